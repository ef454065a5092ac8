"""The provisioned password file and ACL, enforced by a real broker (both modes).

"Delivers nothing" is checked without sleeping: after the forbidden message the same client
sends a permitted one on the same connection and QoS; MQTT keeps a client's messages in order,
so once the permitted one has arrived the forbidden one would have arrived before it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess
from fleetlearn.shared import topics
from tests.conftest import FLEET

pytestmark = pytest.mark.broker


def _client(broker: BrokerProcess, user: str, password: str) -> aiomqtt.Client:
    version = (
        aiomqtt.ProtocolVersion.V5 if broker.kind == "mosquitto" else aiomqtt.ProtocolVersion.V311
    )
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=password,
        identifier=f"{user}-test",
        protocol=version,
        timeout=10,
    )


def _device(broker: BrokerProcess, fleet_dir: Path, dev: str) -> aiomqtt.Client:
    creds = prov.load_device(fleet_dir / "devices" / dev)
    return _client(broker, creds.username, creds.password)


def _aggregator(broker: BrokerProcess, fleet_dir: Path) -> aiomqtt.Client:
    creds = prov.load_aggregator(fleet_dir)
    return _client(broker, creds.username, creds.password)


async def _next(client: aiomqtt.Client, timeout: float = 10) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


async def test_device_publishes_own_status_not_others(
    any_broker: BrokerProcess, fleet_dir: Path
) -> None:
    async with (
        _aggregator(any_broker, fleet_dir) as agg,
        _device(any_broker, fleet_dir, "dev-0001") as dev,
    ):
        await agg.subscribe(f"fl/{FLEET}/dev/+/status", qos=1)
        forbidden = topics.status(FLEET, "dev-0002")
        own = topics.status(FLEET, "dev-0001")
        await dev.publish(forbidden, b"spoofed", qos=1)
        await dev.publish(own, b"mine", qos=1)
        msg = await _next(agg)
        assert str(msg.topic) == own
        assert msg.payload == b"mine"


async def test_device_reads_model_but_not_another_inbox(
    any_broker: BrokerProcess, fleet_dir: Path
) -> None:
    async with (
        _aggregator(any_broker, fleet_dir) as agg,
        _device(any_broker, fleet_dir, "dev-0001") as dev,
    ):
        other_inbox = topics.per_device(FLEET, 3, topics.Kind.INBOX, "dev-0002")
        own_inbox = topics.per_device(FLEET, 3, topics.Kind.INBOX, "dev-0001")
        await agg.publish(topics.model(FLEET), b"release-1", qos=1, retain=True)
        await dev.subscribe(topics.model(FLEET), qos=1)
        msg = await _next(dev)
        assert str(msg.topic) == topics.model(FLEET)
        assert msg.payload == b"release-1"

        # The broker may refuse the subscription outright or accept it and deliver nothing;
        # either way the other device's shares must not reach this one.
        await dev.subscribe(other_inbox, qos=1)
        await dev.subscribe(own_inbox, qos=1)
        await agg.publish(other_inbox, b"not for you", qos=1)
        await agg.publish(own_inbox, b"yours", qos=1)
        msg = await _next(dev)
        assert str(msg.topic) == own_inbox
        assert msg.payload == b"yours"


async def test_device_cannot_publish_model(any_broker: BrokerProcess, fleet_dir: Path) -> None:
    async with (
        _aggregator(any_broker, fleet_dir) as agg,
        _device(any_broker, fleet_dir, "dev-0001") as dev,
    ):
        await agg.subscribe(topics.model(FLEET), qos=1)
        await agg.subscribe(topics.status(FLEET, "dev-0001"), qos=1)
        await dev.publish(topics.model(FLEET), b"forged", qos=1)
        await dev.publish(topics.status(FLEET, "dev-0001"), b"after", qos=1)
        msg = await _next(agg)
        assert str(msg.topic) == topics.status(FLEET, "dev-0001")


async def test_dashboard_reads_metrics_only(any_broker: BrokerProcess, fleet_dir: Path) -> None:
    dash = _client(any_broker, prov.DASHBOARD_USER, prov.dashboard_password(fleet_dir))
    async with _aggregator(any_broker, fleet_dir) as agg, dash:
        await dash.subscribe(f"fl/{FLEET}/#", qos=1)  # wider than its grants
        await dash.subscribe(topics.metrics(FLEET), qos=1)
        await agg.publish(topics.round_announce(FLEET), b"round", qos=1)
        await agg.publish(topics.metrics(FLEET), b"{}", qos=1)
        msg = await _next(dash)
        assert str(msg.topic) == topics.metrics(FLEET)


async def test_dashboard_reads_statuses_not_round_traffic_and_writes_nothing(
    any_broker: BrokerProcess, fleet_dir: Path
) -> None:
    dash = _client(any_broker, prov.DASHBOARD_USER, prov.dashboard_password(fleet_dir))
    async with (
        _aggregator(any_broker, fleet_dir) as agg,
        _device(any_broker, fleet_dir, "dev-0001") as dev,
        dash,
    ):
        await dash.subscribe(f"fl/{FLEET}/#", qos=1)  # wider than its grants
        for topic in topics.dashboard_filters(FLEET):
            await dash.subscribe(topic, qos=1)
        # Forbidden reads: the aggregator's round traffic and model, then a permitted one on
        # the same connection (delivered in order: the forbidden ones would come first).
        await agg.publish(topics.model(FLEET), b"release", qos=1)
        await agg.publish(topics.per_device(FLEET, 3, topics.Kind.INBOX, "dev-0001"), b"x", qos=1)
        await agg.publish(topics.per_round(FLEET, 3, topics.Kind.SURVIVORS), b"x", qos=1)
        await agg.publish(topics.events(FLEET), b"{}", qos=1)
        msg = await _next(dash)
        assert str(msg.topic) == topics.events(FLEET)
        # A device's status reaches the dashboard (its device table). mosquitto delivers a
        # copy per matching subscription (`#` and the grant), so copies of the event may come.
        await dev.publish(topics.status(FLEET, "dev-0001"), b"status", qos=1)
        while str(msg.topic) == topics.events(FLEET):
            msg = await _next(dash)
        assert str(msg.topic) == topics.status(FLEET, "dev-0001")
        assert msg.payload == b"status"

        # The dashboard writes nothing: its QoS 1 publishes are acknowledged (or refused) by
        # the time publish() returns; a device's status sent after them arrives first.
        await agg.subscribe(f"fl/{FLEET}/#", qos=1)
        for topic in (
            topics.metrics(FLEET),
            topics.status(FLEET, "dev-0002"),
            topics.per_device(FLEET, 3, topics.Kind.UPDATE, "dev-0002"),
        ):
            try:
                await dash.publish(topic, b"forged", qos=1)
            except aiomqtt.MqttError:
                pass  # refused outright: as good
        await dev.publish(topics.status(FLEET, "dev-0001"), b"after", qos=1)
        while True:
            msg = await _next(agg)
            if msg.payload == b"after":
                break
            assert msg.payload != b"forged", str(msg.topic)


@pytest.mark.parametrize(
    ("user", "password"),
    [("dev-0001", "wrong-password"), ("intruder", "whatever"), ("dev-0001", "")],
    ids=["wrong-password", "unknown-user", "empty-password"],
)
async def test_bad_credentials_refused_at_connect(
    any_broker: BrokerProcess, fleet_dir: Path, user: str, password: str
) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with _client(any_broker, user, password):
            pass


async def test_anonymous_refused(any_broker: BrokerProcess) -> None:
    client = aiomqtt.Client(any_broker.host, any_broker.port, identifier="anon", timeout=10)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass

"""Client ids are bound to usernames on both brokers: no credential takes over another's session.

A running aggregator service (both its connections) and a device stay connected, and keep
exchanging messages, while another device's credentials connect with each of their client ids,
and while a wrong password tries the same. "Still connected" is read from the links' connect
counters (a connection taken over would have had to reconnect); "still receiving" from the
aggregator's engine, which sees the device go offline and online again after every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.service import AggregatorService
from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess
from fleetlearn.shared import settings, topics, wire
from fleetlearn.transport.mqtt import BrokerAddress, Link
from tests.conftest import FLEET

pytestmark = pytest.mark.broker


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting {timeout:.0f} s for {what}")


def _client(broker: BrokerProcess, user: str, password: str, client_id: str) -> aiomqtt.Client:
    version = (
        aiomqtt.ProtocolVersion.V5 if broker.kind == "mosquitto" else aiomqtt.ProtocolVersion.V311
    )
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=password,
        identifier=client_id,
        protocol=version,
        timeout=10,
    )


async def test_device_credentials_cannot_take_over_other_sessions(
    any_broker: BrokerProcess, fleet_dir: Path, tmp_path: Path
) -> None:
    loaded = settings.load(
        AggregatorSettings,
        sets={
            "broker.url": any_broker.url,
            "broker.protocol": "3.1.1" if any_broker.kind == "embedded" else "auto",
            "fleet.id": FLEET,
            "fleet.dir": str(fleet_dir),
            "state.dir": str(tmp_path / "state"),
            "rounds.count": "1",
            "rounds.cohort": "3",
            "rounds.wait_for_devices": "600",  # two devices online: no round starts
        },
    )
    service = AggregatorService(
        loaded, prov.load_aggregator(fleet_dir), prov.load_registry(fleet_dir)
    )
    device = prov.load_device(fleet_dir / "devices" / "dev-0001")
    intruder = prov.load_device(fleet_dir / "devices" / "dev-0002")
    link = Link(
        BrokerAddress.parse(any_broker.url),
        client_id=device.device_id,
        username=device.username,
        password=device.password,
        protocol="3.1.1",
    )
    running = asyncio.create_task(service.run())
    device_task = asyncio.create_task(link.run())
    status = topics.status(FLEET, device.device_id)

    async def toggle() -> None:
        """The device goes offline and back online; the aggregator must see both."""
        for online in (False, True):
            payload = wire.encode(wire.DeviceStatus(device_id=device.device_id, online=online))
            await link.publish(status, payload)
            await _until(
                lambda online=online: (device.device_id in service.engine.online()) is online,  # type: ignore[misc]
                f"the aggregator to see {device.device_id} {'online' if online else 'offline'}",
            )

    try:
        await _until(
            lambda: service.link.connected.is_set() and service.ingest.connected.is_set(),
            "the aggregator to connect",
        )
        await _until(link.connected.is_set, "the device to connect")
        await toggle()

        # The client ids the aggregator and the device use, the names they had before ids
        # were bound, and the usernames themselves.
        taken = {
            service.link.client_id,
            service.ingest.client_id,
            f"fleetlearn-aggregator-{FLEET}",
            f"fleetlearn-aggregator-{FLEET}-ingest",
            "aggregator",  # the usernames (documented in docs/topics.md)
            "aggregator-ingest",
            device.device_id,
        }
        for client_id in sorted(taken):
            async with _client(any_broker, intruder.username, intruder.password, client_id):
                await toggle()
            # A wrong password under the aggregator's own username, with its client id, is
            # refused before any session is looked up (amqtt used to take the session first).
            for user in ("aggregator", "aggregator-ingest"):
                with pytest.raises(aiomqtt.MqttError):
                    async with _client(any_broker, user, "not-the-password", client_id):
                        pass
            await toggle()

        assert service.link.connects == 1
        assert service.ingest.connects == 1
        assert link.connects == 1
    finally:
        service.stop()
        await link.close()
        device_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await device_task
        async with asyncio.timeout(30):
            await running


async def test_one_connection_per_username(mosquitto: BrokerProcess, fleet_dir: Path) -> None:
    """The binding's other side: a second login with the same credentials replaces the first,
    whatever client id either asks for (why every fleetlearn connection has its own user).
    (amqtt stops serving the first connection too, but leaves its socket open until the
    keepalive expires, so this reads mosquitto's prompt close.)"""
    device = prov.load_device(fleet_dir / "devices" / "dev-0003")
    first = _client(mosquitto, device.username, device.password, "first")
    await first.__aenter__()
    try:
        async with _client(mosquitto, device.username, device.password, "second") as second:
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(10):
                    # The broker closed the first connection; aiomqtt reports it here.
                    await anext(aiter(first.messages))
            await second.publish(topics.status(FLEET, device.device_id), b"x", qos=1)
    finally:
        with contextlib.suppress(aiomqtt.MqttError, RuntimeError):
            await first.__aexit__(None, None, None)


async def test_embedded_answers_mqtt5_at_once(embedded: BrokerProcess, fleet_dir: Path) -> None:
    """An MQTT 5 CONNECT gets "unacceptable protocol version" (amqtt misread it and waited),
    so a client that tries 5 first falls back to 3.1.1 without waiting for its timeout."""
    device = prov.load_device(fleet_dir / "devices" / "dev-0001")
    client = aiomqtt.Client(
        embedded.host,
        embedded.port,
        username=device.username,
        password=device.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
    )
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with client:
            pass
    rc = refused.value.rc
    assert getattr(rc, "value", rc) in (1, 132)  # paho maps 3.1.1's 1 to 5's 132


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x10\xff\xff\xff\x7f", b"\x10\x05\x00\x04MQ", b"\x30\x00"],
    ids=["http", "huge-length", "truncated", "publish-first"],
)
async def test_embedded_drops_garbage_before_connect(
    embedded: BrokerProcess, fleet_dir: Path, garbage: bytes
) -> None:
    reader, writer = await asyncio.open_connection(embedded.host, embedded.port)
    writer.write(garbage)
    await writer.drain()
    writer.write_eof()
    async with asyncio.timeout(20):
        assert await reader.read() in (b"", b"\x20\x02\x00\x01")  # closed (or refused)
    writer.close()
    device = prov.load_device(fleet_dir / "devices" / "dev-0001")
    async with _client(embedded, device.username, device.password, "after-garbage") as client:
        await client.publish(topics.status(FLEET, device.device_id), b"x", qos=1)

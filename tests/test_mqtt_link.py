"""transport.mqtt.Link against a real broker (both modes): delivery, order, robustness, sessions."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess
from fleetlearn.shared import topics
from fleetlearn.transport.mqtt import BrokerAddress, Incoming, Link
from tests.conftest import FLEET

pytestmark = pytest.mark.broker


def _links(
    broker: BrokerProcess, fleet_dir: Path, on_message: object, *, client_id: str = "agg-test"
) -> tuple[Link, Link]:
    agg = prov.load_aggregator(fleet_dir)
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    address = BrokerAddress.parse(broker.url)
    receiver = Link(
        address,
        client_id=client_id,
        username=agg.username,
        password=agg.password,
        subscriptions=[f"fl/{FLEET}/dev/+/status"],
        protocol="3.1.1",
        on_message=on_message,  # type: ignore[arg-type]
    )
    sender = Link(
        address,
        client_id="dev-0001-test",
        username=dev.username,
        password=dev.password,
        protocol="3.1.1",  # "auto" first tries MQTT 5, which the embedded broker ignores
    )
    return receiver, sender


class Inbox:
    """Collects payloads; `wait(n)` returns once n have arrived."""

    def __init__(self) -> None:
        self.messages: list[Incoming] = []
        self._changed = asyncio.Event()

    def add(self, msg: Incoming) -> None:
        self.messages.append(msg)
        self._changed.set()

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_messages_arrive_in_order_and_a_failing_handler_keeps_the_connection(
    any_broker: BrokerProcess, fleet_dir: Path
) -> None:
    inbox = Inbox()

    def handler(msg: Incoming) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        inbox.add(msg)

    receiver, sender = _links(any_broker, fleet_dir, handler)
    tasks = [asyncio.create_task(receiver.run()), asyncio.create_task(sender.run())]
    try:
        await receiver.connected.wait()
        await sender.connected.wait()
        topic = topics.status(FLEET, "dev-0001")
        payloads = [b"boom"] + [i.to_bytes(2, "big") * (1 + 500 * (i % 3)) for i in range(200)]
        await asyncio.gather(*(sender.publish(topic, p, content_type=None) for p in payloads))
        await inbox.wait(200)
        got = inbox.messages
        assert [m.payload for m in got] == payloads[1:]
        assert all(m.topic == topic and type(m.payload) is bytes for m in got)
        assert receiver.connects == 1  # the handler's exception did not cost the connection
        assert receiver.delivered == len(payloads)  # the failing one was delivered too
    finally:
        await receiver.close()
        await sender.close()
        for task in tasks:
            task.cancel()


async def test_messages_sent_while_away_arrive_on_reconnect(
    mosquitto: BrokerProcess, fleet_dir: Path
) -> None:
    inbox = Inbox()
    receiver, sender = _links(mosquitto, fleet_dir, inbox.add, client_id="agg-session")
    task = asyncio.create_task(receiver.run())
    sending = asyncio.create_task(sender.run())
    try:
        await receiver.connected.wait()
        await receiver.close()  # persistent session: the broker keeps its subscription
        await task
        await sender.connected.wait()
        topic = topics.status(FLEET, "dev-0001")
        for i in range(5):
            await sender.publish(topic, b"queued-%d" % i, content_type=None)
        again, _ = _links(mosquitto, fleet_dir, inbox.add, client_id="agg-session")
        task = asyncio.create_task(again.run())
        await inbox.wait(5)
        assert [m.payload for m in inbox.messages] == [b"queued-%d" % i for i in range(5)]
        await again.close()
    finally:
        await sender.close()
        task.cancel()
        sending.cancel()


async def test_mqtt5_publishes_carry_expiry_and_content_type_every_time(
    mosquitto: BrokerProcess, fleet_dir: Path
) -> None:
    import aiomqtt

    agg = prov.load_aggregator(fleet_dir)
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    address = BrokerAddress.parse(mosquitto.url)
    sender = Link(
        address,
        client_id="dev-0001-v5",
        username=dev.username,
        password=dev.password,
        protocol="5",
    )
    topic = topics.status(FLEET, "dev-0001")
    task = asyncio.create_task(sender.run())
    try:
        async with aiomqtt.Client(
            address.host,
            address.port,
            username=agg.username,
            password=agg.password,
            identifier="agg-v5-reader",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as reader:
            await reader.subscribe(topic, qos=1)
            await sender.connected.wait()
            sent = [
                (600, "application/x-a"),
                (600, "application/x-a"),
                (None, "text/x-b"),
                (30, None),
                (None, None),
            ]
            for i, (expiry, content_type) in enumerate(sent):
                await sender.publish(topic, b"%d" % i, expiry=expiry, content_type=content_type)
            got = []
            async with asyncio.timeout(10):
                async for message in reader.messages:
                    props = message.properties
                    got.append(
                        (
                            getattr(props, "MessageExpiryInterval", None),
                            getattr(props, "ContentType", None),
                        )
                    )
                    if len(got) == len(sent):
                        break
        for (expiry, content_type), (got_expiry, got_type) in zip(sent, got, strict=True):
            assert got_type == content_type
            # The broker counts expiry down while it holds a message: at most a second here.
            assert got_expiry is None if expiry is None else expiry - 1 <= got_expiry <= expiry
    finally:
        await sender.close()
        task.cancel()


async def test_a_write_registration_for_a_socket_closed_meanwhile_is_dropped() -> None:
    # paho asks for write readiness, then closes the socket (a disconnect right after a
    # publish) before the loop gets to the registration: nothing may be registered, neither
    # the dead number nor a new socket that took it over, and nothing may be logged.
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    client = aiomqtt.Client("127.0.0.1", 1)
    Link._register_writes_safely(client)
    register = client._client.on_socket_register_write
    first, peer = socket.socketpair()
    register(client._client, None, first)
    first.close()
    peer.close()
    reused, other = socket.socketpair()  # usually gets the closed socket's number
    try:
        await asyncio.sleep(0.01)
        assert errors == []
        for sock in (reused, other):
            with pytest.raises(KeyError):
                loop._selector.get_key(sock.fileno())  # type: ignore[attr-defined]
        register(client._client, None, reused)  # an open socket is registered
        await asyncio.sleep(0.01)
        key = loop._selector.get_key(reused.fileno())  # type: ignore[attr-defined]
        assert key.data[1] is not None  # (reader, writer)
        loop.remove_writer(reused.fileno())
    finally:
        reused.close()
        other.close()

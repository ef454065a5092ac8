"""transport.memory: the MQTT semantics the round protocol relies on, without a broker."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fleetlearn.transport import Endpoint, Incoming, LastWill, LinkAuthError, LinkError, Transport
from fleetlearn.transport.memory import MemoryBroker, topic_matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("fl/a/model", "fl/a/model", True),
        ("fl/a/model", "fl/a/round", False),
        ("fl/+/model", "fl/a/model", True),
        ("fl/+/model", "fl/a/b/model", False),
        ("fl/a/#", "fl/a", True),
        ("fl/a/#", "fl/a/r/1/adv/d", True),
        ("fl/a/#", "fl/b/model", False),
        ("fl/a/dev/+/status", "fl/a/dev/d1/status", True),
        ("fl/a/dev/+/status", "fl/a/dev/d1/health", False),
        ("fl/a", "fl/a/model", False),
        ("fl/a/model/x", "fl/a/model", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


class Client:
    """A link and what it received, running as a task."""

    def __init__(self, broker: MemoryBroker, client_id: str, **kw: object) -> None:
        self.got: list[Incoming] = []
        self.link: Transport = broker.connector(
            Endpoint(
                client_id=client_id,
                username=client_id,
                password="pw",
                on_message=self.got.append,
                **kw,  # type: ignore[arg-type]
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Client:
        self.task = asyncio.create_task(self.link.run())
        async with asyncio.timeout(5):
            await self.link.connected.wait()
        return self

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    def topics(self) -> list[tuple[str, bytes, bool]]:
        return [(m.topic, m.payload, m.retain) for m in self.got]

    async def stop(self) -> None:
        await self.link.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def broker() -> MemoryBroker:
    return MemoryBroker()


async def test_retained_first_then_live_in_order(broker: MemoryBroker) -> None:
    pub = await Client(broker, "pub").start()
    await pub.link.publish("fl/a/model", b"v1", retain=True)
    await pub.link.publish("fl/a/model", b"v2", retain=True)
    sub = await Client(broker, "sub", subscriptions=("fl/a/#",)).start()
    for i in range(5):
        await pub.link.publish(f"fl/a/r/1/adv/d{i}", b"%d" % i)
    await pub.link.publish("fl/b/model", b"other fleet")
    await sub.settle()
    assert sub.topics() == [
        ("fl/a/model", b"v2", True),  # the latest retained, flagged as retained
        *((f"fl/a/r/1/adv/d{i}", b"%d" % i, False) for i in range(5)),
    ]
    # An empty retained payload clears the topic.
    await pub.link.publish("fl/a/model", b"", retain=True)
    assert broker.retained("fl/a/model") is None
    await pub.stop()
    await sub.stop()


async def test_last_will_on_drop_not_on_close(broker: MemoryBroker) -> None:
    watcher = await Client(broker, "watch", subscriptions=("fl/a/dev/+/status",)).start()
    will = LastWill("fl/a/dev/d1/status", b"offline")
    dev = await Client(broker, "d1", will=will).start()
    dev.link.drop(offline_seconds=0.05)  # lost, back after the reconnect delay
    await watcher.settle()
    assert watcher.topics() == [("fl/a/dev/d1/status", b"offline", False)]
    assert broker.retained("fl/a/dev/d1/status") == b"offline"
    async with asyncio.timeout(5):  # it comes back by itself
        await dev.link.connected.wait()
    await dev.stop()
    await watcher.settle()
    assert len(watcher.got) == 1  # a clean close sends no will


async def test_persistent_session_keeps_messages_while_away(broker: MemoryBroker) -> None:
    pub = await Client(broker, "pub").start()
    dev = await Client(broker, "d1", subscriptions=("fl/a/r/+/inbox/d1",)).start()
    dev.link.drop(offline_seconds=0.2)
    await pub.link.publish("fl/a/r/3/inbox/d1", b"shares")
    assert dev.got == []
    async with asyncio.timeout(5):
        await dev.link.connected.wait()
    await dev.settle()
    assert dev.topics() == [("fl/a/r/3/inbox/d1", b"shares", False)]
    # A clean session does not keep them.
    eph = await Client(broker, "e1", subscriptions=("x/#",), persistent=False).start()
    eph.link.drop(offline_seconds=0.2)
    await pub.link.publish("x/1", b"lost")
    async with asyncio.timeout(5):
        await eph.link.connected.wait()
    await eph.settle()
    assert eph.got == []
    for c in (pub, dev, eph):
        await c.stop()


async def test_same_client_id_takes_over(broker: MemoryBroker) -> None:
    will = LastWill("fl/a/dev/d1/status", b"offline")
    first = await Client(broker, "d1", will=will, subscriptions=("t",)).start()
    second = Client(broker, "d1", subscriptions=("t",))
    await second.start()
    assert broker.stats.takeovers == 1
    assert not first.link.connected.is_set()
    assert broker.retained("fl/a/dev/d1/status") == b"offline"  # the first one's will
    await first.stop()  # stop it before it takes the id back
    pub = await Client(broker, "pub").start()
    await pub.link.publish("t", b"x")
    await second.settle()
    assert second.topics() == [("t", b"x", False)]
    assert first.got == []
    for c in (second, pub):
        await c.stop()


async def test_authentication_and_acl() -> None:
    def authorize(user: str | None, topic: str, action: str) -> bool:
        return action == "read" or topic.startswith(f"dev/{user}/")

    broker = MemoryBroker(authenticate=lambda u, p: p == "pw", authorize=authorize)
    bad = broker.connector(Endpoint(client_id="x", username="x", password="nope"))
    with pytest.raises(LinkAuthError):
        await bad.run()
    sub = await Client(broker, "sub", subscriptions=("dev/#",)).start()
    d1 = await Client(broker, "d1").start()
    await d1.link.publish("dev/d1/status", b"mine")
    await d1.link.publish("dev/d2/status", b"forged")  # dropped silently, counted
    await sub.settle()
    assert sub.topics() == [("dev/d1/status", b"mine", False)]
    assert broker.stats.denied == 1
    for c in (sub, d1):
        await c.stop()


async def test_publish_without_connection_times_out(broker: MemoryBroker) -> None:
    link = broker.connector(Endpoint(client_id="x", username="x", password=None))
    with pytest.raises(LinkError):
        await link.publish("t", b"x", wait=0.05)


async def test_failing_handler_costs_only_that_message(broker: MemoryBroker) -> None:
    got: list[str] = []

    def handler(message: Incoming) -> None:
        if message.payload == b"bad":
            raise RuntimeError("handler bug")
        got.append(message.topic)

    sub = broker.connector(
        Endpoint(
            client_id="s", username="s", password=None, subscriptions=("t/#",), on_message=handler
        )
    )
    task = asyncio.create_task(sub.run())
    await sub.connected.wait()
    pub = await Client(broker, "pub").start()
    for payload in (b"ok", b"bad", b"ok"):
        await pub.link.publish("t/1", payload)
    await pub.settle()
    assert got == ["t/1", "t/1"]
    assert sub.connected.is_set()
    await sub.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await pub.stop()

"""An in-process broker with MQTT's semantics: the aggregator and devices in one test, no network.

    broker = MemoryBroker()
    service = AggregatorService(settings, creds, registry, connector=broker.connector)
    agent = DeviceAgent(participant=p, password=pw, data=d, connector=broker.connector)

What it keeps of MQTT, because the round protocol relies on it:
- topic filters with `+` and `#`; per-publisher order of delivery;
- retained messages (an empty retained payload clears one), delivered with `retain=True` to a
  new subscription and with `retain=False` to subscriptions that already exist;
- one live connection per client id: a second connection with the same id takes over, and the
  first one sees its connection lost (its last will is published);
- last wills on a lost connection (`drop()`), none on a clean `close()`;
- persistent sessions: a client that comes back under the same id with `persistent` gets the
  messages published for it while it was away (up to `MAX_QUEUED` per session, then the oldest
  go, as a broker's `max_queued_messages` does);
- optional `authenticate(username, password)` and `authorize(username, topic, action)`, standing
  in for the password file and the ACL: a refused login raises `LinkAuthError` from `run()`; a
  publish the ACL refuses is dropped silently and counted, as mosquitto does.
What it leaves out: QoS levels (every message is delivered once), message expiry, packet size
limits, MQTT 5 properties (content types are accepted and ignored).

Rules: delivery goes through the event loop (`call_soon`), never re-entrantly from `publish`,
so a handler sees messages the way it would from a socket. One broker belongs to one event
loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fleetlearn.transport.base import (
    MSGPACK_CONTENT_TYPE,
    Endpoint,
    Incoming,
    LinkAuthError,
    LinkError,
    Transport,
)

MAX_QUEUED = 10_000
RECONNECT_DELAY = 0.5  # seconds a link waits after losing its connection, as a client backs off
Action = Literal["read", "write"]

log = logging.getLogger("fleetlearn.transport.memory")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: `+` is one level, a final `#` this level and all below."""
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, part in enumerate(want):
        if part == "#":
            return i == len(want) - 1
        if i >= len(have):
            return False
        if part not in ("+", have[i]):
            return False
    return len(want) == len(have)


@dataclass
class _Session:
    filters: tuple[str, ...]
    persistent: bool
    queued: collections.deque[Incoming] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_QUEUED)
    )


@dataclass
class BrokerStats:
    published: int = 0
    delivered: int = 0
    denied: int = 0  # publishes the ACL refused
    takeovers: int = 0


class MemoryBroker:
    """Routes messages between `MemoryLink`s made by `connector`."""

    def __init__(
        self,
        *,
        authenticate: Callable[[str | None, str | None], bool] | None = None,
        authorize: Callable[[str | None, str, Action], bool] | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._authorize = authorize
        self._retained: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._live: dict[str, MemoryLink] = {}
        self.stats = BrokerStats()

    def connector(self, endpoint: Endpoint) -> Transport:
        """A `transport.Connector`: a link of this broker for `endpoint`."""
        return MemoryLink(self, endpoint)

    def retained(self, topic: str) -> bytes | None:
        return self._retained.get(topic)

    # ------------------------------------------------------------------ called by the links

    def _connect(self, link: MemoryLink) -> None:
        ep = link.endpoint
        if self._authenticate is not None and not self._authenticate(ep.username, ep.password):
            raise LinkAuthError(f"memory broker refused {ep.username!r}")
        previous = self._live.get(ep.client_id)
        if previous is not None and previous is not link:
            self.stats.takeovers += 1
            self._disconnect(previous, will=True)
            previous.lose()
        session = self._sessions.get(ep.client_id)
        if session is None or not ep.persistent or not session.persistent:
            session = _Session(filters=(), persistent=ep.persistent)
        session.filters = tuple(ep.subscriptions)
        self._sessions[ep.client_id] = session
        self._live[ep.client_id] = link
        loop = asyncio.get_running_loop()
        while session.queued:
            loop.call_soon(link.deliver, session.queued.popleft())
        for topic, payload in self._retained.items():
            if self._may(ep.username, topic, "read") and any(
                topic_matches(f, topic) for f in session.filters
            ):
                loop.call_soon(link.deliver, Incoming(topic, payload, True))

    def _disconnect(self, link: MemoryLink, *, will: bool) -> None:
        ep = link.endpoint
        if self._live.get(ep.client_id) is not link:
            return
        del self._live[ep.client_id]
        if not ep.persistent:
            self._sessions.pop(ep.client_id, None)
        if will and ep.will is not None:
            self._route(ep.will.topic, ep.will.payload, retain=ep.will.retain, sender=ep)

    def _route(self, topic: str, payload: bytes, *, retain: bool, sender: Endpoint) -> None:
        if not self._may(sender.username, topic, "write"):
            self.stats.denied += 1
            return
        self.stats.published += 1
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        loop = asyncio.get_running_loop()
        for client_id, session in self._sessions.items():
            if not any(topic_matches(f, topic) for f in session.filters):
                continue
            live = self._live.get(client_id)
            if not self._may(live.endpoint.username if live else None, topic, "read"):
                continue
            message = Incoming(topic, payload, False)
            if live is not None:
                loop.call_soon(live.deliver, message)
            elif session.persistent:
                session.queued.append(message)

    def _requeue(self, link: MemoryLink, message: Incoming) -> None:
        """A message that reached a link after it lost its connection waits in its session."""
        session = self._sessions.get(link.endpoint.client_id)
        if session is not None and session.persistent:
            session.queued.append(message)

    def _may(self, username: str | None, topic: str, action: Action) -> bool:
        return self._authorize is None or self._authorize(username, topic, action)


class MemoryLink:
    """One client connection to a `MemoryBroker`; a `transport.Transport`."""

    def __init__(self, broker: MemoryBroker, endpoint: Endpoint) -> None:
        self._broker = broker
        self.endpoint = endpoint
        self.client_id = endpoint.client_id
        self.connected = asyncio.Event()
        self.version: Literal["5", "3.1.1"] | None = None
        self.connects = 0
        self.delivered = 0
        self._closing = False
        self._lost = asyncio.Event()
        self._resume_at = 0.0

    @property
    def mqtt5(self) -> bool:
        return self.version == "5"

    @property
    def peer(self) -> str:
        return "memory broker"

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
        content_type: str | None = MSGPACK_CONTENT_TYPE,
        wait: float = 30.0,
    ) -> None:
        if not self.connected.is_set():
            try:
                async with asyncio.timeout(wait):
                    await self.connected.wait()
            except TimeoutError:
                raise LinkError(f"{self.client_id}: not connected within {wait:.0f} s") from None
        self._broker._route(topic, bytes(payload), retain=retain, sender=self.endpoint)
        await asyncio.sleep(0)  # a publish yields, as a socket write would

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            pause = self._resume_at - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            self._lost = asyncio.Event()
            self._broker._connect(self)
            self.version = "3.1.1" if self.endpoint.protocol == "3.1.1" else "5"
            self.connects += 1
            self.connected.set()
            try:
                if self.endpoint.on_connect is not None:
                    await self.endpoint.on_connect()
                await self._lost.wait()
            finally:
                self.connected.clear()

    def drop(self, offline_seconds: float) -> None:
        self._resume_at = asyncio.get_running_loop().time() + offline_seconds
        self.connected.clear()
        self._broker._disconnect(self, will=True)
        self.lose()

    async def close(self) -> None:
        self._closing = True
        self._broker._disconnect(self, will=False)
        self.lose()

    def lose(self) -> None:
        """The connection is gone (dropped, closed, or taken over by the same client id)."""
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to reconnect
            now = asyncio.get_running_loop().time()
            self._resume_at = max(self._resume_at, now + RECONNECT_DELAY)
        self.connected.clear()
        self._lost.set()

    def deliver(self, message: Incoming) -> None:
        if not self.connected.is_set():
            self._broker._requeue(self, message)
            return
        if self.endpoint.on_message is None:
            return
        self.delivered += 1
        self._broker.stats.delivered += 1
        try:
            self.endpoint.on_message(message)
        except Exception:
            log.exception("%s: the message handler failed on %s", self.client_id, message.topic)

"""The MQTT link: one aiomqtt connection that stays up, for devices and the aggregator alike.

What it owns:
- Connecting with credentials, a last will, and a persistent session (MQTT 5 session expiry, or
  clean_session=False on 3.1.1), so QoS 1 messages sent while a device was away are delivered
  when it returns.
- Protocol choice: `auto` tries MQTT 5 and falls back to 3.1.1 when the broker does not speak it
  (the embedded broker). With MQTT 5, publishes carry message expiry, content type and a
  schema-version user property; with 3.1.1 the same payloads go without properties.
- Reconnecting with exponential backoff and full jitter (so a fleet that lost its broker does not
  return in lockstep), re-subscribing, and calling `on_connect` each time (e.g. to republish
  status). Authentication failures are not retried forever: they raise `LinkAuthError`.
- Handing each incoming message to a callback, straight from paho's `on_message` on the event
  loop's thread; the callback must be quick (queue and return).

This is the one file that touches paho's and aiomqtt's internals (the socket, paho's callbacks,
read and write registration; see `_make_client`): they are what made 1000-device rounds cheap,
and they are why pyproject.toml pins both libraries to the major versions tested here
(aiomqtt 2.x, paho-mqtt 2.x; aiomqtt 3 drops paho). Everything else sees `transport.Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetlearn.transport.base import (
    DEFAULT_BACKOFF,
    MSGPACK_CONTENT_TYPE,
    SESSION_EXPIRY_SECONDS,
    Backoff,
    BrokerAddress,
    Connector,
    Endpoint,
    Incoming,
    LastWill,
    LinkAuthError,
    LinkError,
    MqttVersion,
    Transport,
)

PENDING_PUBLISH_WARNING = 100
READ_BURST = 64  # incoming packets taken per wakeup of the socket, at most
RETRY_WARNING_EVERY = 30.0  # seconds between warnings while a connection keeps failing
# CONNACK codes that mean "wrong credentials / not allowed": retrying will not help.
_AUTH_CODES = {4, 5, 134, 135}
_VERSION_CODES = {1, 132}

log = logging.getLogger("fleetlearn.mqtt")


class _PackedProperties(Properties):
    """Publish properties packed once. paho packs a Properties object again for every
    publish, looking up each of the 27 property names by string; the sets a link uses never
    change once built, so their bytes are kept."""

    def __init__(self, *, expiry: int | None, content_type: str | None) -> None:
        super().__init__(PacketTypes.PUBLISH)
        if content_type is not None:
            self.ContentType = content_type
        if expiry is not None:
            self.MessageExpiryInterval = int(expiry)
        object.__setattr__(self, "_packed", super().pack())

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed


class Link:
    """A self-healing MQTT connection. Use `run()` as a task; `publish()` from anywhere."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        subscriptions: Sequence[str] = (),
        will: LastWill | None = None,
        protocol: MqttVersion = "auto",
        persistent: bool = True,
        on_message: Callable[[Incoming], None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
        ca_file: str | None = None,
        keepalive: int = 30,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self._username = username
        self._password = password
        self._subscriptions = tuple(subscriptions)
        self._will = will
        self._protocol: MqttVersion = protocol
        self._persistent = persistent
        self._on_message = on_message
        self._on_connect = on_connect
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._ca_file = ca_file
        self._keepalive = keepalive
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._closing = False
        self.connects = 0
        self.version: Literal["5", "3.1.1"] | None = None
        self._resume_at = 0.0  # loop time before which run() does not reconnect (see drop())
        self._properties: dict[tuple[int | None, str | None], _PackedProperties] = {}
        self.delivered = 0  # messages handed to on_message

    # --------------------------------------------------------------------------------- public

    @property
    def mqtt5(self) -> bool:
        return self.version == "5"

    @property
    def peer(self) -> str:
        return str(self.address)

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
        """Publish once connected (waiting up to `wait` s); raises LinkError if that fails.

        On MQTT 5 the publish carries `content_type` and `expiry` as properties when given.
        Round traffic passes `content_type=None`: thousands of those messages cross the
        aggregator per round, and every property costs pure-Python decoding on both ends
        (the payload already names its schema version and type)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LinkError(f"not connected to {self.address} within {wait:.0f} s")
            if not self.connected.is_set():
                try:
                    async with asyncio.timeout(remaining):
                        await self.connected.wait()
                except TimeoutError:
                    continue
            client = self._client
            if client is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await client.publish(
                    topic,
                    payload,
                    qos=qos,
                    retain=retain,
                    properties=self._publish_properties(expiry, content_type),
                    timeout=max(1.0, remaining),
                )
                return
            except aiomqtt.MqttError as exc:
                log.debug(
                    "%s: publish to %s failed (%s); waiting for reconnect",
                    self.client_id,
                    topic,
                    exc,
                )
                self.connected.clear()
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        """Connect, subscribe, deliver messages; reconnect on loss until `close()`.

        A lost or refused connection is logged as a warning with the reason: the first
        failure, a changed reason, and then every `RETRY_WARNING_EVERY` seconds while it
        lasts (each retry is logged at INFO), so an operator sees why a process waits."""
        attempt = 0
        loop = asyncio.get_running_loop()
        warned_at, warned_reason = -math.inf, ""
        while not self._closing:
            pause = self._resume_at - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                await self._session()
                attempt = 0
            except LinkAuthError:
                raise
            except (aiomqtt.MqttError, OSError) as exc:
                if self._closing:
                    break
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                reason = str(exc) or type(exc).__name__
                now = loop.time()
                level = logging.INFO
                if reason != warned_reason or now - warned_at >= RETRY_WARNING_EVERY:
                    level, warned_at, warned_reason = logging.WARNING, now, reason
                log.log(
                    level,
                    "%s: connection to %s lost or refused (%s); retry %d in %.2f s",
                    self.client_id,
                    self.address,
                    reason,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self._client = None

    def drop(self, offline_seconds: float) -> None:
        """Lose the connection abruptly, as a failing radio would (the broker then publishes
        the last will), and stay away `offline_seconds` before reconnecting."""
        loop = asyncio.get_running_loop()
        self._resume_at = loop.time() + offline_seconds
        client = self._client
        if client is None:
            return
        sock = client._client.socket()  # paho's socket
        if isinstance(sock, socket.socket):
            # A FIN without a DISCONNECT packet: the broker sees the connection lost (and
            # publishes the will); paho notices on its next read and closes it itself.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        """Stop reconnecting and disconnect cleanly (the broker then does NOT send the will)."""
        self._closing = True
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, RuntimeError):
                await client.__aexit__(None, None, None)

    # -------------------------------------------------------------------------------- private

    def _publish_properties(
        self, expiry: int | None, content_type: str | None
    ) -> Properties | None:
        if not self.mqtt5 or (expiry is None and content_type is None):
            return None
        # paho's Properties are slow to build and to pack; a link uses a handful of sets.
        key = (expiry, content_type)
        props = self._properties.get(key)
        if props is None:
            props = self._properties[key] = _PackedProperties(
                expiry=expiry, content_type=content_type
            )
        return props

    def _make_client(self, version: Literal["5", "3.1.1"]) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, qos=1, retain=self._will.retain
            )
        kwargs: dict[str, object] = {}
        if version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS if self._persistent else 0
            kwargs["properties"] = props
            kwargs["clean_start"] = not self._persistent
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V5
        else:
            kwargs["clean_session"] = not self._persistent
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V311
        if self.address.tls:
            kwargs["tls_context"] = ssl.create_default_context(cafile=self._ca_file)
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            will=will,
            keepalive=self._keepalive,
            timeout=15,
            **kwargs,  # type: ignore[arg-type]
        )
        # aiomqtt warns (and counts its pending calls, O(n)) on every publish beyond 10 in
        # flight; the aggregator publishes a stage's inbox messages 20 at a time, on purpose.
        client.pending_calls_threshold = PENDING_PUBLISH_WARNING
        if not log.isEnabledFor(logging.DEBUG):
            # paho formats a debug line for every packet it sends or receives (three calls
            # each, thousands per round at the aggregator); keep them only when debugging.
            client._client.disable_logger()
        if self._on_message is not None:
            # Take messages from paho's callback, set before connecting (a persistent
            # session's queued messages arrive right after CONNACK). aiomqtt's own path wraps
            # each one in a Message, queues it and wakes a task per message in its iterator:
            # a tenth of the aggregator's MQTT CPU at 1000 devices (bench: 4000 in, 2000 out).
            client._client.on_message = self._deliver
            self._read_in_bursts(client._client)
        self._register_writes_safely(client)
        return client

    @staticmethod
    def _register_writes_safely(client: aiomqtt.Client) -> None:
        """Register paho's socket for writing only if it is still open when the loop gets to it.

        aiomqtt schedules the registration (paho may ask from another thread) by file number.
        When paho closes the socket before the loop runs it, as on a disconnect right after a
        publish, the loop logged EBADF tracebacks (hundreds of devices stopping at once in
        firmware_sim), or, had the number been reused by a new connection, would have taken
        over that connection's writer."""
        loop = client._loop

        def on_register_write(paho: mqtt.Client, _userdata: object, sock: object) -> None:
            fileno = sock.fileno()  # type: ignore[attr-defined]

            def write() -> None:
                try:
                    paho.loop_write()
                except Exception as exc:  # a broken pipe: the connection is gone
                    if not client._disconnected.done():  # a new future per connection
                        client._disconnected.set_exception(exc)

            def register() -> None:
                if fileno >= 0 and sock.fileno() == fileno:  # type: ignore[attr-defined]
                    loop.add_writer(fileno, write)

            loop.call_soon_threadsafe(register)

        client._client.on_socket_register_write = on_register_write

    def _read_in_bursts(self, paho_client: mqtt.Client) -> None:
        """Let one wakeup of the socket take up to READ_BURST incoming messages.

        aiomqtt calls paho's loop_read() once per readable event, and paho then reads at most
        one packet on a connection that only receives. Every message then cost a full turn of
        the event loop and a wakeup of whoever consumes them, which at 5000 messages a round
        was a tenth of the aggregator's CPU. Reading on while each read delivers a message
        (and stopping at the first read that does not: no data, a partial packet, or a
        control packet) lets the consumer take them in batches."""
        read_once = paho_client.loop_read

        def loop_read(max_packets: int = 1) -> mqtt.MQTTErrorCode:
            rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            for _ in range(READ_BURST):
                before = self.delivered
                rc = read_once()
                if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or self.delivered == before:
                    break
            return rc

        paho_client.loop_read = loop_read  # type: ignore[method-assign]

    def _deliver(self, _client: object, _userdata: object, message: MQTTMessage) -> None:
        """paho's on_message: runs on the event loop's thread, inside aiomqtt's read callback."""
        assert self._on_message is not None
        self.delivered += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        try:
            self._on_message(Incoming(topic, bytes(message.payload), bool(message.retain)))
        except Exception:
            # Raising here would make paho drop the connection; one bad message must not.
            log.exception("%s: the message handler failed on %s", self.client_id, topic)

    async def _connect(self) -> aiomqtt.Client:
        versions: list[Literal["5", "3.1.1"]]
        if self._protocol == "auto":
            versions = [self.version] if self.version else ["5", "3.1.1"]
        else:
            versions = [self._protocol]
        last: Exception | None = None
        for version in versions:
            client = self._make_client(version)
            try:
                await client.__aenter__()
            except aiomqtt.MqttCodeError as exc:
                rc = exc.rc
                code = int(rc.value) if isinstance(rc, ReasonCode) else int(rc or 0)
                if code in _AUTH_CODES:
                    raise LinkAuthError(
                        f"{self.address} refused {self._username!r}: "
                        "wrong credentials or not allowed"
                    ) from None
                last = exc
                if code in _VERSION_CODES:
                    continue
                raise
            except aiomqtt.MqttError as exc:
                # A broker may also drop an MQTT 5 CONNECT without a CONNACK.
                last = exc
                continue
            self.version = version
            return client
        assert last is not None
        raise last

    async def _session(self) -> None:
        client = await self._connect()
        self._client = client
        try:
            for topic in self._subscriptions:
                await client.subscribe(topic, qos=1)
            self.connects += 1
            self.connected.set()
            if self._on_connect is not None:
                await self._on_connect()
            # Messages go to `_deliver` straight from paho; this only ends when the
            # connection does (aiomqtt then raises MqttError).
            async for _ in client.messages:
                pass
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            self._client = None
        if not self._closing:
            raise aiomqtt.MqttError("disconnected")


def connector(
    address: BrokerAddress, *, ca_file: str | None = None, backoff: Backoff = DEFAULT_BACKOFF
) -> Connector:
    """A `Connector` that opens `Link`s to the broker at `address`."""

    def connect(endpoint: Endpoint) -> Transport:
        return Link(
            address,
            client_id=endpoint.client_id,
            username=endpoint.username,
            password=endpoint.password,
            subscriptions=endpoint.subscriptions,
            will=endpoint.will,
            protocol=endpoint.protocol,
            persistent=endpoint.persistent,
            on_message=endpoint.on_message,
            on_connect=endpoint.on_connect,
            backoff=backoff,
            ca_file=ca_file,
        )

    return connect

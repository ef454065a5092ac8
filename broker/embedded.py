"""The embedded broker: amqtt (MQTT 3.1.1) with fleetlearn's password file and ACL.

It exists so that `pip install fleetlearn` alone runs the demo on a machine without mosquitto.
It enforces the same `passwd` ($7$ hashes) and `acl` files that `provision` writes for
mosquitto, through two small amqtt plugins, and binds client ids to usernames as mosquitto's
`use_username_as_clientid` does. It lacks MQTT 5, shared subscriptions and persistence, and is
roughly half as fast as mosquitto, so production and load tests use mosquitto.

The binding cannot be a plugin: amqtt looks up, deletes or takes over the session named by the
CONNECT's client id *before* it asks the auth plugins, and takes it over even when they refuse.
`FleetBroker` therefore reads each CONNECT first, whole, by its declared length (`_admit`): it
refuses bad credentials before amqtt sees the connection, and hands amqtt the same CONNECT with
the client id replaced by the username. It also answers an MQTT 5 CONNECT with "unacceptable
protocol version" at once, as MQTT 3.1.1 says: amqtt misread its properties and waited for
bytes that never came, so clients trying 5 first (`Link(protocol="auto")`) fell back to 3.1.1
only after their own timeout. This overrides amqtt's private `Broker._client_connected`, so
pyproject pins the amqtt version it was written against, and tests/test_broker_identity.py
fails if the binding breaks.

Run it as `python -m broker.embedded --host 127.0.0.1 --port 1883 [--passwd F --acl F]`; the
runner starts it that way, in its own process, like mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.mqtt.connack import NOT_AUTHORIZED, UNACCEPTABLE_PROTOCOL_VERSION, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from fleetlearn.broker.acl import Access, Acl
from fleetlearn.broker.provision import check_password

log = logging.getLogger("fleetlearn.broker.embedded")
CONNECT_TIMEOUT = 10.0  # seconds a new connection has to send its CONNECT
MAX_CONNECT_BYTES = 256 * 1024  # ids, credentials and a last will: a status message
MQTT_311 = 4  # protocol level; amqtt speaks nothing else


class PasswordFile:
    """The users and `$7$` hashes of a mosquitto passwd file."""

    def __init__(self, path: Path | str) -> None:
        self._hashes: dict[str, str] = {}
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            user, sep, hashed = line.strip().partition(":")
            if sep:
                self._hashes[user] = hashed
        self._verified: dict[tuple[str, str], bool] = {}

    async def check(self, user: str | None, password: str | None) -> bool:
        if not user or password is None:
            return False
        hashed = self._hashes.get(user)
        if hashed is None:
            return False
        key = (user, password)
        if key not in self._verified:
            # PBKDF2 costs ~1 ms; off the loop, and remembered so reconnect storms stay cheap.
            self._verified[key] = await asyncio.to_thread(check_password, password, hashed)
        return self._verified[key]


class PasswdAuthPlugin(BaseAuthPlugin):
    """Accepts a session only with a username and password matching the mosquitto passwd file,
    and a client id equal to the username (FleetBroker makes it so; this re-checks)."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._passwords = PasswordFile(self.config.password_file)

    async def authenticate(self, *, session: Session) -> bool | None:
        if session.client_id != session.username:
            return False
        return await self._passwords.check(session.username, session.password)


class _Replay(ReaderAdapter):
    """A reader that first returns `head` (the CONNECT, re-encoded), then reads on."""

    def __init__(self, head: bytes, reader: ReaderAdapter) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return await self._reader.read(n)
        if n < 0:
            data, self._head = self._head, b""
            return data + await self._reader.read(n)
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += await self._reader.read(n - len(data))
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class _Bytes(ReaderAdapter):
    """A reader over bytes already received (amqtt's parsers read from a ReaderAdapter)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data)
        data, self._data = self._data[:n], self._data[n:]
        return data

    def feed_eof(self) -> None:
        self._data = b""


async def _read_connect(reader: ReaderAdapter) -> tuple[bytes, bytes]:
    """The first packet's fixed header and body, read whole by its declared length;
    ValueError unless it is a CONNECT."""
    header = await MQTTFixedHeader.from_stream(reader)
    if header is None or header.packet_type != CONNECT:
        raise ValueError("the first packet is not a CONNECT")
    if header.remaining_length > MAX_CONNECT_BYTES:
        raise ValueError(f"a CONNECT of {header.remaining_length} bytes")
    body = await reader.read(header.remaining_length) if header.remaining_length else b""
    if len(body) != header.remaining_length:
        raise ValueError("the connection closed inside its CONNECT")
    return bytes(header.to_bytes()), bytes(body)


class FleetBroker(Broker):
    """amqtt's broker with credentials checked, and the client id bound to the username,
    before any session is looked up (see the module docstring)."""

    def __init__(self, config: dict[str, Any], passwords: PasswordFile | None) -> None:
        super().__init__(config)
        self._passwords = passwords

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                header, body = await _read_connect(reader)
            head = await self._admit(header, body, writer)
        except Exception as exc:  # garbage, a timeout, a closed socket: untrusted input
            log.info("dropped a connection that sent no valid CONNECT (%s)", exc)
            await writer.close()
            return
        if head is not None:
            await super()._client_connected(listener_name, _Replay(head, reader), writer)

    async def _admit(self, header: bytes, body: bytes, writer: WriterAdapter) -> bytes | None:
        """The CONNECT amqtt gets to see, or None after refusing the connection."""
        # The body opens with the protocol name (length 4, "MQTT"), then the protocol level.
        if body[:6] != b"\x00\x04MQTT" or body[6:7] != bytes([MQTT_311]):
            # MQTT 3.1.1: answer "unacceptable protocol version" and close; an MQTT 5 client
            # then retries with 3.1.1 (paho reads this answer as "unsupported version").
            await ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION).to_stream(writer)
            await writer.close()
            return None
        if self._passwords is None:  # anonymous broker: no username to bind to
            return header + body
        connect = await ConnectPacket.from_stream(_Bytes(header + body))
        if not await self._passwords.check(connect.username, connect.password):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            return None
        assert connect.username is not None  # check() refuses a CONNECT without one
        connect.client_id = connect.username  # only ever your own session
        return bytes(connect.to_bytes())


class AclTopicPlugin(BaseTopicPlugin):
    """Enforces a mosquitto ACL file on publish, subscribe and delivery."""

    @dataclass
    class Config:
        acl_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._acl = Acl.load(self.config.acl_file)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None:
            return False
        want = Access.WRITE if action == Action.PUBLISH else Access.READ
        return self._acl.allowed(session.username, session.client_id, topic, want)


@dataclass(slots=True)
class EmbeddedConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    password_file: Path | None = None
    acl_file: Path | None = None
    extra_plugins: dict[str, Any] = field(default_factory=dict)

    def amqtt_config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self.password_file is not None:
            plugins["fleetlearn.broker.embedded.PasswdAuthPlugin"] = {
                "password_file": str(self.password_file)
            }
        else:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        if self.acl_file is not None:
            plugins["fleetlearn.broker.embedded.AclTopicPlugin"] = {"acl_file": str(self.acl_file)}
        plugins.update(self.extra_plugins)
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": 10_000,
                }
            },
            "plugins": plugins,
        }


async def serve(config: EmbeddedConfig, stop: asyncio.Event) -> None:
    passwords = None if config.password_file is None else PasswordFile(config.password_file)
    broker = FleetBroker(config.amqtt_config(), passwords)
    await broker.start()
    print(f"embedded broker (amqtt) listening on {config.host}:{config.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.embedded")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--passwd", type=Path)
    parser.add_argument("--acl", type=Path)
    args = parser.parse_args(argv)
    # amqtt logs every packet at INFO; keep its chatter out of the fleet's output.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = EmbeddedConfig(
        host=args.host, port=args.port, password_file=args.passwd, acl_file=args.acl
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every transport shares: the `Transport` protocol, message values, errors, addresses.

A transport is one client connection to a publish/subscribe broker, owned by one party (the
aggregator has two, each device one). The round logic never sees more of the network than
this protocol: publish a payload, receive `Incoming` messages through a callback, learn when
the connection (re)opens, close. `transport.mqtt.Link` is the real one (aiomqtt/paho);
`transport.memory` routes between links in one process with the same semantics (retained
messages, last wills, persistent sessions, one connection per client id), so the aggregator
and devices can be run together in a test without a broker.

Rules: nothing here imports an MQTT library, so configuration code can parse broker URLs and
check CA files on a machine that will never connect. Callbacks run on the event loop's thread
and must be quick (queue and return); a failing callback costs that message, never the
connection. `Transport.publish` waits for a connection up to `wait` seconds and otherwise
raises `LinkError`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

from fleetlearn.shared.errors import ConfigError, FleetlearnError

MqttVersion = Literal["auto", "5", "3.1.1"]  # what to speak; "auto" tries 5, then 3.1.1
MSGPACK_CONTENT_TYPE = "application/vnd.fleetlearn.v1+msgpack+zstd"
JSON_CONTENT_TYPE = "application/json"
SESSION_EXPIRY_SECONDS = 3600


class LinkError(FleetlearnError):
    """The link cannot do what was asked (not connected in time, closed...)."""


class LinkAuthError(LinkError):
    """The broker refused our credentials."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str, *, key: str = "--broker") -> BrokerAddress:
        """`mqtt://host:port` or `mqtts://host:port` (TLS); the port defaults to 1883/8883."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(key, f"{url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(key, f"{url!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(key, f"{url!r} has an invalid port") from None
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ConfigError(key, f"{url!r}: give only scheme, host and port")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def listen_host(text: str) -> str:
    """An argparse type for an address to listen on: an IP address, or a name this machine
    resolves (the commands that serve: `fleetlearn broker`, `fleetlearn dashboard`)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        try:
            socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an IP address nor a name this machine resolves"
            ) from None
    return text


def check_ca_file(path: str, key: str) -> None:
    """Refuse, before connecting, a CA file the TLS context could not load (a reconnect loop
    would otherwise retry the same error forever)."""
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(
            key, f"cannot use {path} as a CA certificate: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise ConfigError(key, f"cannot use {path!r} as a CA certificate: {exc}") from None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**attempt))."""

    base: float = 0.25
    cap: float = 10.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.base * (2 ** min(attempt, 30))))


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Who connects and what it wants: everything a transport needs besides the network."""

    client_id: str
    username: str | None
    password: str | None
    subscriptions: tuple[str, ...] = ()
    will: LastWill | None = None
    protocol: MqttVersion = "auto"
    # Keep the session (subscriptions and queued QoS 1 messages) while disconnected.
    persistent: bool = True
    on_message: Callable[[Incoming], None] | None = field(default=None, compare=False)
    on_connect: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)


class Transport(Protocol):
    """One self-healing client connection. Run `run()` as a task; `publish()` from anywhere."""

    client_id: str
    connected: asyncio.Event
    version: Literal["5", "3.1.1"] | None

    @property
    def mqtt5(self) -> bool: ...

    @property
    def peer(self) -> str:
        """Where this connects to, for log lines."""
        ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
        content_type: str | None = ...,
        wait: float = 30.0,
    ) -> None: ...

    async def run(self) -> None:
        """Connect, subscribe, deliver; reconnect on loss until `close()`. Raises
        `LinkAuthError` when the credentials are refused."""
        ...

    def drop(self, offline_seconds: float) -> None:
        """Lose the connection abruptly (the broker publishes the last will) and stay away
        `offline_seconds` before reconnecting: a failing radio, for simulations."""
        ...

    async def close(self) -> None:
        """Stop reconnecting and disconnect cleanly (no last will)."""
        ...


Connector = Callable[[Endpoint], Transport]
"""Makes a transport for an endpoint: `transport.mqtt.connector(address)` for a broker,
`MemoryBroker.connector` in tests. Services take one, so the network is a parameter."""

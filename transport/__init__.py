"""The network, behind a small interface: `Transport` (one client connection) and `Connector`.

- `transport.base`: the protocol, the values it carries (`Incoming`, `LastWill`, `Endpoint`),
  `BrokerAddress` and the link errors; imports no MQTT library.
- `transport.mqtt`: `Link`, the MQTT implementation (aiomqtt + paho, their internals confined
  there), and `connector(address)`.
- `transport.memory`: `MemoryBroker`, an in-process broker with MQTT's semantics for tests.

Dependency rule (checked by scripts/check): `transport` imports only `shared`; `aggregator` and
`device` reach the network only through it.
"""

from fleetlearn.transport.base import (
    JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
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
    check_ca_file,
    listen_host,
)

__all__ = [
    "JSON_CONTENT_TYPE",
    "MSGPACK_CONTENT_TYPE",
    "Backoff",
    "BrokerAddress",
    "Connector",
    "Endpoint",
    "Incoming",
    "LastWill",
    "LinkAuthError",
    "LinkError",
    "MqttVersion",
    "Transport",
    "check_ca_file",
    "listen_host",
]

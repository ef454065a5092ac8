"""The fleet directory, read: who belongs to a fleet, and each party's credentials.

`fleetlearn provision` (broker/provision.py) writes the fleet directory; every side reads it
through this module, so the aggregator and a gateway never import the broker package:

    fleet.json                   public registry: fleet id, aggregator and device verify keys
    aggregator/identity.key      aggregator's Ed25519 release-signing key (secret)
    aggregator/password          MQTT password of `aggregator`, its publishing connection
    aggregator/ingest-password   MQTT password of `aggregator-ingest`, its receiving connection
    dashboard/password, simulator/password   read-only users' MQTT passwords
    devices/{id}/identity.key, password, device.json   what one gateway is given

Rules: the files are untrusted input like any other (a gateway's disk may be damaged or
edited): every problem is a `ProvisionError` naming the file, never a traceback; ids are
checked with `shared.ids`, keys must be 32 bytes of hex. Nothing here writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.ids import id_problem

AGGREGATOR_USER = "aggregator"
AGGREGATOR_INGEST_USER = "aggregator-ingest"
DASHBOARD_USER = "dashboard"
SIMULATOR_USER = "simulator"
RESERVED_USERS = frozenset(
    {AGGREGATOR_USER, AGGREGATOR_INGEST_USER, DASHBOARD_USER, SIMULATOR_USER}
)


class ProvisionError(FleetlearnError):
    """The fleet directory is missing, unreadable, or inconsistent."""


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What one device needs: loaded from `devices/{id}/`."""

    device_id: str
    fleet: str
    password: str
    identity: SigningKey
    aggregator_key: VerifyKey

    @property
    def username(self) -> str:
        return self.device_id


@dataclass(frozen=True, slots=True)
class AggregatorCredentials:
    """The aggregator's two MQTT identities (one per connection) and its signing key."""

    fleet: str
    password: str
    identity: SigningKey
    ingest_password: str

    @property
    def username(self) -> str:
        return AGGREGATOR_USER

    @property
    def ingest_username(self) -> str:
        return AGGREGATOR_INGEST_USER


@dataclass(frozen=True, slots=True)
class FleetRegistry:
    """The public half of a fleet: who exists and which keys they sign with."""

    fleet: str
    aggregator_key: VerifyKey
    device_keys: dict[str, VerifyKey]


# ------------------------------------------------------------------------------------ reading


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ProvisionError(f"{what} not found at {path}; run `fleetlearn provision`") from None
    except OSError as exc:
        raise ProvisionError(f"cannot read {what} at {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ProvisionError(f"{what} at {path} is not text; was it overwritten?") from None


def signing_key(path: Path, what: str) -> SigningKey:
    text = read_text(path, what)
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ProvisionError(f"{what} at {path} is not hex") from None
    if len(seed) != 32:
        raise ProvisionError(f"{what} at {path} holds {len(seed)} bytes; expected 32")
    return SigningKey(seed)


def verify_key(text: object, what: str) -> VerifyKey:
    if not isinstance(text, str):
        raise ProvisionError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ProvisionError(f"{what} is not hex") from None
    if len(raw) != 32:
        raise ProvisionError(f"{what} holds {len(raw)} bytes; expected 32")
    return VerifyKey(raw)


# -------------------------------------------------------------------------------------- loading


def load_registry(directory: Path | str) -> FleetRegistry:
    root = Path(directory)
    text = read_text(root / "fleet.json", "fleet registry")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"{root / 'fleet.json'} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise ProvisionError(f"{root / 'fleet.json'} lacks a 'devices' map")
    fleet = data.get("fleet")
    if id_problem(fleet) is not None:
        raise ProvisionError(f"{root / 'fleet.json'}: fleet id {id_problem(fleet)}")
    devices = {}
    for dev, key in data["devices"].items():
        if id_problem(dev) is not None:
            raise ProvisionError(f"{root / 'fleet.json'}: device id {id_problem(dev)}")
        devices[dev] = verify_key(key, f"verify key of {dev}")
    return FleetRegistry(
        fleet=str(fleet),
        aggregator_key=verify_key(data.get("aggregator_verify_key"), "aggregator verify key"),
        device_keys=devices,
    )


def load_device(device_dir: Path | str) -> DeviceCredentials:
    """Load `devices/{id}/` (the bundle a gateway is given)."""
    ddir = Path(device_dir)
    try:
        info = json.loads(read_text(ddir / "device.json", "device.json"))
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"{ddir / 'device.json'} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ProvisionError(f"{ddir / 'device.json'} must hold a JSON object")
    dev, fleet = info.get("device_id"), info.get("fleet")
    for what, value in (("device_id", dev), ("fleet", fleet)):
        if id_problem(value) is not None:
            raise ProvisionError(f"{ddir / 'device.json'}: {what} {id_problem(value)}")
    return DeviceCredentials(
        device_id=str(dev),
        fleet=str(fleet),
        password=read_text(ddir / "password", f"password of {dev}"),
        identity=signing_key(ddir / "identity.key", f"identity key of {dev}"),
        aggregator_key=verify_key(info.get("aggregator_verify_key"), "aggregator verify key"),
    )


def load_aggregator(directory: Path | str) -> AggregatorCredentials:
    root = Path(directory)
    registry = load_registry(root)
    return AggregatorCredentials(
        fleet=registry.fleet,
        password=read_text(root / "aggregator" / "password", "aggregator password"),
        identity=signing_key(root / "aggregator" / "identity.key", "aggregator identity key"),
        # A fleet directory from before the ingest user: re-running provision adds it.
        ingest_password=read_text(
            root / "aggregator" / "ingest-password", "aggregator ingest password"
        ),
    )


def dashboard_password(directory: Path | str) -> str:
    return read_text(Path(directory) / "dashboard" / "password", "dashboard password")


def simulator_password(directory: Path | str) -> str:
    return read_text(Path(directory) / "simulator" / "password", "simulator password")


def provisioned_devices(directory: Path | str) -> list[str]:
    return sorted(load_registry(directory).device_keys)

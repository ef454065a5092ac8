"""Fleet provisioning: broker credentials, the ACL, and Ed25519 identity keys.

This module writes the fleet directory; reading it is `shared.fleetdir`'s (re-exported here),
so that the aggregator and gateways load their credentials without importing `broker`.

What `provision()` writes under its output directory (the "fleet directory"):

    fleet.json                   public registry: fleet id, aggregator and device verify keys
    passwd                       mosquitto password file: PBKDF2-SHA512 `$7$` hashes, mode 0640
    acl                          mosquitto ACL implementing ARCHITECTURE §3, mode 0640
    aggregator/identity.key      aggregator's Ed25519 release-signing key (secret)
    aggregator/password          MQTT password of `aggregator`, its publishing connection
    aggregator/ingest-password   MQTT password of `aggregator-ingest`, its receiving connection
    dashboard/password           read-only `dashboard` user's MQTT password (secret)
    simulator/password           read-only `simulator` user's password (`fleetlearn sim`'s view)
    devices/{id}/identity.key    device's Ed25519 identity key (secret)
    devices/{id}/password        device's MQTT password (secret)
    devices/{id}/device.json     device id, fleet id, aggregator verify key (what a gateway trusts)

Rules: secrets are created 0600 inside 0700 directories and written atomically; the broker only
ever sees hashes, and passwd and acl are readable by their owner (`broker_owner`, the broker's
user) and group only. The fleet directory itself is 0755 so that a broker running as its own
user can reach them. Re-running adds missing devices (and users a newer version introduced)
and leaves existing keys and passwords alone; `rotate=True` replaces them all.

Identities: every MQTT connection has a username of its own, and brokers bind the client id to
it (mosquitto's `use_username_as_clientid`, the embedded broker the same), so a credential can
only ever replace its own connection. A device's username is its device id; the aggregator has
two (its publishing and its receiving connection); dashboards and the simulator's progress
view read with their own. The ACL gives each a section confining it to its own topics.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from fleetlearn.shared import topics
from fleetlearn.shared.fleetdir import (  # noqa: F401 - the readers are part of this module's API
    AGGREGATOR_INGEST_USER,
    AGGREGATOR_USER,
    DASHBOARD_USER,
    RESERVED_USERS,
    SIMULATOR_USER,
    AggregatorCredentials,
    DeviceCredentials,
    FleetRegistry,
    ProvisionError,
    dashboard_password,
    load_aggregator,
    load_device,
    load_registry,
    provisioned_devices,
    read_text,
    signing_key,
    simulator_password,
    verify_key,
)
from fleetlearn.shared.ids import id_problem

MAX_DEVICES = 100_000
MAX_ID = 2**32 - 1  # (uid_t)-1 means "leave unchanged" to chown

# mosquitto_passwd uses 101 iterations. Ten times that slows offline guessing of a stolen passwd
# file tenfold while costing the broker well under a millisecond per CONNECT, which matters when a
# simulated fleet of 1000 devices connects at once.
PBKDF2_ITERATIONS = 1_000
SALT_BYTES = 12  # what mosquitto_passwd uses


@dataclass(frozen=True, slots=True)
class ProvisionReport:
    directory: Path
    fleet: str
    added: tuple[str, ...]
    kept: tuple[str, ...]
    rotated: bool


# --------------------------------------------------------------------------------- file helpers


def _write_file(path: Path, text: str, mode: int) -> None:
    """Atomically write `text` to `path` with `mode`. The file is created 0600 and only gets
    `mode` once complete, so no other user ever reads a secret or a half-written file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_secret(path: Path, text: str) -> None:
    _write_file(path, text, 0o600)


def _write_public(path: Path, text: str, mode: int = 0o644) -> None:
    _write_file(path, text, mode)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _new_password() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------------- mosquitto formats


def hash_password(
    password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None
) -> str:
    """A mosquitto 2.x password-file hash (`$7$`: PBKDF2-HMAC-SHA512, base64 salt and digest)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Verify `password` against a `$7$` hash (used by the embedded broker)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return secrets.compare_digest(digest, expected)


def acl_text(fleet: str, devices: Sequence[str]) -> str:
    """The mosquitto ACL for one fleet (ARCHITECTURE §3).

    Each device gets its own `user` section rather than shared `pattern ... %u` lines: mosquitto
    applies patterns to every user, which would also let the dashboard read round traffic.
    """
    base = f"{topics.PREFIX}/{topics.check_id(fleet, 'fleet id')}"
    lines = [
        f"# fleetlearn ACL for fleet {fleet!r}; generated by `fleetlearn provision`, do not edit.",
        "# mosquitto denies anything not granted here. Reload mosquitto (SIGHUP) after changes.",
        "# Client ids are the usernames (use_username_as_clientid), so each section is also the",
        "# one connection that user may hold.",
        "",
        "# The aggregator runs the fleet: it reads and writes everything under the fleet prefix.",
        f"user {AGGREGATOR_USER}",
        f"topic readwrite {base}/#",
        "",
        "# Its second connection only receives what devices send.",
        f"user {AGGREGATOR_INGEST_USER}",
        f"topic read {base}/#",
        "",
        "# Dashboards, and the simulator's progress view, only read the JSON topics.",
        f"user {DASHBOARD_USER}",
        *(f"topic read {t}" for t in topics.dashboard_filters(fleet)),
        "",
        f"user {SIMULATOR_USER}",
        *(f"topic read {t}" for t in topics.dashboard_filters(fleet)),
        "",
        "# Devices (username = device id) write only under their own id and read the model,",
        "# the round announcement, round-wide messages and their own inbox.",
    ]
    for dev in devices:
        lines.append(f"user {dev}")
        lines += (f"topic write {t}" for t in device_write_topics(fleet, dev))
        lines += (f"topic read {t}" for t in topics.device_filters(fleet, dev))
    lines.append("")
    return "\n".join(lines)


def device_write_topics(fleet: str, device_id: str) -> list[str]:
    """Filters a device may publish to: its status and health, and its round messages."""
    base = f"{topics.PREFIX}/{topics.check_id(fleet, 'fleet id')}"
    topics.check_id(device_id)
    return [
        f"{base}/dev/{device_id}/status",
        f"{base}/dev/{device_id}/health",
        *(
            f"{base}/r/+/{kind.value}/{device_id}"
            for kind in (
                topics.Kind.ADVERTISE,
                topics.Kind.SHARES,
                topics.Kind.MASKED,
                topics.Kind.UPDATE,
                topics.Kind.UNMASK,
            )
        ),
    ]


# ------------------------------------------------------------------------------------ provision


def device_ids(count: int, prefix: str = "dev") -> list[str]:
    """`count` ids `prefix-0001`, ... (width grows past 9999)."""
    if not 0 <= count <= MAX_DEVICES:
        raise ProvisionError(f"device count must be in 0..{MAX_DEVICES}, got {count}")
    width = max(4, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def provision(
    directory: Path | str,
    fleet: str,
    devices: Sequence[str],
    *,
    rotate: bool = False,
    iterations: int = PBKDF2_ITERATIONS,
    broker_owner: tuple[int, int] | None = None,
) -> ProvisionReport:
    """Create or extend the fleet directory for `fleet` with `devices` (see module docstring).

    Raises ProvisionError for bad ids, a fleet with no devices, another fleet's directory, or
    a directory that cannot be written."""
    root = Path(directory)
    problem = id_problem(fleet)
    if problem:
        raise ProvisionError(f"fleet id {problem}")
    for dev in devices:
        problem = id_problem(dev)
        if problem:
            raise ProvisionError(f"device id {problem}")
        if dev in RESERVED_USERS:
            raise ProvisionError(f"device id {dev!r} is reserved for the {dev} user")
    if len(set(devices)) != len(devices):
        raise ProvisionError("device ids repeat")
    if broker_owner is not None and not all(0 <= i < MAX_ID for i in broker_owner):
        raise ProvisionError(f"broker owner {broker_owner} is not a valid uid:gid")
    try:
        return _provision(root, fleet, devices, rotate, iterations, broker_owner)
    except OSError as exc:
        where = exc.filename or root
        raise ProvisionError(
            f"cannot write the fleet directory at {where}: {exc.strerror or exc}"
        ) from None


def _provision(
    root: Path,
    fleet: str,
    devices: Sequence[str],
    rotate: bool,
    iterations: int,
    broker_owner: tuple[int, int] | None,
) -> ProvisionReport:
    existing: dict[str, str] = {}
    registry_path = root / "fleet.json"
    if root.exists() and not root.is_dir():
        raise ProvisionError(f"{root} exists and is not a directory")
    if registry_path.exists():
        registry = load_registry(root)
        if registry.fleet != fleet:
            raise ProvisionError(
                f"{root} already holds fleet {registry.fleet!r}; "
                f"use another directory for {fleet!r}"
            )
        existing = {d: k.encode().hex() for d, k in registry.device_keys.items()}
        clash = sorted(RESERVED_USERS & set(existing))
        if clash:
            raise ProvisionError(
                f"{registry_path} lists device {clash[0]!r}, a name now reserved for a "
                "service user; provision that device under another id in a new directory"
            )
    if not existing and not devices:
        raise ProvisionError("a new fleet needs devices: give --devices N or --ids ID,...")

    # The fleet directory itself stays traversable so a broker running as another user can read
    # passwd and acl; every secret lives in a 0700 subdirectory.
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    agg_dir = _private_dir(root / "aggregator")
    dash_dir = _private_dir(root / "dashboard")
    sim_dir = _private_dir(root / "simulator")
    dev_root = _private_dir(root / "devices")

    agg_key_path = agg_dir / "identity.key"
    if rotate or not agg_key_path.exists():
        _write_secret(agg_key_path, SigningKey.generate().encode().hex() + "\n")
    aggregator_key = signing_key(agg_key_path, "aggregator identity key")
    service_passwords = {
        AGGREGATOR_USER: agg_dir / "password",
        AGGREGATOR_INGEST_USER: agg_dir / "ingest-password",
        DASHBOARD_USER: dash_dir / "password",
        SIMULATOR_USER: sim_dir / "password",
    }
    for pw_path in service_passwords.values():
        if rotate or not pw_path.exists():
            _write_secret(pw_path, _new_password() + "\n")

    all_devices = list(dict.fromkeys([*existing, *devices]))
    added: list[str] = []
    kept: list[str] = []
    verify_keys: dict[str, str] = {}
    agg_verify_hex = aggregator_key.verify_key.encode().hex()
    for dev in all_devices:
        ddir = _private_dir(dev_root / dev)
        key_path, pw_path = ddir / "identity.key", ddir / "password"
        fresh = rotate or not key_path.exists() or not pw_path.exists()
        if rotate or not key_path.exists():
            _write_secret(key_path, SigningKey.generate().encode().hex() + "\n")
        if rotate or not pw_path.exists():
            _write_secret(pw_path, _new_password() + "\n")
        (added if fresh and dev not in existing else kept).append(dev)
        verify_keys[dev] = signing_key(key_path, f"identity key of {dev}").verify_key.encode().hex()
        _write_public(
            ddir / "device.json",
            json.dumps(
                {"device_id": dev, "fleet": fleet, "aggregator_verify_key": agg_verify_hex},
                indent=2,
            )
            + "\n",
        )

    users = [
        *(
            (user, read_text(path, f"password of {user}"))
            for user, path in service_passwords.items()
        ),
        *((d, read_text(dev_root / d / "password", f"password of {d}")) for d in all_devices),
    ]
    old_hashes = _read_passwd(root / "passwd") if (root / "passwd").exists() else {}
    lines = []
    for user, password in users:
        # Keep an existing hash when it still matches, so re-runs leave passwd stable.
        old = old_hashes.get(user)
        if old is not None and not rotate and check_password(password, old):
            lines.append(f"{user}:{old}")
        else:
            lines.append(f"{user}:{hash_password(password, iterations=iterations)}")
    # Only the broker reads passwd and acl: their owner (--broker-owner, the broker's user in
    # docker) and group; nobody else learns the hashes or who may do what.
    _write_public(root / "passwd", "\n".join(lines) + "\n", mode=0o640)
    _write_public(root / "acl", acl_text(fleet, all_devices), mode=0o640)
    if broker_owner is not None:
        # e.g. 1883:1883, the mosquitto user of the eclipse-mosquitto image.
        for name in ("passwd", "acl"):
            try:
                os.chown(root / name, *broker_owner)
            except PermissionError:
                raise ProvisionError(
                    f"cannot hand {root / name} to uid:gid {broker_owner[0]}:{broker_owner[1]}; "
                    "run provision as root or drop --broker-owner"
                ) from None
    _write_public(
        registry_path,
        json.dumps(
            {"fleet": fleet, "aggregator_verify_key": agg_verify_hex, "devices": verify_keys},
            indent=2,
        )
        + "\n",
    )
    return ProvisionReport(root, fleet, tuple(added), tuple(kept), rotate)


def _read_passwd(path: Path) -> dict[str, str]:
    out = {}
    for line in read_text(path, "password file").splitlines():
        user, sep, hashed = line.partition(":")
        if sep:
            out[user] = hashed
    return out

"""The topic namespace (ARCHITECTURE §3): every topic is built and parsed here, nowhere else.

Rules:
- All topics live under `fl/{fleet}/`. Fleet and device ids follow `shared.ids`; round ids are
  decimal integers without leading zeros in 0..2^31-1.
- Builders take ids and return strings; `parse()` takes a concrete topic (no wildcards) and
  returns a `Topic` or raises `TopicError` saying what is wrong.
- Subscription filters for each role are built here too, so the ACL (broker.provision), the
  aggregator and the device agree on one list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.ids import id_problem

PREFIX = "fl"
MAX_ROUND = 2**31 - 1
# MQTT allows 65535 bytes of topic; ours are far shorter, and a long one is hostile.
MAX_TOPIC_LENGTH = 256


class TopicError(FleetlearnError, ValueError):
    """A topic or one of its parts is not valid in the fleetlearn namespace."""


class Kind(enum.Enum):
    """What a topic carries. Values are the topic's fixed words."""

    MODEL = "model"
    ROUND = "round"
    METRICS = "metrics"
    EVENTS = "events"
    STATUS = "status"  # dev/{id}/status
    HEALTH = "health"  # dev/{id}/health
    SURVIVORS = "survivors"  # r/{r}/survivors
    ADVERTISE = "adv"  # r/{r}/adv/{id}
    SHARES = "shares"  # r/{r}/shares/{id}
    INBOX = "inbox"  # r/{r}/inbox/{id}
    MASKED = "masked"  # r/{r}/masked/{id}
    UPDATE = "update"  # r/{r}/update/{id}
    UNMASK = "unmask"  # r/{r}/unmask/{id}


FLEET_WIDE = frozenset({Kind.MODEL, Kind.ROUND, Kind.METRICS, Kind.EVENTS})
PER_DEVICE = frozenset({Kind.STATUS, Kind.HEALTH})
# Rosters are per device (only its neighbours' keys) and travel on its inbox: see docs/topics.md.
PER_ROUND = frozenset({Kind.SURVIVORS})
PER_ROUND_DEVICE = frozenset(
    {Kind.ADVERTISE, Kind.SHARES, Kind.INBOX, Kind.MASKED, Kind.UPDATE, Kind.UNMASK}
)
# Written by a device (the ACL lets it write these under its own id only).
DEVICE_WRITES = frozenset(
    {Kind.STATUS, Kind.HEALTH, Kind.ADVERTISE, Kind.SHARES, Kind.MASKED, Kind.UPDATE, Kind.UNMASK}
)
# Whose machine payloads are JSON (for dashboards) rather than the msgpack+zstd envelope.
JSON_KINDS = frozenset({Kind.METRICS, Kind.EVENTS, Kind.HEALTH})
RETAINED = frozenset({Kind.MODEL, Kind.ROUND, Kind.STATUS, Kind.METRICS, Kind.HEALTH})


def check_id(value: str, what: str = "device id") -> str:
    problem = id_problem(value)
    if problem is not None:
        raise TopicError(f"{what} {problem}")
    return value


def check_round(value: int) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ROUND:
        raise TopicError(f"round id must be an int in 0..{MAX_ROUND}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic. `round_id` and `device_id` are set when the kind has them."""

    kind: Kind
    fleet: str
    round_id: int | None = None
    device_id: str | None = None

    def __str__(self) -> str:
        base = f"{PREFIX}/{self.fleet}"
        if self.kind in FLEET_WIDE:
            return f"{base}/{self.kind.value}"
        if self.kind in PER_DEVICE:
            return f"{base}/dev/{self.device_id}/{self.kind.value}"
        if self.kind in PER_ROUND:
            return f"{base}/r/{self.round_id}/{self.kind.value}"
        return f"{base}/r/{self.round_id}/{self.kind.value}/{self.device_id}"


# ------------------------------------------------------------------------------------ builders


def _fleet(fleet: str) -> str:
    return check_id(fleet, "fleet id")


def model(fleet: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/model"


def round_announce(fleet: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/round"


def metrics(fleet: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/metrics"


def events(fleet: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/events"


def status(fleet: str, device_id: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/dev/{check_id(device_id)}/status"


def health(fleet: str, device_id: str) -> str:
    return f"{PREFIX}/{_fleet(fleet)}/dev/{check_id(device_id)}/health"


def per_round(fleet: str, round_id: int, kind: Kind) -> str:
    """Round-wide topics: SURVIVORS (unmask request or abort for the whole cohort)."""
    if kind not in PER_ROUND:
        raise TopicError(f"{kind.value} is not a round-wide topic")
    return f"{PREFIX}/{_fleet(fleet)}/r/{check_round(round_id)}/{kind.value}"


def per_device(fleet: str, round_id: int, kind: Kind, device_id: str) -> str:
    """Round topics of one device: ADVERTISE, SHARES, INBOX, MASKED, UPDATE, UNMASK."""
    if kind not in PER_ROUND_DEVICE:
        raise TopicError(f"{kind.value} is not a per-device round topic")
    return f"{PREFIX}/{_fleet(fleet)}/r/{check_round(round_id)}/{kind.value}/{check_id(device_id)}"


def build(kind: Kind, fleet: str, round_id: int | None = None, device_id: str | None = None) -> str:
    """Any topic from its parts; checks that the parts given are exactly those the kind needs."""
    needs_round = kind in PER_ROUND or kind in PER_ROUND_DEVICE
    needs_device = kind in PER_DEVICE or kind in PER_ROUND_DEVICE
    if needs_round != (round_id is not None) or needs_device != (device_id is not None):
        raise TopicError(
            f"{kind.value} topic takes round_id={needs_round}, device_id={needs_device}"
        )
    if kind in FLEET_WIDE:
        return f"{PREFIX}/{_fleet(fleet)}/{kind.value}"
    if kind in PER_DEVICE:
        assert device_id is not None
        return f"{PREFIX}/{_fleet(fleet)}/dev/{check_id(device_id)}/{kind.value}"
    assert round_id is not None
    if kind in PER_ROUND:
        return per_round(fleet, round_id, kind)
    assert device_id is not None
    return per_device(fleet, round_id, kind, device_id)


# ------------------------------------------------------------------------------------- parsing

_BY_WORD = {k.value: k for k in Kind}


def _parse_round(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise TopicError(f"round id {text!r} is not a decimal integer")
    if len(text) > 10:
        raise TopicError(f"round id {text!r} is out of range")
    return check_round(int(text))


def parse(topic: str) -> Topic:
    """Parse a concrete topic of the namespace. Raises TopicError for anything else."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic of {len(topic)} characters is longer than {MAX_TOPIC_LENGTH}")
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != PREFIX:
        raise TopicError(f"{topic!r} is not under {PREFIX}/{{fleet}}/")
    fleet = check_id(parts[1], "fleet id")
    rest = parts[2:]
    if len(rest) == 1:
        kind = _BY_WORD.get(rest[0])
        if kind in FLEET_WIDE:
            assert kind is not None
            return Topic(kind, fleet)
    elif len(rest) == 3 and rest[0] == "dev":
        kind = _BY_WORD.get(rest[2])
        if kind in PER_DEVICE:
            assert kind is not None
            return Topic(kind, fleet, device_id=check_id(rest[1]))
    elif len(rest) == 3 and rest[0] == "r":
        kind = _BY_WORD.get(rest[2])
        if kind in PER_ROUND:
            assert kind is not None
            return Topic(kind, fleet, round_id=_parse_round(rest[1]))
    elif len(rest) == 4 and rest[0] == "r":
        kind = _BY_WORD.get(rest[2])
        if kind in PER_ROUND_DEVICE:
            assert kind is not None
            return Topic(kind, fleet, round_id=_parse_round(rest[1]), device_id=check_id(rest[3]))
    raise TopicError(f"{topic!r} is not a fleetlearn topic")


# ---------------------------------------------------------------------------------- filters


def aggregator_filters(fleet: str) -> tuple[str, ...]:
    """What the aggregator subscribes to: every device's status and round messages."""
    base = f"{PREFIX}/{_fleet(fleet)}"
    return (
        f"{base}/dev/+/status",
        *(f"{base}/r/+/{k.value}/+" for k in sorted(DEVICE_WRITES - PER_DEVICE, key=str)),
    )


def device_filters(fleet: str, device_id: str) -> tuple[str, ...]:
    """What a device subscribes to: model, round, its inbox and the round's survivors."""
    base = f"{PREFIX}/{_fleet(fleet)}"
    check_id(device_id)
    return (
        f"{base}/model",
        f"{base}/round",
        f"{base}/r/+/survivors",
        f"{base}/r/+/inbox/{device_id}",
    )


def dashboard_filters(fleet: str) -> tuple[str, ...]:
    """What the read-only `dashboard` and `simulator` users read (and all the ACL grants
    them): the JSON topics, plus every device's retained status for the dashboard's device
    table. Never round traffic, the model or the announcement."""
    base = f"{PREFIX}/{_fleet(fleet)}"
    return (
        f"{base}/metrics",
        f"{base}/events",
        f"{base}/dev/+/health",
        f"{base}/dev/+/status",
    )

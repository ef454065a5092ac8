"""The dashboard topics' payloads, checked: untrusted bytes in, small JSON-ready records out.

What it owns: one reader per topic the dashboard subscribes to (`summary` for `metrics`,
`event` for `events`, `health` and `status` for a device's), the reasons a payload is refused
(`Reason`) and the error that carries one (`PayloadError`).

Rules:
- Everything here is untrusted: devices write `status` and `health`, and a broker may be
  shared. A reader returns a record built only from values it checked, or raises
  `PayloadError`; it never returns part of a payload and never keeps a reference into it.
- Size first: a payload over its topic's limit is refused before it is parsed.
- Numbers must be finite (JSON's NaN and Infinity are refused at parse time, 1e999 after),
  counts are non-negative integers (a JSON `true` is not a count), shares lie in 0..1. The
  figures the view adds up (bytes per device, the cost sums) are at most `MAX_FIGURE`, so no
  sum of them is ever infinite.
- Every string kept is bounded, every list and map too. A field the dashboard does not show is
  not kept (and not checked): a newer aggregator may add fields; one that changes the type of
  a field shown here is refused whole, since half a summary would mislead.
- Pure: no clock, no I/O. The view (`dashboard.view`) decides what to keep and counts refusals.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from fleetlearn.shared import wire
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.topics import MAX_ROUND

# A summary of a 1,024-class model carries per_class for each class (~100 KB); a megabyte is
# ten times that. Events, health reports and statuses are a few hundred bytes.
MAX_SUMMARY_BYTES = 1 << 20
MAX_EVENT_BYTES = 64 << 10
MAX_HEALTH_BYTES = 256 << 10  # predicted_share names every class
MAX_STATUS_BYTES = 64 << 10
MAX_TEXT = 512  # reasons, details, notes (a status note is at most 512 by the wire's rule)
MAX_WORD = 64  # modes, tasks, stage names, labels, mechanism names
MAX_COUNT = 2**53  # the largest integer a browser's JavaScript holds exactly
# The bound of the figures the view adds up (bytes per device, a round's cost sums): over nine
# times a full cohort (shared.rounds.MAX_COHORT, 100,000) each at a cost report's largest
# figure (shared.cost: 1 GiB; a day of CPU and 1 MJ are far less), so no honest summary comes
# near it, and times any count (at most MAX_COUNT) it stays far from a float's range.
MAX_FIGURE = 1e15
MAX_STAGES = 8
MAX_HISTOGRAM = 64  # async staleness buckets kept
MAX_EVENT_FIELDS = 24
MAX_EVENT_LIST = 20  # `stage_closed` names up to 20 dropped devices
ROUND_STATES = ("closed", "aborted", "refused")
CLOSED_BY = ("complete", "quorum", "hard_limit", "")

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*")
_FIELD = re.compile(r"[a-z][a-z0-9_]*")


class Reason(enum.Enum):
    """Why a message was dropped; the values are the `reason` label of the rejection counts."""

    BAD_TOPIC = "bad_topic"  # not a topic of the namespace
    BAD_DEVICE_ID = "bad_device_id"  # a device topic or field whose id fails shared.ids
    OTHER_FLEET = "other_fleet"  # topic or payload of another fleet
    UNEXPECTED_TOPIC = "unexpected_topic"  # a fleetlearn topic the dashboard does not read
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"  # not UTF-8 JSON holding one object
    BAD_PAYLOAD = "bad_payload"  # a field of the wrong type, out of range, or too long
    DEVICE_MISMATCH = "device_mismatch"  # the payload names another device than its topic
    DEVICE_LIMIT = "device_limit"  # a new device beyond the device table's bound
    STALE_ROUND = "stale_round"  # older than every kept round while the round list is full
    INTERNAL_ERROR = "internal_error"  # a bug met on some input: the message is dropped


class DashboardError(FleetlearnError):
    """Something the dashboard cannot do (its port is taken, the broker refused it...)."""


class PayloadError(DashboardError):
    """A payload that is not kept; `reason` says which count it goes to."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _bad(detail: str) -> PayloadError:
    return PayloadError(Reason.BAD_PAYLOAD, detail)


# ------------------------------------------------------------------------------ field readers

_MISSING = object()


def _get(obj: Mapping[str, Any], key: str, required: bool) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING and required:
        raise _bad(f"{key} is missing")
    return value


def _count(obj: Mapping[str, Any], key: str, *, required: bool = False, hi: int = MAX_COUNT) -> Any:
    """A non-negative integer; None when absent (or null, where `nullable`)."""
    value = _get(obj, key, required)
    if value is _MISSING:
        return None
    if type(value) is not int or not 0 <= value <= hi:
        raise _bad(f"{key} must be an integer in 0..{hi}")
    return value


def _nullable_count(obj: Mapping[str, Any], key: str, hi: int = MAX_COUNT) -> int | None:
    if obj.get(key) is None:
        return None
    value: int = _count(obj, key, hi=hi)
    return value


def _number(
    obj: Mapping[str, Any], key: str, *, lo: float = -math.inf, hi: float = math.inf
) -> float | None:
    """A finite number in lo..hi; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(f"{key} must be a finite number in {lo}..{hi}")
    return float(value)


def _figure(obj: Mapping[str, Any], key: str) -> float | None:
    """A figure the view adds up: a number in 0..MAX_FIGURE."""
    return _number(obj, key, lo=0.0, hi=MAX_FIGURE)


def _share(obj: Mapping[str, Any], key: str) -> float | None:
    return _number(obj, key, lo=0.0, hi=1.0)


def _flag(obj: Mapping[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not bool:
        raise _bad(f"{key} must be true or false")
    return value


def _text(obj: Mapping[str, Any], key: str, limit: int = MAX_TEXT) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > limit:
        raise _bad(f"{key} must be a string of at most {limit} characters")
    return value


def _word(obj: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    """A short name (mode, task, stage, label): letters, digits and a few separators."""
    value = _get(obj, key, required)
    if value is _MISSING or value is None:
        if required:
            raise _bad(f"{key} is missing")
        return None
    if type(value) is not str or len(value) > MAX_WORD or not _WORD.fullmatch(value):
        raise _bad(f"{key} must be a short name")
    return value


def _choice(obj: Mapping[str, Any], key: str, allowed: tuple[str, ...], required: bool) -> Any:
    value = _get(obj, key, required)
    if value is _MISSING:
        return None
    if type(value) is not str or value not in allowed:
        raise _bad(f"{key} must be one of {', '.join(repr(a) for a in allowed)}")
    return value


def _object(obj: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not dict:
        raise _bad(f"{key} must be an object")
    return value


def _fleet_matches(obj: Mapping[str, Any], fleet: str) -> None:
    value = obj.get("fleet", fleet)
    if value != fleet:
        raise PayloadError(Reason.OTHER_FLEET, "the payload names another fleet")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def json_object(payload: bytes, limit: int) -> dict[str, Any]:
    """One JSON object from UTF-8 bytes of at most `limit` bytes."""
    if len(payload) > limit:
        raise PayloadError(Reason.TOO_LARGE, f"{len(payload)} bytes; the limit is {limit}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON, NaN/Infinity and integers of thousands of digits.
        raise PayloadError(Reason.BAD_JSON, type(exc).__name__) from None
    if type(obj) is not dict:
        raise PayloadError(Reason.BAD_JSON, "not a JSON object")
    return obj


# ------------------------------------------------------------------------ fl/{fleet}/metrics


def summary(payload: bytes, fleet: str) -> dict[str, Any]:
    """A round summary (docs/topics.md, `metrics`) as the record the dashboard keeps."""
    obj = json_object(payload, MAX_SUMMARY_BYTES)
    _fleet_matches(obj, fleet)
    record: dict[str, Any] = {
        "round": _count(obj, "round", required=True, hi=MAX_ROUND),
        "state": _choice(obj, "state", ROUND_STATES, required=True),
        "mode": _word(obj, "mode"),
        "reason": _text(obj, "reason") or "",
        "task": _word(obj, "task"),
        "model_version": _count(obj, "model_version", hi=MAX_ROUND),
        "new_version": _nullable_count(obj, "new_version", hi=MAX_ROUND),
        "cohort": _count(obj, "cohort"),
        "survivors": _count(obj, "survivors"),
        "stragglers": _count(obj, "stragglers"),
        "late_messages": _count(obj, "late_messages"),
        "rejected": _count(obj, "rejected"),
        "dropouts_recovered": _count(obj, "dropouts_recovered"),
        "samples": _count(obj, "samples"),
        "accuracy": _share(obj, "accuracy"),
        "device_accuracy": _share(obj, "device_accuracy"),
        "mean_loss": _number(obj, "mean_loss"),
        "uplink_bytes_per_device": _figure(obj, "uplink_bytes_per_device"),
        "downlink_bytes_per_device": _figure(obj, "downlink_bytes_per_device"),
        "duration_s": _number(obj, "duration_s", lo=0),
        "ts": _number(obj, "ts", lo=0),
        "stages": _stages(obj),
        "privacy": _privacy(obj),
        "async": _async(obj),
        "cost": _cost(obj),
    }
    return record


def _stages(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    stages = _object(obj, "stages") or {}
    if len(stages) > MAX_STAGES:
        raise _bad(f"stages has {len(stages)} entries; at most {MAX_STAGES}")
    kept: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        if len(name) > MAX_WORD or not _WORD.fullmatch(name) or type(stage) is not dict:
            raise _bad("stages must map stage names to objects")
        kept[name] = {
            "expected": _count(stage, "expected"),
            "arrived": _count(stage, "arrived"),
            "late": _count(stage, "late"),
            "dropped": _count(stage, "dropped"),
            "not_needed": _count(stage, "not_needed"),
            "closed_by": _choice(stage, "closed_by", CLOSED_BY, required=False),
            "seconds": _number(stage, "seconds", lo=0),
        }
    return kept


def _privacy(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    p = _object(obj, "privacy")
    if p is None:
        return None
    return {
        "mechanism": _word(p, "mechanism"),
        "released": _flag(p, "released"),
        "noise_multiplier": _number(p, "noise_multiplier", lo=0),
        "sampling_rate": _share(p, "sampling_rate"),
        "rounds_charged": _count(p, "rounds_charged"),
        "epsilon": _number(p, "epsilon", lo=0),
        "epsilon_amplified": _number(p, "epsilon_amplified", lo=0),
        "epsilon_cohort_known": _number(p, "epsilon_cohort_known", lo=0),
        "amplification": _flag(p, "amplification"),
        "delta": _share(p, "delta"),
        "epsilon_budget": _number(p, "epsilon_budget", lo=0),
    }


def _async(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    a = _object(obj, "async")
    if a is None:
        return None
    histogram = _object(a, "staleness") or {}
    if len(histogram) > MAX_HISTOGRAM:
        raise _bad(f"async.staleness has more than {MAX_HISTOGRAM} buckets")
    staleness = {}
    for behind in histogram:
        if len(behind) > 10 or not behind.isascii() or not behind.isdigit():
            raise _bad("async.staleness keys must be release counts")
        staleness[behind] = _count(histogram, behind)
    wait = _object(a, "buffer_wait_s")
    return {
        "updates_applied": _count(a, "updates_applied"),
        "staleness": staleness,
        "mean_staleness": _number(a, "mean_staleness", lo=0),
        "mean_discount": _number(a, "mean_discount", lo=0),
        "buffer_wait_s": None
        if wait is None
        else {"median": _number(wait, "median", lo=0), "max": _number(wait, "max", lo=0)},
        "stale_refused_total": _count(a, "stale_refused_total"),
        "in_flight": _count(a, "in_flight"),
        "buffered": _count(a, "buffered"),
    }


def _cost(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    c = _object(obj, "cost")
    if c is None:
        return None
    return {
        "devices": _count(c, "devices"),
        "cpu_s": _figure(c, "cpu_s"),
        "bytes_up": _figure(c, "bytes_up"),
        "bytes_down": _figure(c, "bytes_down"),
        "energy_j": _figure(c, "energy_j"),
    }


# ------------------------------------------------------------------------- fl/{fleet}/events


def event(payload: bytes, fleet: str) -> dict[str, Any]:
    """An event (docs/topics.md, `events`). Its extra fields differ by event and grow with the
    aggregator, so any short scalar field (or short list of them) is kept, bounded."""
    obj = json_object(payload, MAX_EVENT_BYTES)
    _fleet_matches(obj, fleet)
    if len(obj) > MAX_EVENT_FIELDS:
        raise _bad(f"an event of {len(obj)} fields; at most {MAX_EVENT_FIELDS}")
    record: dict[str, Any] = {
        "event": _word(obj, "event", required=True),
        "round": _nullable_count(obj, "round", hi=MAX_ROUND),
        "ts": _number(obj, "ts", lo=0),
    }
    device = obj.get("device")
    if device is not None and id_problem(device) is not None:
        raise PayloadError(Reason.BAD_DEVICE_ID, "the event's device id is not valid")
    for key, value in obj.items():
        if key in record or key == "fleet":
            continue
        if len(key) > MAX_WORD or not _FIELD.fullmatch(key):
            raise _bad("event field names are short lowercase words")
        if type(value) is list:
            if len(value) > MAX_EVENT_LIST:
                raise _bad(f"{key} lists more than {MAX_EVENT_LIST} items")
            record[key] = [_scalar(key, item, MAX_WORD) for item in value]
        else:
            record[key] = _scalar(key, value, MAX_TEXT)
    return record


def _scalar(key: str, value: Any, limit: int) -> Any:
    if value is None or type(value) is bool:
        return value
    if type(value) is int and abs(value) <= MAX_COUNT:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is str and len(value) <= limit:
        return value
    raise _bad(f"{key} must be a short string, a finite number, true, false or null")


# --------------------------------------------------------------- fl/{fleet}/dev/{id}/health


def health(payload: bytes, fleet: str, device_id: str) -> dict[str, Any]:
    """A device's inference report (docs/topics.md, `health`): the figures the device table
    shows, whichever the model's task has."""
    obj = json_object(payload, MAX_HEALTH_BYTES)
    _fleet_matches(obj, fleet)
    if obj.get("device_id", device_id) != device_id:
        raise PayloadError(Reason.DEVICE_MISMATCH, "device_id differs from the topic's")
    if obj.get("ts") is None:
        raise _bad("ts is missing")
    latest = _object(obj, "latest") or {}
    figures = {
        "model_version": _count(obj, "model_version", required=True, hi=MAX_ROUND),
        "ts": _number(obj, "ts", lo=0),
        "windows": _count(obj, "windows"),
        "accuracy": _share(obj, "accuracy"),
        "anomalous_share": _share(obj, "anomalous_share"),
        "threshold": _number(obj, "threshold"),
        "max_score": _number(obj, "max_score"),
        "mean_prediction": _number(obj, "mean_prediction"),
        "label": _text(latest, "label", MAX_WORD),
        "confidence": _share(latest, "confidence"),
        "score": _number(latest, "score"),
        "anomaly": _flag(latest, "anomaly"),
        "prediction": _number(latest, "prediction"),
    }
    # Only the task's own figures: a table of 100,000 devices keeps one of these each.
    return {name: value for name, value in figures.items() if value is not None}


# --------------------------------------------------------------- fl/{fleet}/dev/{id}/status


def status(payload: bytes, device_id: str) -> dict[str, Any]:
    """A device's retained status (wire `status`), as the fields the device table shows."""
    if len(payload) > MAX_STATUS_BYTES:
        raise PayloadError(Reason.TOO_LARGE, f"{len(payload)} bytes")
    try:
        msg = wire.decode(payload, wire.DeviceStatus)
    except wire.WireError as exc:
        raise _bad(f"not a wire status ({exc.field or 'payload'})") from None
    if msg.device_id != device_id:
        raise PayloadError(Reason.DEVICE_MISMATCH, "device_id differs from the topic's")
    if len(msg.sdk_version) > MAX_WORD:
        raise _bad(f"sdk_version longer than {MAX_WORD} characters")
    if not math.isfinite(msg.battery) or msg.model_version > MAX_ROUND or msg.samples > MAX_COUNT:
        raise _bad("battery, model_version or samples out of range")
    return {
        "online": msg.online,
        "eligibility": msg.eligibility.value,
        "charging": msg.charging,
        "battery": msg.battery,
        "model_version": msg.model_version,
        "samples": msg.samples,
        "sdk_version": msg.sdk_version,
        "note": msg.note[:MAX_TEXT],
    }

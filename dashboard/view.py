"""The fleet as its dashboard sees it: a sans-IO fold of the dashboard topics into bounded state.

What it owns: `FleetView`. `ingest(topic, payload, now)` takes one message of the fleet's
`metrics`, `events`, or a device's `status` or `health` topic and returns the updates a page
needs to stay current; `snapshot()` is the whole state for a page that just connected;
`dashboard.prom` reads the running totals for Prometheus.

Rules:
- `ingest` never raises, and a refused message changes nothing but `rejected` (reason ->
  count): `dashboard.payloads` checks a payload whole into a new record before anything is
  stored, and a bug met on some input costs that message (`internal_error`), not the state.
- Bounded: the last `max_rounds` rounds, `max_devices` devices (a new device beyond that is
  refused and counted), the last `max_events` events; each record's strings and lists are
  bounded by `dashboard.payloads`.
- The broker replays the retained summary (and every retained status and health report) on
  each reconnect: a message equal to what is kept changes nothing and yields no update. A
  different summary for a kept round replaces it (a refused round's id is used again by the
  next round that runs).
- Running totals (rounds by state, bytes, dropouts, device costs) are counters over every
  summary seen since the view started, kept apart from the bounded round list, and they never
  go down (Prometheus reads a decrease as a restart): a summary that replaces another counts
  as one more summary of its state, and adds to each figure only what it has beyond the
  highest that round's earlier summaries gave. No total is ever infinite: the figures added
  are bounded (`payloads.MAX_FIGURE`) and each total stops at `MAX_TOTAL`.
- A record, once kept, is never changed (a newer one replaces it), so what `snapshot()`
  returns may be encoded in another thread while `ingest` goes on.
- Sans-IO: no clock (`now` comes in), no sockets, no logging.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fleetlearn.dashboard import payloads
from fleetlearn.dashboard.payloads import PayloadError, Reason
from fleetlearn.shared import topics
from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.topics import Kind, TopicError

MAX_ROUNDS = 500
MAX_DEVICES = 100_000
MAX_EVENTS = 200
# A health report's own timestamp counts as "last seen" only if it is not in the future by
# more than this (device clocks drift; a report from next year is not a sign of life).
CLOCK_SLACK_S = 300.0

Update = dict[str, Any]


# A running total stops here: far beyond any fleet (each summary adds at most
# payloads.MAX_FIGURE times a count), it only keeps every total finite whatever comes in.
MAX_TOTAL = 1e300
FIGURES = (
    "uplink_bytes",
    "downlink_bytes",
    "dropouts_recovered",
    "cpu_s",
    "bytes_up",
    "bytes_down",
    "energy_j",
)


@dataclass(slots=True)
class RoundShare:
    """One round's figures in the running totals: the highest of each that the round's
    summaries gave, so that a summary replacing another adds only what goes beyond them."""

    uplink_bytes: float = 0.0
    downlink_bytes: float = 0.0
    dropouts_recovered: int = 0
    cpu_s: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    energy_j: float = 0.0

    @classmethod
    def of(cls, record: dict[str, Any]) -> RoundShare:
        survivors = record["survivors"] or 0
        cohort = record["cohort"] or 0
        # The aggregator averages uplink bytes over the survivors, or over the cohort when a
        # round ended without any (aggregator.report.summary); downlink over the cohort.
        senders = survivors or cohort
        cost = record["cost"] or {}
        return cls(
            uplink_bytes=(record["uplink_bytes_per_device"] or 0.0) * senders,
            downlink_bytes=(record["downlink_bytes_per_device"] or 0.0) * cohort,
            dropouts_recovered=record["dropouts_recovered"] or 0,
            cpu_s=cost.get("cpu_s") or 0.0,
            bytes_up=cost.get("bytes_up") or 0.0,
            bytes_down=cost.get("bytes_down") or 0.0,
            energy_j=cost.get("energy_j") or 0.0,
        )

    def highest(self, other: RoundShare) -> RoundShare:
        """Field by field, the larger of the two."""
        return RoundShare(**{f: max(getattr(self, f), getattr(other, f)) for f in FIGURES})


@dataclass(slots=True)
class Totals:
    """Counters over every round summary the view has seen (not only the kept ones)."""

    rounds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(payloads.ROUND_STATES, 0))
    uplink_bytes: float = 0.0
    downlink_bytes: float = 0.0
    dropouts_recovered: int = 0
    cpu_s: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    energy_j: float = 0.0

    def add(self, state: str, share: RoundShare, counted: RoundShare | None) -> None:
        """Count one more summary of `state`, and add what `share` has beyond `counted` (what
        the round's earlier summaries added, if any), field by field. Nothing here can go
        down: each increase is >= 0, and a total saturates at MAX_TOTAL."""
        self.rounds[state] += 1
        for name in FIGURES:
            before = 0 if counted is None else getattr(counted, name)
            increase = max(0, getattr(share, name) - before)
            setattr(self, name, min(getattr(self, name) + increase, MAX_TOTAL))


@dataclass(slots=True)
class DeviceRow:
    """One device of the table: its last status, its last health report, when last heard."""

    device_id: str
    status: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    last_seen: float | None = None

    @property
    def online(self) -> bool | None:
        """None: no status seen (a health report alone does not say)."""
        return None if self.status is None else bool(self.status["online"])

    @property
    def eligible(self) -> bool:
        return (
            self.status is not None
            and self.status["online"]
            and (self.status["eligibility"] == "eligible")
        )

    def as_dict(self) -> dict[str, Any]:
        s = self.status or {}
        return {
            "device_id": self.device_id,
            "online": self.online,
            "eligibility": s.get("eligibility"),
            "battery": s.get("battery"),
            "charging": s.get("charging"),
            "model_version": s.get("model_version"),
            "samples": s.get("samples"),
            "note": s.get("note"),
            "health": self.health,
            "last_seen": self.last_seen,
        }


class FleetView:
    """The dashboard's state for one fleet. Feed it every message of `dashboard_filters`."""

    def __init__(
        self,
        fleet: str,
        *,
        max_rounds: int = MAX_ROUNDS,
        max_devices: int = MAX_DEVICES,
        max_events: int = MAX_EVENTS,
    ) -> None:
        self.fleet = topics.check_id(fleet, "fleet id")
        self.max_rounds = max_rounds
        self.max_devices = max_devices
        self._rounds: dict[int, dict[str, Any]] = {}
        self._shares: dict[int, RoundShare] = {}
        self._devices: dict[str, DeviceRow] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._event_seq = 0
        self.max_events = max_events
        self.totals = Totals()
        self.online = 0
        self.offline = 0
        self.eligible = 0
        self.rejected: dict[str, int] = {r.value: 0 for r in Reason}
        self.replays = 0  # messages equal to what was kept (retained replays on reconnect)
        self.last_internal_error = ""  # the last bug met (type and message), for the log

    # ------------------------------------------------------------------------------ input

    def ingest(
        self, topic: str, payload: bytes, now: float, *, retained: bool = False
    ) -> list[Update]:
        """Take one message; return the updates for connected pages (empty when the message
        was refused or changed nothing). `retained`: delivered from the broker's store, so
        its arrival says nothing about when the device was last heard of."""
        try:
            return self._ingest(topic, bytes(payload), now, retained)
        except PayloadError as exc:
            self.rejected[exc.reason.value] += 1
        except Exception as exc:  # a bug on some input: it costs this message only
            self.rejected[Reason.INTERNAL_ERROR.value] += 1
            self.last_internal_error = f"{type(exc).__name__}: {exc}"[:300]
        return []

    def _ingest(self, topic: str, payload: bytes, now: float, retained: bool) -> list[Update]:
        try:
            where = topics.parse(topic)
        except TopicError:
            raise PayloadError(_topic_reason(topic), "not a fleetlearn topic") from None
        if where.fleet != self.fleet:
            raise PayloadError(Reason.OTHER_FLEET, f"a topic of fleet {where.fleet}")
        if where.kind is Kind.METRICS:
            return self._on_summary(payloads.summary(payload, self.fleet), now)
        if where.kind is Kind.EVENTS:
            return self._on_event(payloads.event(payload, self.fleet), now)
        if where.kind is Kind.STATUS:
            assert where.device_id is not None
            record = payloads.status(payload, where.device_id)
            return self._on_device(where.device_id, "status", record, None, now, retained)
        if where.kind is Kind.HEALTH:
            assert where.device_id is not None
            record = payloads.health(payload, self.fleet, where.device_id)
            stamped = record.get("ts")
            return self._on_device(where.device_id, "health", record, stamped, now, retained)
        raise PayloadError(Reason.UNEXPECTED_TOPIC, f"{where.kind.value} is not read here")

    def _on_summary(self, record: dict[str, Any], now: float) -> list[Update]:
        round_id: int = record["round"]
        kept = self._rounds.get(round_id)
        if kept is not None and _without_arrival(kept) == record:
            self.replays += 1
            return []
        share = RoundShare.of(record)
        if kept is None and len(self._rounds) >= self.max_rounds:
            oldest = min(self._rounds)
            if round_id < oldest:
                raise PayloadError(Reason.STALE_ROUND, f"round {round_id} < kept {oldest}")
            del self._rounds[oldest]
            del self._shares[oldest]  # what it added stays in the totals
        counted = self._shares.get(round_id)
        self.totals.add(record["state"], share, counted)
        self._shares[round_id] = share if counted is None else counted.highest(share)
        record["received"] = now
        self._rounds[round_id] = record
        return [{"type": "round", "round": record}]

    def _on_event(self, record: dict[str, Any], now: float) -> list[Update]:
        self._event_seq += 1
        # Pages order events and skip ones they already have by this number.
        record["seq"] = self._event_seq
        record["received"] = now
        self._events.append(record)
        return [{"type": "event", "event": record}]

    def _on_device(
        self,
        device_id: str,
        part: str,
        record: dict[str, Any],
        stamped: float | None,
        now: float,
        retained: bool,
    ) -> list[Update]:
        row = self._devices.get(device_id)
        if row is None:
            if len(self._devices) >= self.max_devices:
                raise PayloadError(Reason.DEVICE_LIMIT, f"more than {self.max_devices}")
            row = DeviceRow(device_id)
        seen = row.last_seen
        if not retained:
            seen = now if seen is None else max(seen, now)
        if stamped is not None and stamped <= now + CLOCK_SLACK_S:
            seen = stamped if seen is None else max(seen, stamped)
        if getattr(row, part) == record and seen == row.last_seen:
            self.replays += 1
            return []
        # Everything is checked: from here on nothing can fail half-way.
        self._count(row, -1)
        setattr(row, part, record)
        row.last_seen = seen
        self._devices[device_id] = row
        self._count(row, +1)
        return [{"type": "device", "device": row.as_dict()}]

    def _count(self, row: DeviceRow, sign: int) -> None:
        online = row.online
        if online is True:
            self.online += sign
        elif online is False:
            self.offline += sign
        if row.eligible:
            self.eligible += sign

    # ----------------------------------------------------------------------------- output

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def rounds(self) -> list[dict[str, Any]]:
        """The kept rounds, oldest first."""
        return [self._rounds[r] for r in sorted(self._rounds)]

    def latest_summary(self) -> dict[str, Any] | None:
        """The newest round's summary, whatever its state."""
        return self._rounds[max(self._rounds)] if self._rounds else None

    def latest_round(self) -> dict[str, Any] | None:
        """The newest round that ran (closed or aborted; a refused round never started)."""
        ran = [r for r in self._rounds if self._rounds[r]["state"] != "refused"]
        return self._rounds[max(ran)] if ran else None

    def latest_privacy(self) -> dict[str, Any] | None:
        """The privacy figures of the newest summary that has them."""
        for round_id in sorted(self._rounds, reverse=True):
            privacy = self._rounds[round_id]["privacy"]
            if privacy is not None:
                return dict(privacy)
        return None

    def model_version(self) -> int | None:
        """The newest release the summaries tell of (or the version the newest one trained)."""
        latest = self.latest_summary()
        if latest is None:
            return None
        version: int | None = latest["new_version"] or latest["model_version"]
        return version

    def device(self, device_id: str) -> dict[str, Any] | None:
        row = self._devices.get(device_id)
        return None if row is None else row.as_dict()

    def devices(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Devices by id, at most `limit` of them."""
        ids = sorted(self._devices)
        if limit is not None:
            ids = ids[:limit]
        return [self._devices[d].as_dict() for d in ids]

    def events(self) -> list[dict[str, Any]]:
        """The kept events, oldest first."""
        return list(self._events)

    def summary_counts(self) -> dict[str, Any]:
        """Counts for the page's header, sent with every batch of updates."""
        return {
            "devices": len(self._devices),
            "online": self.online,
            "offline": self.offline,
            "eligible": self.eligible,
            "rounds": dict(self.totals.rounds),
            "rejected": dict(self.rejected),
            # The devices' cost reports, summed over every summary seen (docs/dashboard.md).
            "cost": {
                "cpu_s": round(self.totals.cpu_s, 3),
                "bytes_up": round(self.totals.bytes_up),
                "bytes_down": round(self.totals.bytes_down),
                "energy_j": round(self.totals.energy_j, 3),
            },
            "dropouts_recovered": self.totals.dropouts_recovered,
        }

    def snapshot(self, *, device_limit: int | None = None) -> dict[str, Any]:
        """The whole state as JSON-ready data (`device_limit`: at most that many devices, by
        id; `counts.devices` still tells how many there are)."""
        return {
            "fleet": self.fleet,
            "rounds": self.rounds(),
            "devices": self.devices(device_limit),
            "events": self.events(),
            "counts": self.summary_counts(),
            "model_version": self.model_version(),
        }


def _without_arrival(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "received"}


def _topic_reason(topic: object) -> Reason:
    """Why `topics.parse` refused a topic: a device topic with an invalid id, or not ours."""
    if isinstance(topic, str) and len(topic) <= topics.MAX_TOPIC_LENGTH:
        parts = topic.split("/")
        if (
            len(parts) == 5
            and parts[0] == topics.PREFIX
            and parts[2] == "dev"
            and parts[4] in (Kind.STATUS.value, Kind.HEALTH.value)
            and id_problem(parts[1]) is None
            and id_problem(parts[3]) is not None
        ):
            return Reason.BAD_DEVICE_ID
    return Reason.BAD_TOPIC

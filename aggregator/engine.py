"""The round engine: cohort selection, stage timing and straggler accounting, sans-IO.

One engine runs a fleet's rounds one after another. It knows devices from their retained status,
selects a cohort, announces the round, and then either drives a `SecAggServer` (secure mode) or
collects `PlainUpdate`s (plain mode) until the round closes. It never touches a socket, a clock
or a global RNG: the adapter (`aggregator.service`) hands it decoded topics, raw payloads and
the time, and publishes the `Publish` records it returns.

    engine.observe_status(device_id, payload, now)
    outs = engine.start_round(round_id=..., model_version=..., dim=..., now=...)
    outs = engine.receive(topic, payload, now)     # any round message from a device
    outs = engine.tick(now)                        # at or after engine.next_deadline
    engine.receive(topic, payload, now, defer_close=True)   # then, if engine.close_due:
    outs = engine.tick(now)                        # closes the completed stage
    engine.outcome                                 # RoundOutcome once the round is over

Rules:
- Selection prefers eligible devices (online, not busy, battery above the floor, charging
  first) that run the current model, and over-selects by `over_select` so that dropouts still
  leave enough for the target cohort. A device that did not answer a stage in time is
  *stalled*: it is left out of the next selections (taken only to reach `min_cohort`) until
  it shows life again (an online status or any message) or `stall_cooldown` seconds passed.
- Stage timing (shared.stagetime): each stage closes when everyone expected answered, after
  its soft limit as soon as a `quorum` answered and the round can go on with them, or at its
  hard limit. Limits are durations counted from the stage's opening; the engine opens the
  first stage with the announcement and each later one when it closes the previous one. With
  `adapt`, the soft limits announced for a round follow the recent rounds' arrival times.
  Secure rounds take only devices whose status carries a graph ticket, and the announcement
  carries each member's ticket as its status gave it.
- Every payload is decoded with the type the topic implies and the sender/round the topic
  names. A bad payload raises nothing out of `receive`: it is counted under a reason, listed
  in `events`, and the round goes on. A message for a stage that already closed, or for a round
  that is over, is counted as late and has no effect.
- Secure rounds: the aggregator learns only the sums (SecAgg+ via shared.secagg). Plain
  rounds: robust aggregation rules apply (aggregator.rules).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fleetlearn.aggregator import rules
from fleetlearn.shared import protocol, rounds, sparse, topics, wire
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.rounds import PlainUpdate, RoundAnnounce, RoundMode, RoundState, StageTimes
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.config import SecAggConfig, Stage, suggest_neighbours
from fleetlearn.shared.secagg.errors import RemoteProtocolError, SecAggError
from fleetlearn.shared.secagg.packing import packed_size
from fleetlearn.shared.secagg.server import STAGE_OF, Outbound, SecAggServer, ServerState
from fleetlearn.shared.secagg.shamir import SHARE_BYTES
from fleetlearn.shared.stagetime import ArrivalHistory, StageWindow

KEEP_FINISHED = 32  # finished rounds whose late messages are still told apart
# Size limits per device message, far below the wire's 16 MB default: what an honest device of
# this round can send, plus room for the envelope. One device's credentials then cannot make
# the aggregator decompress and parse tens of megabytes per message.
_SLACK = 16 * 1024
STATUS_LIMITS = wire.Limits(max_compressed=_SLACK, max_decompressed=_SLACK)


def round_limits(dim: int, secagg: SecAggConfig | None) -> dict[topics.Kind, wire.Limits]:
    """The largest payload an honest device sends on each round topic, with slack."""
    if secagg is None:  # plain: a dense float32 update is the largest form
        sizes = {topics.Kind.UPDATE: 8 * dim + _SLACK}
    else:
        k = secagg.neighbours
        sizes = {
            topics.Kind.ADVERTISE: _SLACK,
            topics.Kind.SHARES: k * (sm.SEALED_SHARE_BYTES + 128) + _SLACK,
            topics.Kind.MASKED: packed_size(secagg.dimension + 4, secagg.field_bits) + _SLACK,
            topics.Kind.UNMASK: k * (SHARE_BYTES + 128) + _SLACK,
        }
    return {
        kind: wire.Limits(max_compressed=size, max_decompressed=size)
        for kind, size in sizes.items()
    }


class EngineError(FleetlearnError):
    """The engine cannot do what was asked (e.g. too few eligible devices to start)."""


class NotEnoughDevicesError(EngineError):
    pass


@dataclass(frozen=True, slots=True)
class Publish:
    """Something for the adapter to publish. `payload` is wire bytes, or a JSON-able dict."""

    topic: str
    payload: bytes | dict[str, Any]
    retain: bool = False
    qos: int = 1
    expiry: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    mode: Literal["secure", "plain"] = "secure"
    cohort: int = 20  # devices whose updates a round aims for
    over_select: float = 1.2  # select this many times `cohort` when enough are eligible
    min_cohort: int = 3
    battery_floor: float = 0.2
    times: StageTimes = field(default_factory=StageTimes)
    # After its soft limit a stage closes once this share of the devices it waits for answered.
    quorum: float = 0.8
    adapt: bool = True  # soft limits follow recent arrival times (never above the hard ones)
    stall_cooldown: float = 600.0  # seconds a stalled device stays deprioritized at most
    training: rounds.TrainingPlan = field(default_factory=rounds.TrainingPlan)
    sparsity: Literal["dense", "rand_k", "top_k"] = "rand_k"
    density: float = 0.1
    quant_bits: int = 16
    clip: float = 0.5
    top_k_bits: int = 8
    neighbours: int = 0  # 0: about 2*log2(n), or sized for expected_dropout
    threshold: int = 0  # 0: k/2 + 1
    # Share of the cohort expected to drop during a round. Above 0, an automatic k is the
    # smallest whose chance of aborting a round stays under 1e-3 (secagg.suggest_neighbours).
    expected_dropout: float = 0.0
    rule: rules.RuleName = "mean"
    trim: float = 0.2
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.min_cohort < (3 if self.mode == "secure" else 1):
            raise EngineError(
                f"rounds.min_cohort must be >= 3 in secure mode, got {self.min_cohort}"
            )
        if self.cohort < self.min_cohort:
            raise EngineError(
                f"rounds.cohort {self.cohort} is below rounds.min_cohort {self.min_cohort}"
            )
        if not 0.0 <= self.expected_dropout < 1.0:
            raise EngineError(
                f"secagg.expected_dropout must be in [0, 1), got {self.expected_dropout}"
            )
        if self.over_select < 1.0:
            raise EngineError(f"rounds.over_select must be >= 1, got {self.over_select}")
        if not 0.0 < self.quorum <= 1.0:
            raise EngineError(f"stages.quorum must be in (0, 1], got {self.quorum}")
        if not 0.0 <= self.stall_cooldown <= 86_400:
            raise EngineError(
                f"rounds.stall_cooldown must be in 0..86400 seconds, got {self.stall_cooldown}"
            )
        if self.mode == "secure" and self.sparsity == "top_k":
            raise EngineError(
                "compression.sparsity top_k cannot be masked (each device picks its own "
                "coordinates); use rand_k or dense in secure mode"
            )
        if self.mode == "secure" and self.rule != "mean":
            raise EngineError(
                f"aggregation.rule {self.rule!r} needs individual updates; secure mode only "
                "sees their sum, so it supports 'mean' only"
            )


@dataclass(slots=True)
class StageStats:
    expected: int = 0
    arrived: int = 0
    late: int = 0
    dropped: int = 0  # expected devices that had not answered when the stage closed
    # UNMASK closes as soon as every secret has t shares; answers still on their way then are
    # not needed and are not dropouts.
    not_needed: int = 0
    closed_by: str = ""  # "complete", "quorum" (after the soft limit) or "hard_limit"
    seconds: float = 0.0  # from the stage's opening to its close
    last: float = 0.0  # from the stage's opening to the last answer in time

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "arrived": self.arrived,
            "late": self.late,
            "dropped": self.dropped,
            "not_needed": self.not_needed,
            "closed_by": self.closed_by,
            "seconds": self.seconds,
        }


@dataclass(slots=True)
class RoundOutcome:
    round_id: int
    state: RoundState
    reason: str
    model_version: int
    mean_update: np.ndarray | None  # full-dimension float64, in FedAvg direction
    error_bound: float  # max abs error of mean_update from quantization (0 for plain dense)
    survivors: tuple[str, ...]
    metrics: dict[str, Any]


@dataclass(slots=True)
class _Device:
    status: wire.DeviceStatus
    seen: float


@dataclass(slots=True)
class _Run:
    announce: RoundAnnounce
    started: float
    window: StageWindow  # the open stage's limits on this clock
    dim: int
    coordinates: np.ndarray | None  # rand-k indices
    server: SecAggServer | None
    stages: dict[Stage, StageStats]
    members: frozenset[str] = frozenset()  # the cohort, for membership tests per message
    limits: dict[topics.Kind, wire.Limits] = field(default_factory=dict)  # see round_limits
    plain: dict[str, PlainUpdate] = field(default_factory=dict)
    plain_closed: bool = False
    clock: float = 0.0  # the latest `now` seen: whether the soft limit has passed
    opened_mark: int = 0  # the engine's arrival count when the open stage opened
    # Why the next stage close happens: everyone answered ("complete"; UNMASK also when every
    # secret has t shares), a quorum after the soft limit, or the hard limit.
    closing: Literal["complete", "quorum", "hard_limit"] = "complete"
    uplink: Counter[str] = field(default_factory=Counter)
    downlink: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


class RoundEngine:
    def __init__(
        self,
        *,
        fleet: str,
        config: EngineConfig,
        verify_keys: Mapping[str, bytes],
        random: Callable[[int], bytes],
    ) -> None:
        topics.check_id(fleet, "fleet id")
        self.fleet = fleet
        self.config = config
        self._verify_keys = dict(verify_keys)
        self._random = random
        self._devices: dict[str, _Device] = {}
        self._stalled: dict[str, float] = {}  # device -> when it last missed a stage
        # Order of arrival, not time (several arrive at one instant): device -> the count of
        # arrivals when it last sent an online status or any message.
        self._arrivals = 0
        self._alive_mark: dict[str, int] = {}
        self.history = ArrivalHistory()
        self._run: _Run | None = None
        # Recent finished rounds -> whether UNMASK ended early (answers then are not late).
        # Bounded: an engine runs for months, and outcomes hold full-size update vectors.
        self._finished: dict[int, bool] = {}
        self._last_finished = -1
        self.outcome: RoundOutcome | None = None
        self.rejected_total: Counter[str] = Counter()
        self.late_total = 0
        self.late_after_close: Counter[int] = Counter()
        self.not_needed_after_close: Counter[int] = Counter()
        self.events: list[dict[str, Any]] = []  # drained by the adapter onto fl/{fleet}/events

    # ------------------------------------------------------------------------- device status

    def observe_status(self, device_id: str, payload: bytes, now: float) -> None:
        """Record a retained status message (or last will) of one device."""
        if device_id not in self._verify_keys:
            self._reject(
                "unknown_device", device_id, "status from a device that is not provisioned"
            )
            return
        try:
            status = wire.decode(
                payload,
                wire.DeviceStatus,
                context={"device_id": device_id},
                limits=STATUS_LIMITS,
            )
        except wire.WireError as exc:
            self._reject("bad_payload", device_id, f"status: {exc}")
            return
        self._devices[device_id] = _Device(status, now)
        if status.online:
            self._stalled.pop(device_id, None)  # it is back: its connection works again
            self._arrivals += 1
            self._alive_mark[device_id] = self._arrivals

    def stalled(self, now: float) -> frozenset[str]:
        """Devices that missed a stage recently and showed no life since."""
        cooldown = self.config.stall_cooldown
        return frozenset(d for d, at in self._stalled.items() if now - at < cooldown)

    def online(self) -> list[str]:
        return sorted(d for d, info in self._devices.items() if info.status.online)

    def eligible(self, model_version: int | None = None) -> list[str]:
        c = self.config
        out = []
        for dev, info in self._devices.items():
            s = info.status
            if not s.online or s.eligibility is not wire.Eligibility.ELIGIBLE:
                continue
            if s.battery < c.battery_floor and not s.charging:
                continue
            if model_version is not None and s.model_version != model_version:
                continue
            out.append(dev)
        return sorted(out)

    # ------------------------------------------------------------------------------ rounds

    @property
    def running(self) -> bool:
        return self._run is not None

    @property
    def round_id(self) -> int | None:
        return None if self._run is None else self._run.announce.round_id

    @property
    def next_deadline(self) -> float | None:
        run = self._run
        if run is None:
            return None
        return run.window.next_deadline(run.clock)

    def _ticket(self, device: str) -> bytes:
        info = self._devices.get(device)
        return b"" if info is None else info.status.ticket

    def select(self, model_version: int, now: float | None = None) -> tuple[str, ...]:
        """The cohort: eligible devices on the current model first, charging ones preferred;
        stalled devices (see `stalled`) only as far as needed to reach `min_cohort`. Secure
        rounds need a graph ticket in the device's status (see shared.secagg.graph)."""
        c = self.config
        secure = c.mode == "secure"
        stalled = self.stalled(now) if now is not None else frozenset()
        preferred = [
            d
            for d in self.eligible(model_version)
            if d not in stalled and (not secure or self._ticket(d))
        ]
        taken = set(preferred)
        fallback = [
            d
            for d in self.eligible()
            if d not in taken and d not in stalled and (not secure or self._ticket(d))
        ]

        # Random order within each preference class, drawn from the injected source.
        def shuffled(items: list[str]) -> list[str]:
            keys = {d: self._random(8) for d in items}
            charging = {d for d in items if self._devices[d].status.charging}
            return sorted(items, key=lambda d: (d not in charging, keys[d]))

        ordered = shuffled(preferred) + shuffled(fallback)
        want = max(c.min_cohort, math.ceil(c.cohort * c.over_select))
        chosen = ordered[:want]
        if len(chosen) < c.min_cohort:
            # Better a round with devices that stalled before than no round at all.
            last_resort = [d for d in self.eligible() if d in stalled]
            chosen += shuffled(last_resort)[: c.min_cohort - len(chosen)]
        if len(chosen) < c.min_cohort:
            raise NotEnoughDevicesError(
                f"only {len(chosen)} eligible devices (of {len(self.online())} online); "
                f"a round needs at least {c.min_cohort}"
            )
        return tuple(sorted(chosen))

    def _compression(self) -> sparse.Compression:
        c = self.config
        if c.sparsity == "dense":
            return sparse.Compression(mode=sparse.SparseMode.DENSE)
        if c.sparsity == "top_k":
            return sparse.Compression(
                mode=sparse.SparseMode.TOP_K, density=c.density, bits=c.top_k_bits
            )
        return sparse.Compression(
            mode=sparse.SparseMode.RAND_K, density=c.density, bits=c.quant_bits, clip=c.clip
        )

    def start_round(
        self,
        *,
        round_id: int,
        model_version: int,
        dim: int,
        now: float,
        cohort: tuple[str, ...] | None = None,
    ) -> list[Publish]:
        if self._run is not None:
            raise EngineError(f"round {self._run.announce.round_id} is still running")
        c = self.config
        cohort = cohort if cohort is not None else self.select(model_version, now)
        seed = self._random(rounds.SEED_BYTES)
        compression = self._compression()
        k = compression.k(dim)
        coordinates = None
        if compression.mode is sparse.SparseMode.RAND_K:
            coordinates = sparse.shared_coordinates(seed, dim, k)
        secagg = None
        server = None
        tickets = b""
        times = self.history.adapted(c.times) if c.adapt else c.times
        if c.mode == "secure":
            if compression.mode is sparse.SparseMode.DENSE:
                quant_bits, clip = c.quant_bits, c.clip
            else:
                quant_bits, clip = compression.bits, compression.clip
            neighbours, threshold = c.neighbours or None, c.threshold or None
            if neighbours is None and c.expected_dropout > 0:
                neighbours, suggested_t = suggest_neighbours(len(cohort), c.expected_dropout)
                threshold = threshold or suggested_t
            secagg = SecAggConfig.create(
                cohort_size=len(cohort),
                dimension=k,
                neighbours=neighbours,
                threshold=threshold,
                quant_bits=quant_bits,
                clip=clip,
                # FedAvg weight = local examples trained on, at most the plan's max_samples.
                max_weight=float(c.training.max_samples),
                max_samples=c.training.max_samples,
            )
            missing = [d for d in cohort if not self._ticket(d)]
            if missing:
                raise EngineError(f"{missing[:3]} have no graph ticket in their status")
            tickets = b"".join(self._ticket(d) for d in cohort)
            server = SecAggServer(
                config=secagg,
                round_id=round_id,
                round_seed=seed,
                verify_keys={d: self._verify_keys[d] for d in cohort},
                tickets={d: self._ticket(d) for d in cohort},
                deadlines=None,  # the engine applies soft and hard limits (tick)
            )
        announce = RoundAnnounce(
            round_id=round_id,
            mode=RoundMode(c.mode),
            model_version=model_version,
            cohort=cohort,
            seed=seed,
            compression=compression,
            training=c.training,
            times=times,
            secagg=secagg,
            tickets=tickets,
        )
        stages = {s: StageStats() for s in Stage}
        first = Stage.ADVERTISE if server is not None else Stage.COLLECT
        stages[first].expected = len(cohort)
        self._run = _Run(
            announce=announce,
            started=now,
            window=StageWindow.open(times, first, now),
            opened_mark=self._arrivals,
            dim=dim,
            coordinates=coordinates,
            server=server,
            stages=stages,
            members=frozenset(cohort),
            limits=round_limits(dim, secagg),
            clock=now,
        )
        self.outcome = None
        self._event(
            "round_started", round_id, cohort=len(cohort), mode=c.mode, model_version=model_version
        )
        payload = wire.encode(announce)
        for dev in cohort:
            self._run.downlink[dev] += len(payload)
        return [Publish(topics.round_announce(self.fleet), payload, retain=True)]

    # ---------------------------------------------------------------------------- messages

    def receive(
        self, topic: topics.Topic, payload: bytes, now: float, *, defer_close: bool = False
    ) -> list[Publish]:
        """One message from a device on a round topic. Never raises for bad input.

        A message that completes its stage closes the stage, unless `defer_close`: then
        `close_due` turns true and the next tick() closes it. Per-message work is small; a
        close (rosters, share inboxes, unmasking, the plain aggregation rule) is not, and
        deferring it lets the adapter run the two on different threads."""
        device = topic.device_id or "?"
        run = self._run
        # Only the device itself may publish under its id (broker ACL): whatever it sent, even
        # late or garbled, shows that it runs and reaches the broker again.
        self._stalled.pop(device, None)
        if device in self._verify_keys:
            self._arrivals += 1
            self._alive_mark[device] = self._arrivals
        if run is not None:
            run.clock = max(run.clock, now)
        route = protocol.UPLINK.get(topic.kind)
        if route is None or topic.round_id is None:
            self._reject("wrong_topic", device, f"{topic.kind.value} is not a device round topic")
            return []
        if run is None or topic.round_id != run.announce.round_id:
            if topic.kind is topics.Kind.UNMASK and self._unmask_ended_early(topic.round_id):
                # Asked for and on its way when every secret already had t shares: not late,
                # just not needed. Counted, without an event each (hundreds per round at scale).
                self.not_needed_after_close[topic.round_id] += 1
                return []
            if topic.round_id <= self._last_finished or (
                run is not None and topic.round_id < run.announce.round_id
            ):
                self._late(topic.round_id, device, topic.kind, run_stats=None)
            else:
                self._reject("unknown_round", device, f"round {topic.round_id} is not running")
            return []
        if device not in run.members:
            self._reject("not_in_cohort", device, f"not selected for round {topic.round_id}")
            return []
        expected = route.message
        stage = route.stage
        assert stage is not None
        if run.announce.mode not in route.modes:
            self._reject(
                "wrong_mode",
                device,
                f"{topic.kind.value} message in a {run.announce.mode.value} round",
            )
            return []
        try:
            message = wire.decode(
                payload,
                expect=expected,
                context={"round_id": topic.round_id, "sender": device},
                limits=run.limits.get(topic.kind, wire.DEFAULT_LIMITS),
            )
        except wire.WireError as exc:
            self._reject("bad_payload", device, str(exc))
            return []
        run.uplink[device] += len(payload)
        if run.server is None:
            return self._plain_receive(run, device, message, now, defer_close)
        return self._secure_receive(run, device, stage, message, now, defer_close)

    @property
    def close_due(self) -> bool:
        """The open stage should close now and tick() will close it (see receive): everyone
        it waits for answered, or its soft limit passed and a quorum answered that lets the
        round go on."""
        run = self._run
        if run is None:
            return False
        if run.server is not None:
            if run.server.close_due:
                return True
            return self._enough(run) and run.server.close_problem() is None
        if run.plain_closed:
            return False
        return len(run.plain) == len(run.announce.cohort) or (
            self._enough(run) and len(run.plain) >= self.config.min_cohort
        )

    def _enough(self, run: _Run) -> bool:
        stats = run.stages[run.window.stage]
        return run.window.enough(
            run.clock, answered=stats.arrived, expected=stats.expected, quorum=self.config.quorum
        )

    def tick(self, now: float) -> list[Publish]:
        """Close the open stage if it is due: complete, past its soft limit with enough
        answers, or at its hard limit."""
        run = self._run
        if run is None:
            return []
        run.clock = max(run.clock, now)
        hard = now >= run.window.hard_at
        if run.server is None:
            if hard or self.close_due:
                if len(run.plain) < len(run.announce.cohort):
                    run.closing = "hard_limit" if hard else "quorum"
                return self._plain_close(run, now)
            return []
        server = run.server
        before = server.state
        try:
            if server.close_due:
                outs = server.tick(now)
            elif hard or self.close_due:
                run.closing = "hard_limit" if hard else "quorum"
                outs = server.close_stage(now)
            else:
                return []
        except SecAggError as exc:
            return self._finish(run, RoundState.ABORTED, f"secure aggregation failed: {exc}", now)
        return self._after_server(run, before, outs, now)

    # ----------------------------------------------------------------------------- secure

    def _secure_receive(
        self,
        run: _Run,
        device: str,
        stage: Stage,
        message: wire.Message,
        now: float,
        defer_close: bool,
    ) -> list[Publish]:
        server = run.server
        assert server is not None
        current = server.stage
        if current is None or protocol.STAGE_INDEX[stage] < protocol.STAGE_INDEX[current]:
            self._late(run.announce.round_id, device, None, run_stats=run.stages[stage])
            return []
        before = server.state
        try:
            outs = server.receive(message, now, close=not defer_close)
        except RemoteProtocolError as exc:
            self._reject("protocol", device, exc.problem)
            return []
        except SecAggError as exc:
            return self._finish(run, RoundState.ABORTED, f"secure aggregation failed: {exc}", now)
        self._arrived(run, run.stages[stage], now)
        if not defer_close and server.state is before and self.close_due:
            run.closing = "quorum"
            try:
                outs += server.close_stage(now)
            except SecAggError as exc:
                return self._finish(
                    run, RoundState.ABORTED, f"secure aggregation failed: {exc}", now
                )
        return self._after_server(run, before, outs, now)

    def _arrived(self, run: _Run, stats: StageStats, now: float) -> None:
        stats.arrived += 1
        stats.last = now - run.window.opened

    def _after_server(
        self, run: _Run, before: ServerState, outs: list[Outbound], now: float
    ) -> list[Publish]:
        server = run.server
        assert server is not None
        publishes = [self._route(run, out) for out in outs]
        after = server.state
        if after is not before:
            self._stage_closed(run, before, now)
            following = STAGE_OF.get(after)
            if following is not None:
                run.window = StageWindow.open(run.announce.times, following, now)
                run.opened_mark = self._arrivals
        if after is ServerState.DONE:
            publishes += self._secure_done(run, now)
        elif after in (ServerState.ABORTED, ServerState.ERROR):
            publishes += self._finish(run, RoundState.ABORTED, server.reason or "aborted", now)
        return publishes

    def _stage_closed(self, run: _Run, before: ServerState, now: float) -> None:
        server = run.server
        assert server is not None
        stage = STAGE_OF.get(before)
        if stage is None:
            return
        stats = run.stages[stage]
        dropped = [d for d, s in server.dropped.items() if s is stage]
        early = now < run.window.hard_at
        if stage is Stage.UNMASK and early and server.state is ServerState.DONE:
            stats.not_needed, dropped = len(dropped), []
        stats.dropped = len(dropped)
        self._stall(dropped, run.opened_mark, now)
        self._closed(run, stats, now)
        following = {
            Stage.ADVERTISE: (Stage.SHARE, server.advertised),
            Stage.SHARE: (Stage.COLLECT, server.sharers),
            Stage.COLLECT: (Stage.UNMASK, server.survivors),
        }.get(stage)
        if following is not None and server.state not in (ServerState.ABORTED, ServerState.ERROR):
            run.stages[following[0]].expected = len(following[1])
        self._event(
            "stage_closed",
            run.announce.round_id,
            stage=stage.value,
            arrived=stats.arrived,
            expected=stats.expected,
            dropped=sorted(dropped)[:20],
            late=stats.late,
            closed_by=stats.closed_by,
            stage_s=stats.seconds,
            after_s=round(now - run.started, 3),
        )

    def _route(self, run: _Run, out: Outbound) -> Publish:
        msg = out.message
        route = protocol.ROUTE_OF[type(msg)]
        r = run.announce.round_id
        payload = wire.encode(msg)
        if out.to is not None:  # an inbox message (roster, share inbox): one per device
            assert isinstance(msg, sm.Roster | sm.ShareInbox)
            topic = topics.per_device(self.fleet, r, route.kind, msg.recipient)
            run.downlink[msg.recipient] += len(payload)
        else:  # unmask request, abort: one message for the whole cohort
            topic = topics.per_round(self.fleet, r, route.kind)
            for dev in run.announce.cohort:
                run.downlink[dev] += len(payload)
        return Publish(topic, payload, expiry=route.expiry)

    def _secure_done(self, run: _Run, now: float) -> list[Publish]:
        server = run.server
        assert server is not None
        result = server.result
        assert result is not None
        try:
            mean = result.mean()
            bound = float(np.max(result.mean_error_bound())) if mean.size else 0.0
        except SecAggError as exc:
            return self._finish(run, RoundState.ABORTED, str(exc), now)
        full = self._expand(run, mean)
        # Sharers that sent no masked input (their pairwise masks were removed with their
        # neighbours' key shares) and survivors that did not help unmask (their self-masks
        # were rebuilt without them): dropouts the protocol recovered from.
        recovered = run.stages[Stage.COLLECT].dropped + run.stages[Stage.UNMASK].dropped
        return self._finish(
            run,
            RoundState.CLOSED,
            "",
            now,
            mean_update=full,
            bound=bound,
            survivors=tuple(sorted(result.survivors)),
            extra={
                "mean_loss": _finite(result.mean_loss),
                "accuracy": _finite(result.accuracy),
                "samples": result.samples,
                "weight_sum": result.weight_sum,
                "dropouts_recovered": recovered,
            },
        )

    def _expand(self, run: _Run, values: np.ndarray) -> np.ndarray:
        if run.coordinates is None:
            return values.astype(np.float64)
        return sparse.scatter(run.coordinates, values, run.dim)

    # ------------------------------------------------------------------------------ plain

    def _plain_receive(
        self, run: _Run, device: str, message: wire.Message, now: float, defer_close: bool
    ) -> list[Publish]:
        assert isinstance(message, PlainUpdate)
        stats = run.stages[Stage.COLLECT]
        if run.plain_closed:
            self._late(run.announce.round_id, device, None, run_stats=stats)
            return []
        if device in run.plain:
            self._reject("duplicate", device, "second update in one round")
            return []
        try:
            sparse.check_update(message.update, config=run.announce.compression, dim=run.dim)
        except wire.WireError as exc:
            self._reject("bad_payload", device, str(exc))
            return []
        run.plain[device] = message
        self._arrived(run, stats, now)
        if self.close_due and not defer_close:
            if len(run.plain) < len(run.announce.cohort):
                run.closing = "quorum"
            return self._plain_close(run, now)
        return []

    def _plain_close(self, run: _Run, now: float) -> list[Publish]:
        run.plain_closed = True
        c = self.config
        stats = run.stages[Stage.COLLECT]
        missing = [d for d in run.announce.cohort if d not in run.plain]
        stats.dropped = len(missing)
        self._stall(missing, run.opened_mark, now)
        self._closed(run, stats, now)
        self._event(
            "stage_closed",
            run.announce.round_id,
            stage="collect",
            arrived=stats.arrived,
            expected=stats.expected,
            dropped=sorted(missing)[:20],
            late=stats.late,
            closed_by=stats.closed_by,
            stage_s=stats.seconds,
            after_s=round(now - run.started, 3),
        )
        if len(run.plain) < c.min_cohort:
            return self._finish(
                run,
                RoundState.ABORTED,
                f"only {len(run.plain)} of {len(run.announce.cohort)} devices sent an update "
                f"by the deadline; at least {c.min_cohort} are needed",
                now,
            )
        senders = sorted(run.plain)
        updates = []
        for dev in senders:
            msg = run.plain[dev]
            dense = sparse.to_dense(
                msg.update, config=run.announce.compression, dim=run.dim, seed=run.announce.seed
            )
            updates.append(dense)
        weights = [run.plain[d].weight for d in senders]
        mean = rules.aggregate(updates, weights, rule=c.rule, trim=c.trim, clip_norm=c.clip_norm)
        samples = sum(run.plain[d].samples for d in senders)
        loss = sum(run.plain[d].loss * run.plain[d].samples for d in senders)
        correct = sum(run.plain[d].correct for d in senders)
        return self._finish(
            run,
            RoundState.CLOSED,
            "",
            now,
            mean_update=mean,
            bound=0.0,
            survivors=tuple(senders),
            extra={
                "mean_loss": _finite(loss / samples) if samples else None,
                "accuracy": _finite(correct / samples) if samples else None,
                "samples": samples,
                "weight_sum": float(sum(weights)),
                "dropouts_recovered": 0,
            },
        )

    # ----------------------------------------------------------------------------- finish

    def abort(self, reason: str, now: float) -> list[Publish]:
        """End the running round without a result (e.g. the service is shutting down)."""
        run = self._run
        if run is None:
            return []
        return self._finish(run, RoundState.ABORTED, reason, now)

    def _finish(
        self,
        run: _Run,
        state: RoundState,
        reason: str,
        now: float,
        *,
        mean_update: np.ndarray | None = None,
        bound: float = 0.0,
        survivors: tuple[str, ...] = (),
        extra: dict[str, Any] | None = None,
    ) -> list[Publish]:
        ann = run.announce
        cohort = len(ann.cohort)
        participants = max(1, len(survivors) or cohort)
        late = sum(s.late for s in run.stages.values())
        stages = (
            run.stages if run.server is not None else {Stage.COLLECT: run.stages[Stage.COLLECT]}
        )
        metrics: dict[str, Any] = {
            "round": ann.round_id,
            "mode": ann.mode.value,
            "state": state.value,
            "reason": reason,
            "model_version": ann.model_version,
            "cohort": cohort,
            "survivors": len(survivors),
            "stragglers": sum(s.dropped for s in stages.values()),
            "late_messages": late,
            "rejected": sum(run.rejected.values()),
            "rejected_by_reason": dict(run.rejected),
            "stages": {s.value: st.as_dict() for s, st in stages.items()},
            "uplink_bytes_per_device": round(sum(run.uplink.values()) / participants),
            "downlink_bytes_per_device": round(sum(run.downlink.values()) / max(1, cohort)),
            "duration_s": round(now - run.started, 3),
            "dimension": run.dim,
            "coordinates": int(run.coordinates.size) if run.coordinates is not None else run.dim,
            "quantization_bound": bound,
            "mean_loss": None,
            "accuracy": None,
            "samples": 0,
            "dropouts_recovered": 0,
        }
        if extra:
            metrics.update(extra)
        outcome = RoundOutcome(
            round_id=ann.round_id,
            state=state,
            reason=reason,
            model_version=ann.model_version,
            mean_update=mean_update if state is RoundState.CLOSED else None,
            error_bound=bound,
            survivors=survivors,
            metrics=metrics,
        )
        self.outcome = outcome
        unmask = run.stages[Stage.UNMASK]
        self._finished[ann.round_id] = state is RoundState.CLOSED and unmask.not_needed > 0
        self._last_finished = max(self._last_finished, ann.round_id)
        for counts in (self._finished, self.late_after_close, self.not_needed_after_close):
            for old in [r for r in counts if r <= ann.round_id - KEEP_FINISHED]:
                del counts[old]
        self._run = None
        # No round_closed/round_aborted event here: the service sends it once the outcome is
        # persisted (a closed round is only closed once its release is committed).
        out = []
        if state is RoundState.ABORTED:
            out.append(
                Publish(
                    topics.round_announce(self.fleet),
                    wire.encode(ann.closed(RoundState.ABORTED, reason)),
                    retain=True,
                )
            )
            if run.server is not None and run.server.state is not ServerState.ABORTED:
                # The server did not abort on its own (shutdown, local failure): tell the cohort.
                abort = sm.Abort(round_id=ann.round_id, reason=reason[: sm.MAX_REASON])
                out.append(self._route(run, Outbound(abort, None)))
        return out

    def closing_announce(self, outcome: RoundOutcome, announce: RoundAnnounce) -> Publish:
        return Publish(
            topics.round_announce(self.fleet),
            wire.encode(announce.closed(outcome.state, outcome.reason)),
            retain=True,
        )

    # ------------------------------------------------------------------------ bookkeeping

    def reject(self, reason: str, device: str, detail: str) -> None:
        """Count a message the adapter refused before the engine saw it (e.g. one whose
        handling failed), like the engine's own refusals: per round, in total, on events."""
        self._reject(reason, device, detail)

    def _closed(self, run: _Run, stats: StageStats, now: float) -> None:
        stats.closed_by, run.closing = run.closing, "complete"
        stats.seconds = round(now - run.window.opened, 3)
        if stats.arrived:
            # How long the devices that did answer needed: what the next soft limits follow.
            self.history.record(run.window.stage, stats.last)

    def _stall(self, devices: list[str], opened_mark: int, now: float) -> None:
        """Devices that did not answer a stage before it closed: deprioritized in selection.
        Not those that showed life while the stage was open (a status: a device that left the
        round by its own choice, e.g. below its privacy floor, says so that way)."""
        for device in devices:
            if self._alive_mark.get(device, 0) <= opened_mark:
                self._stalled[device] = now

    def _reject(self, reason: str, device: str, detail: str) -> None:
        run = self._run
        if run is not None:
            run.rejected[reason] += 1
        self.rejected_total[reason] += 1
        self._event(
            "rejected",
            None if run is None else run.announce.round_id,
            device=device,
            reason=reason,
            detail=detail[:300],
        )

    def _late(
        self, round_id: int, device: str, kind: topics.Kind | None, *, run_stats: StageStats | None
    ) -> None:
        """A message for a stage or round that is over: counted, and otherwise ignored."""
        if run_stats is not None:
            run_stats.late += 1
        self.late_total += 1
        if run_stats is None and round_id in self._finished:  # recent enough to count
            # The round's summary may be out already; this shows on the events topic.
            self.late_after_close[round_id] += 1
        self._event("late", round_id, device=device, topic=kind.value if kind else None)

    def _unmask_ended_early(self, round_id: int) -> bool:
        return self._finished.get(round_id, False)

    def _event(self, kind: str, round_id: int | None, **data: Any) -> None:
        self.events.append({"event": kind, "round": round_id, **data})

    def drain_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    @property
    def announce(self) -> RoundAnnounce | None:
        return None if self._run is None else self._run.announce


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None

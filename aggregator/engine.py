"""The round engine: one fleet's rounds, one after another, as a state machine, sans-IO.

It knows devices from their retained status (aggregator.selection), selects a cohort,
announces the round, runs it with the configured mode's strategy (aggregator.modes: secure
SecAgg+ or plain), applies stage timing, counts stragglers, late and refused messages, and
hands the service a `RoundOutcome` (aggregator.report). It never touches a socket, a clock or
a global RNG: the adapter (`aggregator.service`) hands it decoded topics, raw payloads and the
time, and publishes the `Publish` records it returns.

    engine.observe_status(device_id, payload, now)
    outs = engine.start_round(round_id=..., model_version=..., dim=..., now=...)
    outs = engine.receive(topic, payload, now)     # any round message from a device
    outs = engine.tick(now)                        # at or after engine.next_deadline
    engine.receive(topic, payload, now, defer_close=True)   # then, if engine.close_due:
    outs = engine.tick(now)                        # closes the completed stage
    engine.outcome / engine.take_outcome()         # RoundOutcome once the round is over

Phases (`Phase`; the transitions are the table `TRANSITIONS`, anything missing is refused):

    IDLE, CLOSED, ABORTED, ERROR --start--> RUNNING     start_round()
    RUNNING --stage_closed--> RUNNING                   a stage closed, the next one opened
    RUNNING --collected--> CLOSING --result--> CLOSED   the last stage closed; the mean update
    RUNNING, CLOSING --fail--> ABORTED                  too few devices, a threshold, abort()
    RUNNING, CLOSING --bug--> ERROR                     any unexpected exception

Rules:
- Only RUNNING takes device messages and ticks. CLOSED, ABORTED and ERROR say how the last
  round ended; each takes a new round. ERROR is an aborted round whose reason is the bug
  ("internal error while ..."): the cohort is told the round is over, the summary says so,
  and the engine runs the next round. The exception itself waits in `errors` for the
  adapter to log with its traceback.
- A message is checked (topic, round, cohort, mode, size limit) and decoded before anything
  of the round changes: a failure there, bad input or a bug, costs that message only. It is
  counted under a reason and listed in `events`; `receive` raises nothing.
- A message for a stage that already closed, or for a round that is over, is counted as late
  and has no effect. A stage that closed because what it had sufficed (secure UNMASK: every
  secret has t shares) counts the answers still on their way as not needed instead.
- Stage timing (shared.stagetime): each stage closes when everyone expected answered, after
  its soft limit as soon as a `quorum` answered and the round can go on with them, or at its
  hard limit. Limits are durations counted from the stage's opening: the announcement opens
  the mode's first stage, each close the next one. With `adapt`, the soft limits announced
  for a round follow the recent rounds' arrival times.
- Every payload is decoded with the type the topic implies (shared.protocol), the sender and
  round the topic names, and the round's size limit for that topic.
- Memory stays flat over months of rounds: a finished round leaves a small record (whether
  its late answers were needed), the outcome with its full-size update only until the
  service takes it, and `events` keeps the newest `MAX_EVENTS` if nobody drains them.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from fleetlearn.aggregator import privacy, report
from fleetlearn.aggregator.engine_config import EngineConfig, EngineError, NotEnoughDevicesError
from fleetlearn.aggregator.modes import (
    MODES,
    SLACK,
    ModeRound,
    Progress,
    RefusedError,
    RoundFailedError,
    RoundSetup,
    StageClose,
)
from fleetlearn.aggregator.report import ClosedBy, RoundOutcome, RoundTally, StageStats
from fleetlearn.aggregator.selection import Devices
from fleetlearn.shared import compression, protocol, rounds, topics, wire
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.secagg.config import MAX_CLASSES, Stage
from fleetlearn.shared.secagg.server import Outbound
from fleetlearn.shared.stagetime import ArrivalHistory, StageWindow
from fleetlearn.shared.tflite.manifest import Task

__all__ = [
    "TRANSITIONS",
    "BudgetSpentError",
    "EngineConfig",
    "EngineError",
    "Event",
    "NotEnoughDevicesError",
    "Phase",
    "Publish",
    "RoundEngine",
    "RoundOutcome",
]


class BudgetSpentError(EngineError):
    """The next round would take the run past the privacy budget: it is not started."""

    def __init__(self, reason: str, figures: dict[str, Any]) -> None:
        super().__init__(reason, key="privacy.epsilon")
        self.reason = reason
        self.figures = figures  # the `privacy` figures of metrics, as of the refusal


class Phase(enum.Enum):
    IDLE = "idle"  # no round started yet
    RUNNING = "running"  # a round is open: its mode takes messages for the open stage
    CLOSING = "closing"  # the last stage closed; the mode computes the mean update
    CLOSED = "closed"  # the last round closed: `outcome` holds its mean update
    ABORTED = "aborted"  # the last round ended without a result: `outcome.reason` says why
    ERROR = "error"  # the last round hit a bug: aborted, with the error as its reason


class Event(enum.Enum):
    START = "start"
    STAGE_CLOSED = "stage_closed"  # a stage closed and the next one opened
    COLLECTED = "collected"  # the last stage closed: nothing more is taken
    RESULT = "result"  # the mode produced the mean update
    FAIL = "fail"  # the round cannot go on, or abort() was called
    BUG = "bug"  # an unexpected exception while handling the round


_LIVE = (Phase.RUNNING, Phase.CLOSING)
_OVER = (Phase.IDLE, Phase.CLOSED, Phase.ABORTED, Phase.ERROR)

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    **{(p, Event.START): Phase.RUNNING for p in _OVER},
    (Phase.RUNNING, Event.STAGE_CLOSED): Phase.RUNNING,
    (Phase.RUNNING, Event.COLLECTED): Phase.CLOSING,
    (Phase.CLOSING, Event.RESULT): Phase.CLOSED,
    **{(p, Event.FAIL): Phase.ABORTED for p in _LIVE},
    **{(p, Event.BUG): Phase.ERROR for p in _LIVE},
}

KEEP_FINISHED = 32  # finished rounds whose late messages are still told apart
MAX_EVENTS = 10_000  # undrained events kept (the service drains them every few seconds)
MAX_ERRORS = 16  # unexpected exceptions kept for the adapter to log
STATUS_LIMITS = wire.Limits(max_compressed=SLACK, max_decompressed=SLACK)  # see modes.SLACK


@dataclass(frozen=True, slots=True)
class Publish:
    """Something for the adapter to publish. `payload` is wire bytes, or a JSON-able dict."""

    topic: str
    payload: bytes | dict[str, Any]
    retain: bool = False
    qos: int = 1
    expiry: int | None = None


@dataclass(slots=True)
class _Run:
    announce: RoundAnnounce
    mode: ModeRound
    started: float
    window: StageWindow  # the open stage's limits on this clock
    dim: int
    coordinates: int  # how many coordinates each device sends (rand-k), else dim
    labels: tuple[str, ...]  # the model's class names: per-class evaluation counts
    task: Task  # what the model's output is: how its evaluation figures read
    members: frozenset[str]  # the cohort, for membership tests per message
    tally: RoundTally
    clock: float  # the latest `now` seen: whether the soft limit has passed
    opened_mark: int  # the devices' sign-of-life count when the open stage opened
    closing: ClosedBy = "complete"  # why the stage being closed closes
    spare: Stage | None = None  # a stage that closed with answers it did not need
    charged: privacy.RoundCharge | None = None  # what the ledger took for this round


def _unbiased_scale(announce: RoundAnnounce, dim: int) -> float:
    """d/k for rand-k rounds without error feedback, else 1.

    Rand-k sends k of d coordinates; the mean of the sent values is the mean update on those
    coordinates and nothing elsewhere, so in expectation it is k/d of the full mean. Error
    feedback makes up the rest in later rounds; without it, scaling by d/k makes the applied
    update unbiased (docs/compression.md), so `server.lr` keeps its meaning at any density.
    """
    plan = announce.compression
    if plan.mode is not compression.SparseMode.RAND_K or announce.training.error_feedback:
        return 1.0
    return dim / plan.k(dim)


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
        self._mode = MODES[config.mode](config)
        self._devices = Devices(config, verify_keys, random)
        self.history = ArrivalHistory()
        self._phase = Phase.IDLE
        self._run: _Run | None = None
        # What the engine keeps of a finished round, for its late messages: the stage whose
        # answers still on their way were not needed (None: every late answer is late).
        self._finished: dict[int, Stage | None] = {}  # the last KEEP_FINISHED rounds
        self._last_finished = -1
        self._last_call: tuple[Any, ...] | None = None  # the last invitations announced alone
        self.outcome: RoundOutcome | None = None
        self.rejected_total: Counter[str] = Counter()
        self.late_total = 0
        self.late_after_close: Counter[int] = Counter()
        self.not_needed_after_close: Counter[int] = Counter()
        # Drained by the adapter onto fl/{fleet}/events.
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.errors: collections.deque[BaseException] = collections.deque(maxlen=MAX_ERRORS)
        # Privacy: every release's charge so far, oldest first (the service loads it from the
        # store on start and persists each new one), and the budget they must stay within.
        self.ledger = privacy.Ledger()
        self.budget = (
            privacy.Budget(epsilon=config.dp_epsilon, delta=config.dp_delta)
            if config.dp_epsilon
            else None
        )

    # ------------------------------------------------------------------------------ phase

    @property
    def phase(self) -> Phase:
        return self._phase

    def _transition(self, event: Event) -> None:
        try:
            self._phase = TRANSITIONS[(self._phase, event)]
        except KeyError:
            raise EngineError(f"no transition from {self._phase.name} on {event.name}") from None

    # ---------------------------------------------------------------------------- devices

    def observe_status(self, device_id: str, payload: bytes, now: float) -> None:
        """Record a retained status message (or last will) of one device."""
        if not self._devices.known(device_id):
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
        except Exception as exc:  # a bug on some input: it costs this status only
            self._internal_error(device_id, exc)
            return
        self._devices.observe(device_id, status, now)

    def stalled(self, now: float) -> frozenset[str]:
        """Devices that missed a stage recently and showed no life since."""
        return self._devices.stalled(now)

    def online(self) -> list[str]:
        return self._devices.online()

    def eligible(self, model_version: int | None = None) -> list[str]:
        return self._devices.eligible(model_version)

    def training(self) -> list[str]:
        """Asynchronous rounds: the devices with an open invitation (training now)."""
        return self._mode.training()

    def group_due(self, model_version: int, now: float) -> bool:
        """Secure asynchronous rounds: whether enough devices hold an update to start a
        round (always true in other modes)."""
        return self._mode.group_due(self._devices, model_version, now)

    @property
    def next_lapse(self) -> float | None:
        """Asynchronous rounds: when the oldest open invitation lapses (its device then
        counts as stalled at the next round or call)."""
        return self._mode.next_lapse()

    def repeat_call(self) -> None:
        """Let the next `invite` announce even unchanged invitations (after a reconnect, the
        round topic was republished with the last finished round)."""
        self._last_call = None

    def invite(self, round_id: int, model_version: int, now: float) -> list[Publish]:
        """Secure asynchronous rounds, while no round runs: announce the invitations to
        train (retained, with no group: a call; `round_id` is the next round's), when they
        changed since the last call. Nothing in other modes."""
        if self._phase in _LIVE:
            raise EngineError(f"round {self.round_id} is running: its announcement invites")
        called = self._mode.call(self._devices, round_id, model_version, now)
        if called is None or (round_id, model_version, *called) == self._last_call:
            return []
        self._last_call = (round_id, model_version, *called)
        c, mode = self.config, self._mode
        invited, invited_in = called
        announce = RoundAnnounce(
            round_id=round_id,
            mode=mode.round_mode,
            model_version=model_version,
            cohort=(),
            seed=self._random(rounds.SEED_BYTES),
            compression=mode.compression(),
            training=c.plan_for(model_version),
            times=c.times,
            invited=invited,
            invited_in=invited_in,
            max_staleness=c.max_staleness,
            staleness_exponent=c.staleness_exponent,
        )
        return [Publish(topics.round_announce(self.fleet), wire.encode(announce), retain=True)]

    def select(self, model_version: int, now: float | None = None) -> tuple[str, ...]:
        """The cohort (aggregator.selection); the mode may refuse devices (secure rounds take
        only devices whose status carries a graph ticket)."""
        return self._devices.select(model_version, now, self._mode.admits).cohort

    # ----------------------------------------------------------------------------- rounds

    @property
    def running(self) -> bool:
        return self._phase in _LIVE

    @property
    def round_id(self) -> int | None:
        return None if self._run is None else self._run.announce.round_id

    @property
    def announce(self) -> RoundAnnounce | None:
        return None if self._run is None else self._run.announce

    @property
    def planned_charge(self) -> privacy.RoundCharge | None:
        """The running round's planned privacy charge (None without privacy)."""
        return None if self._run is None else self._run.mode.planned_charge

    def budget_spent(self, round_id: int) -> BudgetSpentError | None:
        """Whether the budget is spent already, whatever the next round would cost (so that
        a restarted service says so before it waits for devices)."""
        c = self.config
        if self.budget is None or not self.ledger:
            return None
        spent = self._epsilon()
        if spent < c.dp_epsilon:
            return None
        last = self.ledger.charges[-1]
        return BudgetSpentError(
            f"privacy budget: epsilon {spent:.3g} of privacy.epsilon = {c.dp_epsilon:g} at "
            f"delta {c.dp_delta:g} is spent ({len(self.ledger)} rounds charged); round "
            f"{round_id} and later do not run on this budget",
            self.privacy_figures(last, last),
        )

    def _epsilon(self, extra: privacy.RoundCharge | None = None) -> float:
        """The figure the budget holds: amplified by sampling only with privacy.amplification
        (docs/privacy.md says who can see the cohorts)."""
        c = self.config
        return self.ledger.epsilon(c.dp_delta, amplified=c.dp_amplification, extra=extra)

    @property
    def next_deadline(self) -> float | None:
        run = self._run
        return None if run is None else run.window.next_deadline(run.clock)

    def start_round(
        self,
        *,
        round_id: int,
        model_version: int,
        dim: int,
        now: float,
        cohort: tuple[str, ...] | None = None,
        labels: tuple[str, ...] = (),
        task: Task = Task.CLASSIFICATION,
        waiting: Collection[str] = (),
    ) -> list[Publish]:
        """Select (or take) a cohort and announce the round. Raises NotEnoughDevicesError or
        EngineError (nothing changed then), e.g. while a round still runs. `labels`: the
        model's class names (its manifest's), for per-class federated evaluation; `task`:
        its manifest's task, which names the evaluation figures on `metrics`; `waiting`:
        devices whose answer arrived between rounds and waits for this one (asynchronous
        rounds: their invitations do not lapse).

        With a privacy budget, raises BudgetSpentError when the round, charged as planned,
        would take the run past it. A cohort given by the caller is charged as sampled with
        rate 1 (nothing is known of how it was chosen)."""
        if self._phase not in _OVER:
            raise EngineError(f"round {self.round_id} is still running")
        c, mode = self.config, self._mode
        rate, candidates = 1.0, None
        if cohort is None:
            selection = mode.cohort(self._devices, model_version, now, waiting)
            cohort, rate = selection.cohort, selection.sampling_rate
            candidates = selection.candidates
        unknown = [d for d in cohort if not self._devices.known(d)]
        if unknown:
            raise EngineError(f"cohort members {unknown[:3]} are not provisioned")
        if len(labels) > MAX_CLASSES:
            labels = ()  # too many classes to count each in every masked vector: totals only
        seed = self._random(rounds.SEED_BYTES)
        plan = mode.compression()
        coordinates = None
        if plan.mode is compression.SparseMode.RAND_K:
            coordinates = compression.shared_coordinates(seed, dim, plan.k(dim))
        tickets = {}
        for device in cohort:
            status = self._devices.status(device)
            tickets[device] = b"" if status is None else status.ticket
        setup = RoundSetup(
            round_id=round_id,
            cohort=cohort,
            seed=seed,
            dim=dim,
            compression=plan,
            coordinates=coordinates,
            verify_keys={d: self._verify_keys[d] for d in cohort},
            tickets=tickets,
            labels=tuple(labels),
            model_version=model_version,
            opened=now,
            sampling_rate=rate,
            candidates=len(cohort) if candidates is None else candidates,
            noise_seed=self._random(32) if c.privacy != "none" else b"",
        )
        machine = mode.open(setup)
        planned = machine.planned_charge
        if planned is not None and self.budget is not None:
            self._check_budget(self.budget, planned, round_id)
        times = self.history.adapted(c.times) if c.adapt else c.times
        announce = RoundAnnounce(
            round_id=round_id,
            mode=mode.round_mode,
            model_version=model_version,
            cohort=cohort,
            seed=seed,
            compression=plan,
            training=c.plan_for(model_version),
            times=times,
            secagg=machine.secagg,
            tickets=machine.tickets,
            invited=machine.invited,
            invited_in=machine.invited_in,
            max_staleness=c.max_staleness if c.asynchronous else 0,
            staleness_exponent=c.staleness_exponent,
        )
        payload = wire.encode(announce)
        first = mode.stages[0]
        tally = RoundTally()
        tally.stages[first].expected = len(cohort) if machine.expected is None else machine.expected
        for dev in cohort:
            tally.downlink[dev] += len(payload)
        self._transition(Event.START)
        self._run = _Run(
            announce=announce,
            mode=machine,
            started=now,
            window=StageWindow.open(times, first, now),
            dim=dim,
            coordinates=int(coordinates.size) if coordinates is not None else dim,
            labels=tuple(labels),
            task=task,
            members=frozenset(cohort),
            tally=tally,
            clock=now,
            opened_mark=self._devices.mark,
        )
        self.outcome = None
        self._event(
            "round_started", round_id, cohort=len(cohort), mode=c.mode, model_version=model_version
        )
        return [Publish(topics.round_announce(self.fleet), payload, retain=True)]

    def receive(
        self, topic: topics.Topic, payload: bytes, now: float, *, defer_close: bool = False
    ) -> list[Publish]:
        """One message from a device on a round topic. Never raises.

        A message that completes its stage closes the stage, unless `defer_close`: then
        `close_due` turns true and the next tick() closes it. Per-message work is small; a
        close (rosters, share inboxes, unmasking, the plain aggregation rule) is not, and
        deferring it lets the adapter run the two on different threads."""
        device = topic.device_id or "?"
        try:
            admitted = self._admit(topic, device, payload, now)
        except Exception as exc:  # a bug on some input, before the round changed
            self._internal_error(device, exc)
            return []
        if admitted is None:
            return []
        run, stage, message = admitted
        return self._guarded(
            f"taking {topic.kind.value} from {device}",
            run,
            now,
            lambda: self._take(run, device, stage, message, len(payload), now, defer_close),
        )

    @property
    def close_due(self) -> bool:
        """The open stage should close now and tick() will close it (see receive): everyone
        it waits for answered, or its soft limit passed and a quorum answered that lets the
        round go on."""
        run = self._run
        if run is None or self._phase is not Phase.RUNNING:
            return False
        try:
            return self._due(run) is not None
        except Exception as exc:
            self.errors.append(exc)
            return True  # tick() meets the same failure inside its guard and ends the round

    def tick(self, now: float) -> list[Publish]:
        """Close the open stage if it is due: complete, past its soft limit with enough
        answers, or at its hard limit."""
        run = self._run
        if run is None or self._phase is not Phase.RUNNING:
            return []
        run.clock = max(run.clock, now)
        return self._guarded(
            f"closing {run.window.stage.value}", run, now, lambda: self._tick(run, now)
        )

    def abort(self, reason: str, now: float) -> list[Publish]:
        """End the running round without a result (e.g. the service is shutting down)."""
        run = self._run
        if run is None:
            return []
        return self._guarded(
            "aborting", run, now, lambda: self._finish(run, Event.FAIL, reason, now)
        )

    def take_outcome(self) -> RoundOutcome | None:
        """Hand over the last round's outcome, and forget it here: the engine keeps no
        full-size update once the service has it (what late messages need stays)."""
        outcome, self.outcome = self.outcome, None
        return outcome

    def closing_announce(self, outcome: RoundOutcome, announce: RoundAnnounce) -> Publish:
        return Publish(
            topics.round_announce(self.fleet),
            wire.encode(announce.closed(outcome.state, outcome.reason)),
            retain=True,
        )

    # ------------------------------------------------------------------ steps of a round

    def _admit(
        self, topic: topics.Topic, device: str, payload: bytes, now: float
    ) -> tuple[_Run, Stage, wire.Message] | None:
        """Checks and decoding; None when the message is refused or late (counted)."""
        run = self._run
        self._devices.heard_from(device)
        if run is not None:
            run.clock = max(run.clock, now)
        route = protocol.UPLINK.get(topic.kind)
        if route is None or route.stage is None or topic.round_id is None:
            self._reject("wrong_topic", device, f"{topic.kind.value} is not a device round topic")
            return None
        if run is None or (
            topic.round_id != run.announce.round_id and topic.round_id not in run.mode.calls
        ):
            if topic.round_id in self._finished and self._finished[topic.round_id] is route.stage:
                # Asked for and on its way when its stage already had what it needed: not
                # late, just not needed. Counted, without an event each (hundreds per round).
                self.not_needed_after_close[topic.round_id] += 1
            elif topic.round_id <= self._last_finished or (
                run is not None and topic.round_id < run.announce.round_id
            ):
                self._late(topic.round_id, device, topic.kind, run_stats=None)
            else:
                self._reject("unknown_round", device, f"round {topic.round_id} is not running")
            return None
        if self._phase is not Phase.RUNNING:
            self._late(topic.round_id, device, topic.kind, run_stats=None)
            return None
        if device not in run.members:
            self._reject("not_in_cohort", device, f"not selected for round {topic.round_id}")
            return None
        if run.announce.mode not in route.modes:
            self._reject(
                "wrong_mode",
                device,
                f"{topic.kind.value} message in a {run.announce.mode.value} round",
            )
            return None
        try:
            message = wire.decode(
                payload,
                expect=route.message,
                context={"round_id": topic.round_id, "sender": device},
                limits=run.mode.limits.get(topic.kind, wire.DEFAULT_LIMITS),
            )
        except wire.WireError as exc:
            self._reject("bad_payload", device, str(exc))
            return None
        return run, route.stage, message

    def _guarded(
        self, doing: str, run: _Run, now: float, step: Callable[[], list[Publish]]
    ) -> list[Publish]:
        """One step of the live round. A deliberate failure aborts the round; any other
        exception is a bug: the round ends in ERROR with the error as its reason."""
        try:
            try:
                return step()
            except RoundFailedError as exc:
                if self._run is not run:  # raised after the round ended: a bug after all
                    raise
                return self._finish(run, Event.FAIL, exc.reason, now)
        except Exception as exc:
            return self._crash(run, doing, exc, now)

    def _take(
        self,
        run: _Run,
        device: str,
        stage: Stage,
        message: wire.Message,
        size: int,
        now: float,
        defer_close: bool,
    ) -> list[Publish]:
        run.tally.uplink[device] += size
        stats = run.tally.stages[stage]
        if protocol.STAGE_INDEX[stage] < protocol.STAGE_INDEX[run.mode.stage]:
            self._late(run.announce.round_id, device, None, run_stats=stats)
            return []
        try:
            run.mode.take(device, message, now)
        except RefusedError as exc:
            self._reject(exc.reason, device, exc.detail)
            return []
        stats.arrived += 1
        stats.last = now - run.window.opened
        due = None if defer_close else self._due(run)
        return [] if due is None else self._close(run, due, now)

    def _due(self, run: _Run) -> ClosedBy | None:
        """Whether the open stage may close now without its hard limit, and why."""
        if run.mode.complete():
            return "complete"
        stats = run.tally.stages[run.window.stage]
        enough = run.window.enough(
            run.clock, answered=stats.arrived, expected=stats.expected, quorum=self.config.quorum
        )
        return "quorum" if enough and run.mode.can_close() else None

    def _tick(self, run: _Run, now: float) -> list[Publish]:
        if run.mode.complete():
            return self._close(run, "complete", now)
        if now >= run.window.hard_at:
            return self._close(run, "hard_limit", now)
        due = self._due(run)
        return [] if due is None else self._close(run, due, now)

    def _close(self, run: _Run, closed_by: ClosedBy, now: float) -> list[Publish]:
        run.closing = closed_by
        return self._advance(run, run.mode.close(now), now)

    def _advance(self, run: _Run, progress: Progress, now: float) -> list[Publish]:
        """Publish what the mode's step produced and follow it: a stage closed (the next one
        opens), the round failed, or the last stage closed (the mean update)."""
        publishes = [self._route(run, out) for out in progress.outbound]
        if progress.closed is not None:
            self._stage_closed(run, progress.closed, now)
            if progress.failure is None and not progress.collected:
                self._transition(Event.STAGE_CLOSED)
                stage = run.mode.stage
                run.window = StageWindow.open(run.announce.times, stage, now)
                run.opened_mark = self._devices.mark
        if progress.failure is not None:
            return publishes + self._finish(run, Event.FAIL, progress.failure, now)
        if progress.collected:
            self._transition(Event.COLLECTED)
            try:
                aggregate = run.mode.result(run.tally.stages)
            except RoundFailedError as exc:
                return publishes + self._finish(run, Event.FAIL, exc.reason, now)
            return publishes + self._finish(run, Event.RESULT, "", now, aggregate=aggregate)
        return publishes

    def _stage_closed(self, run: _Run, closed: StageClose, now: float) -> None:
        stats = run.tally.stages[closed.stage]
        unanswered = closed.unanswered
        if closed.sufficed and now < run.window.hard_at:
            stats.not_needed, unanswered = len(unanswered), []
            if stats.not_needed:
                run.spare = closed.stage
        stats.dropped = len(unanswered)
        self._devices.stall(unanswered, run.opened_mark, now)
        stats.closed_by, run.closing = run.closing, "complete"
        stats.seconds = round(now - run.window.opened, 3)
        if stats.arrived:
            # How long the devices that did answer needed: what the next soft limits follow.
            self.history.record(run.window.stage, stats.last)
        if closed.next_expected is not None:
            following = self._mode.stages.index(closed.stage) + 1
            run.tally.stages[self._mode.stages[following]].expected = closed.next_expected
        self._event(
            "stage_closed",
            run.announce.round_id,
            stage=closed.stage.value,
            arrived=stats.arrived,
            expected=stats.expected,
            dropped=sorted(unanswered)[:20],
            late=stats.late,
            closed_by=stats.closed_by,
            stage_s=stats.seconds,
            after_s=round(now - run.started, 3),
        )

    def _route(self, run: _Run, out: Outbound) -> Publish:
        """An aggregator message on the topic the protocol gives it."""
        msg = out.message
        route = protocol.ROUTE_OF[type(msg)]
        r = run.announce.round_id
        payload = wire.encode(msg)
        if out.to is not None:  # one device's inbox (roster, share inbox)
            (device,) = out.to
            topic = topics.per_device(self.fleet, r, route.kind, device)
            run.tally.downlink[device] += len(payload)
        else:  # one message for the whole cohort (unmask request, abort)
            topic = topics.per_round(self.fleet, r, route.kind)
            for dev in run.announce.cohort:
                run.tally.downlink[dev] += len(payload)
        return Publish(topic, payload, expiry=route.expiry)

    # ----------------------------------------------------------------------------- finish

    def _finish(
        self,
        run: _Run,
        event: Event,
        reason: str,
        now: float,
        *,
        aggregate: report.Aggregate | None = None,
    ) -> list[Publish]:
        """End the round: its outcome and summary, what the fleet is told, the next phase.
        No round_closed/round_aborted event here: the service sends it once the outcome is
        persisted (a closed round is only closed once its release is committed)."""
        ann = run.announce
        state = RoundState.CLOSED if event is Event.RESULT else RoundState.ABORTED
        kept = aggregate if state is RoundState.CLOSED else None
        scale = _unbiased_scale(ann, run.dim)
        if kept is not None and scale != 1.0:
            kept = dataclasses.replace(
                kept, mean_update=kept.mean_update * scale, error_bound=kept.error_bound * scale
            )
        metrics = report.summary(
            announce=ann,
            state=state,
            reason=reason,
            tally=run.tally,
            stages=self._mode.stages,
            started=run.started,
            now=now,
            dim=run.dim,
            coordinates=run.coordinates,
            aggregate=kept,
            labels=run.labels,
            task=run.task,
        )
        planned = run.mode.planned_charge
        charge = run.mode.spent_charge()
        if charge is not None and run.charged is None:
            self.ledger.add(charge)  # the noisy sum exists: charged whatever happens next
            run.charged = charge
        if planned is not None:
            metrics["privacy"] = self.privacy_figures(planned, charge)
        outcome = RoundOutcome(
            round_id=ann.round_id,
            state=state,
            reason=reason,
            model_version=ann.model_version,
            mean_update=None if kept is None else kept.mean_update,
            error_bound=0.0 if kept is None else kept.error_bound,
            survivors=() if kept is None else kept.survivors,
            metrics=metrics,
            charge=charge,
            planned_charge=planned,
        )
        out: list[Publish] = []
        if state is RoundState.ABORTED:
            closed = wire.encode(ann.closed(RoundState.ABORTED, reason))
            out.append(Publish(topics.round_announce(self.fleet), closed, retain=True))
            out += [self._route(run, notice) for notice in run.mode.abort_notice(reason)]
        self._transition(event)
        self._remember(ann.round_id, run.spare if kept is not None else None)
        self._run = None
        self.outcome = outcome
        return out

    def privacy_figures(
        self, planned: privacy.RoundCharge, charge: privacy.RoundCharge | None
    ) -> dict[str, Any]:
        """The `privacy` figures of metrics: the run's epsilon at the configured delta (the
        ledger, with this round's charge if it released), and the same run's epsilon for
        someone who knows every round's cohort (no amplification by sampling)."""
        c = self.config
        return {
            "mechanism": c.privacy,
            "released": charge is not None,
            "noise_multiplier": (charge or planned).noise_multiplier,
            "sampling_rate": planned.sampling_rate,
            "rounds_charged": len(self.ledger),
            "epsilon": self._epsilon(),
            "amplification": c.dp_amplification,
            "epsilon_amplified": self.ledger.epsilon(c.dp_delta, amplified=True),
            "epsilon_cohort_known": self.ledger.epsilon(c.dp_delta, amplified=False),
            "delta": c.dp_delta,
            "epsilon_budget": c.dp_epsilon or None,
        }

    def _check_budget(
        self, budget: privacy.Budget, planned: privacy.RoundCharge, round_id: int
    ) -> None:
        after = self._epsilon(planned)
        if after <= budget.epsilon:
            return
        c = self.config
        figures = self.privacy_figures(planned, None)
        raise BudgetSpentError(
            f"privacy budget: round {round_id} would take epsilon from "
            f"{figures['epsilon']:.3g} to {after:.3g}, past privacy.epsilon = "
            f"{c.dp_epsilon:g} at delta {c.dp_delta:g} ({len(self.ledger)} rounds "
            "charged); no more rounds run on this budget",
            figures,
        )

    def refusal(self, round_id: int, model_version: int, reason: str) -> list[Publish]:
        """A round that is not started (the budget): the retained round topic says so, with
        the reason, and so does an event. The service publishes `metrics` itself."""
        c, mode = self.config, self._mode
        announce = RoundAnnounce(
            round_id=round_id,
            mode=mode.round_mode,
            model_version=model_version,
            cohort=(),
            seed=bytes(rounds.SEED_BYTES),
            compression=mode.compression(),
            training=c.plan_for(model_version),
            times=c.times,
            state=RoundState.ABORTED,
            reason=reason[:1000],
        )
        self._event("round_refused", round_id, reason=reason)
        return [Publish(topics.round_announce(self.fleet), wire.encode(announce), retain=True)]

    def _crash(self, run: _Run, doing: str, exc: BaseException, now: float) -> list[Publish]:
        """An unexpected exception while handling `run`: end it in ERROR if it still runs."""
        self.errors.append(exc)
        detail = f"{type(exc).__name__}: {exc}"
        if self._run is not run or self._phase not in _LIVE:
            self._event("internal_error", run.announce.round_id, doing=doing, detail=detail[:300])
            return []
        reason = f"internal error while {doing}: {detail}"
        try:
            return self._finish(run, Event.BUG, reason, now)
        except Exception as again:  # the summary itself failed: end it with the bare facts
            self.errors.append(again)
            ann = run.announce
            planned = run.mode.planned_charge
            # Whether the noisy sum exists is unknown here: charged as planned (never less
            # than was spent), unless the ledger already took this round's charge.
            charge = run.charged
            if charge is None and planned is not None:
                charge = run.charged = planned
                self.ledger.add(planned)
            if self._phase in _LIVE:
                self._transition(Event.BUG)
            self._run = None
            self.outcome = RoundOutcome(
                round_id=ann.round_id,
                state=RoundState.ABORTED,
                reason=reason,
                model_version=ann.model_version,
                mean_update=None,
                error_bound=0.0,
                survivors=(),
                metrics={
                    "round": ann.round_id,
                    "mode": ann.mode.value,
                    "state": RoundState.ABORTED.value,
                    "reason": reason,
                    "model_version": ann.model_version,
                    "cohort": len(ann.cohort),
                },
                charge=charge,
                planned_charge=planned,
            )
            closed = wire.encode(ann.closed(RoundState.ABORTED, reason))
            return [Publish(topics.round_announce(self.fleet), closed, retain=True)]

    def _remember(self, round_id: int, spare: Stage | None) -> None:
        self._finished[round_id] = spare
        self._last_finished = max(self._last_finished, round_id)
        for counts in (self._finished, self.late_after_close, self.not_needed_after_close):
            for old in [r for r in counts if r <= round_id - KEEP_FINISHED]:
                del counts[old]

    # ------------------------------------------------------------------------ bookkeeping

    def reject(self, reason: str, device: str, detail: str) -> None:
        """Count a message the adapter refused before the engine saw it, like the engine's
        own refusals: per round, in total, on events."""
        self._reject(reason, device, detail)

    def _reject(self, reason: str, device: str, detail: str) -> None:
        run = self._run
        if run is not None:
            run.tally.rejected[reason] += 1
        self.rejected_total[reason] += 1
        self._event(
            "rejected",
            None if run is None else run.announce.round_id,
            device=device,
            reason=reason,
            detail=detail[:300],
        )

    def _internal_error(self, device: str, exc: BaseException) -> None:
        """A bug met while checking one message, before it changed anything."""
        self.errors.append(exc)
        self._reject("internal_error", device, f"{type(exc).__name__}: {exc}")

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

    def _event(self, kind: str, round_id: int | None, **data: Any) -> None:
        self.events.append({"event": kind, "round": round_id, **data})

    def drain_events(self) -> list[dict[str, Any]]:
        events = list(self.events)
        self.events.clear()
        return events

    def drain_errors(self) -> list[BaseException]:
        """The unexpected exceptions since the last call, for the adapter to log."""
        errors = list(self.errors)
        self.errors.clear()
        return errors

"""Round-level messages: the announcement every device reads, and plain-mode updates.

The secure stages' own messages live in `shared.secagg.messages`; model releases in
`shared.release`. What is here:

- `RoundAnnounce`, retained on `fl/{fleet}/round`: which round, which model version it trains,
  who is in the cohort, the round seed (public: it picks the rand-k coordinates; the neighbour
  graph does not depend on it), each cohort member's graph ticket (secure rounds: copied from
  its retained status, the commitment its advert will open; see shared.secagg.graph),
  compression, SecAgg parameters, local training settings, and each stage's soft and hard
  limit. Those are *durations*, each counted from the moment its stage opened, never
  wall-clock times, because device clocks are not synchronised; each side turns them into
  deadlines on its own clock (`shared.stagetime`).
  The same topic later carries the round's end (`state` CLOSED or ABORTED, with a reason), so a
  device that reconnects learns that the round it was in is over.
- `PlainUpdate` on `fl/{fleet}/r/{r}/update/{id}`: a compressed update plus the FedAvg weight,
  training metrics and the device's cost report (`shared.cost`), for plain (non-secure) rounds
  where the aggregator may see each update.

Asynchronous rounds (FedBuff): a "round" is the time between two releases. Its announcement
lists the devices `invited` to train, each with the round that invited it (`invited_in`): the
announcing round for a new invitation, an earlier one for a device still training since then
(its slot stays taken). A device invited anew trains on the announced release; one no longer
listed by a newer announcement is no longer invited.
- `ASYNC` (plain): `cohort` is the invited devices. A device answers on the topic of the
  round that invited it, with `base_version` the model version that round announced; an
  update that is too stale when it arrives is refused.
- `ASYNC_SECURE`: a device that finished training holds its update and puts its base version
  in its status (`ready_version`). `cohort` is a group of such devices whose updates this
  round sums with SecAgg+, each scaled by its staleness discount by the device itself; an
  empty cohort is a call: invitations only, no secure stages.
"""

from __future__ import annotations

import enum
import math

from fleetlearn.shared import wire
from fleetlearn.shared.compression.messages import (
    Compression,
    DenseUpdate,
    SharedUpdate,
    SparseMode,
    SparseUpdate,
)
from fleetlearn.shared.cost import Cost
from fleetlearn.shared.secagg.config import MAX_CLASSES as SECAGG_MAX_CLASSES
from fleetlearn.shared.secagg.config import STAGES, SecAggConfig, Stage
from fleetlearn.shared.secagg.keys import TICKET_BYTES

SEED_BYTES = 32
DEFAULT_LEARNING_RATE = 0.05
MAX_COHORT = 100_000
MAX_STAGE_SECONDS = 86_400


class RoundMode(enum.Enum):
    SECURE = "secure"  # SecAgg+: the aggregator learns only the sum
    PLAIN = "plain"  # each update is visible; robust aggregation rules apply
    # Buffered asynchronous (FedBuff): invited devices train on the announced release and
    # send a plain update tagged with its version whenever it is ready; every `buffer`
    # updates the aggregator applies their staleness-weighted mean (docs/learning.md).
    ASYNC = "async"
    # The same, with secure aggregation: a device that finished training holds its update
    # and says so in its status; the aggregator sums the held updates of a group of at
    # least `buffer` devices in one SecAgg+ round (docs/secagg.md).
    ASYNC_SECURE = "async-secure"


class RoundState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # aggregated and released
    ABORTED = "aborted"


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial discount: an asynchronous update `staleness` releases old counts
    (1 + staleness)^-exponent."""
    return float((1.0 + max(0, staleness)) ** -exponent)


@wire.record
class StageTimes(wire.Record):
    """Each stage's soft and hard limit: durations in seconds, never clock times.

    A stage's limits count from the moment it opened, on the clock of whoever applies them
    (see `shared.stagetime`): the aggregator opens ADVERTISE (a plain round's COLLECT) with
    the announcement and every later stage when it closes the one before; a device counts from
    when it received the announcement, or the message that opened the stage (roster, share
    inbox, unmask request). A stage closes when every device expected answered, after its soft
    limit as soon as enough have, and at its hard limit whoever answered.

    Plain rounds use only `collect`, which must allow for local training.
    """

    advertise: float = 10.0
    share: float = 10.0
    collect: float = 40.0
    unmask: float = 10.0
    advertise_hard: float = 30.0
    share_hard: float = 30.0
    collect_hard: float = 120.0
    unmask_hard: float = 30.0

    def __post_init__(self) -> None:
        for stage in STAGES:
            soft, hard = self.soft(stage), self.hard(stage)
            for name, value in ((stage.value, soft), (f"{stage.value}_hard", hard)):
                wire.require(
                    isinstance(value, float | int)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and 0 < value <= MAX_STAGE_SECONDS,
                    f"StageTimes.{name}",
                    f"{value!r} must be in (0, {MAX_STAGE_SECONDS}] seconds",
                )
            wire.require(
                hard >= soft,
                f"StageTimes.{stage.value}_hard",
                f"{hard} is below the soft limit {stage.value} = {soft}",
            )

    def soft(self, stage: Stage) -> float:
        """Seconds after `stage` opened from which it closes once enough devices answered."""
        return float(getattr(self, stage.value))

    def hard(self, stage: Stage) -> float:
        """Seconds after `stage` opened at which it closes, whoever answered."""
        return float(getattr(self, f"{stage.value}_hard"))


@wire.record
class TrainingPlan(wire.Record):
    """What each device does locally before it sends an update, set per round.

    learning_rate  the local optimizer's rate this round (the aggregator's schedule picks it;
                   models built before it was a train input keep their built-in rate)
    epochs, steps  passes over the local training split, or, when `steps` > 0, exactly that
                   many optimizer steps (so a device with 20 examples learns as much per round
                   as one with 2000)
    max_samples    a device trains (and evaluates) on at most this many recent examples
    prox_mu        FedProx: weight of the proximal term mu/2 ||w - w_global||^2 (0 = FedAvg)
    eval_fraction  share of each device's examples held out, never trained on, on which it
                   evaluates the round's model (federated evaluation); 0 = no evaluation
    personal       weight names that stay on the device: trained locally, never sent, never
                   aggregated (personalization layers); the update covers the others only
    error_feedback carry what compression did not send into the next round. Off, the
                   aggregator scales rand-k's mean by d/k to keep it unbiased
                   (docs/compression.md)
    local_clip, local_noise
                   local differential privacy (both 0: none; docs/privacy.md): the device
                   clips its update to L2 norm local_clip, adds Gaussian noise of standard
                   deviation local_noise * local_clip to every coordinate before
                   compression, and sends no weight or evaluation figures
    cost_report    devices send, with each update, what they spent since their previous one
                   (shared.cost; in secure rounds inside the masked vector, which
                   `SecAggConfig.cost_report` then lays out). Off by default on the wire, so an
                   older device refuses an announcement that asks for it instead of sending an
                   update its aggregator cannot read; the aggregator turns it off in private
                   rounds (docs/privacy.md)
    """

    epochs: int = 1
    max_samples: int = 2048
    error_feedback: bool = True
    learning_rate: float = DEFAULT_LEARNING_RATE
    steps: int = 0
    prox_mu: float = 0.0
    eval_fraction: float = 0.0
    personal: tuple[str, ...] = ()
    local_clip: float = 0.0
    local_noise: float = 0.0
    cost_report: bool = False

    @property
    def local_dp(self) -> bool:
        return self.local_noise > 0

    def __post_init__(self) -> None:
        wire.require(1 <= self.epochs <= 100, "TrainingPlan.epochs", "must be in 1..100")
        for name, high in (("local_clip", 1e6), ("local_noise", 1000.0)):
            value = getattr(self, name)
            wire.require(
                isinstance(value, float | int)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and 0.0 <= value <= high,
                f"TrainingPlan.{name}",
                f"{value!r} must be in [0, {high:g}]",
            )
        wire.require(
            (self.local_clip > 0) == (self.local_noise > 0),
            "TrainingPlan.local_noise",
            "local_clip and local_noise are both 0 (no local DP) or both > 0",
        )
        wire.require(
            1 <= self.max_samples <= 1_000_000, "TrainingPlan.max_samples", "must be in 1..1e6"
        )
        wire.require(0 <= self.steps <= 100_000, "TrainingPlan.steps", "must be in 0..100000")
        for name, low, high in (("learning_rate", 0.0, 10.0), ("prox_mu", 0.0, 100.0)):
            value = getattr(self, name)
            wire.require(
                isinstance(value, float | int)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and low <= value <= high
                and (name != "learning_rate" or value > 0),
                f"TrainingPlan.{name}",
                f"{value!r} must be in {'(' if name == 'learning_rate' else '['}{low}, {high}]",
            )
        wire.require(
            isinstance(self.eval_fraction, float | int)
            and not isinstance(self.eval_fraction, bool)
            and 0.0 <= self.eval_fraction <= 0.5,
            "TrainingPlan.eval_fraction",
            f"{self.eval_fraction!r} must be in [0, 0.5]",
        )
        wire.require(len(self.personal) <= 256, "TrainingPlan.personal", "too many names")
        wire.require(
            all(isinstance(n, str) and 0 < len(n) <= 128 for n in self.personal)
            and len(set(self.personal)) == len(self.personal),
            "TrainingPlan.personal",
            "must be distinct weight names of 1..128 characters",
        )


@wire.message("round.announce")
class RoundAnnounce(wire.Message):
    round_id: int
    mode: RoundMode
    model_version: int
    cohort: tuple[str, ...]
    seed: bytes
    compression: Compression
    training: TrainingPlan
    times: StageTimes
    secagg: SecAggConfig | None = None
    state: RoundState = RoundState.OPEN
    reason: str = ""
    # Secure rounds: TICKET_BYTES per cohort member, in `cohort` order (one bytes field, so
    # decoding stays cheap at n = 1000: 16 kB).
    tickets: bytes = b""
    # Asynchronous rounds: the devices invited to train and, in the same order, the round each
    # invitation is from (this round: a new invitation; an earlier one: still training).
    invited: tuple[str, ...] = ()
    invited_in: tuple[int, ...] = ()
    # Asynchronous rounds: how many releases old an update may be when it is aggregated, and
    # the exponent of the discount (1 + staleness)^-exponent it then counts with.
    max_staleness: int = 0
    staleness_exponent: float = 0.5

    def __post_init__(self) -> None:
        wire.require(0 <= self.round_id < 2**31, "RoundAnnounce.round_id", "out of range")
        wire.require(self.model_version >= 1, "RoundAnnounce.model_version", "must be >= 1")
        wire.require(len(self.seed) == SEED_BYTES, "RoundAnnounce.seed", "must be 32 bytes")
        wire.require(len(self.cohort) <= MAX_COHORT, "RoundAnnounce.cohort", "too large")
        wire.require_ids(self.cohort, "RoundAnnounce.cohort")
        wire.require(
            self.secagg is None or self.secagg.cost_report == self.training.cost_report,
            "RoundAnnounce.secagg",
            "cost_report must agree with training.cost_report",
        )
        wire.require(len(self.reason) <= 1000, "RoundAnnounce.reason", "too long")
        if self.tickets:
            wire.require(
                len(self.tickets) == TICKET_BYTES * len(self.cohort),
                "RoundAnnounce.tickets",
                f"must hold {TICKET_BYTES} bytes per cohort member",
            )
        asynchronous = self.mode in (RoundMode.ASYNC, RoundMode.ASYNC_SECURE)
        wire.require(len(self.invited) <= MAX_COHORT, "RoundAnnounce.invited", "too large")
        wire.require_ids(self.invited, "RoundAnnounce.invited")
        wire.require(
            len(self.invited_in) == len(self.invited),
            "RoundAnnounce.invited_in",
            "names the inviting round of every invited device, in the same order",
        )
        wire.require(
            not self.invited or asynchronous,
            "RoundAnnounce.invited",
            "only asynchronous rounds carry it",
        )
        wire.require(
            all(type(r) is int and 0 <= r <= self.round_id for r in self.invited_in),
            "RoundAnnounce.invited_in",
            "every entry must be a round id at most this round's",
        )
        wire.require(
            type(self.max_staleness) is int and 0 <= self.max_staleness <= 10_000,
            "RoundAnnounce.max_staleness",
            "must be in 0..10000",
        )
        wire.require(
            isinstance(self.staleness_exponent, float | int)
            and not isinstance(self.staleness_exponent, bool)
            and 0.0 <= self.staleness_exponent <= 10.0,
            "RoundAnnounce.staleness_exponent",
            "must be in [0, 10]",
        )
        secure = self.mode is RoundMode.SECURE or (
            self.mode is RoundMode.ASYNC_SECURE and bool(self.cohort)
        )
        if self.state is RoundState.OPEN and self.mode is not RoundMode.ASYNC_SECURE:
            wire.require(len(self.cohort) >= 1, "RoundAnnounce.cohort", "is empty")
        if secure and self.state is RoundState.OPEN:
            wire.require(self.secagg is not None, "RoundAnnounce.secagg", "secure rounds need it")
            wire.require(
                self.compression.mode is not SparseMode.TOP_K,
                "RoundAnnounce.compression",
                "top-k cannot be masked: every device must send the same coordinates",
            )
            assert self.secagg is not None
            wire.require(bool(self.tickets), "RoundAnnounce.tickets", "secure rounds need them")
            wire.require(
                self.secagg.cohort_size == len(self.cohort),
                "RoundAnnounce.secagg",
                f"cohort_size {self.secagg.cohort_size} != {len(self.cohort)} devices",
            )
            if self.compression.mode is SparseMode.RAND_K:
                # SecAgg quantizes the shared coordinates itself; one grid, stated once each.
                wire.require(
                    self.secagg.quant_bits == self.compression.bits
                    and self.secagg.clip == self.compression.clip,
                    "RoundAnnounce.compression",
                    "bits and clip must equal secagg.quant_bits and secagg.clip",
                )

    def closed(self, state: RoundState, reason: str = "") -> RoundAnnounce:
        """The same round, marked over."""
        return RoundAnnounce(
            round_id=self.round_id,
            mode=self.mode,
            model_version=self.model_version,
            cohort=self.cohort,
            seed=self.seed,
            compression=self.compression,
            training=self.training,
            times=self.times,
            secagg=self.secagg,
            state=state,
            reason=reason[:1000],
            tickets=self.tickets,
            invited=self.invited,
            invited_in=self.invited_in,
            max_staleness=self.max_staleness,
            staleness_exponent=self.staleness_exponent,
        )

    def invitation(self, device: str) -> int | None:
        """Asynchronous rounds: the round whose invitation `device` answers (None: not
        invited by this announcement)."""
        if device not in self.invited:
            return None
        return self.invited_in[self.invited.index(device)]

    def ticket_map(self) -> dict[str, bytes]:
        """Cohort member -> its announced graph ticket (empty for plain rounds)."""
        if not self.tickets:
            return {}
        size = TICKET_BYTES
        return {d: self.tickets[i * size : (i + 1) * size] for i, d in enumerate(self.cohort)}


# Per-class evaluation counts in an update: at most this many classes, in plain rounds as in
# secure ones (where each class takes two words of the masked vector).
MAX_EVAL_CLASSES = SECAGG_MAX_CLASSES


@wire.message("round.plain_update")
class PlainUpdate(wire.Message):
    """A device's update in a plain round, with what FedAvg and the metrics need."""

    round_id: int
    sender: str
    update: SparseUpdate | SharedUpdate | DenseUpdate
    weight: float  # FedAvg weight: the number of local examples trained on
    # Federated evaluation on the device's held-out examples (`samples`; 0 = none held out):
    loss: float  # mean loss of the round's (global) model
    correct: int  # held-out examples the global model classified right
    samples: int  # held-out examples evaluated
    local_correct: int = 0  # held-out examples the device's trained model classified right
    # Per class of the model's outputs: held-out rows with that label, and the global model's
    # hits among them (empty: not reported).
    class_samples: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()
    # Asynchronous rounds: the model version the update was trained from (the inviting
    # round's); 0 in synchronous rounds, which train the round's own version.
    base_version: int = 0
    # What the device spent since its previous report (shared.cost); None: not reported
    # (older devices, local DP).
    cost: Cost | None = None

    def __post_init__(self) -> None:
        wire.require(0 <= self.round_id < 2**31, "PlainUpdate.round_id", "out of range")
        wire.require(
            type(self.base_version) is int and 0 <= self.base_version < 2**31,
            "PlainUpdate.base_version",
            "out of range",
        )
        wire.require_id(self.sender, "PlainUpdate.sender")
        wire.require(
            math.isfinite(self.weight) and 0 < self.weight <= 1e9,
            "PlainUpdate.weight",
            "must be in (0, 1e9]",
        )
        wire.require(
            math.isfinite(self.loss) and self.loss >= 0, "PlainUpdate.loss", "must be >= 0"
        )
        wire.require(0 <= self.samples <= 10**9, "PlainUpdate.samples", "out of range")
        wire.require(0 <= self.correct <= self.samples, "PlainUpdate.correct", "> samples")
        wire.require(
            0 <= self.local_correct <= self.samples, "PlainUpdate.local_correct", "> samples"
        )
        rows, hits = self.class_samples, self.class_correct
        wire.require(
            len(rows) == len(hits) <= MAX_EVAL_CLASSES,
            "PlainUpdate.class_samples",
            f"and class_correct must have the same length, at most {MAX_EVAL_CLASSES}",
        )
        wire.require(
            all(type(v) is int and v >= 0 for v in (*rows, *hits))
            and all(h <= r for h, r in zip(hits, rows, strict=True))
            and sum(rows) <= self.samples
            and sum(hits) <= self.correct,
            "PlainUpdate.class_correct",
            "per-class counts must be ints >= 0, hits within rows, sums within the totals",
        )

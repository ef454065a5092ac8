"""Round-level messages: the announcement every device reads, and plain-mode updates.

The secure stages' own messages live in `shared.secagg.messages`; model releases in
`shared.tflite_model`. What is here:

- `RoundAnnounce`, retained on `fl/{fleet}/round`: which round, which model version it trains,
  who is in the cohort, the round seed (public: it picks the rand-k coordinates; the neighbour
  graph does not depend on it), each cohort member's graph ticket (secure rounds: copied from
  its retained status, the commitment its advert will open; see shared.secagg.graph),
  compression, SecAgg parameters, local training settings, and the stage timings. Timings are
  *durations* from the announcement, never wall-clock times, because device clocks are not
  synchronised; each side turns them into deadlines on its own clock.
  The same topic later carries the round's end (`state` CLOSED or ABORTED, with a reason), so a
  device that reconnects learns that the round it was in is over.
- `PlainUpdate` on `fl/{fleet}/r/{r}/update/{id}`: a compressed update plus the FedAvg weight and
  training metrics, for plain (non-secure) rounds where the aggregator may see each update.
"""

from __future__ import annotations

import enum
import math

from shared import wire
from shared.secagg.config import SecAggConfig, StageDeadlines
from shared.secagg.keys import TICKET_BYTES
from shared.sparse import Compression, DenseUpdate, SharedUpdate, SparseMode, SparseUpdate

SEED_BYTES = 32
MAX_COHORT = 100_000


class RoundMode(enum.Enum):
    SECURE = "secure"  # SecAgg+: the aggregator learns only the sum
    PLAIN = "plain"  # each update is visible; robust aggregation rules apply


class RoundState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # aggregated and released
    ABORTED = "aborted"


@wire.record
class StageTimes(wire.Record):
    """Seconds after the announcement at which each stage closes (strictly increasing).

    Plain rounds use only `collect` (updates due). `collect` must allow for local training.
    """

    advertise: float = 10.0
    share: float = 20.0
    collect: float = 60.0
    unmask: float = 75.0

    def __post_init__(self) -> None:
        values = (self.advertise, self.share, self.collect, self.unmask)
        names = ("advertise", "share", "collect", "unmask")
        for name, value in zip(names, values, strict=True):
            wire.require(
                math.isfinite(value) and 0 < value <= 86_400,
                f"StageTimes.{name}",
                f"{value!r} must be in (0, 86400] seconds",
            )
        for (n1, v1), (n2, v2) in zip(
            zip(names, values, strict=True), zip(names[1:], values[1:], strict=True), strict=False
        ):
            wire.require(v2 > v1, f"StageTimes.{n2}", f"must be later than {n1} ({v1})")

    def deadlines(self, start: float) -> StageDeadlines:
        """The stage deadlines of a round announced at `start`, on the caller's clock."""
        return StageDeadlines(
            advertise=start + self.advertise,
            share=start + self.share,
            collect=start + self.collect,
            unmask=start + self.unmask,
        )


@wire.record
class TrainingPlan(wire.Record):
    """What each device does locally before it sends an update."""

    epochs: int = 1
    max_samples: int = 2048  # a device trains on at most this many recent examples
    # Carry what compression did not send into the next round. Off, rand-k is unbiased only
    # with a server learning rate of 1/density (see docs/compression.md, partial participation).
    error_feedback: bool = True

    def __post_init__(self) -> None:
        wire.require(1 <= self.epochs <= 100, "TrainingPlan.epochs", "must be in 1..100")
        wire.require(
            1 <= self.max_samples <= 1_000_000, "TrainingPlan.max_samples", "must be in 1..1e6"
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

    def __post_init__(self) -> None:
        wire.require(0 <= self.round_id < 2**31, "RoundAnnounce.round_id", "out of range")
        wire.require(self.model_version >= 1, "RoundAnnounce.model_version", "must be >= 1")
        wire.require(len(self.seed) == SEED_BYTES, "RoundAnnounce.seed", "must be 32 bytes")
        wire.require(len(self.cohort) <= MAX_COHORT, "RoundAnnounce.cohort", "too large")
        wire.require_ids(self.cohort, "RoundAnnounce.cohort")
        wire.require(len(self.reason) <= 1000, "RoundAnnounce.reason", "too long")
        if self.state is RoundState.OPEN:
            wire.require(len(self.cohort) >= 1, "RoundAnnounce.cohort", "is empty")
        if self.tickets:
            wire.require(
                len(self.tickets) == TICKET_BYTES * len(self.cohort),
                "RoundAnnounce.tickets",
                f"must hold {TICKET_BYTES} bytes per cohort member",
            )
        if self.mode is RoundMode.SECURE and self.state is RoundState.OPEN:
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
        )

    def ticket_map(self) -> dict[str, bytes]:
        """Cohort member -> its announced graph ticket (empty for plain rounds)."""
        if not self.tickets:
            return {}
        size = TICKET_BYTES
        return {d: self.tickets[i * size : (i + 1) * size] for i, d in enumerate(self.cohort)}


@wire.message("round.plain_update")
class PlainUpdate(wire.Message):
    """A device's update in a plain round, with what FedAvg and the metrics need."""

    round_id: int
    sender: str
    update: SparseUpdate | SharedUpdate | DenseUpdate
    weight: float  # FedAvg weight: the number of local examples trained on
    loss: float  # mean training loss
    correct: int  # correctly classified local examples (evaluated after training)
    samples: int  # examples evaluated

    def __post_init__(self) -> None:
        wire.require(0 <= self.round_id < 2**31, "PlainUpdate.round_id", "out of range")
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

"""Round modes: how a round of each kind collects the cohort's answers and yields a mean update.

What it owns: the strategies the engine (aggregator.engine) runs a round with. The engine
owns what every round shares (the phase, stage windows and timing, counts, late and refused
messages, the summary); a mode owns what differs:

    mode = MODES[config.mode](config)        # one per engine: SecureMode, PlainMode, AsyncMode
    mode.admits(status)                      # may selection take this device?
    mode.cohort(devices, version, now)       # the next round's cohort (a Selection)
    round = mode.open(setup)                 # one per round: SecureRound, PlainRound, AsyncRound
    round.secagg, round.tickets, round.limits    # for the announcement and the decoder
    round.invited_in, round.calls            # asynchronous: invitations and their rounds
    round.expected                           # answers the first stage waits for
    round.stage                              # the stage it collects now
    round.take(device, message, now)         # one decoded device message; never closes
    round.complete() / round.can_close()     # everyone answered / closing now can go on
    round.close(now) -> Progress             # close the open stage with whoever answered
    round.result(stages) -> Aggregate        # once a Progress said `collected`
    round.abort_notice(reason)               # what the cohort is told if the engine aborts
    round.planned_charge                     # with privacy: what the round will spend at most

Rules:
- Sans-IO, like the engine. Which stages a mode runs and which message answers each comes
  from `shared.protocol`.
- `take` either accepts the message, or raises `RefusedError` (counted under its reason;
  nothing changed) or `RoundFailedError` (the round cannot go on); `close` and `result`
  raise `RoundFailedError` for the same. Any other exception is a bug: the engine ends the
  round in its ERROR phase.
- Secure rounds: SecAgg+ (shared.secagg) with the engine's timing (`deadlines=None`); the
  aggregator learns only the sum. Plain rounds: every update is visible and the configured
  robust rule (aggregator.rules) aggregates them.
- Privacy (docs/privacy.md): a secure round with `privacy = distributed` carries
  `DistributedNoise` in its SecAgg config, sized so that the least survivors it plans for
  (`least_survivors`: fewer only with probability 1e-3 at the expected dropout) carry the
  configured multiplier, and refuses to unmask fewer (min_survivors); a plain round
  with `privacy = central` clips each update and adds Gaussian noise to the sum. Either
  divides by a denominator fixed before the round and reports the charge of what it
  released in its Aggregate.
- Asynchronous rounds (FedBuff): the mode, which lives as long as the engine, holds the
  open invitations and the buffer; a round is the time between two releases. It takes
  updates on the topics of the rounds that invited their senders (`calls`), closes once the
  buffer holds `buffer` updates, and yields their staleness-weighted mean. An update staler
  than `max_staleness` is refused (`stale`) and frees its sender's slot: the one refusal
  that changes something, since the device did answer. A round whose buffer does not fill by
  its hard limit aborts and the buffer waits for the next one; invitations lapse after
  `times.collect_hard` seconds (their devices count as stragglers).
- A new mode is one more `Mode`/`ModeRound` pair and a row in `MODES`; the engine needs no
  branch for it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine_config import EngineConfig, EngineError, NotEnoughDevicesError
from fleetlearn.aggregator.privacy import RoundCharge
from fleetlearn.aggregator.report import Aggregate, StageStats, finite
from fleetlearn.aggregator.selection import Devices, Selection
from fleetlearn.shared import compression, privacy, protocol, wire
from fleetlearn.shared.cost import CostTotals
from fleetlearn.shared.rounds import PlainUpdate, RoundMode, staleness_weight
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.config import (
    MAX_LOSS,
    MIN_COHORT,
    DistributedNoise,
    SecAggConfig,
    Stage,
    suggest_neighbours,
)
from fleetlearn.shared.secagg.errors import RemoteProtocolError, SecAggError
from fleetlearn.shared.secagg.server import STAGE_OF, Outbound, SecAggServer, ServerState
from fleetlearn.shared.secagg.shamir import SHARE_BYTES
from fleetlearn.shared.topics import Kind

# Size limits per device message, far below the wire's 16 MB default: what an honest device of
# this round can send, plus room for the envelope. One device's credentials then cannot make
# the aggregator decompress and parse tens of megabytes per message.
SLACK = 16 * 1024


class RefusedError(EngineError):
    """A device message the round does not take; `reason` is what it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class RoundFailedError(EngineError):
    """The round cannot go on (too few devices, a threshold, a failed reconstruction)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RoundSetup:
    """What the engine decided for a round before its announcement."""

    round_id: int
    cohort: tuple[str, ...]
    seed: bytes  # the round seed (public): picks the rand-k coordinates
    dim: int
    compression: compression.Compression
    coordinates: np.ndarray | None  # the rand-k coordinates every device sends
    verify_keys: Mapping[str, bytes]  # the cohort's Ed25519 keys
    tickets: Mapping[str, bytes]  # the cohort's graph tickets, from their statuses
    # The model's class names (its manifest's labels): federated evaluation is also counted
    # per class. Empty: no per-class counts.
    labels: tuple[str, ...] = ()
    model_version: int = 1  # the release the round trains (asynchronous: the current one)
    opened: float = 0.0  # when the round starts, on the engine's clock
    # With privacy: each candidate's chance of being in the cohort (the accounting's q), how
    # many candidates it was drawn from, and the seed of the aggregator's own noise (central
    # DP; from the engine's random source). What a noisy round is sized by comes from these,
    # never from the cohort drawn, whose size depends on who was sampled.
    sampling_rate: float = 1.0
    candidates: int = 0
    noise_seed: bytes = b""

    def expected_survivors(self, dropout: float) -> float:
        """The contributions a round expects: candidates * rate * (1 - dropout)."""
        return max(1.0, self.candidates * self.sampling_rate * (1.0 - dropout))

    def least_survivors(self, dropout: float) -> int:
        """The fewest contributions a noisy round plans for (see `least_survivors`): each
        candidate ends up in the sum with probability rate * (1 - dropout)."""
        return least_survivors(self.candidates, 1.0 - self.sampling_rate * (1.0 - dropout))


@dataclass(frozen=True, slots=True)
class StageClose:
    """A stage that closed."""

    stage: Stage
    unanswered: list[str]  # expected devices whose answer had not arrived
    # It closed because what it had sufficed: before the hard limit, the unanswered were
    # not needed (their answers are counted as such, not as dropouts or late).
    sufficed: bool = False
    next_expected: int | None = None  # how many devices the next stage waits for


@dataclass(slots=True)
class Progress:
    """What one step of a round did."""

    outbound: list[Outbound] = field(default_factory=list)  # messages for devices
    closed: StageClose | None = None
    failure: str | None = None  # the round cannot go on: why
    collected: bool = False  # the last stage closed: result() may be called


class ModeRound(abc.ABC):
    """One round of a mode (see the module docstring)."""

    secagg: SecAggConfig | None  # for the announcement
    tickets: bytes  # for the announcement: each member's ticket, in cohort order
    limits: dict[Kind, wire.Limits]  # the largest honest payload per device topic
    # With privacy: the most the round can spend (its release charged with the fewest
    # contributions it accepts); None without privacy.
    planned_charge: RoundCharge | None = None
    # Asynchronous rounds: the devices invited to train and the round that invited each
    # (announced), and the earlier rounds whose topics this round takes updates on.
    invited: tuple[str, ...] = ()
    invited_in: tuple[int, ...] = ()
    calls: frozenset[int] = frozenset()
    expected: int | None = None  # answers the first stage waits for (None: the cohort)

    @property
    @abc.abstractmethod
    def stage(self) -> Stage: ...

    @abc.abstractmethod
    def take(self, device: str, message: wire.Message, now: float) -> None: ...

    @abc.abstractmethod
    def complete(self) -> bool: ...

    @abc.abstractmethod
    def can_close(self) -> bool: ...

    @abc.abstractmethod
    def close(self, now: float) -> Progress: ...

    @abc.abstractmethod
    def result(self, stages: Mapping[Stage, StageStats]) -> Aggregate: ...

    def abort_notice(self, reason: str) -> list[Outbound]:
        return []

    def spent_charge(self) -> RoundCharge | None:
        """With privacy, once the round's noisy sum exists (whether or not the round goes on
        to release it): what it spends, with the noise it really carries. Else None."""
        return None


class Mode(abc.ABC):
    """One kind of round; the engine holds one, chosen by `EngineConfig.mode`."""

    round_mode: ClassVar[RoundMode]

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @property
    def stages(self) -> tuple[Stage, ...]:
        return protocol.stages(self.round_mode)

    def admits(self, status: wire.DeviceStatus) -> bool:
        """Whether selection may take a device with this status."""
        return True

    def cohort(
        self, devices: Devices, model_version: int, now: float, waiting: Collection[str] = ()
    ) -> Selection:
        """The next round's cohort, chosen from what the engine knows of its devices.
        `waiting`: devices whose answer arrived and waits for this round (asynchronous
        rounds: their invitations stand whatever their age)."""
        return devices.select(model_version, now, self.admits)

    def training(self) -> list[str]:
        """Devices training between rounds (asynchronous invitations); none otherwise."""
        return []

    def group_due(self, devices: Devices, model_version: int, now: float) -> bool:
        """Secure asynchronous rounds: whether enough devices hold an update to start one."""
        return True

    def call(
        self, devices: Devices, round_id: int, model_version: int, now: float
    ) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        """Secure asynchronous rounds: invitations to announce while no round runs (`invited`,
        `invited_in`); None for modes without them."""
        return None

    def next_lapse(self) -> float | None:
        """When the oldest open invitation lapses (None: none open, or no invitations)."""
        return None

    def compression(self) -> compression.Compression:
        c = self.config
        if c.sparsity == "dense":
            return compression.Compression(mode=compression.SparseMode.DENSE)
        if c.sparsity == "top_k":
            return compression.Compression(
                mode=compression.SparseMode.TOP_K, density=c.density, bits=c.top_k_bits
            )
        return compression.Compression(
            mode=compression.SparseMode.RAND_K, density=c.density, bits=c.quant_bits, clip=c.clip
        )

    @abc.abstractmethod
    def open(self, setup: RoundSetup) -> ModeRound: ...


SURVIVOR_RISK = 1e-3  # a noisy round's chance of too few survivors, at the expected dropout


def least_survivors(n: int, dropout: float, risk: float = SURVIVOR_RISK) -> int:
    """The most survivors m that n devices, each dropping with probability `dropout`, fall
    short of with probability at most `risk` (Binomial(n, 1 - dropout) < m), and at least
    MIN_COHORT: the survivors a noisy round's noise is sized for, and the fewest it unmasks."""
    if dropout <= 0.0:
        return n
    stay = 1.0 - dropout
    below = 0.0  # P(X < m), built up one m at a time
    m = 0
    while m < n:
        log_pmf = (
            math.lgamma(n + 1)
            - math.lgamma(m + 1)
            - math.lgamma(n - m + 1)
            + m * math.log(stay)
            + (n - m) * math.log(dropout)
        )
        if below + math.exp(log_pmf) > risk:
            break
        below += math.exp(log_pmf)
        m += 1
    return min(n, max(MIN_COHORT, m))


def _limits(sizes: Mapping[Kind, int]) -> dict[Kind, wire.Limits]:
    return {k: wire.Limits(max_compressed=n, max_decompressed=n) for k, n in sizes.items()}


def _evaluation(sent: list[PlainUpdate], classes: int) -> dict[str, Any]:
    """The federated evaluation and cost sums an Aggregate of plain updates carries: sums
    over the devices' held-out rows (losses clipped as secure rounds clip them), and per class
    over the devices that reported per-class counts (a device that sent none adds nothing to
    any class)."""
    samples = sum(m.samples for m in sent)
    reports = [m.cost for m in sent if m.cost is not None]
    loss = sum(min(m.loss, MAX_LOSS) * m.samples for m in sent)
    correct = sum(m.correct for m in sent)
    local_correct = sum(m.local_correct for m in sent)
    return {
        "mean_loss": loss / samples if samples else None,
        "accuracy": correct / samples if samples else None,
        "samples": samples,
        "local_accuracy": local_correct / samples if samples else None,
        "class_samples": tuple(
            sum(m.class_samples[i] for m in sent if m.class_samples) for i in range(classes)
        ),
        "class_correct": tuple(
            sum(m.class_correct[i] for m in sent if m.class_correct) for i in range(classes)
        ),
        # Summed over the devices that reported one (local DP updates carry none); None when
        # none did (the round did not ask: TrainingPlan.cost_report).
        "cost": CostTotals.of(reports) if reports else None,
    }


def _staleness_figures(staleness: list[int], exponent: float) -> dict[str, Any]:
    """The `async` figures of a release common to both asynchronous modes."""
    histogram: dict[str, int] = {}
    for t in sorted(staleness):
        histogram[str(t)] = histogram.get(str(t), 0) + 1
    discount = [staleness_weight(t, exponent) for t in staleness]
    return {
        "updates_applied": len(staleness),
        "staleness": histogram,
        "mean_staleness": round(float(np.mean(staleness)), 3) if staleness else None,
        "mean_discount": round(float(np.mean(discount)), 4) if discount else None,
    }


def _expand(setup: RoundSetup, values: np.ndarray) -> np.ndarray:
    if setup.coordinates is None:
        return values.astype(np.float64)
    return compression.scatter(setup.coordinates, values, setup.dim)


# ------------------------------------------------------------------------------------ secure


class SecureMode(Mode):
    round_mode = RoundMode.SECURE

    def admits(self, status: wire.DeviceStatus) -> bool:
        return bool(status.ticket)  # its advert must open the ticket the announcement carries

    def open(self, setup: RoundSetup) -> SecureRound:
        return SecureRound(setup, self.config)


class SecureRound(ModeRound):
    """SecAgg+ through `SecAggServer`: ADVERTISE, SHARE, COLLECT, UNMASK."""

    def __init__(self, setup: RoundSetup, config: EngineConfig, *, least: int = 0) -> None:
        """`least`: the fewest survivors whose sum the round may reveal (secure asynchronous
        rounds: the buffer), on top of the SecAgg+ and privacy minimums."""
        c, plan = config, setup.compression
        if plan.mode is compression.SparseMode.DENSE:
            quant_bits, clip = c.quant_bits, c.clip
        else:
            quant_bits, clip = plan.bits, plan.clip
        neighbours, threshold = c.neighbours or None, c.threshold or None
        if neighbours is None and c.expected_dropout > 0:
            neighbours, suggested_t = suggest_neighbours(len(setup.cohort), c.expected_dropout)
            threshold = threshold or suggested_t
        n, k = len(setup.cohort), plan.k(setup.dim)
        noise, fewest = None, least
        if c.privacy == "distributed":
            # The noise is sized for the fewest survivors the round accepts; the mean divides
            # by the survivors expected. Both come from the sampling, not from who was drawn.
            least = setup.least_survivors(c.expected_dropout)
            fewest = max(fewest, least)
            if least > n:
                raise NotEnoughDevicesError(
                    f"the sample of {n} devices is below the {least} survivors the round's "
                    "noise is sized for; the next round samples again"
                )
            noise = DistributedNoise.sized(
                clip=c.dp_clip,
                dimension=k,
                noise_multiplier=c.dp_noise_multiplier,
                least_survivors=least,
                denominator=setup.expected_survivors(c.expected_dropout),
            )
        secagg = SecAggConfig.create(
            cohort_size=n,
            dimension=k,
            neighbours=neighbours,
            threshold=threshold,
            quant_bits=quant_bits,
            clip=clip,
            # FedAvg weight = local examples trained on, at most the plan's max_samples.
            max_weight=float(c.training.max_samples),
            max_samples=c.training.max_samples,
            classes=len(setup.labels),
            noise=noise,
            cost_report=c.cost_report,
        )
        if fewest > secagg.min_survivors:
            # Fewer survivors would carry less noise than charged, or reveal a sum of fewer
            # updates than the buffer: the round aborts instead.
            secagg = dataclasses.replace(secagg, min_survivors=fewest)
        if noise is not None:
            self.planned_charge = self._charge(secagg, noise, least, setup.sampling_rate)
        self.secagg: SecAggConfig = secagg
        missing = [d for d in setup.cohort if not setup.tickets.get(d)]
        if missing:
            raise EngineError(f"{missing[:3]} have no graph ticket in their status")
        self.tickets = b"".join(setup.tickets[d] for d in setup.cohort)
        self._setup = setup
        self._server = SecAggServer(
            config=self.secagg,
            round_id=setup.round_id,
            round_seed=setup.seed,
            verify_keys={d: setup.verify_keys[d] for d in setup.cohort},
            tickets={d: setup.tickets[d] for d in setup.cohort},
            deadlines=None,  # the engine applies soft and hard limits
        )
        k = self.secagg.neighbours
        self.limits = _limits(
            {
                Kind.ADVERTISE: SLACK,
                Kind.SHARES: k * (sm.SEALED_SHARE_BYTES + 128) + SLACK,
                Kind.MASKED: self.secagg.packed_bytes + SLACK,
                Kind.UNMASK: k * (SHARE_BYTES + 128) + SLACK,
            }
        )

    @staticmethod
    def _charge(
        secagg: SecAggConfig, noise: DistributedNoise, survivors: int, rate: float
    ) -> RoundCharge:
        """The Skellam charge of a sum of `survivors` contributions, on the integer grid:
        sensitivity the rounded norm bound (L2) and sqrt(p) times it (L1)."""
        p = secagg.update_words
        return RoundCharge(
            sampling_rate=rate,
            noise_multiplier=noise.noise_multiplier(p, survivors),
            mechanism="skellam",
            dimension=p,
            scale=noise.norm_bound(p),
        )

    @property
    def stage(self) -> Stage:
        return STAGE_OF[self._server.state]

    def take(self, device: str, message: wire.Message, now: float) -> None:
        try:
            self._server.receive(message, now, close=False)
        except RemoteProtocolError as exc:
            raise RefusedError("protocol", exc.problem) from None
        except SecAggError as exc:
            raise RoundFailedError(f"secure aggregation failed: {exc}") from None

    def complete(self) -> bool:
        return self._server.close_due

    def can_close(self) -> bool:
        return self._server.close_problem() is None

    def close(self, now: float) -> Progress:
        server = self._server
        before = server.state
        try:
            outs = server.tick(now) if server.close_due else server.close_stage(now)
        except SecAggError as exc:
            raise RoundFailedError(f"secure aggregation failed: {exc}") from None
        after = server.state
        closed = None
        if after is not before and before in STAGE_OF:
            stage = STAGE_OF[before]
            following = {
                Stage.ADVERTISE: server.advertised,
                Stage.SHARE: server.sharers,
                Stage.COLLECT: server.survivors,
            }.get(stage)
            closed = StageClose(
                stage=stage,
                unanswered=sorted(d for d, s in server.dropped.items() if s is stage),
                # UNMASK closes as soon as every secret has t shares.
                sufficed=stage is Stage.UNMASK and after is ServerState.DONE,
                next_expected=(
                    len(following) if following is not None and after in STAGE_OF else None
                ),
            )
        failed = after in (ServerState.ABORTED, ServerState.ERROR)
        return Progress(
            outbound=outs,
            closed=closed,
            failure=(server.reason or "aborted") if failed else None,
            collected=after is ServerState.DONE,
        )

    def result(self, stages: Mapping[Stage, StageStats]) -> Aggregate:
        result = self._server.result
        if result is None:
            raise RoundFailedError("secure aggregation ended without a sum")
        try:
            mean = result.mean()
            bound = float(np.max(result.mean_error_bound())) if mean.size else 0.0
        except SecAggError as exc:
            raise RoundFailedError(str(exc)) from None
        return Aggregate(
            mean_update=_expand(self._setup, mean),
            error_bound=bound,
            survivors=tuple(sorted(result.survivors)),
            mean_loss=finite(result.mean_loss),
            accuracy=finite(result.accuracy),
            samples=result.samples,
            local_accuracy=finite(result.local_accuracy),
            class_samples=result.class_samples,
            class_correct=result.class_correct,
            cost=result.cost,
            weight_sum=result.weight_sum,
            # Sharers that sent no masked input (their pairwise masks were removed with their
            # neighbours' key shares) and survivors that did not help unmask (their self-masks
            # were rebuilt without them).
            dropouts_recovered=stages[Stage.COLLECT].dropped + stages[Stage.UNMASK].dropped,
        )

    def spent_charge(self) -> RoundCharge | None:
        # Once the masks came off, the aggregator saw the noisy sum, even one then refused.
        count, noise = self._server.unmasked, self._server.config.noise
        if count is None or noise is None:
            return None
        return self._charge(self._server.config, noise, count, self._setup.sampling_rate)

    def abort_notice(self, reason: str) -> list[Outbound]:
        if self._server.state is ServerState.ABORTED:
            return []  # the server told the cohort itself
        abort = sm.Abort(round_id=self._setup.round_id, reason=reason[: sm.MAX_REASON])
        return [Outbound(abort, None)]


# ------------------------------------------------------------------------------------- plain


class PlainMode(Mode):
    round_mode = RoundMode.PLAIN

    def open(self, setup: RoundSetup) -> PlainRound:
        return PlainRound(setup, self.config)


class PlainRound(ModeRound):
    """Every device's `PlainUpdate` in one stage, COLLECT; then the aggregation rule."""

    secagg = None
    tickets = b""

    def __init__(self, setup: RoundSetup, config: EngineConfig) -> None:
        self._setup = setup
        self._config = config
        self._updates: dict[str, PlainUpdate] = {}
        self._spent: RoundCharge | None = None
        if config.privacy == "central":
            self.planned_charge = RoundCharge(
                sampling_rate=setup.sampling_rate, noise_multiplier=config.dp_noise_multiplier
            )
        elif config.privacy == "local":
            # Each update is a Gaussian mechanism on its own. Charged for its strongest
            # observer, the aggregator, with replace-one adjacency (sensitivity 2 clips):
            # multiplier z / 2. For readers of the release that over-counts (docs/privacy.md).
            self.planned_charge = RoundCharge(
                sampling_rate=setup.sampling_rate,
                noise_multiplier=config.dp_noise_multiplier / 2.0,
            )
        # A dense float32 update is the largest form a plain update takes.
        self.limits = _limits({Kind.UPDATE: 8 * setup.dim + SLACK})

    @property
    def stage(self) -> Stage:
        return Stage.COLLECT

    def take(self, device: str, message: wire.Message, now: float) -> None:
        assert isinstance(message, PlainUpdate)
        if device in self._updates:
            raise RefusedError("duplicate", "second update in one round")
        try:
            compression.check_update(
                message.update, config=self._setup.compression, dim=self._setup.dim
            )
        except wire.WireError as exc:
            raise RefusedError("bad_payload", str(exc)) from None
        classes = len(message.class_samples)
        if classes and self._setup.labels and classes != len(self._setup.labels):
            raise RefusedError(
                "bad_payload",
                f"per-class counts for {classes} classes; the model has {len(self._setup.labels)}",
            )
        self._updates[device] = message
        if self._config.privacy == "local":
            # A noisy update reached the aggregator (and the broker): charged even if the
            # round goes no further.
            self._spent = self.planned_charge

    def complete(self) -> bool:
        return len(self._updates) == len(self._setup.cohort)

    def can_close(self) -> bool:
        return len(self._updates) >= self._config.min_cohort

    def close(self, now: float) -> Progress:
        cohort = self._setup.cohort
        closed = StageClose(Stage.COLLECT, [d for d in cohort if d not in self._updates])
        if len(self._updates) < self._config.min_cohort:
            why = (
                f"only {len(self._updates)} of {len(cohort)} devices sent an update by the "
                f"deadline; at least {self._config.min_cohort} are needed"
            )
            return Progress(closed=closed, failure=why)
        return Progress(closed=closed, collected=True)

    def result(self, stages: Mapping[Stage, StageStats]) -> Aggregate:
        c, setup = self._config, self._setup
        senders = sorted(self._updates)
        sent = [self._updates[d] for d in senders]
        dense = [
            compression.to_dense(m.update, config=setup.compression, dim=setup.dim, seed=setup.seed)
            for m in sent
        ]
        # A FedAvg weight counts up to the plan's max_samples (what an honest device sends).
        weights = [min(m.weight, float(c.training.max_samples)) for m in sent]
        if c.privacy == "central":
            self._spent = self.planned_charge  # a plain round's noise does not depend on who sent
            mean = self._noisy_mean(dense)
            weights = [1.0] * len(sent)  # every device counts the same
        elif c.privacy == "local":
            weights = [1.0] * len(sent)  # devices send none: their sample counts stay theirs
            # Post-processing that bounds what one device can do: an honest noisy update's
            # norm is about z * clip * sqrt(d); anything far beyond it is cut to that.
            bound = c.dp_clip * (1.0 + c.dp_noise_multiplier * (math.sqrt(setup.dim) + 10.0))
            dense = [privacy.clip_l2(u, bound) for u in dense]
            if c.rule == "mean":  # over the contributions expected, fixed before the round
                if c.clip_norm:
                    dense = [rules.clip_to_norm(u, c.clip_norm) for u in dense]
                mean = np.sum(dense, axis=0) / self._denominator()
            else:  # any rule on noisy updates is post-processing
                mean = rules.aggregate(
                    dense, weights, rule=c.rule, trim=c.trim, clip_norm=c.clip_norm
                )
        else:
            mean = rules.aggregate(dense, weights, rule=c.rule, trim=c.trim, clip_norm=c.clip_norm)
        return Aggregate(
            mean_update=mean,
            error_bound=0.0,
            survivors=tuple(senders),
            **_evaluation(sent, len(setup.labels)),
            weight_sum=float(sum(weights)),
            dropouts_recovered=0,
        )

    def spent_charge(self) -> RoundCharge | None:
        return self._spent

    def _noisy_mean(self, dense: list[np.ndarray]) -> np.ndarray:
        """Central DP: each update clipped to L2 `dp_clip`, their sum plus Gaussian noise of
        standard deviation noise_multiplier * clip on every coordinate an update can hold
        (rand-k: the round's public coordinates), divided by the expected contributions.
        numpy's floating-point Gaussian (docs/privacy.md says what that assumes)."""
        c, setup = self._config, self._setup
        total = np.zeros(setup.dim)
        for update in dense:
            total += privacy.clip_l2(update, c.dp_clip)
        rng = np.random.default_rng(int.from_bytes(setup.noise_seed, "big"))
        sd = c.dp_noise_multiplier * c.dp_clip
        if setup.coordinates is None:
            total += rng.normal(0.0, sd, setup.dim)
        else:
            total[setup.coordinates] += rng.normal(0.0, sd, setup.coordinates.size)
        return total / self._denominator()

    def _denominator(self) -> float:
        """The noisy mean's denominator: the contributions expected, fixed by the sampling."""
        return self._setup.expected_survivors(self._config.expected_dropout)


# ------------------------------------------------------------------------------------- async


@dataclass(frozen=True, slots=True)
class Invitation:
    """An open invitation to train (asynchronous rounds)."""

    round_id: int  # the round that invited the device: the topic its update comes on
    version: int  # the release that round announced: the update's base version
    seed: bytes  # that round's seed (its rand-k coordinates)
    at: float  # when it was announced, on the engine's clock
    mark: int  # the devices' sign-of-life count then (a lapsed invitation stalls its device)


@dataclass(frozen=True, slots=True)
class Buffered:
    """An accepted update waiting for the buffer to fill."""

    device: str
    update: np.ndarray  # dense, full dimension
    message: PlainUpdate
    arrived: float


class _Invitations(Mode):
    """What both asynchronous modes share: the open invitations to train. A round invites
    new devices into the free slots (at most `concurrency` train at once); an invitation
    stands until its device answers, or lapses after `times.collect_hard` seconds (its
    device counts as stalled)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.invitations: dict[str, Invitation] = {}
        self.stale_refused = 0  # since the engine started
        self._new: tuple[str, ...] = ()  # chosen by cohort() or call(), invited by open()
        self._mark = 0

    def training(self) -> list[str]:
        return sorted(self.invitations)

    def lapse(self, now: float, keep: Collection[str] = ()) -> dict[str, Invitation]:
        """Drop the invitations older than the training hard limit, but those of `keep`
        (their answer arrived and waits); return them."""
        limit = self.config.times.collect_hard
        lapsed = {
            d: i for d, i in self.invitations.items() if now - i.at >= limit and d not in keep
        }
        for device in lapsed:
            del self.invitations[device]
        return lapsed

    def next_lapse(self) -> float | None:
        if not self.invitations:
            return None
        return min(i.at for i in self.invitations.values()) + self.config.times.collect_hard

    def _refresh(
        self,
        devices: Devices,
        model_version: int,
        now: float,
        busy: Collection[str] = (),
        keep: Collection[str] = (),
    ) -> None:
        """Lapse old invitations (stalling their devices) and choose new invitees for the
        free slots (not yet invited: `open` or `invite` does that), preferring devices on
        the current release. `busy`: devices that may not be invited either. Stalled
        devices are invited only as a last resort, to keep `buffer` devices training: a
        device whose update a flaky link lost looks stalled, and a fleet whose every device
        once lost one must still make progress."""
        self._mark = devices.mark
        lapsed = self.lapse(now, keep)
        for device, invitation in lapsed.items():
            devices.stall([device], invitation.mark, now)
        taken = set(self.invitations) | set(busy)
        free = self.config.concurrency - len(self.invitations)
        self._new = ()
        if free <= 0:
            return

        def invitable(status: wire.DeviceStatus) -> bool:
            return status.device_id not in taken and self._invitable(status)

        least = max(0, min(free, self.config.buffer - len(self.invitations)))
        try:
            chosen = devices.select(model_version, now, invitable, want=free, least=least)
        except NotEnoughDevicesError:  # fewer than that, stalled ones included: take them
            chosen = devices.select(model_version, now, invitable, want=free, least=0)
        self._new = chosen.cohort

    def _invitable(self, status: wire.DeviceStatus) -> bool:
        return self.admits(status)

    def invite(self, round_id: int, version: int, seed: bytes, now: float) -> None:
        """Invite the devices `_refresh` chose, from round `round_id`."""
        for device in self._new:
            self.invitations[device] = Invitation(round_id, version, seed, now, self._mark)
        self._new = ()

    def invited(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The announcement's `invited` and `invited_in`."""
        names = tuple(sorted(self.invitations))
        return names, tuple(self.invitations[d].round_id for d in names)


class AsyncMode(_Invitations):
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) on plain updates."""

    round_mode = RoundMode.ASYNC

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.buffer: list[Buffered] = []

    def cohort(
        self, devices: Devices, model_version: int, now: float, waiting: Collection[str] = ()
    ) -> Selection:
        """The devices still training (their invitations stand) and new invitees for the free
        slots: whoever may send an update in the round."""
        self._refresh(devices, model_version, now, keep=waiting)
        cohort = tuple(sorted(set(self.invitations) | set(self._new)))
        if not cohort:
            raise NotEnoughDevicesError(
                f"no device to invite (of {len(devices.online())} online) and none training"
            )
        return Selection(cohort, 1.0, len(cohort))

    def open(self, setup: RoundSetup) -> AsyncRound:
        self.invite(setup.round_id, setup.model_version, setup.seed, setup.opened)
        return AsyncRound(setup, self.config, self)


class AsyncRound(ModeRound):
    """One release's worth of asynchronous updates: COLLECT until the buffer holds `buffer`."""

    secagg = None
    tickets = b""

    def __init__(self, setup: RoundSetup, config: EngineConfig, mode: AsyncMode) -> None:
        self._setup = setup
        self._config = config
        self._mode = mode
        self.invited, self.invited_in = mode.invited()
        self.calls = frozenset(self.invited_in)
        self.expected = max(0, config.buffer - len(mode.buffer))
        self.limits = _limits({Kind.UPDATE: 8 * setup.dim + SLACK})
        self._closed_at = setup.opened

    @property
    def stage(self) -> Stage:
        return Stage.COLLECT

    def take(self, device: str, message: wire.Message, now: float) -> None:
        assert isinstance(message, PlainUpdate)
        mode, setup = self._mode, self._setup
        invitation = mode.invitations.get(device)
        if invitation is None or invitation.round_id != message.round_id:
            raise RefusedError(
                "not_invited",
                f"no open invitation from round {message.round_id} (it lapsed, was answered, "
                "or a later one replaced it)",
            )
        if message.base_version != invitation.version:
            raise RefusedError(
                "bad_payload",
                f"base_version {message.base_version}; round {invitation.round_id} announced "
                f"v{invitation.version}",
            )
        staleness = setup.model_version - invitation.version
        if staleness > self._config.max_staleness:
            del mode.invitations[device]  # it answered: its slot is free again
            mode.stale_refused += 1
            raise RefusedError(
                "stale",
                f"trained from v{invitation.version}, {staleness} releases behind "
                f"v{setup.model_version}; fedbuff.max_staleness is {self._config.max_staleness}",
            )
        try:
            compression.check_update(message.update, config=setup.compression, dim=setup.dim)
        except wire.WireError as exc:
            raise RefusedError("bad_payload", str(exc)) from None
        classes = len(message.class_samples)
        if classes and setup.labels and classes != len(setup.labels):
            raise RefusedError(
                "bad_payload",
                f"per-class counts for {classes} classes; the model has {len(setup.labels)}",
            )
        dense = compression.to_dense(
            message.update, config=setup.compression, dim=setup.dim, seed=invitation.seed
        )
        if not np.all(np.isfinite(dense)):
            raise RefusedError("bad_payload", "the update holds NaN or infinity")
        mode.buffer.append(Buffered(device, dense, message, now))
        del mode.invitations[device]

    def complete(self) -> bool:
        return len(self._mode.buffer) >= self._config.buffer

    def can_close(self) -> bool:
        return self.complete()

    def close(self, now: float) -> Progress:
        self._closed_at = now
        lapsed = sorted(self._mode.lapse(now))
        closed = StageClose(Stage.COLLECT, lapsed)
        held, wanted = len(self._mode.buffer), self._config.buffer
        if held < wanted:
            why = (
                f"the buffer held {held} of {wanted} updates when stages.collect_hard "
                f"({self._config.times.collect_hard:g} s) passed; they wait for the next round"
            )
            return Progress(closed=closed, failure=why)
        return Progress(closed=closed, collected=True)

    def result(self, stages: Mapping[Stage, StageStats]) -> Aggregate:
        c, setup, mode = self._config, self._setup, self._mode
        taken, mode.buffer = mode.buffer[: c.buffer], mode.buffer[c.buffer :]
        staleness = [setup.model_version - b.message.base_version for b in taken]
        discount = [staleness_weight(s, c.staleness_exponent) for s in staleness]
        # A device's FedAvg weight counts up to the plan's max_samples (what an honest one
        # sends): a claimed 1e9 cannot outweigh the buffer.
        weights = [min(b.message.weight, float(c.training.max_samples)) for b in taken]
        scaled = [d * w for d, w in zip(discount, weights, strict=True)]
        updates = [b.update for b in taken]
        if c.rule == "mean":
            # sum(s_i w_i u_i) / sum(w_i): a stale update adds less, and is not made up for
            # by the others (FedBuff).
            mean = rules.aggregate(updates, scaled, rule="mean", clip_norm=c.clip_norm) * (
                sum(scaled) / sum(weights)
            )
        else:
            # Robust rules ignore weights: the rule's result times the plain mean discount.
            mean = rules.aggregate(
                updates, weights, rule=c.rule, trim=c.trim, clip_norm=c.clip_norm
            ) * float(np.mean(discount))
        waits = sorted(self._closed_at - b.arrived for b in taken)
        figures = {
            **_staleness_figures(staleness, c.staleness_exponent),
            "buffer_wait_s": {
                "median": round(float(np.median(waits)), 3),
                "max": round(waits[-1], 3),
            },
            "stale_refused_total": mode.stale_refused,
            "in_flight": len(mode.invitations),
            "buffered": len(mode.buffer),
        }
        return Aggregate(
            mean_update=mean,
            error_bound=0.0,
            survivors=tuple(sorted(b.device for b in taken)),
            **_evaluation([b.message for b in taken], len(setup.labels)),
            weight_sum=float(sum(scaled)),
            dropouts_recovered=0,
            figures={"async": figures},
        )


class AsyncSecureMode(_Invitations):
    """FedBuff with secure aggregation: a device that finished training holds its update and
    says so in its status (`ready_version`, its base version). Once `buffer` * over_select
    devices hold one (or `buffer` have, the first of them for `times.collect` seconds), a
    SecAgg+ round sums the held updates of that group; each device scales its own by the
    staleness discount, and the round reveals no sum of fewer than `buffer` survivors. The
    same announcement carries the invitations; while no group is ready, `call` announces
    them alone (docs/secagg.md)."""

    round_mode = RoundMode.ASYNC_SECURE

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._versions: dict[str, int] = {}  # the group's base versions, for the figures
        self._stale_seen: set[tuple[str, int]] = set()

    def admits(self, status: wire.DeviceStatus) -> bool:
        return bool(status.ticket)  # its advert must open the ticket the announcement carries

    def _invitable(self, status: wire.DeviceStatus) -> bool:
        return self.admits(status) and status.ready_version == 0  # holds nothing yet

    @property
    def group_size(self) -> int:
        c = self.config
        return max(c.buffer, math.ceil(c.buffer * c.over_select))

    def _holding(self, devices: Devices, model_version: int, now: float) -> list[str]:
        """Devices that hold an update fresh enough to be summed, in the order they said so
        (first come, first summed: an update that waited is not left to go stale).
        Invitations whose device now holds its update are answered; stale holdings are
        counted once."""
        oldest = model_version - self.config.max_staleness
        stalled = devices.stalled(now)
        out: list[tuple[float, str]] = []
        stale: set[tuple[str, int]] = set()
        for status, since in devices.holding():
            device, version = status.device_id, status.ready_version
            invitation = self.invitations.get(device)
            if invitation is not None and version >= invitation.version:
                del self.invitations[device]  # answered: its slot is free
            if version < oldest:
                stale.add((device, version))
                if (device, version) not in self._stale_seen:
                    self.stale_refused += 1
                continue
            if device not in stalled and version <= model_version and self.admits(status):
                out.append((since, device))
        self._stale_seen = stale  # only what is still held: memory stays flat
        return [d for _, d in sorted(out)]

    def group_due(self, devices: Devices, model_version: int, now: float) -> bool:
        """Whether a group may form now: `group_size` hold an update, or `buffer` do and the
        first of them has waited `times.collect` seconds."""
        holding = self._holding(devices, model_version, now)
        if len(holding) >= self.group_size:
            return True
        if len(holding) < self.config.buffer:
            return False
        since = [devices.ready_since(d) for d in holding]
        return now - min(since) >= self.config.times.collect

    def cohort(
        self, devices: Devices, model_version: int, now: float, waiting: Collection[str] = ()
    ) -> Selection:
        holding = self._holding(devices, model_version, now)
        if len(holding) < self.config.buffer:
            raise NotEnoughDevicesError(
                f"{len(holding)} devices hold an update; a secure group needs "
                f"fedbuff.buffer = {self.config.buffer}"
            )
        group = tuple(sorted(holding[: self.group_size]))
        self._versions = {d: s.ready_version for d in group if (s := devices.status(d))}
        self._refresh(devices, model_version, now, busy=group)
        return Selection(group, 1.0, len(group))

    def call(
        self, devices: Devices, round_id: int, model_version: int, now: float
    ) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Invitations alone, while no group is ready: lapse, invite into free slots."""
        self._holding(devices, model_version, now)  # answered invitations free their slots
        self._refresh(devices, model_version, now)
        self.invite(round_id, model_version, b"", now)
        return self.invited()

    def open(self, setup: RoundSetup) -> AsyncSecureRound:
        secure = SecureRound(setup, self.config, least=self.config.buffer)
        # Invited only once the round exists: a round that cannot start invites nobody.
        self.invite(setup.round_id, setup.model_version, setup.seed, setup.opened)
        return AsyncSecureRound(setup, self.config, self, secure)


class AsyncSecureRound(ModeRound):
    """One group's SecAgg+ round (`SecureRound`, at least `buffer` survivors), announced with
    the invitations."""

    def __init__(
        self,
        setup: RoundSetup,
        config: EngineConfig,
        mode: AsyncSecureMode,
        secure: SecureRound,
    ) -> None:
        self._secure = secure
        self._setup = setup
        self._config = config
        self._mode = mode
        self._versions = {d: mode._versions.get(d, setup.model_version) for d in setup.cohort}
        self.secagg = self._secure.secagg
        self.tickets = self._secure.tickets
        self.limits = self._secure.limits
        self.planned_charge = self._secure.planned_charge
        self.invited, self.invited_in = mode.invited()

    @property
    def stage(self) -> Stage:
        return self._secure.stage

    def take(self, device: str, message: wire.Message, now: float) -> None:
        self._secure.take(device, message, now)

    def complete(self) -> bool:
        return self._secure.complete()

    def can_close(self) -> bool:
        return self._secure.can_close()

    def close(self, now: float) -> Progress:
        return self._secure.close(now)

    def result(self, stages: Mapping[Stage, StageStats]) -> Aggregate:
        aggregate = self._secure.result(stages)
        c, version = self._config, self._setup.model_version
        # Base versions are public (statuses): which staleness each survivor's discount had.
        staleness = [version - self._versions[d] for d in aggregate.survivors]
        figures = {
            **_staleness_figures(staleness, c.staleness_exponent),
            "stale_refused_total": self._mode.stale_refused,
            "in_flight": len(self._mode.invitations),
        }
        return dataclasses.replace(aggregate, figures={"async": figures})

    def spent_charge(self) -> RoundCharge | None:
        return self._secure.spent_charge()

    def abort_notice(self, reason: str) -> list[Outbound]:
        return self._secure.abort_notice(reason)


# The engine's `mode` setting -> its strategy.
MODES: dict[str, type[Mode]] = {
    "secure": SecureMode,
    "plain": PlainMode,
    "async": AsyncMode,
    "async-secure": AsyncSecureMode,
}

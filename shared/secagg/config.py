"""Parameters of one secure-aggregation round: cohort, graph, threshold, ring, quantization.

What it owns: `SecAggConfig` (validated once, shared by server and devices, and a `wire.record`
so the round announcement can carry it), `StageDeadlines`, the `Stage` names, a device's own
`PrivacyFloor` (never on the wire: the announcement cannot lower it), and the sizing rules that
tie them together:

- every device has exactly k neighbours (so n*k must be even), and a threshold t > k/2 of them
  must stay alive; k = n - 1 is classic SecAgg (Bonawitz et al. 2017), smaller k is SecAgg+
  (Bell et al. 2020);
- sums live in Z_2^b and must not wrap: b >= q + ceil(log2 n) for q-bit quantized updates;
- the FedAvg weight and training metrics ride as `EXTRA_COORDINATES` after the d update
  coordinates, then the device's cost report in `cost_limbs` words per figure, then per class
  (`classes` of them) the held-out rows and hits, each given the per-device budget
  b - ceil(log2 n) bits so their sum cannot wrap either.

Rules: a config that exists is valid. Every refusal raises `SecAggConfigError` naming the field
and the fix. Nothing here draws randomness or reads a clock.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from fleetlearn.shared import privacy, wire
from fleetlearn.shared.secagg.errors import SecAggConfigError

# Order of the values appended after the update coordinates (see shared.secagg.contribution).
EXTRA_COORDINATES = ("weight", "loss_sum", "correct", "samples", "local_correct")
# The device's cost report (shared.cost) follows them as exact integers (milliseconds, bytes,
# millijoules), each below 2^COST_BITS, split into `SecAggConfig.cost_limbs` words of at most
# COST_LIMB_BITS bits (low first), so the sums are exact whatever the field width.
COST_BITS = 32
COST_LIMB_BITS = 16
COST_FIELDS = 4  # cpu, bytes up, bytes down, energy (shared.cost.FIELDS)

# Per-class counts: at most this many classes ride in a masked vector (2 words each).
MAX_CLASSES = 1024
# A device's mean evaluation loss is clipped to [0, MAX_LOSS] before it is summed (secure
# rounds: in the masked vector; plain rounds: by the aggregator), so no device, faulty or
# hostile, moves the fleet's figure by more than its share of rows times this.
MAX_LOSS = 100.0
MIN_COHORT = 3  # with two devices the sum reveals the other device's update
MAX_COHORT = 65_536
MAX_FIELD_BITS = 64  # arithmetic is numpy uint32/uint64 wraparound
MAX_NOISY_FIELD_BITS = 62  # a noisy sum is decoded to int64, signed: keep a bit to spare
# A device's Skellam variance: each half is a Poisson draw, which numpy refuses above ~9.2e18.
MAX_NOISE_VARIANCE = 1e18
# Weight and loss are floats; past 52 bits float64 cannot resolve the quantization grid.
MAX_FLOAT_GRID_BITS = 52


class Stage(enum.Enum):
    """The four message-carrying stages of a round, in order."""

    ADVERTISE = "advertise"
    SHARE = "share"
    COLLECT = "collect"
    UNMASK = "unmask"


STAGES = (Stage.ADVERTISE, Stage.SHARE, Stage.COLLECT, Stage.UNMASK)


def sum_bits(cohort_size: int) -> int:
    """ceil(log2 n): the headroom a sum of n values needs above one value's bits."""
    return (cohort_size - 1).bit_length()


def default_neighbours(cohort_size: int) -> int:
    """About 2*log2(n) neighbours (Bell et al.), at most n-1, bumped so n*k is even."""
    n = cohort_size
    k = min(n - 1, max(2, round(2 * math.log2(n))))
    if (n * k) % 2:
        # n is odd here, so n-1 is even and k < n-1: k+1 still fits.
        k += 1
    return k


def default_threshold(neighbours: int) -> int:
    """The smallest threshold above k/2: most tolerant of dropouts while still secure."""
    return neighbours // 2 + 1


def abort_probability(cohort_size: int, neighbours: int, threshold: int, dropout: float) -> float:
    """Union bound on the chance that some device keeps fewer than t live neighbours.

    Each of at most 2n conditions (a survivor's self-mask seed, a dropped device's mask key)
    needs t of k neighbours alive; with independent dropouts at rate `dropout` one condition
    fails with probability P(Binomial(k, 1 - dropout) < t).
    """
    live = 1.0 - dropout
    tail = sum(
        math.comb(neighbours, i) * live**i * dropout ** (neighbours - i) for i in range(threshold)
    )
    return min(1.0, 2 * cohort_size * tail)


def suggest_neighbours(
    cohort_size: int, dropout: float, *, abort_risk: float = 1e-3
) -> tuple[int, int]:
    """(k, t) with the fewest neighbours whose `abort_probability` stays under `abort_risk`.

    Never below `default_neighbours`; falls back to classic SecAgg (k = n-1) when no sparser
    graph is safe enough. Example: n=1000 needs k=20 at 10% dropout but k=142 at 30%.
    """
    if not 0.0 <= dropout < 1.0:
        raise SecAggConfigError("dropout", f"must be in [0, 1), got {dropout!r}")
    n = cohort_size
    k = default_neighbours(n)
    while k < n - 1:
        t = default_threshold(k)
        if abort_probability(n, k, t, dropout) <= abort_risk:
            return k, t
        k += 1 if n % 2 == 0 else 2
    return n - 1, default_threshold(n - 1)


@wire.record
class DistributedNoise(wire.Record):
    """Distributed differential privacy in a secure round (docs/privacy.md).

    Each device clips its update to L2 norm `clip` (no FedAvg weight: every device counts
    the same), rotates it (random signs from the round seed, then Walsh-Hadamard, padded to
    a power of two), multiplies by `scale` onto the integer grid, rounds within the norm
    bound, clamps each coordinate to the coordinate bound, adds symmetric Skellam noise of
    `variance` per coordinate and sends it in Z_2^b, negative values as 2^b - |v|. The
    aggregator unrotates the unmasked sum and divides it by `denominator`, fixed before the
    round (the planned number of contributions), so the release depends on the devices'
    data only through the noisy sum.

    clip         L2 clip of one device's update, in update units
    scale        grid points per update unit (gamma)
    variance     each device's Skellam variance, in grid units squared
    denominator  what the sum is divided by to give the mean update
    """

    clip: float
    scale: float
    variance: float
    denominator: float

    def __post_init__(self) -> None:
        for name in ("clip", "scale", "variance", "denominator"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise SecAggConfigError(
                    f"noise.{name}", f"must be a finite number > 0, got {value!r}"
                )
        if self.variance > MAX_NOISE_VARIANCE:
            raise SecAggConfigError(
                "noise.variance",
                f"{self.variance:.3g} is beyond what a device can draw (at most "
                f"{MAX_NOISE_VARIANCE:g}: numpy's Poisson sampler); lower the noise multiplier",
            )

    @classmethod
    def sized(
        cls,
        *,
        clip: float,
        dimension: int,
        noise_multiplier: float,
        least_survivors: int,
        denominator: float | None = None,
    ) -> DistributedNoise:
        """Noise for a round whose sum must carry `noise_multiplier` times a device's grid
        sensitivity (the norm bound) in standard deviation whenever at least
        `least_survivors` devices' contributions are in it. Only survivors - 1 devices'
        noise is counted: the device whose data is in question may be the one that is
        added or removed, and it knows its own noise. The mean divides by `denominator`
        (by default `least_survivors`; the expected number of survivors is better for the
        model), which must not depend on who took part."""
        if not _is_int(least_survivors) or least_survivors < 2:
            raise SecAggConfigError(
                "noise", f"least_survivors must be >= 2, got {least_survivors!r}"
            )
        if not _is_number(noise_multiplier) or not noise_multiplier > 0:
            raise SecAggConfigError(
                "noise", f"noise_multiplier must be > 0, got {noise_multiplier!r}"
            )
        if not _is_number(clip) or not clip > 0:
            raise SecAggConfigError("noise", f"clip must be > 0, got {clip!r}")
        padded = privacy.padded_dimension(dimension)
        scale = privacy.GRID * math.sqrt(padded) / clip
        bound = privacy.rounded_norm_bound(scale * clip, padded, privacy.ROUNDING_BETA)
        return cls(
            clip=float(clip),
            scale=scale,
            variance=(noise_multiplier * bound) ** 2 / (least_survivors - 1),
            denominator=float(least_survivors if denominator is None else denominator),
        )

    def noise_multiplier(self, padded: int, survivors: int) -> float:
        """The noise multiplier a sum of `survivors` contributions carries: the standard
        deviation of survivors - 1 devices' noise over the grid sensitivity."""
        return math.sqrt(max(survivors - 1, 0) * self.variance) / self.norm_bound(padded)

    def norm_bound(self, padded: int) -> float:
        """L2 bound of a device's rounded, scaled vector: its sensitivity on the grid."""
        return privacy.rounded_norm_bound(self.scale * self.clip, padded, privacy.ROUNDING_BETA)

    def coordinate_bound(self, padded: int) -> int:
        """Largest |coordinate| of a device's rounded vector, before noise (clamped)."""
        return privacy.coordinate_bound(self.scale * self.clip, padded)

    def sum_bound(self, padded: int, devices: int) -> int:
        """Largest |coordinate| of the sum of `devices` contributions, noise included
        (except with probability privacy.WRAP_RISK)."""
        return devices * self.coordinate_bound(padded) + privacy.noise_headroom(
            devices * self.variance, padded
        )

    def field_bits(self, padded: int, devices: int) -> int:
        """Bits of a ring that holds that sum, signed, without wrapping."""
        return (2 * self.sum_bound(padded, devices) + 1).bit_length()


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@wire.record
class SecAggConfig(wire.Record):
    """One round's secure-aggregation parameters. Build with `SecAggConfig.create(...)`.

    cohort_size   n, devices selected for the round (the roster)
    dimension     d, update coordinates each device contributes (the rand-k shared coordinates)
    neighbours    k, neighbours per device in the masking/sharing graph
    threshold     t, shares needed to rebuild a secret; k/2 < t <= k
    quant_bits    q, bits per quantized update coordinate
    field_bits    b, bits of the ring Z_2^b the masked sums live in
    clip          updates (already scaled by weight/max_weight) are clipped to [-clip, clip]
    max_weight    largest FedAvg weight a device may declare (typically its sample count)
    max_samples   largest sample count a device may report; sent exactly, as an integer
    max_loss      mean training loss is clipped to [0, max_loss] before loss*samples is sent
    min_survivors fewest devices whose masked inputs may be summed (privacy floor)
    classes       per-class evaluation counts carried (0: none): 2 * classes more coordinates
    cost_report   the device's cost report rides after the extras (4 * cost_limbs words)
    noise         distributed DP (None: none): the update is clipped, rotated and noised
                  instead of quantized on [-clip, clip] (quant_bits, clip and the FedAvg
                  weight then apply to the extras only; see DistributedNoise)
    """

    cohort_size: int
    dimension: int
    neighbours: int
    threshold: int
    quant_bits: int
    field_bits: int
    clip: float
    max_weight: float
    max_samples: int
    max_loss: float
    min_survivors: int
    classes: int = 0
    noise: DistributedNoise | None = None
    cost_report: bool = False  # the cost words follow the extras (TrainingPlan.cost_report)

    @classmethod
    def create(
        cls,
        *,
        cohort_size: int,
        dimension: int,
        neighbours: int | None = None,
        threshold: int | None = None,
        quant_bits: int = 16,
        field_bits: int | None = None,
        clip: float = 1.0,
        max_weight: float = 1.0,
        max_samples: int | None = None,
        max_loss: float = MAX_LOSS,
        min_survivors: int | None = None,
        classes: int = 0,
        noise: DistributedNoise | None = None,
        cost_report: bool = False,
    ) -> SecAggConfig:
        """Fill the derived defaults: k ~ 2 log2 n, t = k//2 + 1, b = q + ceil(log2 n) (with
        noise, at least what the noisy sum needs), min_survivors = t, max_samples = 65535 or
        what the extra-coordinate budget allows."""
        if not _is_int(cohort_size) or not MIN_COHORT <= cohort_size <= MAX_COHORT:
            raise SecAggConfigError(
                "cohort_size", f"must be an int in {MIN_COHORT}..{MAX_COHORT}, got {cohort_size!r}"
            )
        k = default_neighbours(cohort_size) if neighbours is None else neighbours
        t = default_threshold(k) if threshold is None and _is_int(k) else threshold
        b = field_bits
        if b is None and _is_int(quant_bits):
            b = quant_bits + sum_bits(cohort_size)
            if isinstance(noise, DistributedNoise) and _is_int(dimension) and dimension >= 1:
                b = max(b, noise.field_bits(privacy.padded_dimension(dimension), cohort_size))
        samples = max_samples
        if samples is None:
            budget = (b or 0) - sum_bits(cohort_size)  # refused below when b is unusable
            samples = min(65_535, (1 << budget) - 1) if 0 < budget <= MAX_FIELD_BITS else 65_535
        return cls(
            cohort_size=cohort_size,
            dimension=dimension,
            neighbours=k,
            threshold=t if t is not None else 0,
            quant_bits=quant_bits,
            field_bits=b if b is not None else 0,
            clip=float(clip) if _is_number(clip) else clip,
            max_weight=float(max_weight) if _is_number(max_weight) else max_weight,
            max_samples=samples,
            max_loss=float(max_loss) if _is_number(max_loss) else max_loss,
            min_survivors=(t if t is not None else 0) if min_survivors is None else min_survivors,
            classes=classes,
            noise=noise,
            cost_report=cost_report,
        )

    def __post_init__(self) -> None:
        n, k, t = self.cohort_size, self.neighbours, self.threshold
        if not _is_int(n) or not MIN_COHORT <= n <= MAX_COHORT:
            raise SecAggConfigError(
                "cohort_size", f"must be an int in {MIN_COHORT}..{MAX_COHORT}, got {n!r}"
            )
        if not _is_int(self.dimension) or self.dimension < 1:
            raise SecAggConfigError("dimension", f"must be an int >= 1, got {self.dimension!r}")
        if not _is_int(k) or not 2 <= k <= n - 1:
            raise SecAggConfigError(
                "neighbours", f"must be an int in 2..{n - 1} (n-1 is classic SecAgg), got {k!r}"
            )
        if (n * k) % 2:
            raise SecAggConfigError(
                "neighbours",
                f"{n} devices cannot each have exactly {k} neighbours (n*k must be even); "
                f"use {k - 1} or {k + 1}",
            )
        if not _is_int(t) or not (2 * t > k and t <= k):
            raise SecAggConfigError(
                "threshold",
                f"must satisfy k/2 < t <= k, i.e. {k // 2 + 1}..{k} for k={k}, got {t!r}; "
                "t <= k/2 would let the aggregator collect both shares of one device",
            )
        q, b = self.quant_bits, self.field_bits
        if not _is_int(q) or not 1 <= q <= MAX_FIELD_BITS - 2:
            raise SecAggConfigError("quant_bits", f"must be an int in 1..62, got {q!r}")
        need = q + sum_bits(n)
        if not _is_int(b) or b > MAX_FIELD_BITS:
            raise SecAggConfigError("field_bits", f"must be an int <= {MAX_FIELD_BITS}, got {b!r}")
        if b < need:
            raise SecAggConfigError(
                "field_bits",
                f"{b} bits cannot hold the sum of {n} values of {q} bits without wrapping: "
                f"need field_bits >= q + ceil(log2 n) = {need}"
                + (f", or quant_bits <= {b - sum_bits(n)}" if b - sum_bits(n) >= 1 else ""),
            )
        if self.noise is not None:
            if not isinstance(self.noise, DistributedNoise):
                raise SecAggConfigError("noise", "must be a DistributedNoise record or None")
            if self.dimension > privacy.MAX_DIMENSION:
                raise SecAggConfigError(
                    "dimension", f"at most {privacy.MAX_DIMENSION} coordinates carry noise"
                )
            if b > MAX_NOISY_FIELD_BITS:
                raise SecAggConfigError(
                    "field_bits",
                    f"a noisy sum is read as signed int64: at most {MAX_NOISY_FIELD_BITS} "
                    f"bits, got {b}",
                )
            noisy = self.noise.field_bits(self.update_words, n)
            if noisy > MAX_NOISY_FIELD_BITS:
                raise SecAggConfigError(
                    "noise",
                    f"the noisy sum of {n} devices needs {noisy} bits, more than "
                    f"{MAX_NOISY_FIELD_BITS}; lower noise.variance or noise.scale",
                )
            if b < noisy:
                raise SecAggConfigError(
                    "field_bits",
                    f"{b} bits cannot hold the noisy sum of {n} devices without wrapping: "
                    f"need field_bits >= {noisy}",
                )
        for name in ("clip", "max_weight", "max_loss"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise SecAggConfigError(name, f"must be a finite float > 0, got {value!r}")
        limit = (1 << self.extra_bits) - 1
        if not _is_int(self.max_samples) or not 1 <= self.max_samples <= limit:
            raise SecAggConfigError(
                "max_samples",
                f"must be an int in 1..{limit} (2^(b - ceil(log2 n)) - 1, so that the sum of "
                f"sample counts cannot wrap), got {self.max_samples!r}; raise field_bits to "
                "allow more",
            )
        if not _is_int(self.min_survivors) or not 2 <= self.min_survivors <= n:
            raise SecAggConfigError(
                "min_survivors", f"must be an int in 2..{n}, got {self.min_survivors!r}"
            )
        if not _is_int(self.classes) or not 0 <= self.classes <= MAX_CLASSES:
            raise SecAggConfigError(
                "classes", f"must be an int in 0..{MAX_CLASSES}, got {self.classes!r}"
            )
        packed = self.packed_bytes
        budget = wire.DEFAULT_LIMITS.max_compressed - 4096  # masked bytes do not compress
        if packed > budget:
            raise SecAggConfigError(
                "dimension",
                f"a masked vector of {self.dimension} coordinates at {b} bits packs to {packed} "
                f"bytes, over the wire limit of {budget}; lower dimension or field_bits",
            )

    # ---------------------------------------------------------------------- derived sizes

    @property
    def update_words(self) -> int:
        """Words the update takes in the masked vector: d, or with noise the rotation's
        length (d padded to a power of two)."""
        if self.noise is None:
            return self.dimension
        return privacy.padded_dimension(self.dimension)

    @property
    def coordinates(self) -> int:
        """Length of the vector that is masked: the update's words plus the extras."""
        return self.update_words + len(EXTRA_COORDINATES) + self.cost_words + 2 * self.classes

    @property
    def cost_words(self) -> int:
        """Words the cost report takes: 4 figures of `cost_limbs` limbs, or none."""
        return COST_FIELDS * self.cost_limbs if self.cost_report else 0

    @property
    def cost_limb_bits(self) -> int:
        """Bits of each cost word: within the per-device budget, so no sum wraps."""
        return min(self.extra_bits, COST_LIMB_BITS)

    @property
    def cost_limbs(self) -> int:
        """Words per cost figure: enough limbs to hold COST_BITS."""
        return -(-COST_BITS // self.cost_limb_bits)

    @property
    def extra_bits(self) -> int:
        """Per-device bit budget of each extra coordinate: b - ceil(log2 n) >= q."""
        return self.field_bits - sum_bits(self.cohort_size)

    @property
    def float_extra_bits(self) -> int:
        """Quantization bits for the weight and loss sum (the budget, capped by float64)."""
        return min(self.extra_bits, MAX_FLOAT_GRID_BITS)

    @property
    def word_bits(self) -> int:
        """Width of the numpy words that carry Z_2^b: 32 or 64 (2^b divides 2^word_bits)."""
        return 32 if self.field_bits <= 32 else 64

    @property
    def field_mask(self) -> int:
        return (1 << self.field_bits) - 1

    @property
    def packed_bytes(self) -> int:
        """Bytes of one masked vector on the wire: exactly b bits per coordinate, rounded up."""
        return -(-self.coordinates * self.field_bits // 8)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyFloor:
    """What a device demands of a round before it reveals anything, from its own configuration.

    min_cohort              refuse to join a round whose cohort (U0) is smaller
    min_survivors           refuse to go on with fewer advertisers, or to unmask for fewer
                            survivors (the announcement's `min_survivors` applies too: the
                            larger of the two wins)
    min_advertised_fraction refuse to go on when fewer than ceil(fraction * |U0|) devices are
                            in U1: it bounds how small the aggregator can make U1, which it may
                            choose (leaving honest advertisers out) to try rings until one gives
                            a victim t colluding neighbours; a smaller U1 makes that likelier
    min_noise               refuse a round whose differential-privacy noise this device can
                            check is below this multiplier (0: no demand): a secure round's
                            distributed noise at its least survivors, a plain round's local
                            noise (docs/privacy.md); a plain round with central or no noise
                            has nothing the device can check, and is refused

    Defaults: 3 / 3 / 0.8. Three is the smallest sum that hides one device's input from each of
    the others; larger sizes depend on the fleet and come from the operator (`fleetlearn device
    --min-cohort/--min-survivors`). 0.8 tolerates one device in five failing to advertise (the
    aggregator over-selects by 1.2 for that) and makes that search 15 to 150 times longer than
    0.5 would; the numbers are in docs/secagg.md ("What the aggregator can still do").
    """

    min_cohort: int = MIN_COHORT
    min_survivors: int = 3
    min_advertised_fraction: float = 0.8
    min_noise: float = 0.0

    def __post_init__(self) -> None:
        if not _is_number(self.min_noise) or not 0.0 <= self.min_noise <= 1000.0:
            raise SecAggConfigError(
                "floor.min_noise", f"must be a number in [0, 1000], got {self.min_noise!r}"
            )
        if not _is_int(self.min_cohort) or not MIN_COHORT <= self.min_cohort <= MAX_COHORT:
            raise SecAggConfigError(
                "floor.min_cohort",
                f"must be an int in {MIN_COHORT}..{MAX_COHORT}, got {self.min_cohort!r}",
            )
        if not _is_int(self.min_survivors) or not 2 <= self.min_survivors <= MAX_COHORT:
            raise SecAggConfigError(
                "floor.min_survivors",
                f"must be an int in 2..{MAX_COHORT}, got {self.min_survivors!r}",
            )
        fraction = self.min_advertised_fraction
        if not _is_number(fraction) or not 0.0 <= fraction <= 1.0:
            raise SecAggConfigError(
                "floor.min_advertised_fraction", f"must be a number in [0, 1], got {fraction!r}"
            )

    @classmethod
    def minimal(cls) -> PrivacyFloor:
        """Only what the protocol itself requires (cohort 3, 2 survivors, no share of
        advertisers). For tests and benchmarks of the protocol's own rules, not for devices."""
        return cls(min_cohort=MIN_COHORT, min_survivors=2, min_advertised_fraction=0.0)

    def cohort_problem(self, cohort_size: int) -> str | None:
        """Why a round with this many devices is too small for this device, or None."""
        least = max(self.min_cohort, self.min_survivors)
        if cohort_size < least:
            return f"a cohort of {cohort_size} devices is below this device's floor of {least}"
        return None

    def noise_problem(self, config: SecAggConfig) -> str | None:
        """Why a secure round's noise is too little for this device, or None: the noise
        multiplier its least survivors (the announced min_survivors) carry."""
        if not self.min_noise:
            return None
        if config.noise is None:
            return (
                f"the round adds no noise; this device demands a multiplier of {self.min_noise:g}"
            )
        planned = config.noise.noise_multiplier(config.update_words, config.min_survivors)
        if planned < self.min_noise * (1 - 1e-9):
            return (
                f"the round's noise multiplier is {planned:.3g} at its least survivors; this "
                f"device demands {self.min_noise:g}"
            )
        return None

    def survivors_needed(self, config: SecAggConfig) -> int:
        """Fewest survivors this device unmasks for: the announcement's and its own minimum."""
        return max(config.min_survivors, self.min_survivors)

    def advertisers_needed(self, config: SecAggConfig) -> int:
        """Fewest advertisers (|U1|) this device deals its shares to."""
        share = math.ceil(self.min_advertised_fraction * config.cohort_size - 1e-9)
        return max(self.survivors_needed(config), share)


@wire.record
class StageDeadlines(wire.Record):
    """When each stage closes, in the adapter's clock (seconds). Strictly increasing.

    The server closes a stage at its deadline (or earlier when everyone expected answered); a
    device gives up waiting for the aggregator's reply to stage S at the deadline of S + 1.
    """

    advertise: float
    share: float
    collect: float
    unmask: float

    def __post_init__(self) -> None:
        values = [self.advertise, self.share, self.collect, self.unmask]
        for stage, value in zip(STAGES, values, strict=True):
            if not _is_number(value):
                raise SecAggConfigError(
                    f"deadlines.{stage.value}", f"must be a finite number, got {value!r}"
                )
        for (s1, v1), (s2, v2) in zip(
            zip(STAGES, values, strict=True), zip(STAGES[1:], values[1:], strict=True), strict=False
        ):
            if not v2 > v1:
                raise SecAggConfigError(
                    f"deadlines.{s2.value}",
                    f"{v2} must be later than the {s1.value} deadline {v1}",
                )

    def of(self, stage: Stage) -> float:
        return float(getattr(self, stage.value))

    @classmethod
    def evenly(cls, start: float, stage_seconds: float) -> StageDeadlines:
        """Deadlines `stage_seconds` apart, the first one `stage_seconds` after `start`."""
        return cls(
            advertise=start + stage_seconds,
            share=start + 2 * stage_seconds,
            collect=start + 3 * stage_seconds,
            unmask=start + 4 * stage_seconds,
        )

"""What a device contributes to the secure sum, and what the sum means once unmasked.

What it owns: the layout of the vector that is masked, and the bounds of its decoding.

    [ q(w/W * x_1) ... q(w/W * x_d) | weight | loss_sum | correct | samples | local_correct |
      cost: cpu_ms, bytes_up, bytes_down, energy_mj, L limbs each |
      rows_0 .. rows_{C-1} | hits_0 .. hits_{C-1} ]
      d update coordinates, q bits; the five EXTRA_COORDINATES, 4L cost words (only with
      config.cost_report) and 2C per-class counts (C = config.classes, may be 0),
      b - ceil(log2 n) bits each

- The update is pre-scaled by w/W (FedAvg weight over `max_weight`), clipped to [-clip, clip]
  and stochastically rounded to q bits by `shared.compression.quantization.quantize` (the one
  implementation of stochastic rounding in the code base; its dither generator is device-local
  noise, never mask material). The weighted mean is then sum(w/W * x) / sum(w/W).
- The weight and the loss sum (mean loss * samples) are stochastically rounded the same way on
  the grid [0, max] with the extra-coordinate budget; `correct`, `samples` and `local_correct`
  are integers and travel exactly, as do the per-class held-out rows and hits. So the
  aggregator learns only the sums, never one device's values. The metrics are federated
  evaluation on each device's held-out rows: the global model's loss and hits (in total and
  per class), and the hits of the device's own trained model.
- The device's cost report (shared.cost: training CPU seconds, bytes up and down, energy) is
  sent exactly as integers (milliseconds, bytes, millijoules; each below 2^32 by the report's
  bounds), each split into L = config.cost_limbs words of config.cost_limb_bits bits, low
  first. Limb sums are recombined after unmasking, so the aggregator learns the fleet's exact
  sums and nothing per device.
- No sum can wrap: every coordinate of one device is below 2^(b - ceil(log2 n)) and at most n
  devices add up (checked in SecAggConfig).
- With distributed DP (`config.noise`, docs/privacy.md) the update words are instead the
  device's update clipped to L2 `noise.clip`, rotated with signs from the round seed, scaled
  onto the integer grid, rounded within the norm bound, clamped per coordinate, plus Skellam
  noise, as signed integers mod 2^b (shared.privacy holds the steps). Every device has the
  same weight (the weight word carries max_weight), so a weight neither scales a device's
  sensitivity nor reveals its sample count. The rounded words are within the coordinate
  bound with certainty and the noise of n devices within its headroom except with
  probability privacy.WRAP_RISK, which the field bits are sized for; a decoded sum beyond
  that is refused as corrupt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fleetlearn.shared import cost as costs
from fleetlearn.shared import privacy
from fleetlearn.shared.compression import quantization
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.secagg.config import EXTRA_COORDINATES, DistributedNoise, SecAggConfig
from fleetlearn.shared.secagg.errors import LocalProtocolError, SecAggError


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingMetrics:
    """A device's evaluation figures for the round; summed securely with the update."""

    loss: float = 0.0  # mean loss over `samples`; clipped to [0, max_loss] before summing
    correct: int = 0
    samples: int = 0
    local_correct: int = 0  # hits of the device's own trained model on the same rows
    # The global model per class on the same rows: rows with each label, and hits among them.
    class_samples: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()
    # What the device spent since its previous report (with `config.cost_report`).
    cost: costs.Cost = field(default_factory=costs.Cost)

    def __post_init__(self) -> None:
        if not isinstance(self.cost, costs.Cost):
            raise LocalProtocolError("metrics.cost must be a shared.cost.Cost")
        if not isinstance(self.loss, float | int) or not math.isfinite(self.loss):
            raise LocalProtocolError(f"metrics.loss must be a finite number, got {self.loss!r}")
        for name in ("correct", "samples", "local_correct"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise LocalProtocolError(f"metrics.{name} must be an int >= 0, got {value!r}")
        for name in ("correct", "local_correct"):
            if getattr(self, name) > self.samples:
                raise LocalProtocolError(
                    f"metrics.{name} ({getattr(self, name)}) cannot exceed metrics.samples "
                    f"({self.samples})"
                )
        rows, hits = self.class_samples, self.class_correct
        if len(rows) != len(hits):
            raise LocalProtocolError("metrics.class_samples and class_correct differ in length")
        if not all(type(v) is int and v >= 0 for v in (*rows, *hits)):
            raise LocalProtocolError("metrics per-class counts must be ints >= 0")
        if any(h > r for h, r in zip(hits, rows, strict=True)) or (
            rows and (sum(rows) > self.samples or sum(hits) > self.correct)
        ):
            raise LocalProtocolError(
                "metrics per-class counts exceed their rows or the totals (samples, correct)"
            )


def _loss_range(config: SecAggConfig) -> float:
    return config.max_loss * config.max_samples


def _quantize_scalar(value: float, high: float, bits: int, rng: np.random.Generator) -> int:
    # quantization.quantize works on [-clip, clip]; shift [0, high] onto it (exact grid mapping).
    half = high / 2.0
    grid = quantization.quantize(np.array([value - half]), clip=half, bits=bits, rng=rng)
    return int(grid[0])


def encode(
    config: SecAggConfig,
    vector: np.ndarray,
    *,
    weight: float,
    metrics: TrainingMetrics,
    rng: np.random.Generator,
    seed: bytes = b"",
) -> np.ndarray:
    """The device's contribution in Z_2^b: `config.coordinates` words of `config.word_bits`.
    `seed`: the round seed (the rotation's signs come from it when the round adds noise)."""
    values = np.asarray(vector)
    if values.ndim != 1 or values.shape[0] != config.dimension:
        raise LocalProtocolError(
            f"input must be a 1-d vector of {config.dimension} values, got shape {values.shape}"
        )
    if values.dtype.kind != "f":
        raise LocalProtocolError(f"input must be floating point, got {values.dtype}")
    if not np.all(np.isfinite(values)):
        raise LocalProtocolError("input holds NaN or infinity")
    if config.noise is not None:
        weight = config.max_weight  # every device counts the same (module doc)
    if not isinstance(weight, float | int) or not 0.0 <= weight <= config.max_weight:
        raise LocalProtocolError(f"weight must be in [0, {config.max_weight}], got {weight!r}")
    if metrics.samples > config.max_samples:
        raise LocalProtocolError(
            f"metrics.samples {metrics.samples} exceeds max_samples {config.max_samples}"
        )
    per_class = _per_class(config, metrics)
    dtype = np.dtype(f"<u{config.word_bits // 8}")
    out = np.empty(config.coordinates, dtype=dtype)
    words = config.update_words
    if config.noise is not None:
        noisy = _noised(config, config.noise, values, seed, rng)
        out[:words] = (noisy & np.int64(config.field_mask)).astype(dtype)
    else:
        scaled = np.multiply(values, float(weight) / config.max_weight, dtype=np.float64)
        out[:words] = quantization.quantize(
            scaled, clip=config.clip, bits=config.quant_bits, rng=rng
        )
    bits = config.float_extra_bits
    loss_sum = min(max(float(metrics.loss), 0.0), config.max_loss) * metrics.samples
    extras = (
        _quantize_scalar(float(weight), config.max_weight, bits, rng),
        _quantize_scalar(loss_sum, _loss_range(config), bits, rng),
        metrics.correct,
        metrics.samples,
        metrics.local_correct,
        *(_cost_words(config, metrics.cost) if config.cost_report else ()),
        *per_class,
    )
    out[words:] = np.array(extras, dtype=dtype)
    return out


def _noised(
    config: SecAggConfig,
    noise: DistributedNoise,
    values: np.ndarray,
    seed: bytes,
    rng: np.random.Generator,
) -> np.ndarray:
    """The update words of a noisy contribution, as signed int64 (module doc)."""
    if not isinstance(seed, bytes) or not seed:
        raise LocalProtocolError("a round with noise needs the round seed (the rotation's)")
    padded = config.update_words
    try:
        clipped = privacy.clip_l2(values, noise.clip)
        rotation = privacy.RandomRotation(config.dimension, privacy.rotation_seed(seed))
        grid = rotation.rotate(clipped) * noise.scale
        # Clamping only shrinks the vector: its norm stays within scale * clip.
        limit = noise.coordinate_bound(padded) - 1
        np.clip(grid, -limit, limit, out=grid)
        rounded = privacy.round_conditional(grid, bound=noise.norm_bound(padded), rng=rng)
        return rounded + privacy.skellam_noise(padded, noise.variance, rng)
    except privacy.PrivacyEncodingError as exc:
        raise LocalProtocolError(f"noise: {exc}") from None


def _cost_words(config: SecAggConfig, cost: costs.Cost) -> list[int]:
    """The report's 4L words: each figure in its integer unit, limbs low first."""
    width, limbs = config.cost_limb_bits, config.cost_limbs
    low = (1 << width) - 1
    words: list[int] = []
    for value in costs.integer_units(cost):
        words.extend((value >> (width * i)) & low for i in range(limbs))
    return words


def _cost_sums(config: SecAggConfig, words: list[int], count: int) -> costs.CostTotals:
    """The survivors' summed report from its limb sums; CompressionError when a limb or a
    figure is beyond what `count` honest reports can make."""
    width, limbs = config.cost_limb_bits, config.cost_limbs
    if any(w > count * ((1 << width) - 1) for w in words):
        raise CompressionError(f"an unmasked cost word is impossible for {count} devices")
    totals = [
        sum(words[f * limbs + i] << (width * i) for i in range(limbs))
        for f in range(len(costs.FIELDS))
    ]
    try:
        return costs.CostTotals.of_units(count, totals)
    except ValueError as exc:
        raise CompressionError(f"unmasked cost sums: {exc}") from None


def _per_class(config: SecAggConfig, metrics: TrainingMetrics) -> tuple[int, ...]:
    """The 2C per-class words: rows then hits, cut or zero-padded to `config.classes` (a
    model with fewer outputs than the round's classes has no rows of the others)."""
    c = config.classes
    rows = (*metrics.class_samples[:c], *(0,) * (c - len(metrics.class_samples[:c])))
    hits = (*metrics.class_correct[:c], *(0,) * (c - len(metrics.class_correct[:c])))
    return (*rows, *hits)


def _dequantize_scalar_sum(total: int, high: float, bits: int, count: int) -> float:
    half = high / 2.0
    grid = np.array([total], dtype=np.uint64)
    shifted = quantization.dequantize(grid, clip=half, bits=bits, count=count)
    return float(shifted[0]) + count * half


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggResult:
    """The unmasked outcome of a round: sums over the survivors, nothing per device.

    `vector` is the sum of the survivors' quantized, weight-scaled updates in Z_2^b (exactly,
    no wraparound by construction); `update_sum()`/`mean()` dequantize it.
    """

    config: SecAggConfig
    survivors: tuple[str, ...]
    vector: np.ndarray  # d coordinates, uint, the sum in Z_2^b
    # The sums after the update coordinates as unmasked, in Z_2^b: the EXTRA_COORDINATES,
    # the cost words (with `config.cost_report`), then the per-class rows and hits.
    extra_grid: tuple[int, ...]
    weight_sum: float
    loss_sum: float
    correct: int
    samples: int
    local_correct: int = 0
    class_samples: tuple[int, ...] = ()  # per class: held-out rows with that label (summed)
    class_correct: tuple[int, ...] = ()  # and the global model's hits among them
    # The survivors' cost reports, summed (None: the round asked for none).
    cost: costs.CostTotals | None = None
    seed: bytes = b""  # the round seed: with noise, the rotation to undo

    @property
    def count(self) -> int:
        return len(self.survivors)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else math.nan

    @property
    def local_accuracy(self) -> float:
        """Held-out accuracy of each device's own trained model, over all held-out rows."""
        return self.local_correct / self.samples if self.samples else math.nan

    def update_sum(self) -> np.ndarray:
        """sum over survivors of clip(w/W * x), as float64 (within count * step per coordinate).
        With noise: the sum of the L2-clipped updates plus the noise, unrotated."""
        cfg = self.config
        if cfg.noise is not None:
            signed = _signed(self.vector, cfg.field_bits)
            rotation = privacy.RandomRotation(cfg.dimension, privacy.rotation_seed(self.seed))
            return rotation.unrotate(signed.astype(np.float64) / cfg.noise.scale)
        return quantization.dequantize(
            self.vector, clip=self.config.clip, bits=self.config.quant_bits, count=self.count
        )

    def mean(self) -> np.ndarray:
        """The FedAvg weighted mean sum(w x) / sum(w) (for inputs within the clip range)."""
        if self.config.noise is not None:
            return self.update_sum() / self.config.noise.denominator
        if self.weight_sum <= 0.0:
            raise SecAggError("the survivors' weights sum to zero; there is no weighted mean")
        return self.update_sum() / (self.weight_sum / self.config.max_weight)

    def mean_error_bound(self) -> np.ndarray:
        """Per-coordinate bound on |mean() - exact weighted mean of the clipped updates|.

        With m = N/D the exact mean and N^, D^ the quantized sums: |N^ - N| < U*step_q and
        |D^ - D| < U*step_w (U survivors, each rounding below one grid step), so
        |m^ - m| <= (a + |m^| r) / (1 - r) with a = U*step_q / D^ and r = U*step_w / D^.
        Typical errors are ~sqrt(U) smaller (roundings are zero-mean and independent).
        """
        cfg = self.config
        if cfg.noise is not None:
            # Rounding moves each device's grid vector by less than 1 per word: by at most
            # sqrt(p) in L2, which bounds every coordinate after the (orthonormal) unrotation.
            # The noise is not in this bound: it is the privacy, not an error.
            per_device = math.sqrt(cfg.update_words) / cfg.noise.scale
            return np.full(cfg.dimension, self.count * per_device / cfg.noise.denominator)
        denominator = self.weight_sum / cfg.max_weight
        if denominator <= 0.0:
            raise SecAggError("the survivors' weights sum to zero; there is no weighted mean")
        step_q = quantization.quant_step(cfg.clip, cfg.quant_bits)
        step_w = 1.0 / ((1 << cfg.float_extra_bits) - 1)  # weight grid step, in units of W
        a = self.count * step_q / denominator
        r = self.count * step_w / denominator
        if r >= 1.0:
            return np.full(cfg.dimension, np.inf)
        return (a + np.abs(self.mean()) * r) / (1.0 - r)


def _signed(words: np.ndarray, bits: int) -> np.ndarray:
    """Words of Z_2^b read as signed integers in [-2^(b-1), 2^(b-1)) (int64; b <= 62)."""
    values = words.astype(np.int64)
    values[values >= (1 << (bits - 1))] -= 1 << bits
    return values


def decode(
    config: SecAggConfig, total: np.ndarray, survivors: tuple[str, ...], seed: bytes = b""
) -> SecAggResult:
    """Split an unmasked sum (reduced mod 2^b) into the update sum and the extra sums.
    `seed`: the round seed (with noise, the rotation's).

    Raises CompressionError when a coordinate is larger than `len(survivors)` honest
    contributions can make: the sum is corrupt (a bad masked vector or share got in).
    """
    d = config.update_words
    count = len(survivors)
    extras = [int(v) for v in total[d:]]
    weight_total, loss_total, correct, samples, local_correct = extras[: len(EXTRA_COORDINATES)]
    cost_words = extras[len(EXTRA_COORDINATES) : len(EXTRA_COORDINATES) + config.cost_words]
    extras = [
        *extras[: len(EXTRA_COORDINATES)],
        *extras[len(EXTRA_COORDINATES) + len(cost_words) :],
    ]
    c = config.classes
    rows = tuple(extras[len(EXTRA_COORDINATES) : len(EXTRA_COORDINATES) + c])
    hits = tuple(extras[len(EXTRA_COORDINATES) + c :])
    bits = config.float_extra_bits
    integer_limit = count * ((1 << config.extra_bits) - 1)
    if samples > integer_limit or max(correct, local_correct) > samples:
        raise CompressionError(
            f"unmasked counts (correct={correct}, local_correct={local_correct}, "
            f"samples={samples}) are impossible for {count} devices"
        )
    if any(h > r for h, r in zip(hits, rows, strict=True)) or (
        sum(rows) > samples or sum(hits) > correct
    ):
        raise CompressionError(
            f"unmasked per-class counts (rows {sum(rows)}, hits {sum(hits)}) are impossible "
            f"with {samples} held-out rows"
        )
    vector = total[:d].copy()
    if config.noise is not None:
        if not isinstance(seed, bytes) or not seed:
            raise SecAggError("a round with noise needs the round seed to decode its sum")
        limit = config.noise.sum_bound(d, count)
        if d and int(np.max(np.abs(_signed(vector, config.field_bits)))) > limit:
            raise CompressionError(
                f"the unmasked noisy sum has a coordinate beyond {limit}, which {count} "
                "honest contributions cannot reach: the sum is corrupt"
            )
    else:
        # Decoding the update sum here runs dequantize's range check once, before use.
        quantization.dequantize(vector, clip=config.clip, bits=config.quant_bits, count=count)
    return SecAggResult(
        config=config,
        survivors=survivors,
        vector=vector,
        extra_grid=tuple(int(v) for v in total[d:]),
        weight_sum=_dequantize_scalar_sum(weight_total, config.max_weight, bits, count),
        loss_sum=_dequantize_scalar_sum(loss_total, _loss_range(config), bits, count),
        correct=correct,
        samples=samples,
        local_correct=local_correct,
        class_samples=rows,
        class_correct=hits,
        cost=_cost_sums(config, cost_words, count) if config.cost_report else None,
        seed=seed,
    )

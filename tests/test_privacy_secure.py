"""Distributed DP inside secure rounds (issue 17, acceptance 1): over many in-memory SecAgg+
rounds with dropouts, the noise left in the unmasked, decoded sum has the variance the
config promises; clipping holds whatever a device feeds in; the modular sum never wraps; and
a sum no honest cohort can make is refused.

Statistics: the residual (decoded sum minus the survivors' clipped updates) of round r is
count_r devices' Skellam noise plus their rounding, unrotated and divided by the scale. Per
coordinate its variance is count_r * (variance + rho) / scale^2 with the rounding's share
rho in [0, 1/4]. Dividing each round's residual by sqrt(count_r) gives N draws of one
variance; the sample variance of N near-Gaussian draws has standard error
sigma^2 * sqrt(2 / (N - 1)), and the test allows 5 of them (a false alarm about once in
1.7 million runs), with the seeds fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetlearn.shared import privacy, wire
from fleetlearn.shared.compression import Compression, SparseMode
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.rounds import RoundAnnounce, RoundMode, StageTimes, TrainingPlan
from fleetlearn.shared.secagg import contribution
from fleetlearn.shared.secagg.config import DistributedNoise, SecAggConfig
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.errors import SecAggConfigError
from fleetlearn.shared.secagg.harness import DeviceInput, DropPoint, RoundRun
from tests.secagg_support import device_ids, run_round

N_DEVICES = 8
DIMENSION = 200  # padded to 256 by the rotation
CLIP = 0.5
ROUNDS = 30


def noisy_config(*, multiplier: float = 1.0, dimension: int = DIMENSION) -> SecAggConfig:
    noise = DistributedNoise.sized(
        clip=CLIP, dimension=dimension, noise_multiplier=multiplier, least_survivors=6
    )
    return SecAggConfig.create(
        cohort_size=N_DEVICES, dimension=dimension, quant_bits=16, clip=CLIP, noise=noise
    )


def inputs_of(config: SecAggConfig, seed: int, *, spread: float) -> dict[str, DeviceInput]:
    """Updates of L2 norm about `spread` * CLIP (above 1: every one of them is clipped)."""
    rng = np.random.default_rng(seed)
    out = {}
    for d in device_ids(config.cohort_size):
        x = rng.normal(size=config.dimension)
        x *= spread * CLIP * rng.uniform(0.5, 1.5) / np.linalg.norm(x)
        out[d] = DeviceInput(
            vector=x.astype(np.float32),
            weight=float(rng.uniform(0.1, 1.0)),  # ignored: with noise every device counts alike
            metrics=TrainingMetrics(loss=0.5, correct=3, samples=10),
        )
    return out


def drops_for(round_index: int) -> dict[str, DropPoint]:
    """Dropouts that leave 6, 7 or 8 contributions (a masked-and-gone device still counts)."""
    ids = device_ids(N_DEVICES)
    scripts = [
        {},
        {ids[round_index % N_DEVICES]: DropPoint.AFTER_SHARE},
        {ids[1]: DropPoint.BEFORE_ADVERTISE, ids[5]: DropPoint.AFTER_SHARE},
        {ids[2]: DropPoint.AFTER_MASKED},
    ]
    return scripts[round_index % len(scripts)]


def finished(config: SecAggConfig, index: int, inputs: dict[str, DeviceInput]) -> RoundRun:
    run = run_round(
        config,
        drops=drops_for(index),
        round_id=index + 1,
        round_seed=bytes([index + 1]) * 32,
        inputs=inputs,
        keep_contributions=True,
    )
    assert run.server.result is not None, run.server.abort_reason
    return run


def clipped_sum(run: RoundRun) -> np.ndarray:
    result = run.server.result
    assert result is not None
    return sum(
        (
            privacy.clip_l2(run.expected_float[d].vector.astype(np.float64), CLIP)
            for d in result.survivors
        ),
        np.zeros(result.config.dimension),
    )


def signed(words: np.ndarray, bits: int) -> np.ndarray:
    """Z_2^b words as signed integers, written out here rather than borrowed from the code."""
    return np.array([int(w) - (1 << bits) if int(w) >= 1 << (bits - 1) else int(w) for w in words])


@pytest.fixture(scope="module")
def runs() -> list[RoundRun]:
    config = noisy_config()
    return [finished(config, i, inputs_of(config, 100 + i, spread=3.0)) for i in range(ROUNDS)]


def test_the_noise_in_the_decoded_sum_has_the_promised_variance(runs: list[RoundRun]) -> None:
    config = runs[0].server.config
    noise = config.noise
    assert noise is not None
    counts = []
    normalised = []
    for run in runs:
        result = run.server.result
        assert result is not None
        counts.append(result.count)
        residual = result.update_sum() - clipped_sum(run)
        normalised.append(residual / math.sqrt(result.count))
    assert set(counts) == {6, 7, 8}  # the dropouts did leave less noise in some sums
    draws = np.concatenate(normalised)
    n = draws.size
    lowest = noise.variance / noise.scale**2
    highest = (noise.variance + 0.25) / noise.scale**2
    spread = 5 * highest * math.sqrt(2.0 / (n - 1))
    assert lowest - spread <= float(np.var(draws, ddof=1)) <= highest + spread
    # Zero mean: 5 standard errors of a mean of n draws.
    assert abs(float(np.mean(draws))) <= 5 * math.sqrt(highest / n)


def test_the_survivors_noise_gives_the_planned_multiplier(runs: list[RoundRun]) -> None:
    """A round with the planned least survivors (6) carries the configured multiplier; more
    survivors carry more, and the charge is computed from who survived."""
    config = runs[0].server.config
    noise = config.noise
    assert noise is not None
    p = config.update_words
    assert noise.noise_multiplier(p, 6) == pytest.approx(1.0)
    assert noise.noise_multiplier(p, 8) == pytest.approx(math.sqrt(7 / 5))
    assert noise.noise_multiplier(p, 3) < 1.0


def test_nothing_wraps(runs: list[RoundRun]) -> None:
    """The signed sum of the accepted contributions, added as plain integers, is exactly what
    the aggregator decoded: the sum mod 2^b never left the signed range."""
    for run in runs:
        result = run.server.result
        assert result is not None
        config = result.config
        p = config.update_words
        plain = sum(
            (signed(words[:p], config.field_bits) for words in run.contributions.values()),
            np.zeros(p, dtype=object),
        )
        assert set(run.contributions) == set(result.survivors)
        decoded = signed(result.vector, config.field_bits)
        assert list(plain) == list(decoded)
        assert max(abs(int(v)) for v in plain) <= config.noise.sum_bound(p, result.count)
        assert config.noise.sum_bound(p, config.cohort_size) < 1 << (config.field_bits - 1)


def test_clipping_holds_for_any_input() -> None:
    """Updates 10^6 times the clip end up in the sum as updates of norm `clip` (the residual
    is the noise alone), and one device's words, before noise, are within the norm bound."""
    config = noisy_config(multiplier=1.0)
    inputs = inputs_of(config, 7, spread=1e6)
    run = finished(config, 0, inputs)
    result = run.server.result
    assert result is not None
    residual = result.update_sum() - clipped_sum(run)
    noise = config.noise
    assert noise is not None
    sd = math.sqrt(result.count * (noise.variance + 0.25)) / noise.scale
    assert float(np.max(np.abs(residual))) < 6 * sd
    # Without meaningful noise, a device's own words show its clipped, rounded vector.
    quiet = noisy_config(multiplier=1e-6)
    x = inputs[device_ids(N_DEVICES)[0]].vector
    words = contribution.encode(
        quiet,
        x,
        weight=1.0,
        metrics=TrainingMetrics(),
        rng=np.random.default_rng(3),
        seed=b"\x01" * 32,
    )
    assert quiet.noise is not None
    p = quiet.update_words
    vector = signed(words[:p], quiet.field_bits).astype(np.float64)
    assert np.linalg.norm(vector) <= quiet.noise.norm_bound(p) + 1.0  # noise of sd 1e-6 * bound
    assert np.linalg.norm(vector) / quiet.noise.scale == pytest.approx(CLIP, rel=1e-2)


def test_a_sum_no_honest_cohort_makes_is_refused(runs: list[RoundRun]) -> None:
    run = runs[0]
    result = run.server.result
    assert result is not None
    config = result.config
    decoded = contribution.decode(config, run.expected, result.survivors, seed=result.seed)
    np.testing.assert_array_equal(decoded.vector, result.vector)  # the honest total passes
    total = run.expected.copy()
    total[5] = (1 << (config.field_bits - 1)) - 1  # far beyond any noisy sum of 8
    with pytest.raises(CompressionError, match="corrupt"):
        contribution.decode(config, total, result.survivors, seed=result.seed)


def test_the_rotation_needs_the_round_seed() -> None:
    config = noisy_config()
    with pytest.raises(Exception, match="round seed"):
        contribution.encode(
            config,
            np.zeros(DIMENSION, dtype=np.float32),
            weight=1.0,
            metrics=TrainingMetrics(),
            rng=np.random.default_rng(0),
        )


def test_the_bits_grow_with_the_noise_and_too_many_are_refused() -> None:
    small = noisy_config(multiplier=0.5)
    large = noisy_config(multiplier=50.0)
    assert small.field_bits < large.field_bits <= 62
    # A grid so fine that 8 devices' coordinates need more than 62 bits.
    noise = DistributedNoise(clip=CLIP, scale=1e19, variance=1.0, denominator=2.0)
    with pytest.raises(SecAggConfigError, match="bits"):
        SecAggConfig.create(cohort_size=N_DEVICES, dimension=DIMENSION, clip=CLIP, noise=noise)
    with pytest.raises(SecAggConfigError, match="noise"):
        DistributedNoise(clip=1.0, scale=1.0, variance=-1.0, denominator=2.0)
    # Noise a device's Poisson sampler cannot draw is refused in the config, not on devices.
    with pytest.raises(SecAggConfigError, match="variance"):
        DistributedNoise.sized(
            clip=CLIP, dimension=DIMENSION, noise_multiplier=1e14, least_survivors=2
        )


def test_a_noisy_config_travels_in_the_announcement() -> None:
    config = noisy_config()
    cohort = tuple(device_ids(N_DEVICES))
    announce = RoundAnnounce(
        round_id=1,
        mode=RoundMode.SECURE,
        model_version=1,
        cohort=cohort,
        seed=b"\x02" * 32,
        compression=Compression(mode=SparseMode.DENSE),
        training=TrainingPlan(epochs=1, max_samples=100),
        times=StageTimes(advertise=1.0, share=1.0, collect=1.0, unmask=1.0),
        secagg=config,
        tickets=b"\x00" * 16 * N_DEVICES,
    )
    decoded = wire.decode(wire.encode(announce))
    assert decoded == announce
    assert isinstance(decoded, RoundAnnounce)
    assert decoded.secagg is not None
    assert decoded.secagg.noise == config.noise

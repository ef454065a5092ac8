"""The device side of distributed DP (issue 17, part 1): clipping, the random rotation,
conditional rounding and Skellam noise, each against what it must guarantee. Statistical
checks use fixed seeds and bounds of several standard errors, stated next to each."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import hadamard

from fleetlearn.shared import privacy
from fleetlearn.shared.privacy import PrivacyEncodingError, RandomRotation


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=500) * 10
    clipped = privacy.clip_l2(big, 2.0)
    assert np.linalg.norm(clipped) == pytest.approx(2.0)
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), big / np.linalg.norm(big))
    small = rng.normal(size=500) * 1e-3
    np.testing.assert_array_equal(privacy.clip_l2(small, 2.0), small)


def test_the_rotation_is_the_normalised_hadamard_of_the_signed_update() -> None:
    rotation = RandomRotation(6, b"round-seed")
    assert rotation.padded == 8
    x = np.arange(1.0, 7.0)
    padded = np.zeros(8)
    padded[:6] = x
    expected = hadamard(8) @ (padded * rotation._signs) / math.sqrt(8)  # a library's H
    np.testing.assert_allclose(rotation.rotate(x), expected, atol=1e-12)


@pytest.mark.parametrize("dimension", [1, 5, 1024, 3000])
def test_the_rotation_keeps_norms_and_inverts(dimension: int) -> None:
    rng = np.random.default_rng(dimension)
    x = rng.normal(size=dimension)
    rotation = RandomRotation(dimension, b"\x01" * 32)
    y = rotation.rotate(x)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    np.testing.assert_allclose(rotation.unrotate(y), x, atol=1e-9)
    # The same seed rotates alike on every device; another seed does not.
    np.testing.assert_array_equal(RandomRotation(dimension, b"\x01" * 32).rotate(x), y)
    if dimension > 1:
        assert not np.allclose(RandomRotation(dimension, b"\x02" * 32).rotate(x), y)


def test_the_rotation_flattens_a_spike() -> None:
    """All of an update's norm on one coordinate ends up spread evenly: each rotated
    coordinate is +-1/sqrt(p) of it, the flattest an orthonormal map can make it."""
    d = 4096
    spike = np.zeros(d)
    spike[17] = 3.0
    y = RandomRotation(d, b"seed").rotate(spike)
    np.testing.assert_allclose(np.abs(y), 3.0 / math.sqrt(d))


def test_conditional_rounding_gives_integers_within_the_bound_and_is_close_to_unbiased() -> None:
    rng = np.random.default_rng(3)
    d = 2000
    x = rng.normal(size=d)
    x *= 20.0 / np.linalg.norm(x)
    bound = privacy.rounded_norm_bound(20.0, d, beta=math.exp(-0.5))
    assert bound < 20.0 + math.sqrt(d)
    draws = np.stack([privacy.round_conditional(x, bound=bound, rng=rng) for _ in range(400)])
    assert draws.dtype == np.int64
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.all(np.abs(draws - x) < 1.0)
    # Each coordinate's draws average to it: the mean error over 400 draws has a standard
    # error of at most 0.5 / sqrt(400) = 0.025 per coordinate; over all coordinates the mean
    # absolute deviation stays well below that bound.
    assert float(np.abs(draws.mean(axis=0) - x).mean()) < 0.025


def test_rounding_that_cannot_meet_its_bound_says_so() -> None:
    rng = np.random.default_rng(4)
    x = np.full(100, 0.5)
    with pytest.raises(PrivacyEncodingError, match="no rounding within"):
        privacy.round_conditional(x, bound=np.linalg.norm(x) + 1e-9, rng=rng)
    with pytest.raises(PrivacyEncodingError, match="exceeds the rounding bound"):
        privacy.round_conditional(x, bound=1.0, rng=rng)


@pytest.mark.parametrize("variance", [0.5, 4.0, 1000.0])
def test_skellam_noise_has_the_variance_asked_and_sums_across_devices(variance: float) -> None:
    """Mean 0 and the given variance, within 5 standard errors (for a draw of n values the
    variance estimate's standard error is about variance * sqrt((2 + 1/variance) / n): the
    Skellam's excess kurtosis is 1/variance). Ten devices' shares sum to ten times it."""
    rng = np.random.default_rng(int(variance * 10))
    n = 200_000
    noise = privacy.skellam_noise(n, variance, rng)
    assert noise.dtype == np.int64
    assert abs(float(noise.mean())) < 5 * math.sqrt(variance / n)
    error = variance * math.sqrt((2 + 1 / variance) / n)
    assert abs(float(noise.var()) - variance) < 5 * error
    devices = sum(privacy.skellam_noise(n // 10, variance, rng) for _ in range(10))
    total_error = 10 * variance * math.sqrt((2 + 1 / (10 * variance)) / (n // 10))
    assert abs(float(devices.var()) - 10 * variance) < 5 * total_error


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: privacy.clip_l2(np.array([1.0, np.nan]), 1.0), "NaN"),
        (lambda: privacy.clip_l2(np.ones(3), 0.0), "clip"),
        (lambda: privacy.clip_l2(np.ones((2, 2)), 1.0), "1-d"),
        (lambda: RandomRotation(0, b"s"), "dimension"),
        (lambda: RandomRotation(4, b""), "seed"),
        (lambda: RandomRotation(4, b"s").rotate(np.ones(5)), "coordinates"),
        (lambda: RandomRotation(4, b"s").unrotate(np.ones(3)), "coordinates"),
        (lambda: privacy.skellam_noise(10, -1.0, np.random.default_rng()), "variance"),
        (lambda: privacy.skellam_noise(-1, 1.0, np.random.default_rng()), "size"),
        (lambda: privacy.rounded_norm_bound(1.0, 10, 1.5), "beta"),
    ],
)
def test_bad_inputs_are_refused_with_the_encodings_error(call: object, match: str) -> None:
    with pytest.raises(PrivacyEncodingError, match=match):
        call()  # type: ignore[operator]

"""Distributed differential privacy on a device: what it does to its update before masking.

What it owns, each a pure function of its inputs and a numpy Generator (issue 17 wires them
into the secure contribution; docs/privacy.md):
- `clip_l2`: scale an update down to an L2 norm of at most `clip` (the sensitivity the
  accountant charges for one device).
- `RandomRotation`: random signs, then the Walsh-Hadamard transform, normalised, on the update
  zero-padded to a power of two. Orthonormal, so norms are kept and the inverse is exact (up
  to float rounding); it spreads a spiky update over every coordinate, so that a per-coordinate
  bound (what the modular sum needs) is about clip * sqrt(log d / d) instead of clip. Its signs
  come from the round's public seed: every device and the aggregator rotate alike.
- `round_conditional`: stochastic rounding to integers, drawn again while the rounded vector's
  L2 norm exceeds `rounded_norm_bound` (Kairouz, Liu and Steinke, ICML 2021, "conditional
  randomized rounding"), so the sensitivity on the integer grid is bounded with certainty.
- `skellam_noise`: integer noise, the difference of two Poisson draws of mean variance / 2
  (a symmetric Skellam variate of the given variance); n devices' shares sum to a Skellam of
  n times the variance (Agarwal, Kairouz and Liu, NeurIPS 2021). numpy's Poisson sampler draws
  them; nothing here samples by hand.

Rules: inputs are checked and a bad value is a `PrivacyEncodingError` (a `ValueError`);
randomness only from the Generator passed in (device-local, never mask material); no clock.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fleetlearn.shared.errors import FleetlearnError

MAX_ROUNDING_TRIES = 1000
MAX_DIMENSION = 1 << 26  # 64M coordinates after padding: far beyond any fleet model
# Conditional rounding refuses a draw with probability about beta (Kairouz et al. use e^-0.5).
ROUNDING_BETA = math.exp(-0.5)
# Grid points per rotated coordinate of a clipped update (scale = GRID * sqrt(p) / clip): the
# rounding error is then about 1/1000 of a typical coordinate, and the Skellam bound's grid
# correction is negligible. It costs bits only logarithmically.
GRID = 1024.0
# The chance, per device and round, that a rotated coordinate is clamped to the coordinate
# bound (clamping only shrinks the update, so the sensitivity still holds), and the chance,
# per round, that the noise in the sum exceeds the headroom the field bits leave for it.
CLAMP_RISK = 1e-6
WRAP_RISK = 1e-12


class PrivacyEncodingError(FleetlearnError, ValueError):
    """A value the DP encoding cannot take (the message says which)."""


def _vector(x: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(x)
    if values.ndim != 1 or values.dtype.kind not in "fiu":
        raise PrivacyEncodingError(f"{what} must be a 1-d numeric vector, got {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise PrivacyEncodingError(f"{what} holds NaN or infinity")
    return values


def _positive(value: float, what: str) -> float:
    if not (isinstance(value, float | int) and math.isfinite(value) and value > 0):
        raise PrivacyEncodingError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def clip_l2(x: np.ndarray, clip: float) -> np.ndarray:
    """`x` scaled by min(1, clip / ||x||_2): its L2 norm is at most `clip` (float64)."""
    values = _vector(x, "update")
    bound = _positive(clip, "clip")
    norm = float(np.linalg.norm(values))
    return values if norm <= bound else values * (bound / norm)


def _fwht(a: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform of a power-of-two-long float64 vector (a copy)."""
    out = a.copy()
    n, h = out.shape[0], 1
    while h < n:
        pairs = out.reshape(-1, 2, h)
        first, second = pairs[:, 0, :], pairs[:, 1, :]
        total = first + second
        second -= first
        second *= -1.0
        first[...] = total
        h *= 2
    return out


class RandomRotation:
    """x -> H D pad(x) / sqrt(p), with D random signs from `seed` and p = 2^ceil(log2 d)."""

    def __init__(self, dimension: int, seed: bytes) -> None:
        if type(dimension) is not int or not 1 <= dimension <= MAX_DIMENSION:
            raise PrivacyEncodingError(f"dimension must be an int in 1..{MAX_DIMENSION}")
        if not isinstance(seed, bytes) or not seed:
            raise PrivacyEncodingError("the rotation needs a non-empty byte seed")
        self.dimension = dimension
        self.padded = 1 << (dimension - 1).bit_length()
        signs = np.random.default_rng(int.from_bytes(seed, "big")).integers(0, 2, self.padded)
        self._signs = np.where(signs == 1, 1.0, -1.0)
        self._norm = 1.0 / math.sqrt(self.padded)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """The rotated update: `padded` float64 coordinates, same L2 norm."""
        values = _vector(x, "update")
        if values.shape[0] != self.dimension:
            raise PrivacyEncodingError(
                f"update has {values.shape[0]} coordinates, the rotation {self.dimension}"
            )
        padded = np.zeros(self.padded)
        padded[: self.dimension] = values
        return _fwht(padded * self._signs) * self._norm

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """The inverse: `dimension` coordinates (H is symmetric and H H = p I)."""
        values = _vector(y, "rotated vector")
        if values.shape[0] != self.padded:
            raise PrivacyEncodingError(
                f"rotated vector has {values.shape[0]} coordinates, expected {self.padded}"
            )
        return (_fwht(values) * self._norm * self._signs)[: self.dimension]


def rounded_norm_bound(norm: float, dimension: int, beta: float) -> float:
    """The L2 norm that conditional rounding guarantees for a vector of norm `norm` in
    `dimension` coordinates (Kairouz et al. 2021, the conditional rounding bound):
    min(norm + sqrt(d), sqrt(norm^2 + d/4 + sqrt(2 ln(1/beta)) (norm + sqrt(d)/2))).
    With beta = 0 rounding is unconditional and only the first bound holds."""
    c = float(norm)
    d = float(dimension)
    plain = c + math.sqrt(d)
    if beta == 0.0:
        return plain
    if not 0.0 < beta < 1.0:
        raise PrivacyEncodingError(f"beta must be in [0, 1), got {beta!r}")
    squared = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2.0)
    return min(plain, math.sqrt(squared))


def round_conditional(x: np.ndarray, *, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of `x` to integers (int64), drawn again until the result's L2
    norm is at most `bound`. Unbiased for each draw; the conditioning shifts the mean by a
    little when the bound is tight (beta is the chance a draw is refused)."""
    values = _vector(x, "vector")
    limit = _positive(bound, "bound")
    if float(np.linalg.norm(values)) > limit:
        raise PrivacyEncodingError("the vector's own norm exceeds the rounding bound")
    floor = np.floor(values)
    frac = values - floor
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (rng.random(values.shape) < frac)
        if float(np.linalg.norm(rounded)) <= limit:
            return rounded.astype(np.int64)
    raise PrivacyEncodingError(
        f"no rounding within norm {limit:.4g} in {MAX_ROUNDING_TRIES} draws; the bound is too "
        "tight for this vector (raise beta)"
    )


def padded_dimension(dimension: int) -> int:
    """The rotation's length for `dimension` coordinates: the next power of two."""
    if type(dimension) is not int or not 1 <= dimension <= MAX_DIMENSION:
        raise PrivacyEncodingError(f"dimension must be an int in 1..{MAX_DIMENSION}")
    return 1 << (dimension - 1).bit_length()


def rotation_seed(round_seed: bytes) -> bytes:
    """The rotation's signs come from the round's public seed, kept apart from the other
    uses of it (rand-k coordinates) by hashing with a purpose string."""
    return hashlib.blake2b(round_seed, digest_size=32, person=b"fl-dp-rotation").digest()


def coordinate_bound(norm: float, padded: int) -> int:
    """Integer L such that a rotated vector of L2 norm `norm` in `padded` coordinates has
    every coordinate within L - 1 except with probability CLAMP_RISK (each coordinate is
    sub-Gaussian with variance proxy norm^2 / padded: a union bound over the coordinates),
    so that after rounding every coordinate is within L."""
    spread = float(norm) * math.sqrt(2.0 * math.log(2.0 * padded / CLAMP_RISK) / padded)
    return math.ceil(spread) + 1


def noise_headroom(variance: float, coordinates: int) -> int:
    """t such that `coordinates` symmetric Skellam variates of total `variance` (a sum of
    devices' noise) all lie within +-t except with probability WRAP_RISK.

    A Skellam variate of variance V is X - Y with X, Y Poisson(V/2); |X - Y| >= t needs
    |X - V/2| >= t/2 or |Y - V/2| >= t/2, and Bernstein's inequality for the Poisson gives
    P(|X - lam| >= s) <= 2 exp(-s^2 / (2 (lam + s/3))). Solved for s with 4 * coordinates
    such terms summing to WRAP_RISK."""
    if variance <= 0.0:
        return 0
    lam = variance / 2.0
    log_term = math.log(4.0 * coordinates / WRAP_RISK)
    # s^2 = 2 (lam + s/3) log_term: the positive root of s^2 - (2/3) L s - 2 lam L = 0.
    s = (2.0 / 3.0 * log_term + math.sqrt((2.0 / 3.0 * log_term) ** 2 + 8.0 * lam * log_term)) / 2
    return math.ceil(2.0 * s)


def skellam_noise(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """`size` symmetric Skellam variates of `variance` (int64): Poisson(variance/2) minus
    Poisson(variance/2)."""
    if type(size) is not int or size < 0:
        raise PrivacyEncodingError(f"size must be an int >= 0, got {size!r}")
    var = _positive(variance, "variance")
    half = var / 2.0
    return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)

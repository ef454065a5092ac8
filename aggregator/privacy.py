"""Differential-privacy accounting: what the fleet's releases have spent of (epsilon, delta).

What it owns: `RoundCharge` (one round's mechanism as it ran), `skellam_rdp_curve` (the
Renyi-DP curve of Skellam rounds), `epsilon_spent` (a run's epsilon at a delta, from the
whole list), `Ledger` (the same, composed round by round, for the engine) and `Budget`.
Nothing here adds noise: devices and the aggregator's round modes do (docs/privacy.md).

Two mechanisms, each on a sum of updates whose L2 norm is clipped:
- `gaussian`: Gaussian noise of standard deviation `noise_multiplier` times the sensitivity
  on the sum (central and local DP, plain rounds). Accounted by dp-accounting's RDP
  accountant with its own events (a Poisson-sampled Gaussian per round): nothing about it is
  computed here.
- `skellam`: integer Skellam noise that devices add before masking, so that the unmasked sum
  carries noise of standard deviation `noise_multiplier` times the grid sensitivity `scale`
  (Agarwal, Kairouz and Liu, NeurIPS 2021). Its per-order RDP is their bound for the
  Skellam mechanism with L1 and L2 sensitivities in the scaled integer domain; Poisson
  subsampling amplifies it by the general bound of Zhu and Wang (ICML 2019, Theorem 5),
  since dp-accounting amplifies only its own events; dp-accounting converts the composed
  curve to (epsilon, delta).

Rules: the noise charged is the noise that was in the sum (a round with dropouts carries less
of the devices' noise shares: the caller passes what the survivors added, never the plan);
integer orders only (the Zhu-Wang bound needs them); every input is checked, and an
impossible charge is a `PrivacyError`, never a smaller epsilon.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fleetlearn.shared.errors import FleetlearnError, require_modules

# Integer orders 2..256 (the subsampling bound needs integers; high orders matter for small
# epsilon, low ones for many rounds).
ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256)
Mechanism = Literal["gaussian", "skellam"]


class PrivacyError(FleetlearnError, ValueError):
    """A privacy charge or budget that cannot be accounted (the message says which value)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundCharge:
    """One round's mechanism as it ran.

    sampling_rate     probability that a given device was in the round's cohort
    noise_multiplier  noise standard deviation in the sum, over the L2 sensitivity
    mechanism         `gaussian` or `skellam`
    dimension         coordinates the noise is on (skellam: its L1 sensitivity grows with it)
    scale             skellam: the L2 sensitivity on the integer grid (aggregator.modes passes
                      the rounded norm bound B of one device's scaled, rotated update), so that
                      the sensitivities are 1 (L2) and sqrt(d) (L1) in units of it
    """

    sampling_rate: float
    noise_multiplier: float
    mechanism: Mechanism = "gaussian"
    dimension: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sampling_rate) and 0.0 < self.sampling_rate <= 1.0):
            raise PrivacyError(f"sampling rate {self.sampling_rate!r} is outside (0, 1]")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0.0):
            raise PrivacyError(f"noise multiplier {self.noise_multiplier!r} must be > 0")
        if self.mechanism not in ("gaussian", "skellam"):
            raise PrivacyError(f"mechanism {self.mechanism!r} is not gaussian or skellam")
        if type(self.dimension) is not int or self.dimension < 1:
            raise PrivacyError(f"dimension {self.dimension!r} must be an int >= 1")
        if not (math.isfinite(self.scale) and self.scale > 0.0):
            raise PrivacyError(f"scale {self.scale!r} must be > 0")


def require_accountant() -> None:
    """Raise MissingExtraError unless dp-accounting is installed (the `privacy` extra)."""
    require_modules("privacy accounting", ("dp_accounting",), "privacy")


def _dp_accounting() -> Any:
    require_accountant()
    import dp_accounting

    return dp_accounting


def skellam_rdp(order: int, *, noise_multiplier: float, dimension: int, scale: float) -> float:
    """RDP at `order` of one Skellam mechanism (no subsampling), sensitivities in units of
    the clip: L2 sensitivity 1 (one device's clipped update), L1 at most sqrt(d) times it
    (Agarwal et al. 2021, the bound for the Skellam mechanism; the variance mu and the
    sensitivities taken in update units, `scale` the grid factor)."""
    a, s = float(order), scale
    mu = noise_multiplier**2  # the central variance over clip^2
    l2 = 1.0
    l1 = math.sqrt(dimension)
    base = a * l2**2 / (2.0 * mu)
    correction = min(
        ((2.0 * a - 1.0) * s * l2**2 + 6.0 * l1) / (4.0 * s**3 * mu**2),
        3.0 * l1 / (2.0 * s * mu),
    )
    return base + correction


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def poisson_subsampled_rdp(order: int, rate: float, rdp: Any) -> float:
    """Zhu and Wang 2019, Theorem 5: an upper bound on the RDP at integer `order` of a
    mechanism with RDP curve `rdp(order)` run on a Poisson sample with rate `rate`; never
    above the mechanism's own RDP."""
    own = float(rdp(order))
    if rate == 1.0:
        return own
    alpha, q = order, rate
    log_terms = [
        (alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1.0),
        _log_comb(alpha, 2) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + float(rdp(2)),
    ]
    for ell in range(3, alpha + 1):
        log_terms.append(
            math.log(3.0)
            + _log_comb(alpha, ell)
            + (alpha - ell) * math.log1p(-q)
            + ell * math.log(q)
            + (ell - 1) * float(rdp(ell))
        )
    top = max(log_terms)
    amplified = (top + math.log(sum(math.exp(t - top) for t in log_terms))) / (alpha - 1)
    return min(amplified, own)


@functools.lru_cache(maxsize=1024)
def _skellam_curve(charge: RoundCharge, orders: tuple[int, ...]) -> tuple[float, ...]:
    """One Skellam round's amplified RDP at `orders` (rounds repeat a handful of charges)."""

    def own(order: int) -> float:
        return skellam_rdp(
            order,
            noise_multiplier=charge.noise_multiplier,
            dimension=charge.dimension,
            scale=charge.scale,
        )

    return tuple(poisson_subsampled_rdp(o, charge.sampling_rate, own) for o in orders)


def skellam_rdp_curve(charges: Sequence[RoundCharge], orders: Sequence[int] = ORDERS) -> np.ndarray:
    """The composed RDP curve of Skellam `charges` at `orders` (RDP composes by addition)."""
    total = np.zeros(len(orders))
    for charge, count in collections.Counter(charges).items():
        if charge.mechanism != "skellam":
            raise PrivacyError("skellam_rdp_curve takes Skellam charges only")
        total += count * np.array(_skellam_curve(charge, tuple(orders)))
    return total


def _gaussian_event(dpa: Any, charges: Sequence[RoundCharge]) -> Any:
    """The run as dp-accounting events: each distinct round self-composed as often as it
    ran (equal to composing the rounds one by one, and as fast at any run length)."""
    return dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(c.sampling_rate, dpa.GaussianDpEvent(c.noise_multiplier)),
                count,
            )
            for c, count in collections.Counter(charges).items()
        ]
    )


def epsilon_spent(charges: Sequence[RoundCharge], delta: float) -> float:
    """Epsilon of the whole run at `delta` (0 without charges).

    A run with one mechanism is composed in RDP: Gaussian rounds by dp-accounting's own
    accountant end to end, Skellam rounds with their curve (`skellam_rdp_curve`) and
    dp-accounting's conversion. A run that changed mechanism adds the two parts' epsilons,
    each at delta / 2 (basic composition: valid, and never smaller than the truth)."""
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise PrivacyError(f"delta {delta!r} is outside (0, 1)")
    gaussian = [c for c in charges if c.mechanism == "gaussian"]
    skellam = [c for c in charges if c.mechanism == "skellam"]
    if gaussian and skellam:
        return epsilon_spent(gaussian, delta / 2.0) + epsilon_spent(skellam, delta / 2.0)
    if not charges:
        return 0.0
    dpa = _dp_accounting()
    if gaussian:
        accountant = dpa.rdp.RdpAccountant(orders=[float(o) for o in ORDERS])
        accountant.compose(_gaussian_event(dpa, gaussian))
        return float(accountant.get_epsilon(delta))
    epsilon, _ = dpa.rdp.rdp_privacy_accountant.compute_epsilon(
        [float(o) for o in ORDERS], skellam_rdp_curve(skellam), delta
    )
    return float(epsilon)


@functools.lru_cache(maxsize=4096)
def _round_curve(charge: RoundCharge) -> tuple[float, ...]:
    """One round's RDP at ORDERS: a Gaussian's from dp-accounting's own accountant, a
    Skellam's from `skellam_rdp_curve`."""
    if charge.mechanism == "skellam":
        return _skellam_curve(charge, ORDERS)
    dpa = _dp_accounting()
    accountant = dpa.rdp.RdpAccountant(orders=[float(o) for o in ORDERS])
    accountant.compose(
        dpa.PoissonSampledDpEvent(
            charge.sampling_rate, dpa.GaussianDpEvent(charge.noise_multiplier)
        )
    )
    return tuple(float(v) for v in accountant.rdp)


class Ledger:
    """A run's charges with their RDP composed as they come, so that the run's epsilon costs
    the same after a thousand rounds as after one. `epsilon` equals `epsilon_spent` on the
    same charges (RDP composes by addition; the conversion is dp-accounting's).

    Two figures: `amplified` (each round at its sampling rate: for observers who do not know
    who was sampled) and not (every rate taken as 1: for observers who see the cohorts)."""

    def __init__(self, charges: Sequence[RoundCharge] = ()) -> None:
        self.charges: list[RoundCharge] = []
        self._rdp = {
            (amplified, mechanism): np.zeros(len(ORDERS))
            for amplified in (True, False)
            for mechanism in ("gaussian", "skellam")
        }
        for charge in charges:
            self.add(charge)

    def __len__(self) -> int:
        return len(self.charges)

    @staticmethod
    def _curves(charge: RoundCharge) -> dict[bool, np.ndarray]:
        known = dataclasses.replace(charge, sampling_rate=1.0)
        return {True: np.array(_round_curve(charge)), False: np.array(_round_curve(known))}

    def add(self, charge: RoundCharge) -> None:
        for amplified, curve in self._curves(charge).items():
            self._rdp[(amplified, charge.mechanism)] += curve
        self.charges.append(charge)

    def epsilon(self, delta: float, *, amplified: bool, extra: RoundCharge | None = None) -> float:
        """The run's epsilon at `delta`, with `extra` added if given (what one more round
        would make it); composed like `epsilon_spent`."""
        if not (math.isfinite(delta) and 0.0 < delta < 1.0):
            raise PrivacyError(f"delta {delta!r} is outside (0, 1)")
        mechanisms = {c.mechanism for c in self.charges}
        gaussian = self._rdp[(amplified, "gaussian")]
        skellam = self._rdp[(amplified, "skellam")]
        if extra is not None:
            mechanisms.add(extra.mechanism)
            curve = self._curves(extra)[amplified]
            if extra.mechanism == "gaussian":
                gaussian = gaussian + curve
            else:
                skellam = skellam + curve
        if not mechanisms:
            return 0.0
        dpa = _dp_accounting()
        orders = [float(o) for o in ORDERS]

        def convert(curve: np.ndarray, at: float) -> float:
            epsilon, _ = dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, at)
            return float(epsilon)

        if mechanisms == {"gaussian", "skellam"}:
            return convert(gaussian, delta / 2.0) + convert(skellam, delta / 2.0)
        return convert(gaussian if "gaussian" in mechanisms else skellam, delta)


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """The fleet's privacy budget: no round starts that would take the run past `epsilon`
    at `delta`."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0.0):
            raise PrivacyError(f"privacy.epsilon {self.epsilon!r} must be a number > 0")
        if not (math.isfinite(self.delta) and 0.0 < self.delta < 1.0):
            raise PrivacyError(f"privacy.delta {self.delta!r} is outside (0, 1)")

    def spent(self, charges: Sequence[RoundCharge]) -> float:
        return epsilon_spent(charges, self.delta)

    def allows(self, charges: Sequence[RoundCharge], next_round: RoundCharge) -> bool:
        """Whether `next_round`, charged as planned, keeps the run within the budget."""
        return epsilon_spent([*charges, next_round], self.delta) <= self.epsilon

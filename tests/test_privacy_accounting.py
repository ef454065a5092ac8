"""Privacy accounting (issue 17, part 1): the epsilon a run spends, against dp-accounting.

A Gaussian run is dp-accounting's own computation, so it must equal a direct one; the Skellam
curve is ours (the bound of Agarwal et al. 2021, amplified by Zhu and Wang's Theorem 5), so it
is checked against what it must bound and what it must approach.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fleetlearn.aggregator import privacy
from fleetlearn.aggregator.privacy import Budget, PrivacyError, RoundCharge

dp_accounting = pytest.importorskip("dp_accounting")

ORDERS = [float(o) for o in privacy.ORDERS]


def direct_gaussian_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return float(accountant.compose(event).get_epsilon(delta))


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.05, 1.1, 100), (0.2, 0.8, 20), (1.0, 5.0, 3)])
def test_a_gaussian_run_is_what_dp_accounting_computes(q: float, z: float, rounds: int) -> None:
    charges = [RoundCharge(sampling_rate=q, noise_multiplier=z)] * rounds
    spent = privacy.epsilon_spent(charges, 1e-5)
    assert spent == pytest.approx(direct_gaussian_epsilon(q, z, rounds, 1e-5), rel=1e-9)
    assert 0 < spent < math.inf


def gaussian_rdp(z: float):  # type: ignore[no-untyped-def]
    return lambda order: order / (2.0 * z * z)


@pytest.mark.parametrize(("q", "z"), [(0.01, 1.0), (0.1, 1.5), (0.3, 4.0)])
def test_the_subsampling_bound_bounds_dp_accountings_tight_gaussian(q: float, z: float) -> None:
    """Zhu-Wang's bound is general, so it is looser than dp-accounting's exact analysis of the
    subsampled Gaussian, and never below it. Measured over q in 0.01..0.5 and z in 0.8..4 (50
    rounds, delta 1e-5): 1.0 to 2.7 times the tight epsilon, worst with much noise."""
    ours = (
        np.array([privacy.poisson_subsampled_rdp(int(o), q, gaussian_rdp(z)) for o in ORDERS]) * 50
    )
    ours_eps, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(ORDERS, ours, 1e-5)
    tight = direct_gaussian_epsilon(q, z, 50, 1e-5)
    assert tight <= ours_eps <= 3.0 * tight, (tight, ours_eps)


def test_without_subsampling_the_curve_is_the_mechanisms_own() -> None:
    curve = gaussian_rdp(2.0)
    for order in (2, 3, 10, 64):
        assert privacy.poisson_subsampled_rdp(order, 1.0, curve) == curve(order)
        assert privacy.poisson_subsampled_rdp(order, 0.5, curve) <= curve(order)


def test_skellam_bounds_the_gaussian_of_its_variance_and_approaches_it_on_a_fine_grid() -> None:
    """The Skellam mechanism's RDP is the Gaussian's of the same variance plus a correction
    for its integer support, which vanishes as the grid gets finer (scale grows)."""
    z, d = 1.2, 1000
    for order in (2, 8, 32):
        gaussian = order / (2 * z * z)
        coarse = privacy.skellam_rdp(order, noise_multiplier=z, dimension=d, scale=10.0)
        fine = privacy.skellam_rdp(order, noise_multiplier=z, dimension=d, scale=1e4)
        assert gaussian < fine < coarse
        assert fine == pytest.approx(gaussian, rel=1e-3)


def test_a_skellam_run_on_a_fine_grid_spends_about_what_the_gaussian_would() -> None:
    skellam = [RoundCharge(sampling_rate=0.1, noise_multiplier=1.0, mechanism="skellam",
                           dimension=10_000, scale=1e4)] * 30  # fmt: skip
    gaussian = [RoundCharge(sampling_rate=0.1, noise_multiplier=1.0)] * 30
    eps_skellam = privacy.epsilon_spent(skellam, 1e-5)
    eps_gaussian = privacy.epsilon_spent(gaussian, 1e-5)
    # Looser (the general subsampling bound, see above) but of the same size.
    assert eps_gaussian <= eps_skellam <= 3.0 * eps_gaussian, (eps_gaussian, eps_skellam)


def test_more_rounds_less_noise_or_more_sampling_spend_more() -> None:
    def spent(q: float, z: float, rounds: int, mechanism: str = "gaussian") -> float:
        charge = RoundCharge(sampling_rate=q, noise_multiplier=z, mechanism=mechanism,  # type: ignore[arg-type]
                             dimension=100, scale=100.0)  # fmt: skip
        return privacy.epsilon_spent([charge] * rounds, 1e-5)

    for mechanism in ("gaussian", "skellam"):
        assert spent(0.1, 1.0, 10, mechanism) < spent(0.1, 1.0, 20, mechanism)
        assert spent(0.1, 2.0, 10, mechanism) < spent(0.1, 1.0, 10, mechanism)
        assert spent(0.05, 1.0, 10, mechanism) < spent(0.1, 1.0, 10, mechanism)
    assert privacy.epsilon_spent([], 1e-5) == 0.0


def test_a_run_that_changed_mechanism_is_charged_both_parts() -> None:
    g = [RoundCharge(sampling_rate=0.1, noise_multiplier=1.0)] * 5
    s = [RoundCharge(sampling_rate=0.1, noise_multiplier=1.0, mechanism="skellam",
                     dimension=100, scale=100.0)] * 5  # fmt: skip
    both = privacy.epsilon_spent([*g, *s], 1e-5)
    assert both == pytest.approx(privacy.epsilon_spent(g, 5e-6) + privacy.epsilon_spent(s, 5e-6))
    assert both > max(privacy.epsilon_spent(g, 1e-5), privacy.epsilon_spent(s, 1e-5))


def test_the_budget_refuses_the_round_that_would_cross_it() -> None:
    charge = RoundCharge(sampling_rate=0.2, noise_multiplier=1.0)
    budget = Budget(epsilon=3.0, delta=1e-5)
    history: list[RoundCharge] = []
    while budget.allows(history, charge):
        history.append(charge)
    assert history  # some rounds fit
    assert budget.spent(history) <= 3.0 < budget.spent([*history, charge])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampling_rate": 0.0, "noise_multiplier": 1.0},
        {"sampling_rate": 1.5, "noise_multiplier": 1.0},
        {"sampling_rate": math.nan, "noise_multiplier": 1.0},
        {"sampling_rate": 0.1, "noise_multiplier": 0.0},
        {"sampling_rate": 0.1, "noise_multiplier": math.inf},
        {"sampling_rate": 0.1, "noise_multiplier": 1.0, "mechanism": "laplace"},
        {"sampling_rate": 0.1, "noise_multiplier": 1.0, "dimension": 0},
        {"sampling_rate": 0.1, "noise_multiplier": 1.0, "scale": -1.0},
    ],
)
def test_impossible_charges_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(PrivacyError):
        RoundCharge(**kwargs)  # type: ignore[arg-type]


def test_impossible_budgets_and_deltas_are_refused() -> None:
    for epsilon, delta in ((0.0, 1e-5), (math.inf, 1e-5), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(PrivacyError):
            Budget(epsilon=epsilon, delta=delta)
    with pytest.raises(PrivacyError):
        privacy.epsilon_spent([], 2.0)


def test_the_ledger_composed_round_by_round_equals_the_whole_run() -> None:
    """The engine's running ledger (one curve added per round, cached per distinct charge)
    gives what `epsilon_spent` computes from the whole list, amplified and cohort-known,
    for a run that mixes mechanisms, rates and multipliers, and with one more round."""
    rng = np.random.default_rng(4)
    charges = []
    for _ in range(60):
        q, z = float(rng.choice([0.05, 0.3, 1.0])), float(rng.choice([0.9, 1.7]))
        if rng.random() < 0.5:
            charges.append(RoundCharge(sampling_rate=q, noise_multiplier=z))
        else:
            charges.append(
                RoundCharge(
                    sampling_rate=q,
                    noise_multiplier=z,
                    mechanism="skellam",
                    dimension=2048,
                    scale=40_000.0,
                )
            )
    ledger = privacy.Ledger()
    for k, charge in enumerate(charges, start=1):
        ledger.add(charge)
        if k in (1, 7, 60):
            done = charges[:k]
            known = [dataclasses.replace(c, sampling_rate=1.0) for c in done]
            assert ledger.epsilon(1e-5, amplified=True) == pytest.approx(
                privacy.epsilon_spent(done, 1e-5), rel=1e-12
            )
            assert ledger.epsilon(1e-5, amplified=False) == pytest.approx(
                privacy.epsilon_spent(known, 1e-5), rel=1e-12
            )
    extra = charges[3]
    assert ledger.epsilon(1e-5, amplified=True, extra=extra) == pytest.approx(
        privacy.epsilon_spent([*charges, extra], 1e-5), rel=1e-12
    )
    assert len(ledger) == 60  # what-if left the ledger as it was
    assert privacy.Ledger().epsilon(1e-5, amplified=True) == 0.0

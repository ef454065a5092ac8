"""Acceptance 2: over random cohorts, graphs, thresholds, rings, quantizers and drop scripts,
the round is exact whenever the threshold holds and ABORTED with a reason whenever it does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetlearn.shared.secagg.config import SecAggConfig, sum_bits
from fleetlearn.shared.secagg.errors import SecAggError
from fleetlearn.shared.secagg.harness import DropPoint
from fleetlearn.shared.secagg.server import ServerState
from tests.secagg_support import device_ids, predict, run_round, weighted_mean


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[SecAggConfig, dict[str, DropPoint], bytes]:
    n = draw(st.integers(3, 14))
    k = draw(st.sampled_from([k for k in range(2, n) if (n * k) % 2 == 0]))
    t = draw(st.integers(k // 2 + 1, k))
    q = draw(st.integers(1, 24))
    need = q + sum_bits(n)
    b = draw(st.integers(need, min(64, need + 40)))  # reaches the uint64 ring too
    extra_limit = (1 << (b - sum_bits(n))) - 1
    config = SecAggConfig.create(
        cohort_size=n,
        dimension=draw(st.integers(1, 12)),
        neighbours=k,
        threshold=t,
        quant_bits=q,
        field_bits=b,
        clip=draw(st.sampled_from([0.5, 1.0, 4.0])),
        max_weight=draw(st.sampled_from([1.0, 10.0, 1000.0])),
        max_samples=min(1000, extra_limit),
        min_survivors=draw(st.one_of(st.none(), st.integers(2, n))),
    )
    drops = draw(st.dictionaries(st.sampled_from(device_ids(n)), st.sampled_from(list(DropPoint))))
    seed = draw(st.binary(min_size=32, max_size=32))
    return config, drops, seed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 2**16))
def test_exact_when_threshold_holds_else_aborted(
    scenario: tuple[SecAggConfig, dict[str, DropPoint], bytes], input_seed: int
) -> None:
    config, drops, seed = scenario
    expected_abort = predict(config, seed, drops)
    event(f"outcome: {expected_abort or 'DONE'}")
    run = run_round(config, drops=drops, round_seed=seed, input_seed=input_seed)
    server = run.server
    if expected_abort is not None:
        assert server.state is ServerState.ABORTED
        assert server.reason is not None
        assert server.reason.startswith(expected_abort), (expected_abort, server.reason)
        assert server.result is None
        return
    assert server.state is ServerState.DONE, server.reason
    result = server.result
    assert result is not None
    d = config.dimension
    assert np.array_equal(result.vector, run.expected[:d])
    assert result.extra_grid == tuple(int(v) for v in run.expected[d:])
    assert result.samples == sum(i.metrics.samples for i in run.expected_float.values())
    if result.weight_sum == 0.0:
        # On a coarse weight grid (e.g. 1 bit) stochastic rounding can send every weight to 0:
        # the sum is still exact, but there is no weighted mean, and the library says so.
        with pytest.raises(SecAggError, match="sum to zero"):
            result.mean()
        return
    error = np.abs(result.mean() - weighted_mean(run.expected_float))
    assert np.all(error <= result.mean_error_bound())

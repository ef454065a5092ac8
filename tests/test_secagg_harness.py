"""Acceptance 1: whole rounds in memory, dropouts scripted at every point.

For n in {3, 10, 100} and k in {2, ~2 log2 n, n-1}, with devices dropping before advertising,
after advertising, after sharing, after sending the masked input, and during unmasking: the
unmasked sum equals the exact sum of the survivors' quantized contributions in Z_2^b, the
dequantized weighted mean is within the stated bound of the float computation, and a drop
script that breaks the threshold ends ABORTED with a reason naming the stage.
"""

from __future__ import annotations

import numpy as np
import pytest

from fleetlearn.shared.secagg.config import SecAggConfig, Stage, default_neighbours
from fleetlearn.shared.secagg.harness import DropPoint
from fleetlearn.shared.secagg.server import ServerState
from tests.secagg_support import device_ids, pick_drops, predict, run_round, weighted_mean

SEED = b"\x07" * 32
POINTS = list(DropPoint)


def _cases() -> list[tuple[int, int, str]]:
    cases = []
    for n in (3, 10, 100):
        ks = sorted({2, default_neighbours(n), n - 1})
        for k_wanted in ks:
            # every device needs exactly k neighbours, so n*k must be even
            k = k_wanted + 1 if (n * k_wanted) % 2 else k_wanted
            for script in ["none", *(p.value for p in POINTS), "mixed"]:
                cases.append((n, k, script))
    return cases


def _drops(n: int, script: str) -> dict[str, DropPoint]:
    devices = device_ids(n)
    if script == "none":
        return {}
    count = max(1, n // 10)
    if script == "mixed":
        mixed = min(n, max(len(POINTS), count))
        return pick_drops(devices, mixed, lambda j: POINTS[j % len(POINTS)], 5)
    return pick_drops(devices, count, DropPoint(script), 3)


@pytest.mark.parametrize(("n", "k", "script"), _cases())
def test_round_with_dropouts(n: int, k: int, script: str) -> None:
    dimension = 64 if n == 100 else 40
    config = SecAggConfig.create(
        cohort_size=n,
        dimension=dimension,
        neighbours=k,
        quant_bits=12,
        max_weight=50.0,
        max_samples=1000,
    )
    drops = _drops(n, script)
    expected_abort = predict(config, SEED, drops)
    run = run_round(config, drops=drops, round_seed=SEED, input_seed=n * 1000 + k)
    server = run.server

    # Harness rejections may only be late unmask answers (DURING_UNMASK) or messages after
    # the round ended; nothing honest is ever refused otherwise.
    for sender, error in run.rejected:
        assert (
            drops.get(sender) is DropPoint.DURING_UNMASK or server.state is not ServerState.UNMASK
        )
        assert "late" in str(error) or "round is over" in str(error), error

    if expected_abort is not None:
        assert server.state is ServerState.ABORTED, (expected_abort, server.reason)
        assert server.reason is not None
        assert server.reason.startswith(expected_abort)
        assert server.result is None
        for device, client in run.clients.items():
            if device not in drops:
                assert client.state.name == "ABORTED", (device, client.state)
        return

    assert server.state is ServerState.DONE, server.reason
    result = server.result
    assert result is not None
    # Survivors are exactly those whose masked input went in.
    gone_early = {DropPoint.BEFORE_ADVERTISE, DropPoint.AFTER_ADVERTISE, DropPoint.AFTER_SHARE}
    assert set(result.survivors) == {d for d in device_ids(n) if drops.get(d) not in gone_early}
    # Bit-exact in Z_2^b, extras included.
    d = config.dimension
    assert np.array_equal(result.vector, run.expected[:d])
    assert result.extra_grid == tuple(int(v) for v in run.expected[d:])
    assert (result.correct, result.samples, result.local_correct) == result.extra_grid[2:5]
    assert result.correct == sum(i.metrics.correct for i in run.expected_float.values())
    assert result.samples == sum(i.metrics.samples for i in run.expected_float.values())
    # Float semantics within the stated bounds.
    reference = weighted_mean(run.expected_float)
    error = np.abs(result.mean() - reference)
    assert np.all(error <= result.mean_error_bound()), float(np.max(error))
    weights = sum(i.weight for i in run.expected_float.values())
    step_w = config.max_weight / ((1 << config.float_extra_bits) - 1)
    assert abs(result.weight_sum - weights) < result.count * step_w
    # Who dropped where is reported.
    stage_of = {
        DropPoint.BEFORE_ADVERTISE: Stage.ADVERTISE,
        DropPoint.AFTER_ADVERTISE: Stage.SHARE,
        DropPoint.AFTER_SHARE: Stage.COLLECT,
    }
    for device, point in drops.items():
        if point in stage_of:
            assert server.dropped[device] is stage_of[point]
    # Every live device finished its part.
    for device, client in run.clients.items():
        if device not in drops:
            assert client.state.name == "DONE", (device, client.state, client.reason)


def test_the_cases_are_not_vacuous() -> None:
    """Each drop point is exercised in at least one round that must finish with a result."""
    finishing = set()
    for n, k, script in _cases():
        config = SecAggConfig.create(cohort_size=n, dimension=8, neighbours=k)
        if predict(config, SEED, _drops(n, script)) is None:
            finishing.add(script)
    assert finishing == {"none", "mixed", *(p.value for p in POINTS)}


def test_quantized_mean_is_close_in_practice() -> None:
    """Beyond the worst-case bound: with 16-bit quantization the mean is within 1e-3."""
    config = SecAggConfig.create(cohort_size=10, dimension=200, quant_bits=16, max_weight=10.0)
    run = run_round(config, input_seed=42)
    result = run.server.result
    assert result is not None
    assert float(np.max(np.abs(result.mean() - weighted_mean(run.expected_float)))) < 1e-3

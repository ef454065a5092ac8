"""Federated rounds over a real mosquitto with the provisioned password and ACL files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.shared import tflite
from tests.conftest import require_mosquitto
from tests.fleet_harness import Harness, fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
async def harness20(tmp_path: Path) -> AsyncIterator[Harness]:
    require_mosquitto()
    async with fleet(tmp_path, 20) as h:
        yield h


async def test_three_secure_rounds_with_dropouts(harness20: Harness) -> None:
    """Round 2: two devices leave after sending their masked input, one never advertises."""
    h = harness20
    leavers = {"dev-0003", "dev-0011"}
    silent = "dev-0007"

    h.script_dropouts(2, silent=silent, leavers=leavers)
    h.start_devices()
    service, summaries = await h.run_aggregator(
        timeout=240,
        # Plain FedAvg, so that the release is exactly the old weights plus the mean (the
        # default adds server momentum).
        **{"rounds.count": "3", "rounds.min_cohort": "3", "server.optimizer": "fedavg"},
    )
    assert [s.state for s in summaries] == ["closed"] * 3, [
        s.metrics.get("reason") for s in summaries
    ]
    assert [s.new_version for s in summaries] == [2, 3, 4]

    r2 = summaries[1]
    assert silent not in r2.survivors
    assert set(r2.survivors) == set(h.devices) - {silent}  # leavers' inputs are in the sum
    assert r2.metrics["stages"]["advertise"]["dropped"] == 1
    closed = {
        e["stage"]: set(e["dropped"])
        for e in service.recent_events
        if e["event"] == "stage_closed" and e["round"] == 2
    }
    assert closed["advertise"] == {silent}
    # UNMASK closes as soon as every secret has t shares; the leavers are then "not needed"
    # (their self-masks were rebuilt from neighbours' shares in any case).
    unmask = r2.metrics["stages"]["unmask"]
    if unmask["dropped"]:  # closed at its deadline
        assert leavers <= closed["unmask"]
    else:
        assert unmask["not_needed"] >= 2
    assert r2.metrics["stages"]["unmask"]["arrived"] <= 17

    # The applied update equals the survivors' weighted mean within the quantization bound.
    from fleetlearn.aggregator.store import Store

    store = Store(h.state_dir)
    try:
        v2, v3 = store.model_bytes(2), store.model_bytes(3)
    finally:
        store.close()
    manifest = tflite.read_manifest(v2)
    assert manifest is not None
    w2 = tflite.flatten(tflite.read_weights(v2), manifest.layout).astype(np.float64)
    w3 = tflite.flatten(tflite.read_weights(v3), manifest.layout).astype(np.float64)
    inputs = {d: h.agents[d].participant.inputs[2] for d in r2.survivors}
    idx = next(iter(inputs.values()))[0]
    total = sum(w for _, _, w in inputs.values())
    expected = (
        sum(w * np.clip(v * w / 256, -0.5, 0.5) / (w / 256) for _, v, w in inputs.values()) / total
    )
    applied = (w3 - w2)[idx]
    bound = r2.metrics["quantization_bound"]
    assert 0 < bound < 1e-2
    assert np.max(np.abs(applied - expected)) <= bound + 1e-6  # + float32 storage of weights
    untouched = np.ones(w2.size, bool)
    untouched[idx] = False
    assert np.array_equal(w3[untouched], w2[untouched])

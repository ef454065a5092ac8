"""The aggregator service and 20 device agents over `transport.memory`: no broker, no sockets.

The same stack as the integration tests (AggregatorService with its store and optimizer,
DeviceAgents with real LiteRT training and SecAgg+), with only the transport swapped, so a
change to the round logic is caught by the default test run even where mosquitto is absent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlearn.aggregator.engine import Phase
from fleetlearn.aggregator.store import Store
from fleetlearn.shared import tflite
from fleetlearn.shared.secagg.server import SecAggServer
from tests.fleet_harness import Harness, memory_fleet

pytestmark = pytest.mark.slow


@pytest.fixture
async def memory20(tmp_path: Path) -> AsyncIterator[Harness]:
    async with memory_fleet(tmp_path, 20) as h:
        yield h


async def test_secure_rounds_with_dropouts_in_memory(memory20: Harness) -> None:
    """Round 2: one device never advertises, two leave after sending their masked input."""
    h = memory20
    leavers = {"dev-0004", "dev-0013"}
    silent = "dev-0009"

    h.script_dropouts(2, silent=silent, leavers=leavers)
    h.start_devices()
    service, summaries = await h.run_aggregator(
        timeout=240,
        # Plain FedAvg, so that the release is exactly the old weights plus the mean (the
        # default adds server momentum).
        **{"rounds.count": "2", "rounds.min_cohort": "3", "server.optimizer": "fedavg"},
    )
    assert [s.state for s in summaries] == ["closed"] * 2, [
        s.metrics.get("reason") for s in summaries
    ]
    assert [s.new_version for s in summaries] == [2, 3]
    assert service.link.peer == "memory broker"

    r2 = summaries[1]
    assert set(r2.survivors) == set(h.devices) - {silent}  # the leavers' inputs are in the sum
    assert r2.metrics["stages"]["advertise"]["dropped"] == 1
    assert r2.metrics["mode"] == "secure"

    # The release the aggregator applied is the survivors' weighted mean (quantization bound).
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
    bound = r2.metrics["quantization_bound"]
    assert np.max(np.abs((w3 - w2)[idx] - expected)) <= bound + 1e-6
    # Every device still running holds the newest release, delivered through the memory broker.
    running = [d for d in h.devices if d not in leavers]
    async with asyncio.timeout(60):
        while any(h.agents[d].participant.model_version != 3 for d in running):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_a_bug_inside_the_engine_aborts_that_round_and_the_service_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SecAgg+ server raises RuntimeError on round 1's first masked input: that round ends
    aborted with the error as its reason (persisted, on metrics and events), the devices are
    told, and the service starts and closes the next round."""
    real = SecAggServer._on_masked
    raised: list[str] = []

    def broken(self: SecAggServer, message: Any, sender: str) -> None:
        if not raised:
            raised.append(sender)
            raise RuntimeError("injected bug in the masked-input handler")
        real(self, message, sender)

    monkeypatch.setattr(SecAggServer, "_on_masked", broken)
    async with memory_fleet(tmp_path, 6) as h:
        h.start_devices()
        service, summaries = await h.run_aggregator(
            timeout=240, **{"rounds.count": "1", "rounds.min_cohort": "3"}
        )
    assert raised
    assert [s.state for s in summaries] == ["aborted", "closed"], [
        s.metrics.get("reason") for s in summaries
    ]
    reason = summaries[0].metrics["reason"]
    assert reason == (
        f"internal error while taking masked from {raised[0]}: "
        "RuntimeError: injected bug in the masked-input handler"
    )
    assert summaries[1].new_version == 2
    assert len(summaries[1].survivors) == 6
    assert service.engine.phase is Phase.CLOSED
    aborted = [e for e in service.recent_events if e["event"] == "round_aborted"]
    assert [(e["round"], e["reason"]) for e in aborted] == [(1, reason)]
    store = Store(h.state_dir)
    try:
        rows = store.rounds()
    finally:
        store.close()
    assert [(r.round_id, r.status, r.reason) for r in rows] == [
        (1, "aborted", reason),
        (2, "done", ""),
    ]

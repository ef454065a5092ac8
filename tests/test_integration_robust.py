"""Plain mode with 20% poisoned devices: robust rules hold, the plain mean does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator.store import Store
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.firmware_sim.data import MACHINE_TYPES, device_machine
from fleetlearn.shared import tflite
from tests.conftest import require_mosquitto
from tests.fleet_harness import fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]
DEVICES = 20
ROUNDS = 8


def _test_set() -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    kinds = list(MACHINE_TYPES)
    for i in range(12):
        x, y = device_machine(99, 500 + i, i % 4, kinds[i % 3]).windows(200)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _scale(update: np.ndarray) -> np.ndarray:
    return update * 100.0


def _flip(update: np.ndarray) -> np.ndarray:
    return -update


async def _run(tmp: Path, rule: str, poisoned: bool) -> float:
    async with fleet(tmp, DEVICES) as h:
        if poisoned:  # 20% of devices: half scale their update by 100, half flip its sign
            h.tamper = {d: _scale if i % 2 else _flip for i, d in enumerate(h.devices[3::5])}
        h.start_devices()
        _, summaries = await h.run_aggregator(
            timeout=240,
            **{
                "rounds.count": str(ROUNDS),
                "rounds.mode": "plain",
                "compression.sparsity": "dense",
                "aggregation.rule": rule,
                "aggregation.trim": "0.2",
                # The setting these rules were calibrated in: two local epochs at rate 0.05
                # on all local rows, FedAvg.
                "training.eval_fraction": "0",
                "training.epochs": "2",
                "training.steps": "0",
                "training.learning_rate": "0.05",
                "server.optimizer": "fedavg",
                "rounds.settle": "0.5",
            },
        )
        assert [s.state for s in summaries] == ["closed"] * ROUNDS
        store = Store(h.state_dir)
        try:
            model = store.model_bytes(store.latest_version())
        finally:
            store.close()
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    x, y = _test_set()
    return LiteRTTrainer(model, manifest).evaluate(x, y).accuracy


async def test_median_and_trimmed_mean_resist_poisoning(tmp_path: Path) -> None:
    require_mosquitto()
    clean = await _run(tmp_path / "clean", "mean", poisoned=False)
    median = await _run(tmp_path / "median", "median", poisoned=True)
    trimmed = await _run(tmp_path / "trimmed", "trimmed", poisoned=True)
    mean = await _run(tmp_path / "mean", "mean", poisoned=True)
    print(f"accuracy clean {clean:.3f} median {median:.3f} trimmed {trimmed:.3f} mean {mean:.3f}")
    assert clean > 0.5  # the clean run learned something worth protecting
    assert abs(median - clean) <= 0.05
    assert abs(trimmed - clean) <= 0.05
    assert clean - mean > 0.05

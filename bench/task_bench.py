"""Three kinds of model through secure federated rounds: anomaly detection, remaining useful
life, raw-window classification. Measured.

    python bench/task_bench.py [--rounds 20] [--devices 30] [--seeds 0,1] [--only anomaly]

Each is a Keras model built with `model_keras.build_keras_model` (the same build as
`fleetlearn model build --keras`), federated by the simulator in memory (the real engine,
participants, SecAgg+ and LiteRT trainers) in secure mode with the shipped training defaults
and 10% of the cohort vanishing after sharing keys, then judged on a test set from machines
no device has (`firmware_sim.data`, docs/data.md):

- anomaly: a dense autoencoder (16-8-4-8-16, tanh) on the 16 features; every device a
  healthy-only machine (200 windows). Test: machines with the fleet's fault mix, 2000
  windows. Figure: ROC AUC of the release's anomaly score, normal vs faulty (and per fault),
  and the detection rate at 1% false alarms; before federating and after.
- rul: a dense regressor (16-32-16-1, relu, Huber loss); every device one run to failure of
  150..350 cycles. Test: 10 other runs. Figure: mean absolute error in cycles, against
  predicting the training targets' mean.
- conv1d: a 1-D CNN on raw vibration windows (256 samples; Conv1D 8x9, max-pool 4, Conv1D
  16x9, global max-pool, dense 4); every device 200 windows of its site's fault mix. Test:
  2000 windows. Figure: accuracy, against always answering the commonest class.

Medians over seeds. Needs the `bench` extra (scikit-learn for the ROC AUC).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.firmware_sim import data as simdata
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import settings, tflite

TYPES = tuple(simdata.MACHINE_TYPES)


def machine(seed: int, index: int, *, healthy_only: bool = False) -> simdata.Machine:
    return simdata.device_machine(
        seed, index, index % 5, TYPES[index % len(TYPES)], healthy_only=healthy_only
    )


def build(model: Any, task: tflite.Task, loss: str | None = None) -> bytes:
    from fleetlearn.aggregator import model_keras

    data, _, _ = model_keras.build_keras_model(model, task=task, loss=loss, batch=32)
    return data


def federate(
    model: bytes, parts: list[tuple[np.ndarray, Any]], rounds: int, seed: int
) -> InMemoryFleet:
    agg = settings.load(AggregatorSettings)
    config = dataclasses.replace(
        agg.engine_config(),
        mode="secure",
        cohort=len(parts),
        over_select=1.0,
        min_cohort=len(parts) // 2,
    )
    scenario = Scenario.parse(f"[fleet]\nseed = {seed}\n[dropout]\ncollect = 0.1\n")
    fleet = InMemoryFleet(
        len(parts),
        config,
        scenario,
        optimizer=agg.optimizer_config(),
        model=model,
        seed=seed,
        data=parts,
    )
    for _ in range(rounds):
        metrics = fleet.run_round()
        if metrics["state"] != "closed":
            raise SystemExit(f"round {metrics['round']} {metrics['state']}: {metrics['reason']}")
    return fleet


def released(fleet: InMemoryFleet) -> LiteRTTrainer:
    return LiteRTTrainer(fleet.model, fleet.manifest)


# ------------------------------------------------------------------------------- tasks


def anomaly(keras: Any, seed: int, devices: int, rounds: int) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    keras.utils.set_random_seed(seed)
    net = keras.Sequential(
        [
            keras.Input((simdata.N_FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(simdata.N_FEATURES),
        ],
        name="normal-ae",
    )
    model = build(net, tflite.Task.ANOMALY)
    parts = []
    for i in range(devices):
        x, y = machine(seed, i, healthy_only=True).windows(200)
        parts.append((x, y))
    tests = [machine(seed, 10_000 + i).windows(100) for i in range(20)]
    x_test = np.concatenate([t[0] for t in tests])
    faulty = np.concatenate([t[1] for t in tests])

    def judge(trainer: LiteRTTrainer) -> dict[str, float]:
        scores = trainer.anomaly_scores(x_test)
        fpr, tpr, _ = roc_curve(faulty != 0, scores)
        out = {
            "auc": float(roc_auc_score(faulty != 0, scores)),
            "detect@1%": float(np.interp(0.01, fpr, tpr)),
        }
        for c in range(1, simdata.N_CLASSES):
            rows = (faulty == 0) | (faulty == c)
            out[f"auc_{simdata.CLASSES[c]}"] = float(roc_auc_score(faulty[rows] == c, scores[rows]))
        return out

    start = judge(LiteRTTrainer(model, _manifest(model)))
    fleet = federate(model, parts, rounds, seed)
    end = judge(released(fleet))
    last = fleet.history[-1]
    return {
        "auc_round0": start["auc"],
        **end,
        "device_specificity": last["per_class"][0]["recall"],
    }


def rul(keras: Any, seed: int, devices: int, rounds: int) -> dict[str, float]:
    keras.utils.set_random_seed(seed)
    net = keras.Sequential(
        [
            keras.Input((simdata.N_FEATURES,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ],
        name="rul",
    )
    model = build(net, tflite.Task.REGRESSION, "huber")
    rng = np.random.default_rng([seed, 7])
    parts = [machine(seed, i).run_to_failure(int(rng.integers(150, 351))) for i in range(devices)]
    tests = [
        machine(seed, 10_000 + i).run_to_failure(int(rng.integers(150, 351))) for i in range(10)
    ]
    x_test = np.concatenate([t[0] for t in tests])
    y_test = np.concatenate([t[1] for t in tests])
    mean_target = float(np.mean(np.concatenate([p[1] for p in parts])))

    def mae(trainer: LiteRTTrainer) -> float:
        return float(np.abs(trainer.predict_values(x_test) - y_test).mean()) * simdata.RUL_UNIT

    start = mae(LiteRTTrainer(model, _manifest(model)))
    fleet = federate(model, parts, rounds, seed)
    last = fleet.history[-1]
    return {
        "mae_cycles_round0": start,
        "mae_cycles": mae(released(fleet)),
        "mae_cycles_mean_predictor": float(np.abs(mean_target - y_test).mean()) * simdata.RUL_UNIT,
        "device_mae_cycles": last["mae"] * simdata.RUL_UNIT,
    }


def conv1d(keras: Any, seed: int, devices: int, rounds: int) -> dict[str, float]:
    keras.utils.set_random_seed(seed)
    net = keras.Sequential(
        [
            keras.Input((simdata.WINDOW, 1)),
            keras.layers.Conv1D(8, 9, activation="relu"),
            keras.layers.MaxPooling1D(4),
            keras.layers.Conv1D(16, 9, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(simdata.N_CLASSES),
        ],
        name="vib-cnn",
    )
    model = build(net, tflite.Task.CLASSIFICATION)
    parts = [machine(seed, i).raw_windows(200) for i in range(devices)]
    tests = [machine(seed, 10_000 + i).raw_windows(100) for i in range(20)]
    x_test = np.concatenate([t[0] for t in tests])
    y_test = np.concatenate([t[1] for t in tests])

    def accuracy(trainer: LiteRTTrainer) -> float:
        return trainer.evaluate(x_test, y_test).accuracy

    start = accuracy(LiteRTTrainer(model, _manifest(model)))
    fleet = federate(model, parts, rounds, seed)
    return {
        "accuracy_round0": start,
        "accuracy": accuracy(released(fleet)),
        "accuracy_commonest_class": float(np.bincount(y_test).max() / y_test.size),
        "device_accuracy": fleet.history[-1]["accuracy"],
    }


def _manifest(model: bytes) -> tflite.ModelManifest:
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    return manifest


TASKS: dict[str, Callable[[Any, int, int, int], dict[str, float]]] = {
    "anomaly": anomaly,
    "rul": rul,
    "conv1d": conv1d,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", choices=sorted(TASKS), action="append")
    args = parser.parse_args()
    import keras

    seeds = [int(s) for s in args.seeds.split(",")]
    print("command: python " + " ".join(sys.argv))
    print(
        f"secure rounds, {args.devices} devices all selected, 10% vanishing after sharing keys, "
        f"{args.rounds} rounds, shipped training defaults; medians over seeds {seeds}"
    )
    for name in args.only or list(TASKS):
        began = time.perf_counter()
        runs = [TASKS[name](keras, seed, args.devices, args.rounds) for seed in seeds]
        medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        seconds = time.perf_counter() - began
        shown = ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
        print(f"{name}: {shown}  ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

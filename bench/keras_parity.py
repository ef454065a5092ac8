"""The on-device model against Keras, per supported layer type (docs/models.md, "Bring your own
Keras model").

    python bench/keras_parity.py [--seeds 0,1,2] [--rows 64]

For each layer type: a small model around it (tests/keras_cases.py) with random weights, built
by `fleetlearn.aggregator.model_keras.build_keras_model` (batch 16, SGD), then, per seed, the
largest |logit difference| between LiteRT and Keras on `--rows` random rows, and the largest
|weight difference| after one SGD step at rate 0.05 (Keras: eager TensorFlow, its own
gradients). Prints the maxima over seeds, the build time (median), the parameter count and
the command. Then the same for each task's loss (a Conv1D regressor with MSE and Huber, a
dense autoencoder with its reconstruction MSE; Keras's own loss classes as the reference).
Needs the `build` extra (TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    import keras

    from fleetlearn.aggregator import model_keras as mk
    from tests.keras_cases import CASES, randomized

    seeds = [int(s) for s in args.seeds.split(",")]
    print("| layer (model around it) | parameters | logits: max abs diff | weights after one "
          "step: max abs diff | build s (median) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for case in sorted(CASES):
        infer, step, seconds = [], [], []
        params = 0
        for seed in seeds:
            model = randomized(CASES[case](keras), seed=seed)
            started = time.perf_counter()
            data, manifest, _ = mk.build_keras_model(model, batch=16)
            seconds.append(time.perf_counter() - started)
            params = manifest.parameter_count
            translation = mk.translate(model)
            parity = mk.measure_parity(
                model, translation, data, manifest, rows=args.rows, seed=100 + seed
            )
            infer.append(parity.infer)
            if parity.step is not None:
                step.append(parity.step)
        step_cell = f"{max(step):.1e}" if step else "not compared (random mask)"
        print(
            f"| {case} | {params} | {max(infer):.1e} | {step_cell} | "
            f"{statistics.median(seconds):.1f} |",
            flush=True,
        )
    from fleetlearn.shared import tflite

    def regressor(k: Any) -> Any:
        return k.Sequential(
            [
                k.Input((16, 3)),
                k.layers.Conv1D(8, 3, activation="relu"),
                k.layers.GlobalAveragePooling1D(),
                k.layers.Dense(1),
            ]
        )

    def autoencoder(k: Any) -> Any:
        return k.Sequential(
            [
                k.Input((16,)),
                k.layers.Dense(8, activation="tanh"),
                k.layers.Dense(4, activation="sigmoid"),
                k.layers.Dense(16),
            ]
        )

    print("\n| task (loss) | parameters | output: max abs diff | weights after one step: max "
          "abs diff | build s (median) |")  # fmt: skip
    print("|---|---|---|---|---|")
    tasks = [
        ("regression (mse)", regressor, tflite.Task.REGRESSION, "mse"),
        ("regression (huber)", regressor, tflite.Task.REGRESSION, "huber"),
        ("anomaly (reconstruction mse)", autoencoder, tflite.Task.ANOMALY, "mse"),
    ]
    for name, make, task, loss in tasks:
        infer, step, seconds = [], [], []
        for seed in seeds:
            model = randomized(make(keras), seed=seed)
            started = time.perf_counter()
            data, manifest, _ = mk.build_keras_model(model, batch=16, task=task, loss=loss)
            seconds.append(time.perf_counter() - started)
            params = manifest.parameter_count
            translation = mk.translate(model, task=task)
            parity = mk.measure_parity(
                model, translation, data, manifest, rows=args.rows, seed=100 + seed, loss=loss
            )
            infer.append(parity.infer)
            assert parity.step is not None
            step.append(parity.step)
        print(
            f"| {name} | {params} | {max(infer):.1e} | {max(step):.1e} | "
            f"{statistics.median(seconds):.1f} |",
            flush=True,
        )
    print(f"\ncommand: python bench/keras_parity.py --seeds {args.seeds} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

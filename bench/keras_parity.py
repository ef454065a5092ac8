"""The on-device model against Keras, per supported layer type (docs/models.md, "Bring your own
Keras model").

    python bench/keras_parity.py [--seeds 0,1,2] [--rows 64]

For each layer type: a small model around it (tests/keras_cases.py) with random weights, built
by `fleetlearn.aggregator.model_keras.build_keras_model` (batch 16, SGD), then, per seed, the
largest |logit difference| between LiteRT and Keras on `--rows` random rows, and the largest
|weight difference| after one SGD step at rate 0.05 (Keras: eager TensorFlow, its own
gradients). Prints the maxima over seeds, the build time (median), the parameter count and
the command. Needs the `build` extra (TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

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
    print(f"\ncommand: python bench/keras_parity.py --seeds {args.seeds} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

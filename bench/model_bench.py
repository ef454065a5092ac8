"""Model lifecycle costs for three model sizes: build, bytes, patch, release, load, train step.

    .venv/bin/python bench/model_bench.py            # the table in docs/models.md
    .venv/bin/python bench/model_bench.py --repeats 50 --optimizer adam

Needs TensorFlow (the `build` extra) to build; everything after the build is what the
aggregator (patch, release) and a device (verify, load, train) do without it. Times are medians
over --repeats runs, on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable

import nacl.signing
import numpy as np

from fleetlearn.aggregator import model_build as mb
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.shared import tflite
from fleetlearn.shared.release import release_weights, verify_release

# name -> (input width, hidden layers); 4 classes and batch 32 throughout.
SIZES: dict[str, tuple[int, tuple[int, ...]]] = {
    "3k": (16, (64, 32)),
    "100k": (64, (256, 256, 64)),
    "1M": (128, (1024, 832)),
}


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--optimizer", choices=mb.OPTIMIZERS, default="sgd")
    parser.add_argument("--sizes", nargs="*", choices=sorted(SIZES), default=list(SIZES))
    args = parser.parse_args()

    start = time.perf_counter()
    mb.import_tensorflow()
    tf_import = time.perf_counter() - start
    key = nacl.signing.SigningKey(bytes(range(32)))
    rng = np.random.default_rng(0)
    base = mb.load_spec()

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"tensorflow-cpu {version('tensorflow-cpu')}, ai-edge-litert {version('ai-edge-litert')}, "
        f"numpy {np.__version__}; TF import {tf_import:.1f} s (not in build times); "
        f"optimizer {args.optimizer}, batch 32, medians of {args.repeats}"
    )
    print()
    header = (
        "| model | parameters | build s | .tflite bytes | zstd bytes | patch ms "
        "| release ms | verify ms | load ms | train step ms |"
    )
    print(header)
    print("|---" * 10 + "|")
    for name in args.sizes:
        print(bench_size(name, args, base, key, rng))


def bench_size(
    name: str,
    args: argparse.Namespace,
    base: mb.ModelSpec,
    key: nacl.signing.SigningKey,
    rng: np.random.Generator,
) -> str:
    width, hidden = SIZES[name]
    spec = dataclasses.replace(
        base, model_id=f"bench-{name}", input_width=width, hidden=hidden, optimizer=args.optimizer
    )
    start = time.perf_counter()
    model, manifest = mb.build_model(spec)
    build_s = time.perf_counter() - start

    vector = rng.normal(0, 0.05, manifest.parameter_count).astype(np.float32)
    weights = tflite.unflatten(vector, manifest.layout)
    patch_ms = median_ms(lambda: tflite.patch_weights(model, weights), args.repeats)
    release = release_weights(model, vector, version=2, signing_key=key)
    release_ms = median_ms(
        lambda: release_weights(model, vector, version=2, signing_key=key), args.repeats
    )
    verify_ms = median_ms(
        lambda: verify_release(release, key.verify_key, min_version=1), args.repeats
    )
    released, released_manifest = verify_release(release, key.verify_key, min_version=1)

    def load() -> LiteRTTrainer:
        trainer = LiteRTTrainer(released, released_manifest)
        trainer.get_weights()  # the first call runs the variables' initializer
        return trainer

    load_ms = median_ms(load, args.repeats)
    trainer = load()
    x = rng.normal(size=(32, width)).astype(np.float32)
    y = rng.integers(0, spec.classes, 32)
    for _ in range(3):  # warm up: first invocations allocate
        trainer.train_step(x, y)
    step_ms = median_ms(lambda: trainer.train_step(x, y), max(args.repeats, 50))
    return (
        f"| {name} | {manifest.parameter_count:,} | {build_s:.2f} | {len(model):,} "
        f"| {len(release.model_zst):,} | {patch_ms:.2f} | {release_ms:.1f} | {verify_ms:.1f} "
        f"| {load_ms:.1f} | {step_ms:.3f} |"
    )


if __name__ == "__main__":
    main()

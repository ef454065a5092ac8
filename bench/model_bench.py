"""Model lifecycle costs for four models: build, bytes, patch, release, load, train step, and
what one device sends in a secure round.

    .venv/bin/python bench/model_bench.py            # the table in docs/models.md
    .venv/bin/python bench/model_bench.py --repeats 50 --optimizer adam

Three MLPs from the spec (3k, 100k, 1M parameters) and a 1M-parameter Keras 1-D CNN on raw
256-sample windows (`model build --keras`). Needs TensorFlow (the `build` extra) to build;
everything after the build is what the aggregator (patch, release) and a device (verify, load,
train) do without it. Times are medians over --repeats runs, on one thread. *up/device*: the
bytes each device sent in one secure round of 5 simulated devices in memory with the shipped
round settings (adverts, shares, masked input and unmask answers together), from that round's
`uplink_bytes_per_device`; *masked input*: the masked vector's message alone.
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
from typing import Any

import nacl.signing
import numpy as np

from fleetlearn.aggregator import model_build as mb
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import settings, tflite, topics
from fleetlearn.shared.release import release_weights, verify_release

# name -> (input width, hidden layers); 4 classes and batch 32 throughout.
SIZES: dict[str, tuple[int, tuple[int, ...]]] = {
    "3k": (16, (64, 32)),
    "100k": (64, (256, 256, 64)),
    "1M": (128, (1024, 832)),
}
KERAS_SIZES = ("1M conv1d",)


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
    parser.add_argument(
        "--sizes",
        nargs="*",
        choices=[*SIZES, *KERAS_SIZES],
        default=[*SIZES, *KERAS_SIZES],
    )
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
        "| release ms | verify ms | load ms | train step ms | up/device bytes "
        "| masked input bytes |"
    )
    print(header)
    print("|---" * 12 + "|")
    for name in args.sizes:
        print(bench_size(name, args, base, key, rng))


def bench_size(
    name: str,
    args: argparse.Namespace,
    base: mb.ModelSpec,
    key: nacl.signing.SigningKey,
    rng: np.random.Generator,
) -> str:
    start = time.perf_counter()
    if name in SIZES:
        width, hidden = SIZES[name]
        spec = dataclasses.replace(
            base,
            model_id=f"bench-{name}",
            input_width=width,
            hidden=hidden,
            optimizer=args.optimizer,
        )
        model, manifest = mb.build_model(spec)
    else:
        model, manifest = conv1d_model(args.optimizer)
        width = 256
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
    y = rng.integers(0, trainer.classes, 32)
    for _ in range(3):  # warm up: first invocations allocate
        trainer.train_step(x, y, learning_rate=0.01)
    step_ms = median_ms(lambda: trainer.train_step(x, y, learning_rate=0.01), max(args.repeats, 50))
    uplink, masked = secure_round(model, width)
    return (
        f"| {name} | {manifest.parameter_count:,} | {build_s:.2f} | {len(model):,} "
        f"| {len(release.model_zst):,} | {patch_ms:.2f} | {release_ms:.1f} | {verify_ms:.1f} "
        f"| {load_ms:.1f} | {step_ms:.3f} | {uplink:,} | {masked:,} |"
    )


def conv1d_model(optimizer: str) -> tuple[bytes, tflite.ModelManifest]:
    """About a million parameters on raw 256-sample windows, most in the dense layer."""
    import keras

    from fleetlearn.aggregator import model_keras

    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input((256, 1)),
            keras.layers.Conv1D(64, 9, activation="relu"),
            keras.layers.MaxPooling1D(4),
            keras.layers.Conv1D(128, 9, activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(272, activation="relu"),
            keras.layers.Dense(4),
        ],
        name="bench-1m-conv1d",
    )
    data, manifest, _ = model_keras.build_keras_model(net, batch=32, optimizer=optimizer)
    return data, manifest


def secure_round(model: bytes, width: int) -> tuple[int, int]:
    """(uplink bytes per device, masked-input bytes per device) of one secure round of 5
    devices with the shipped settings, on random rows (what they learn does not matter)."""
    agg = settings.load(AggregatorSettings, sets={"training.steps": "2"})
    config = dataclasses.replace(
        agg.engine_config(), mode="secure", cohort=5, over_select=1.0, min_cohort=3
    )
    rng = np.random.default_rng(1)
    parts = [
        (rng.normal(size=(64, width)).astype(np.float32), rng.integers(0, 4, 64)) for _ in range(5)
    ]
    fleet = InMemoryFleet(5, config, Scenario(), optimizer=agg.optimizer_config(),
                          model=model, seed=1, data=parts)  # fmt: skip
    masked: list[int] = []
    receive = fleet.engine.receive

    def counting(
        topic: topics.Topic, payload: bytes, now: float, *, defer_close: bool = False
    ) -> Any:
        if topic.kind is topics.Kind.MASKED:
            masked.append(len(payload))
        return receive(topic, payload, now, defer_close=defer_close)

    fleet.engine.receive = counting  # type: ignore[method-assign]  # a bench's tap
    metrics = fleet.run_round()
    if metrics["state"] != "closed":
        raise SystemExit(f"secure round {metrics['state']}: {metrics['reason']}")
    return int(metrics["uplink_bytes_per_device"]), int(statistics.median(masked))


if __name__ == "__main__":
    main()

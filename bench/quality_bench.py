"""How close does federated training get to central training? Real datasets, the shipped defaults.

    python bench/quality_bench.py [--datasets pdm,italy_power,digits,vowels] [--rounds 20]
        [--devices 50] [--alpha 0.3] [--dropout 0.1] [--modes central,plain,secure]
        [--partitions dirichlet,iid] [--seeds 0] [--shift S --sites N] [--set KEY=VALUE ...]
        [--central-lr R] [--json FILE]

For each dataset: features standardised with the training split's statistics, a stratified
80/20 train/test split (seeded), an MLP of the data's shape built with TensorFlow
(`aggregator.model_build`, hidden 32-16, the shipped spec's batch), then

- central: the same model trained on the whole training split with the same local optimizer,
  60 epochs, at the shipped default local rate (or `--central-lr`), whatever `--set` changes:
  one reference per dataset and seed, so runs with different local rates share it; its best
  test accuracy over the epochs is the reference (favours central, so the ratios below are
  conservative);
- plain / secure: the training split partitioned over `--devices` devices (Dirichlet label
  skew `--alpha`, or IID), every device selected each round, `--dropout` of them vanishing
  after sharing their keys (secure: SecAgg+ recovers them; plain: their update is missing),
  the aggregator's shipped defaults (`AggregatorSettings()`, changed only by `--set`), the
  real engine, participants and LiteRT trainers in memory (`firmware_sim.inmemory`).

Prints the test accuracy of the global model after each round, and federated / central at
rounds 10, 20 and 50 (those within `--rounds`). `--json` also writes every figure.

Datasets (all shipped inside PyPI packages, nothing downloaded):
- pdm: fleetlearn's synthetic predictive-maintenance windows (`firmware_sim.data`), 120
  machines x 50 windows, 16 features, 4 condition classes;
- italy_power: ItalyPowerDemand from `aeon` (aeon/datasets/data; UCR archive): 1,096 days of
  Italian electrical power demand, 24 hourly readings each, class = October-March or April-
  September; train and test files pooled, then re-split;
- digits: `sklearn.datasets.load_digits`: 1,797 8x8 handwritten digits (64 features, 10 classes);
- vowels: JapaneseVowels (equal-length version) from `aeon`: 640 utterances of /ae/, 12 LPC
  cepstrum channels x 25 frames, class = one of 9 speakers.

Needs the `bench` and `build` extras (scikit-learn, aeon, TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator import model_build as mb
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.firmware_sim.data import device_machine
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.partition import partition
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import settings, tflite
from fleetlearn.shared.dataset import Dataset

CENTRAL_EPOCHS = 60
CHECKPOINTS = (10, 20, 50)


@dataclass(frozen=True)
class Split:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


# ----------------------------------------------------------------------------------- datasets


def _pdm() -> tuple[np.ndarray, np.ndarray, str]:
    scenario = Scenario()
    xs, ys = [], []
    for i in range(120):
        site, _ = scenario.site_of(i)
        x, y = device_machine(
            scenario.seed, i, site, scenario.machine_of(i), scenario.non_iid
        ).windows(50)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), "fleetlearn firmware_sim.data (synthetic)"


def _aeon(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    from aeon.datasets import load_classification  # the `bench` extra

    x, y = load_classification(name)  # bundled in aeon/datasets/data: no download
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    labels = {label: i for i, label in enumerate(sorted(set(y)))}
    return x, np.array([labels[v] for v in y], dtype=np.int32), f"aeon.datasets {name}"


def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits  # the `bench` extra

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int32), "sklearn.datasets.load_digits"


LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, str]]] = {
    "pdm": _pdm,
    "italy_power": lambda: _aeon("ItalyPowerDemand"),
    "digits": _digits,
    "vowels": lambda: _aeon("JapaneseVowels_eq"),
}


def load_split(name: str, seed: int) -> Split:
    x, y, source = LOADERS[name]()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):  # stratified 20% test
        rows = rng.permutation(np.flatnonzero(y == label))
        test[rows[: max(1, round(0.2 * len(rows)))]] = True
    mean = x[~test].mean(axis=0)
    std = x[~test].std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).astype(np.float32)
    return Split(name, x[~test], y[~test], x[test], y[test], source)


def build_model(split: Split) -> bytes:
    shipped = mb.load_spec()
    spec = mb.ModelSpec(
        model_id=f"bench-{split.name.replace('_', '-')}",
        input_width=split.x_train.shape[1],
        hidden=(32, 16),
        labels=tuple(f"class_{i}" for i in range(split.classes)),
        train_batch=shipped.train_batch,
        optimizer="sgd",
        learning_rate=shipped.learning_rate,
        seed=shipped.seed,
    )
    model, _ = mb.build_model(spec)
    return model


# ------------------------------------------------------------------------------------- runs


def central(model: bytes, split: Split, learning_rate: float, seed: int) -> list[float]:
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    trainer = LiteRTTrainer(model, manifest)
    rng = np.random.default_rng(seed)
    curve = []
    for _ in range(CENTRAL_EPOCHS):
        trainer.train(split.x_train, split.y_train, learning_rate=learning_rate, rng=rng)
        curve.append(trainer.evaluate(split.x_test, split.y_test).accuracy)
    return curve


def federated(
    model: bytes,
    split: Split,
    agg: AggregatorSettings,
    *,
    mode: str,
    scheme: str,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    data = Dataset(x=split.x_train, y=split.y_train)
    parts = partition(data, args.devices, scheme=scheme, alpha=args.alpha, seed=seed, min_rows=2)
    config = agg.engine_config()
    config = type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "mode": mode,
            "cohort": args.devices,
            "over_select": 1.0,
            "min_cohort": max(3, args.devices // 2),
        }
    )
    scenario = Scenario.parse(f"[dropout]\ncollect = {args.dropout}\n")
    device_data = [(split.x_train[p], split.y_train[p]) for p in parts]
    if args.shift > 0:
        device_data = site_shift(device_data, args.sites, args.shift, seed)
    fleet = InMemoryFleet(
        args.devices,
        config,
        scenario,
        optimizer=agg.optimizer_config(),
        model=model,
        seed=seed,
        data=device_data,
    )
    curve, fed_eval, device_acc, states = [], [], [], []
    for _ in range(args.rounds):
        metrics = fleet.run_round()
        states.append(metrics["state"])
        curve.append(fleet.evaluate(split.x_test, split.y_test))
        fed_eval.append(metrics.get("accuracy"))
        device_acc.append(metrics.get("device_accuracy"))
    # The last round, per device and unweighted (simulation only: the aggregator sees sums).
    per_device = fleet.per_device_accuracy()
    return {
        "test_accuracy": curve,
        "federated_eval": fed_eval,
        "device_accuracy": device_acc,
        "per_device_mean": per_device,
        "rounds_closed": states.count("closed"),
        "rows_per_device": [len(p) for p in parts],
    }


def site_shift(
    data: list[tuple[np.ndarray, np.ndarray]], sites: int, strength: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Strongly non-IID sites: device i belongs to site i % sites, and each site's sensors
    read every feature with their own gain (log-normal, sigma = strength) and offset (normal,
    sd = strength, in standard deviations), as uncalibrated installations in different plants
    would. Labels keep their meaning; a device's held-out rows are shifted like its others."""
    rng = np.random.default_rng(10_000 + seed)
    width = data[0][0].shape[1]
    gains = np.exp(rng.normal(0.0, strength, size=(sites, width)))
    offsets = rng.normal(0.0, strength, size=(sites, width))
    return [
        ((x * gains[i % sites] + offsets[i % sites]).astype(np.float32), y)
        for i, (x, y) in enumerate(data)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pdm,italy_power,digits,vowels")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--modes", default="central,plain,secure")
    parser.add_argument("--partitions", default="dirichlet,iid")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument(
        "--shift", type=float, default=0.0, help="per-site sensor gain/offset strength (0: none)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--central-lr",
        type=float,
        default=AggregatorSettings().training.learning_rate,
        help="central training's rate (default: the shipped local rate, not --set's)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    agg = settings.load(AggregatorSettings, sets=settings.parse_sets(args.set))
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    print(
        "command: python bench/quality_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    changed = ", ".join(args.set) or "none"
    shift = f", {args.sites} sites with sensor shift {args.shift}" if args.shift else ""
    print(
        f"{args.devices} devices, {args.rounds} rounds, {args.dropout:.0%} dropouts after "
        f"sharing, Dirichlet alpha {args.alpha}{shift}; aggregator defaults changed: {changed}"
    )
    results: dict[str, Any] = {"command": sys.argv, "sets": args.set, "datasets": {}}
    for name in args.datasets.split(","):
        per_seed: dict[str, list[list[float]]] = {}
        extra: dict[str, list[dict[str, Any]]] = {}
        source = ""
        for seed in seeds:
            split = load_split(name, seed)
            source = split.source
            model = build_model(split)
            if "central" in modes:
                per_seed.setdefault("central", []).append(
                    central(model, split, args.central_lr, seed)
                )
            for mode in (m for m in modes if m != "central"):
                for scheme in args.partitions.split(","):
                    started = time.perf_counter()
                    run = federated(
                        model, split, agg, mode=mode, scheme=scheme, args=args, seed=seed
                    )
                    run["seconds"] = round(time.perf_counter() - started, 1)
                    key = f"{mode}/{scheme}"
                    per_seed.setdefault(key, []).append(run["test_accuracy"])
                    extra.setdefault(key, []).append(run)
        report = _report(name, source, split, per_seed, extra, args)
        results["datasets"][name] = report
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _median_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.median(values) for values in zip(*curves, strict=True)]


def _report(
    name: str,
    source: str,
    split: Split,
    per_seed: dict[str, list[list[float]]],
    extra: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    print(
        f"\n== {name} ({source}): {len(split.y_train)} train / {len(split.y_test)} test rows, "
        f"{split.x_train.shape[1]} features, {split.classes} classes"
    )
    central_best = (
        statistics.median(max(c) for c in per_seed["central"]) if "central" in per_seed else None
    )
    if central_best is not None:
        print(
            f"central (rate {args.central_lr}, best of {CENTRAL_EPOCHS} epochs, median over "
            f"seeds): {central_best:.3f}"
        )
    out: dict[str, Any] = {"source": source, "central": central_best, "runs": {}}
    for key, curves in per_seed.items():
        if key == "central":
            continue
        curve = _median_curve(curves)
        marks = [r for r in CHECKPOINTS if r <= len(curve)]
        ratios = {r: (curve[r - 1] / central_best if central_best else None) for r in marks}
        runs = extra[key]
        closed = min(r["rounds_closed"] for r in runs)
        # Last round's federated evaluation (global model on the devices' held-out rows) and
        # per-device accuracy (each device's own model), median over seeds.
        fed = (
            [statistics.median(r["federated_eval"][-1] for r in runs)]
            if all(r["federated_eval"][-1] is not None for r in runs)
            else []
        )
        dev = (
            [statistics.median(r["device_accuracy"][-1] for r in runs)]
            if all(r["device_accuracy"][-1] is not None for r in runs)
            else []
        )
        text = " ".join(f"{a:.2f}" for a in curve)
        print(f"{key:18s} test accuracy by round: {text}")
        print(
            f"{'':18s} "
            + ", ".join(
                f"round {r}: {curve[r - 1]:.3f}"
                + (f" = {ratios[r]:.1%} of central" if ratios[r] is not None else "")
                for r in marks
            )
            + f"; rounds closed {closed}/{len(curve)}"
            + (f"; last federated eval {fed[-1]:.3f}" if fed else "")
            + (f", per-device {dev[-1]:.3f}" if dev else "")
            + f"; {statistics.median(r['seconds'] for r in runs):.0f} s"
        )
        out["runs"][key] = {
            "curve": curve,
            "ratios": {str(r): v for r, v in ratios.items()},
            "rounds_closed": closed,
            "federated_eval": [r["federated_eval"] for r in runs],
            "device_accuracy": [r["device_accuracy"] for r in runs],
            "last_federated_eval": fed[-1] if fed else None,
            "last_device_accuracy": dev[-1] if dev else None,
            # Unweighted mean over devices of (global, own) accuracy, median over seeds.
            "last_per_device_mean": (
                [statistics.median(r["per_device_mean"][i] for r in runs) for i in (0, 1)]
                if all(r["per_device_mean"] is not None for r in runs)
                else None
            ),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""What differential privacy costs in accuracy: test accuracy at a target epsilon.

    python bench/privacy_bench.py [--datasets pdm,digits] [--devices 100] [--cohort 20]
        [--rounds 20] [--dropout 0.1] [--epsilons 1,3,8,none] [--mechanism distributed]
        [--clip 0.5] [--delta 1e-5] [--figure amplified] [--seeds 0] [--json FILE]

For each dataset (loaded, split and modelled as in `bench/quality_bench.py`: pdm is
fleetlearn's synthetic predictive-maintenance task, digits is sklearn's real handwritten
digits) and seed:

- the training split is partitioned over `--devices` devices (Dirichlet label skew 0.3);
- each round takes a Poisson sample of about `--cohort` of them (rate cohort / devices), and
  `--dropout` of the sampled devices vanish before their masked input (secure rounds) or
  their update (plain rounds);
- for each target epsilon, the noise multiplier z is the smallest that keeps `--rounds`
  rounds with the expected number of survivors within epsilon at `--delta` (a bisection on
  the aggregator's own accountant, `aggregator.privacy`), for `--figure`: `amplified` (by
  sampling: the figure usually reported, right against whoever does not see the cohorts)
  or `cohort_known` (what the aggregator's budget holds by default). Distributed noise is
  sized so that the round's least survivors (`aggregator.modes.least_survivors`) carry z;
  the expected survivors carry more, and that is what is calibrated. Both epsilons reported
  are what the run's metrics say it spent, which can differ a little from the target;
- `none` is the same fleet without noise, clipping or Poisson sampling (fixed-size cohorts).

All runs use the aggregator's shipped defaults, with the real engine, participants, SecAgg+
and LiteRT trainers in memory (`firmware_sim.inmemory`). The clip is a fixed L2 norm, not
tuned on the data. The bench prints the test accuracy of the last round's model and its
ratio to central training (quality_bench's reference: the best of 60 epochs on the pooled
training split), the median over seeds, and the command.

Needs the `bench`, `build` and `privacy` extras.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import quality_bench

from fleetlearn.aggregator import privacy
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.engine_config import EngineConfig, NotEnoughDevicesError
from fleetlearn.aggregator.modes import least_survivors
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.partition import partition
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import privacy as encoding
from fleetlearn.shared import tflite
from fleetlearn.shared.dataset import Dataset
from fleetlearn.shared.secagg.config import DistributedNoise

MODES = {"distributed": "secure", "central": "plain", "local": "plain"}


def expected_charge(
    mechanism: str, z: float, *, rate: float, clip: float, dim: int, args: argparse.Namespace
) -> privacy.RoundCharge:
    """What one round is charged when as many devices survive as expected (what
    aggregator.modes charges then)."""
    if mechanism == "distributed":
        p = encoding.padded_dimension(dim)
        noise = DistributedNoise.sized(
            clip=clip, dimension=dim, noise_multiplier=z, least_survivors=3
        )
        sampled = min(1.0, args.cohort / args.devices)
        least = least_survivors(args.devices, 1.0 - sampled * (1.0 - args.dropout))
        expected = args.devices * sampled * (1.0 - args.dropout)
        return privacy.RoundCharge(
            sampling_rate=rate,
            # z is what the least survivors carry; the expected ones carry more.
            noise_multiplier=z * math.sqrt((expected - 1.0) / (least - 1.0)),
            mechanism="skellam",
            dimension=p,
            scale=noise.norm_bound(p),
        )
    if mechanism == "local":
        return privacy.RoundCharge(sampling_rate=rate, noise_multiplier=z / 2)
    return privacy.RoundCharge(sampling_rate=rate, noise_multiplier=z)


def calibrate(
    epsilon: float, rounds: int, delta: float, charge_of: Any, low: float = 0.05
) -> float:
    """The smallest z (to 0.5%) whose `rounds` planned charges stay within `epsilon`."""
    high = 1.0
    while privacy.epsilon_spent([charge_of(high)] * rounds, delta) > epsilon:
        high *= 2.0
        if high > 1e4:
            raise ValueError(f"epsilon {epsilon} is out of reach in {rounds} rounds")
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        if privacy.epsilon_spent([charge_of(mid)] * rounds, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


def engine_config(args: argparse.Namespace, epsilon: float | None, z: float) -> EngineConfig:
    base = AggregatorSettings().engine_config()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(
        mode=MODES[args.mechanism],
        cohort=args.cohort,
        over_select=1.0,
        min_cohort=3,
        expected_dropout=args.dropout,
    )
    if epsilon is not None:
        fields.update(
            privacy=args.mechanism,
            dp_noise_multiplier=z,
            dp_clip=args.clip,
            dp_delta=args.delta,
        )
    return EngineConfig(**fields)


def run(
    model: bytes,
    split: quality_bench.Split,
    args: argparse.Namespace,
    *,
    epsilon: float | None,
    seed: int,
) -> dict[str, Any]:
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    dim = manifest.parameter_count
    rate = min(1.0, args.cohort / args.devices)
    if args.figure == "cohort_known":
        rate = 1.0
    z = 0.0
    if epsilon is not None:

        def charge_of(value: float) -> privacy.RoundCharge:
            return expected_charge(
                args.mechanism, value, rate=rate, clip=args.clip, dim=dim, args=args
            )

        z = calibrate(epsilon, args.rounds, args.delta, charge_of)
    data = Dataset(x=split.x_train, y=split.y_train)
    parts = partition(data, args.devices, scheme="dirichlet", alpha=0.3, seed=seed, min_rows=2)
    fleet = InMemoryFleet(
        args.devices,
        engine_config(args, epsilon, z),
        Scenario.parse(f"[dropout]\ncollect = {args.dropout}\n"),
        optimizer=AggregatorSettings().optimizer_config(),
        model=model,
        seed=seed,
        data=[(split.x_train[p], split.y_train[p]) for p in parts],
    )
    started = time.perf_counter()
    states: list[str] = []
    norms: list[float] = []
    spent: dict[str, float] = {}
    while len(states) < args.rounds:
        try:
            metrics = fleet.run_round()
        except NotEnoughDevicesError:  # a Poisson sample below min_cohort: sample again
            continue
        states.append(metrics["state"])
        norms += [float(np.linalg.norm(r.update)) for r in fleet.round_results.values()]
        if "privacy" in metrics:
            figures = metrics["privacy"]
            spent = {k: figures[f"epsilon_{k}"] for k in ("amplified", "cohort_known")}
    return {
        "epsilon_target": epsilon,
        "noise_multiplier": z,
        "epsilon_spent": spent or None,
        "accuracy": fleet.evaluate(split.x_test, split.y_test),
        "rounds_closed": states.count("closed"),
        "update_norm_median": statistics.median(norms) if norms else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pdm,digits")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--epsilons", default="1,3,8,none")
    parser.add_argument("--mechanism", choices=sorted(MODES), default="distributed")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--figure", choices=["amplified", "cohort_known"], default="amplified")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    command = "python bench/privacy_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    targets = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(command)
    print(
        f"{args.mechanism} DP, {args.devices} devices, Poisson cohorts of about {args.cohort} "
        f"(rate {min(1.0, args.cohort / args.devices):.2g}), {args.rounds} rounds, "
        f"{args.dropout:.0%} dropouts, clip {args.clip}, delta {args.delta:g}; z calibrated "
        f"for the {args.figure.replace('_', '-')} epsilon"
    )
    out: dict[str, Any] = {"command": command, "datasets": {}}
    for name in args.datasets.split(","):
        rows: dict[str, list[dict[str, Any]]] = {}
        centrals = []
        for seed in seeds:
            split = quality_bench.load_split(name, seed)
            model = quality_bench.build_model(split)
            centrals.append(
                max(
                    quality_bench.central(
                        model, split, AggregatorSettings().training.learning_rate, seed
                    )
                )
            )
            for target in targets:
                rows.setdefault(str(target), []).append(
                    run(model, split, args, epsilon=target, seed=seed)
                )
        central = statistics.median(centrals)
        print(f"\n== {name}: central accuracy {central:.3f} (median over seeds {seeds})")
        print(
            "| epsilon target | noise multiplier | epsilon spent, amplified | epsilon spent, "
            "cohort known | rounds closed | accuracy | of central |"
        )
        print("|---|---|---|---|---|---|---|")
        for key, runs in rows.items():
            acc = statistics.median(r["accuracy"] for r in runs)
            z = statistics.median(r["noise_multiplier"] for r in runs)
            closed = min(r["rounds_closed"] for r in runs)
            cells = []
            for figure in ("amplified", "cohort_known"):
                values = [r["epsilon_spent"][figure] for r in runs if r["epsilon_spent"]]
                cells.append(f"{statistics.median(values):.2f}" if values else "-")
            print(
                f"| {key} | {z:.2f} | {cells[0]} | {cells[1]} | {closed}/{args.rounds} | "
                f"{acc:.3f} | {acc / central:.0%} |"
            )
        out["datasets"][name] = {"central": central, "runs": rows}
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

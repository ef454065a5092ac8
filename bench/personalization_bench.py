"""Does keeping some layers on each device (training.personal) help the devices? Measured.

    python bench/personalization_bench.py [--seeds 0,1] [--rounds 20] [--skip-datasets]

Secure rounds with the shipped defaults, 50 devices all selected each round, 10% vanishing
after sharing keys, medians over seeds. For each configuration it prints, after the last round:

- global: the global model on the devices' held-out rows (federated evaluation, `accuracy`):
  what a device runs without personalization;
- own: what each device runs after the round, on the same rows (`device_accuracy`: the
  release with its personal layers).

Both as the aggregator reports them (every held-out row counts once, so large devices weigh
more) and as the unweighted mean over devices of each device's accuracy (the simulator sees
every device; the aggregator, in secure mode, only sums).

Part 1 is the fleet's own predictive-maintenance sites: every device a machine of its own
(type, speed, resonance), sites with skewed fault mixes (`non_iid` 0.2: strongly skewed; 1.0:
milder), 100 windows per device. Part 2 is the four datasets of bench/quality_bench.py split
with Dirichlet(0.1) label skew (needs the `bench` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import settings

PERSONAL = {
    "none": "",
    "head (dense_2)": "dense_2_kernel,dense_2_bias",
    "input (dense_0)": "dense_0_kernel,dense_0_bias",
}


def pdm_sites(
    non_iid: float, personal: str, seeds: list[int], rounds: int
) -> tuple[float, float, float, float]:
    results = []
    for seed in seeds:
        sets = {"training.personal": personal} if personal else {}
        agg = settings.load(AggregatorSettings, sets=sets)
        base = agg.engine_config()
        config = type(base)(
            **{
                **{f: getattr(base, f) for f in base.__dataclass_fields__},
                "mode": "secure",
                "cohort": 50,
                "over_select": 1.0,
                "min_cohort": 25,
            }
        )
        scenario = Scenario.parse(
            f"[fleet]\nseed = {seed}\nnon_iid = {non_iid}\nsamples = 100\n"
            "[dropout]\ncollect = 0.1\n"
        )
        fleet = InMemoryFleet(50, config, scenario, optimizer=agg.optimizer_config(), seed=seed)
        for _ in range(rounds):
            metrics = fleet.run_round()
        per_device = fleet.per_device_accuracy()
        assert per_device is not None
        results.append((metrics["accuracy"], metrics["device_accuracy"], *per_device))
    return tuple(statistics.median(r[i] for r in results) for i in range(4))  # type: ignore[return-value]


def datasets(personal: str, seeds: str, rounds: int) -> dict[str, tuple[float, ...]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality_bench  # a sibling script

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        argv = [
            "--rounds", str(rounds), "--seeds", seeds, "--modes", "secure",
            "--partitions", "dirichlet", "--alpha", "0.1", "--json", str(out),
        ]  # fmt: skip
        if personal:
            argv += ["--set", f"training.personal={personal}"]
        with contextlib.redirect_stdout(io.StringIO()):
            quality_bench.main(argv)
        result = json.loads(out.read_text())
    runs = {name: rep["runs"]["secure/dirichlet"] for name, rep in result["datasets"].items()}
    return {
        name: (
            run["last_federated_eval"],
            run["last_device_accuracy"],
            *run["last_per_device_mean"],
        )
        for name, run in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"command: python bench/personalization_bench.py --seeds {args.seeds} "
        f"--rounds {args.rounds}" + (" --skip-datasets" if args.skip_datasets else "")
    )
    print("\npart 1: the fleet's own sites (accuracy on held-out rows; per row / mean per device)")
    print("| sites | personal layers | global | own | global, per device | own, per device |")
    print("|---|---|---|---|---|---|")
    for non_iid in (0.2, 1.0):
        for label, personal in PERSONAL.items():
            glob, own, glob_dev, own_dev = pdm_sites(non_iid, personal, seeds, args.rounds)
            print(
                f"| pdm, non_iid {non_iid} | {label} | {glob:.3f} | {own:.3f} | {glob_dev:.3f} "
                f"| {own_dev:.3f} |",
                flush=True,
            )
    if args.skip_datasets:
        return 0
    print("\npart 2: Dirichlet(0.1) label skew (accuracy on held-out rows)")
    print(
        "| dataset | none: global | head: own | change | none: global, per device "
        "| head: own, per device | change |"
    )
    print("|---|---|---|---|---|---|---|")
    plain = datasets("", args.seeds, args.rounds)
    head = datasets(PERSONAL["head (dense_2)"], args.seeds, args.rounds)
    for name in plain:
        glob, own = plain[name][0], head[name][1]
        glob_dev, own_dev = plain[name][2], head[name][3]
        print(
            f"| {name} | {glob:.3f} | {own:.3f} | {own - glob:+.3f} | {glob_dev:.3f} "
            f"| {own_dev:.3f} | {own_dev - glob_dev:+.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall time to a target accuracy: synchronous rounds against asynchronous (FedBuff) ones.

    python bench/async_bench.py [--devices 500] [--target 0.85] [--seeds 0,1,2]
        [--train-seconds 10] [--speed lognormal] [--speed-sigma 1.0]
        [--modes sync-plain,async-plain,sync-secure,async-secure] [--buffer 10]
        [--concurrency 30]
        [--max-staleness 8] [--sync-collect 40] [--max-hours 6] [--json FILE]

A fleet of `--devices` simulated devices (fleetlearn's synthetic predictive-maintenance task:
each device a machine of its site, non-IID fault mixes) runs in memory with the real engine,
participants, SecAgg+ and LiteRT training (`firmware_sim.inmemory`). Time is simulated: a
device needs `--train-seconds` times its speed factor for a local round, drawn once per
device from a heavy-tailed distribution (`--speed lognormal` with sigma `--speed-sigma`, or
`pareto` with tail index `--speed-sigma`). Messages and the aggregator's own work take no
simulated time, which favours neither mode.

- sync-plain / sync-secure: the aggregator's shipped defaults (cohort 20, over-selection 1.2,
  quorum 0.8, COLLECT soft 40 s and hard 120 s with adaptive soft limits, FedAvgM), in plain
  or secure (SecAgg+) rounds. `--sync-collect S` sets COLLECT's soft limit (and turns off
  its adaptation): with a small S a round closes as soon as 80% of its cohort answered, the
  fastest a synchronous round can be;
- async-plain: `rounds.mode = async` with `--buffer` updates per release, `--concurrency`
  devices training at once, `--max-staleness`, FedBuff's (1 + staleness)^-0.5, and otherwise
  the same defaults;
- async-secure: `rounds.mode = async-secure`, the same settings: groups of
  ceil(buffer * 1.2) devices holding a trained update are summed with SecAgg+, never fewer
  than `--buffer` survivors.

After each release the bench evaluates the model on held-out windows from machines that are
in no device's data and records the simulated time at which it first reaches `--target`.
It prints, per mode, the median over seeds of that time, the releases and local trainings it
took, the speed-up against sync-plain, and the command.

Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.engine_config import NotEnoughDevicesError
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.firmware_sim.inmemory import InMemoryFleet, held_out_set
from fleetlearn.firmware_sim.scenario import Scenario

# bench mode -> rounds.mode
MODES = {
    "sync-plain": "plain",
    "async-plain": "async",
    "sync-secure": "secure",
    "async-secure": "async-secure",
}


def scenario(args: argparse.Namespace) -> Scenario:
    return Scenario.parse(
        "[compute]\n"
        f"train_seconds = {args.train_seconds}\n"
        f'speed = "{args.speed}"\n'
        f"speed_sigma = {args.speed_sigma}\n"
    )


def run(mode: str, args: argparse.Namespace, seed: int, test: Any) -> dict[str, Any]:
    settings = AggregatorSettings()
    kind = mode.split("-", maxsplit=1)[0]
    config = dataclasses.replace(
        settings.engine_config(),
        mode=MODES[mode],  # type: ignore[arg-type]
        buffer=args.buffer,
        concurrency=args.concurrency,
        max_staleness=args.max_staleness,
    )
    if kind == "sync" and args.sync_collect is not None:
        times = dataclasses.replace(config.times, collect=args.sync_collect)
        config = dataclasses.replace(config, times=times, adapt=False)
    fleet = InMemoryFleet(
        args.devices,
        config,
        scenario(args),
        optimizer=settings.optimizer_config(),
        seed=seed,
    )
    limit = args.max_hours * 3600.0
    curve: list[tuple[float, float]] = []
    reached: dict[str, Any] = {}
    trainings = 0

    def check(metrics: dict[str, Any]) -> bool:
        nonlocal trainings
        accuracy = LiteRTTrainer(fleet.model, fleet.manifest).evaluate(*test).accuracy
        curve.append((fleet.now, accuracy))
        if accuracy >= args.target and not reached:
            reached.update(
                seconds=round(fleet.now, 1),
                releases=fleet.version - 1,
                trainings=fleet.trainings,
            )
        return bool(reached)

    started = time.perf_counter()
    if kind == "async":
        fleet.run_async(100_000, max_seconds=limit, on_release=check)
    else:
        while fleet.now < limit and not reached:
            try:
                metrics = fleet.run_round()
            except NotEnoughDevicesError:
                fleet.now += 1.0
                continue
            if metrics["state"] == "closed":
                check(metrics)
    return {
        "mode": mode,
        "seed": seed,
        "reached": bool(reached),
        "seconds_to_target": reached.get("seconds"),
        "releases_to_target": reached.get("releases"),
        "trainings_to_target": reached.get("trainings"),
        "final_accuracy": curve[-1][1] if curve else None,
        "simulated_seconds": round(fleet.now, 1),
        "cpu_seconds": round(time.perf_counter() - started, 1),
    }


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if len(present) == len(values) and present else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-seconds", type=float, default=10.0)
    p.add_argument("--speed", choices=["lognormal", "pareto", "fixed"], default="lognormal")
    p.add_argument("--speed-sigma", type=float, default=1.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--buffer", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=30)
    p.add_argument("--max-staleness", type=int, default=8)
    p.add_argument("--sync-collect", type=float, default=None)
    p.add_argument("--max-hours", type=float, default=6.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    test = held_out_set(scenario(args))
    rows = []
    for mode in modes:
        for seed in seeds:
            row = run(mode, args, seed, test)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        f"{args.devices} devices, local round {args.train_seconds:g} s x {args.speed} "
        f"(sigma {args.speed_sigma:g}) speed factor; target accuracy {args.target:g}; "
        f"sync COLLECT soft limit "
        f"{'40 s adaptive' if args.sync_collect is None else f'{args.sync_collect:g} s'}; "
        f"medians over seeds {args.seeds}"
    )
    print(
        f"{'mode':<12} {'sim s to target':>16} {'releases':>9} {'trainings':>10} "
        f"{'speed-up':>9} {'reached':>8}"
    )
    base = median([r["seconds_to_target"] for r in rows if r["mode"] == "sync-plain"])
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        seconds = median([r["seconds_to_target"] for r in mine])
        releases = median([r["releases_to_target"] for r in mine])
        trainings = median([r["trainings_to_target"] for r in mine])
        ratio = base / seconds if base and seconds else None
        summary[mode] = {
            "seconds_to_target": seconds,
            "releases_to_target": releases,
            "trainings_to_target": trainings,
            "speedup_vs_sync_plain": ratio,
        }
        print(
            f"{mode:<12} {_fmt(seconds, 16, '.0f')} {_fmt(releases, 9, '.0f')} "
            f"{_fmt(trainings, 10, '.0f')} {_fmt(ratio, 9, '.2f')} "
            f"{sum(r['reached'] for r in mine):>5}/{len(mine)}"
        )
    command = "python bench/async_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\ncommand: {command.strip()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    return 0


def _fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


if __name__ == "__main__":
    raise SystemExit(main())

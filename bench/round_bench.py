"""Whole rounds over a real mosquitto: wall time, aggregator CPU, memory, bytes per device.

    python bench/round_bench.py [--sizes 100,500,1000] [--dims 10k,100k] [--modes secure,plain]
                                [--rounds 4] [--repeat 1]

For each N (cohort = N, every device selected), model size d and mode, this provisions a fleet,
starts mosquitto, runs the simulator (N devices over 2 worker processes) and the aggregator
service in this process, and runs `--rounds` rounds. Round 1 is not measured (every device loads
the model then); figures are medians over rounds 2..R, and over `--repeat` runs of the whole
configuration. Secure rounds use rand-10% + SecAgg+ (k about 2 log2 N); plain rounds top-10% int8.
Models are MLPs on the simulator's 16 features (16-96-96-4 = 11,332 and 16-300-300-4 = 96,604
parameters), built first with TensorFlow in a subprocess.

Columns: round wall time (announcement to outcome); aggregator CPU seconds in that interval
(process time of the process that runs only the aggregator; one process per configuration), and
the range over the measured rounds; aggregator CPU per whole cycle (one announcement to the next:
adds applying the update, publishing the release and taking every device's new status);
peak RSS of the aggregator process and of the largest simulator worker; uplink/downlink payload
bytes per device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIMS = {"10k": [96, 96], "100k": [300, 300]}


def build_models(work: Path, dims: list[str]) -> dict[str, Path]:
    out = {}
    for name in dims:
        spec = work / f"{name}.toml"
        hidden = ", ".join(str(h) for h in DIMS[name])
        spec.write_text(
            f'[model]\nid = "bench-{name}"\ninput_width = 16\nhidden = [{hidden}]\n'
            'classes = ["healthy", "bearing_wear", "imbalance", "misalignment"]\nseed = 7\n'
            '[train]\nbatch = 32\noptimizer = "sgd"\nlearning_rate = 0.05\n'
        )
        path = work / f"{name}.tflite"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fleetlearn",
                "model",
                "build",
                "--spec",
                str(spec),
                "--out",
                str(path),
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        out[name] = path
    return out


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_one(work: Path, n: int, model: Path, mode: str, rounds: int = 4) -> dict[str, Any]:
    from fleetlearn.aggregator.config import AggregatorSettings
    from fleetlearn.aggregator.service import AggregatorService, RoundSummary
    from fleetlearn.broker import provision as prov
    from fleetlearn.broker.runner import BrokerProcess, BrokerSettings
    from fleetlearn.firmware_sim.fleet import SimSpec, Simulator
    from fleetlearn.firmware_sim.scenario import Scenario
    from fleetlearn.shared import settings

    run_dir = Path(tempfile.mkdtemp(dir=work))
    fleet_dir = run_dir / "fleet"
    devices = prov.device_ids(n)
    prov.provision(fleet_dir, "bench", devices)
    broker = BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet_dir), "mosquitto").start()
    spec = SimSpec(
        broker=broker.url,
        fleet="bench",
        fleet_dir=str(fleet_dir),
        devices=tuple(devices),
        scenario=Scenario.parse("[fleet]\nsamples = 256\n"),
    )
    sim = Simulator(spec, procs=2)
    marks: dict[int, tuple[float, float]] = {}
    result: dict[str, Any] = {}
    try:
        sim.start()
        sim.wait_connected(n, timeout=300)
        sets = {
            "broker.url": broker.url,
            "fleet.id": "bench",
            "fleet.dir": str(fleet_dir),
            "state.dir": str(run_dir / "state"),
            "model.initial": str(model),
            "rounds.count": str(rounds),
            "rounds.mode": mode,
            "rounds.cohort": str(n),
            "rounds.over_select": "1.0",
            "rounds.wait_for_devices": "300",
            "rounds.settle": "5",
            "stages.advertise": "120",
            "stages.share": "240",
            "stages.collect": "480",
            "stages.unmask": "600",
            "training.max_samples": "256",
            "compression.sparsity": "rand_k" if mode == "secure" else "top_k",
            "compression.density": "0.1",
            # top-k needs error feedback (the aggregator refuses it without).
            "training.error_feedback": "false" if mode == "secure" else "true",
        }
        loaded = settings.load(AggregatorSettings, sets=sets)

        def on_round(summary: RoundSummary) -> None:
            marks[summary.round_id] = (time.monotonic(), time.process_time())

        service = AggregatorService(
            loaded,
            prov.load_aggregator(fleet_dir),
            prov.load_registry(fleet_dir),
            on_round=on_round,
        )
        original = service.engine.start_round

        def start_round(**kwargs: Any) -> Any:
            marks[-kwargs["round_id"]] = (time.monotonic(), time.process_time())
            return original(**kwargs)

        service.engine.start_round = start_round  # type: ignore[method-assign]
        summaries = asyncio.run(service.run())
        worker_rss = max(peak_rss_mb(w.pid) for w in sim._workers)
        m = summaries[-1].metrics
        measured = range(2, rounds + 1)
        walls = [marks[r][0] - marks[-r][0] for r in measured]
        cpus = [marks[r][1] - marks[-r][1] for r in measured]
        cycles = [marks[-(r + 1)][1] - marks[-r][1] for r in measured if -(r + 1) in marks]
        result = {
            "state": "closed" if all(s.state == "closed" for s in summaries) else m["state"],
            "wall_s": statistics.median(walls),
            "agg_cpu_s": statistics.median(cpus),
            "agg_cpu_each": cpus,
            "cycle_cpu_s": statistics.median(cycles) if cycles else float("nan"),
            "agg_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sim_rss_mb": worker_rss,
            "up": m["uplink_bytes_per_device"],
            "down": m["downlink_bytes_per_device"],
            "dim": m["dimension"],
        }
    finally:
        sim.stop()
        broker.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument("--dims", default="10k,100k")
    parser.add_argument("--modes", default="secure,plain")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run; 2..R measured")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration")
    parser.add_argument(
        "--one", nargs=4, metavar=("N", "MODEL", "MODE", "WORK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 is not measured)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.one:
        # One configuration per process, so peak RSS belongs to that configuration alone.
        n, model, mode, work = args.one
        print(json.dumps(run_one(Path(work), int(n), Path(model), mode, args.rounds)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = args.dims.split(",")
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-round-bench-"))
    models = build_models(work, dims)
    print(
        "command: python bench/round_bench.py "
        f"--sizes {args.sizes} --dims {args.dims} --modes {args.modes} "
        f"--rounds {args.rounds} --repeat {args.repeat}"
    )
    print(
        "| N | d | mode | round s | aggregator CPU s (range) | CPU s per cycle "
        "| aggregator peak RSS MB | simulator worker peak RSS MB "
        "| uplink B/device | downlink B/device |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for dim in dims:
            for mode in modes:
                runs = []
                for _ in range(args.repeat):
                    proc = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--rounds",
                            str(args.rounds),
                            "--one",
                            str(n),
                            str(models[dim]),
                            mode,
                            str(work),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = runs[-1]
                cpus = [c for run in runs for c in run["agg_cpu_each"]]
                wall = statistics.median(run["wall_s"] for run in runs)
                cpu = statistics.median(cpus)
                cycle = statistics.median(run["cycle_cpu_s"] for run in runs)
                states = {run["state"] for run in runs}
                print(
                    f"| {n} | {r['dim']:,} | {mode} | {wall:.1f} | {cpu:.2f} "
                    f"({min(cpus):.2f}-{max(cpus):.2f}) | {cycle:.2f} | "
                    f"{max(x['agg_rss_mb'] for x in runs):.0f} | "
                    f"{max(x['sim_rss_mb'] for x in runs):.0f} | {r['up']:,} | {r['down']:,} |"
                    + ("" if states == {"closed"} else f" ({', '.join(sorted(states))})"),
                    flush=True,
                )


if __name__ == "__main__":
    main()

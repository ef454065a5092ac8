"""SecAgg+ costs: per-device work, aggregator unmask work, bytes per device per stage.

Runs whole rounds through the in-memory harness (real wire encoding, real crypto, the OS
CSPRNG for keys) and prints one table row per (n, d, dropout):

    python bench/secagg_bench.py                          # the full grid of issue 4
    python bench/secagg_bench.py --n 1000 --d 100000 --dropout 0.1
    python bench/secagg_bench.py --drop-at after_masked   # drops after the masked input

Dropouts are scripted at `--drop-at` (default after_share: the devices' shares were dealt but
their masked input never arrives, so the aggregator must rebuild each one's mask key and
regenerate every pairwise mask it had with a surviving neighbour: the expensive case).
k is about 2 log2 n, raised with `suggest_neighbours` when the dropout rate would make that
graph abort (each survivor must keep t > k/2 live neighbours); `--k` forces a value.

Columns: client ms = protocol work of one device over the whole round (quantize, keys, shares,
masks, packing, unmask; wire encoding excluded), mean, 95th percentile and max; unmask s =
aggregator time in UNMASK (collecting shares, rebuilding secrets, removing masks); collect s =
aggregator time summing masked vectors; up B = bytes one device sends per stage (encoded
frames); up/packed = total uplink over the packed masked vector alone; down B = bytes one
device receives. One process simulates every device, so Python's garbage collector pauses
(caused by the other 999 devices' objects) land on whichever device is running: they inflate
the max; `--gc-off` shows the figures without them. `--cpu-time` times with the process's CPU
clock instead of the wall clock, which other jobs on a shared machine do not inflate.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetlearn.shared.secagg.config import (
    STAGES,
    SecAggConfig,
    Stage,
    default_neighbours,
    suggest_neighbours,
)
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.harness import DeviceInput, DropPoint, InMemoryRound
from fleetlearn.shared.secagg.keys import system_random
from fleetlearn.shared.secagg.server import ServerState


def run(
    n: int,
    d: int,
    dropout: float,
    drop_at: DropPoint,
    k: int | None,
    q: int,
    timer: Callable[[], float] = time.perf_counter,
) -> dict:
    if k is None:
        k = default_neighbours(n)
        if dropout > 0:
            k = max(k, suggest_neighbours(n, dropout)[0])
    config = SecAggConfig.create(cohort_size=n, dimension=d, neighbours=k, quant_bits=q)
    devices = [f"dev-{i:05d}" for i in range(n)]
    identities = {dev: nacl.signing.SigningKey.generate() for dev in devices}
    rng = np.random.default_rng(n * 7 + d)  # simulation data only
    dropped = rng.choice(n, size=round(dropout * n), replace=False)
    drops = {devices[int(i)]: drop_at for i in dropped}

    def inputs(device: str) -> DeviceInput:
        local = np.random.default_rng(int(device.split("-")[1]))
        return DeviceInput(
            vector=local.uniform(-1, 1, d).astype(np.float32),
            weight=float(local.uniform(0.1, 1.0)),
            metrics=TrainingMetrics(loss=0.7, correct=40, samples=50),
        )

    harness = InMemoryRound(
        config=config,
        round_id=1,
        round_seed=system_random(32),
        identities=identities,
        inputs=inputs,
        random_for=lambda device: system_random,
        drops=drops,
        lazy_inputs=True,  # a device quantizes when its inbox arrives: bounded memory
        timer=timer,
    )
    began = time.perf_counter()
    outcome = harness.run()
    wall = time.perf_counter() - began
    server, stats = outcome.server, outcome.stats
    active = [dev for dev in devices if dev not in drops]
    client_ms = np.array([stats.device_seconds[dev] * 1e3 for dev in active])
    uplink = {
        stage: float(np.mean([stats.uplink_bytes[stage].get(dev, 0) for dev in active]))
        for stage in STAGES
    }
    downlink = float(
        np.mean([sum(stats.downlink_bytes[s].get(dev, 0) for s in STAGES) for dev in active])
    )
    exact = (
        server.state is ServerState.DONE
        and server.result is not None
        and bool(np.array_equal(server.result.vector, outcome.expected[:d]))
    )
    return {
        "n": n,
        "d": d,
        "dropout": dropout,
        "k": k,
        "t": config.threshold,
        "b": config.field_bits,
        "outcome": "exact" if exact else f"{server.state.name}: {server.reason}",
        "client_mean": float(client_ms.mean()),
        "client_p95": float(np.percentile(client_ms, 95)),
        "client_max": float(client_ms.max()),
        "unmask_s": stats.server_seconds[Stage.UNMASK],
        "collect_s": stats.server_seconds[Stage.COLLECT],
        "uplink": uplink,
        "ratio": sum(uplink.values()) / config.packed_bytes,
        "downlink": downlink,
        "wall": wall,
    }


HEADER = (
    "| n | d | drop | k | t | b | outcome | client ms mean/p95/max | unmask s | collect s "
    "| up B adv/share/masked/unmask | up/packed | down B | run s |"
)


def row(r: dict) -> str:
    up = r["uplink"]
    return (
        f"| {r['n']} | {r['d']} | {r['dropout']:.0%} | {r['k']} | {r['t']} | {r['b']} "
        f"| {r['outcome'][:60]} | {r['client_mean']:.1f} / {r['client_p95']:.1f} / "
        f"{r['client_max']:.1f} "
        f"| {r['unmask_s']:.3f} | {r['collect_s']:.3f} "
        f"| {up[Stage.ADVERTISE]:.0f} / {up[Stage.SHARE]:.0f} / {up[Stage.COLLECT]:.0f} / "
        f"{up[Stage.UNMASK]:.0f} | {r['ratio']:.4f} | {r['downlink']:.0f} | {r['wall']:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[100, 500, 1000])
    parser.add_argument("--d", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--dropout", type=float, nargs="*", default=[0.0, 0.1, 0.3])
    parser.add_argument(
        "--drop-at",
        choices=[p.value for p in DropPoint],
        default=DropPoint.AFTER_SHARE.value,
    )
    parser.add_argument("--k", type=int, default=None, help="neighbours (default ~2 log2 n)")
    parser.add_argument("--q", type=int, default=16, help="quantization bits")
    parser.add_argument("--gc-off", action="store_true", help="disable the garbage collector")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time with the process CPU clock, not wall time"
    )
    args = parser.parse_args()
    if args.gc_off:
        gc.disable()
    print("command: python bench/secagg_bench.py " + " ".join(sys.argv[1:]))
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(f"drop point: {args.drop_at}, q={args.q}, gc {'off' if args.gc_off else 'on'}")
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    for n in args.n:
        for d in args.d:
            for dropout in args.dropout:
                result = run(
                    n,
                    d,
                    dropout,
                    DropPoint(args.drop_at),
                    args.k,
                    args.q,
                    time.process_time if args.cpu_time else time.perf_counter,
                )
                print(row(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

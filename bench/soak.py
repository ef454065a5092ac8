"""Soak: a fleet running for half an hour, with the memory of every process sampled each minute.

    python bench/soak.py [--minutes 30] [--devices 200] [--cohort 50] [--procs 2]
                         [--broker mosquitto|embedded] [--mode secure|plain]

Starts a broker on loopback (fleetlearn's runner, with persistence), provisions the fleet,
starts `fleetlearn sim` (10% of each cohort vanishes before masking, as in the demo) and
`fleetlearn aggregator --rounds 0` with the demo's round settings, and every minute prints
the resident memory (VmRSS) of the aggregator, of the simulator (its main process and workers
together) and of the broker, with the rounds closed and aborted so far. Stops by itself after
--minutes (also on Ctrl-C), terminating everything it started, then prints the aggregator's
growth over the last 20 minutes (the acceptance bound of issue 13 is < 5 MB) and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetlearn.broker import provision as prov  # noqa: E402
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings  # noqa: E402

SCENARIO = """
[fleet]
seed = 7
samples = 300

[dropout]
collect = 0.1
"""


# The demo's round settings (firmware_sim/cli.py): short soft limits, so rounds follow each
# other quickly and the soak sees many of them.
DEMO_SETTINGS = [
    "rounds.settle=1.5",
    "stages.advertise=5", "stages.share=5", "stages.collect=5", "stages.unmask=5",
    "stages.advertise_hard=30", "stages.share_hard=30", "stages.collect_hard=60",
    "stages.unmask_hard=30",
    "training.epochs=2", "training.max_samples=256",
    "compression.density=0.1", "compression.clip=1.0",
    "secagg.expected_dropout=0.1",
]  # fmt: skip


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def rounds_so_far(state: Path) -> tuple[int, int]:
    db_path = state / "fleetlearn.sqlite3"
    if not db_path.exists():
        return 0, 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT status, COUNT(*) FROM rounds GROUP BY status").fetchall()
    except sqlite3.OperationalError:  # the aggregator has not made its tables yet
        return 0, 0
    finally:
        db.close()
    counts = dict(rows)
    return counts.get("done", 0), counts.get("aborted", 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
    parser.add_argument("--mode", choices=["secure", "plain"], default="secure")
    args = parser.parse_args()
    if args.minutes <= 0 or args.devices < 3 or not 3 <= args.cohort <= args.devices:
        parser.error("need --minutes > 0, --devices >= 3 and 3 <= --cohort <= --devices")
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-soak-"))
    fleet_dir, state = work / "fleet", work / "state"
    prov.provision(fleet_dir, "soak", prov.device_ids(args.devices))
    (work / "scenario.toml").write_text(SCENARIO)
    broker = BrokerProcess(
        # The runner's own state directory: mosquitto's user cannot enter the 0700 work dir.
        BrokerSettings(port=0, fleet_dir=fleet_dir, persistence=True),
        args.broker,
    ).start()
    protocol = "3.1.1" if broker.kind == "embedded" else "auto"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "fleetlearn"]
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    logs = contextlib.ExitStack()
    sim_log = logs.enter_context(open(work / "sim.log", "wb"))  # noqa: SIM115 - ExitStack
    agg_log = logs.enter_context(open(work / "aggregator.log", "wb"))  # noqa: SIM115
    try:
        sim = subprocess.Popen(
            [*base, "sim", "--broker", broker.url, "--fleet", "soak", "--fleet-dir",
             str(fleet_dir), "--devices", str(args.devices), "--procs", str(args.procs),
             "--scenario", str(work / "scenario.toml"), "--protocol", protocol],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sim_log,
        )  # fmt: skip
        procs.append(sim)
        agg = subprocess.Popen(
            [*base, "aggregator", "--broker", broker.url, "--fleet", "soak",
             "--fleet-dir", str(fleet_dir), "--state-dir", str(state), "--rounds", "0",
             "--mode", args.mode, "--cohort", str(args.cohort),
             "--set", f"broker.protocol={protocol}",
             *[x for kv in DEMO_SETTINGS for x in ("--set", kv)]],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=agg_log,
        )  # fmt: skip
        procs.append(agg)
        print(f"command: {command}")
        print(f"work dir: {work} ({broker.kind} broker on {broker.url})")
        print("minute | aggregator MB | simulator MB (all processes) | broker MB | rounds closed"
              " | aborted")  # fmt: skip
        samples: list[tuple[float, float, float, float]] = []
        started = time.monotonic()
        minute = 0
        while not stopping and minute < args.minutes:
            target = started + 60 * (minute + 1)
            while not stopping and time.monotonic() < target:
                time.sleep(0.5)
                for p in procs:
                    if p.poll() is not None:
                        print(f"{p.args[3]} exited with {p.returncode}; see {work}")  # type: ignore[index]
                        return 1
            if stopping:
                break
            minute += 1
            a = rss_mb(agg.pid)
            s = sum(rss_mb(p) for p in tree(sim.pid))
            b = rss_mb(broker.pid) if broker.pid else 0.0
            closed, aborted = rounds_so_far(state)
            samples.append((minute, a, s, b))
            print(f"{minute:6d} | {a:13.1f} | {s:28.1f} | {b:9.1f} | {closed:13d} | {aborted:7d}",
                  flush=True)  # fmt: skip
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.close()
        logs.close()
    closed, aborted = rounds_so_far(state)
    print(f"rounds: {closed} closed, {aborted} aborted in {len(samples)} minutes")
    if len(samples) >= 21:
        start = next(x for x in samples if x[0] == samples[-1][0] - 20)
        growth = samples[-1][1] - start[1]
        print(
            f"aggregator RSS over the last 20 minutes: {start[1]:.1f} -> {samples[-1][1]:.1f} MB"
            f" (growth {growth:+.1f} MB; bound < 5 MB: {'met' if growth < 5 else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

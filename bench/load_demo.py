"""`fleetlearn demo` on a loaded machine: two busy-loop processes for the whole run.

    python bench/load_demo.py [--runs 3] [--brokers mosquitto,embedded] [--busy 2] [-- DEMO ARGS]

Starts `--busy` processes that spin on the CPU (each stops by itself when this bench's process
is gone, and is ended in a `finally`, also on Ctrl-C or an error), then runs the real
`python -m fleetlearn demo` once per broker mode and run, one after another. Prints a line per
run (broker, exit code, rounds closed and aborted from the demo's report.json, wall time, the
command) and a summary. Exit status 0 only if every run exited 0 and closed all its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A spinner that checks once in a while whether its parent is still there, so that even a
# SIGKILLed bench does not leave it behind.
SPIN = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(2_000_000):
        pass
"""


def start_busy(count: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop_busy(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def run_demo(broker: str, out: Path, extra: list[str], timeout: float) -> dict[str, object]:
    cmd = [sys.executable, "-m", "fleetlearn", "demo", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if broker == "embedded":
        cmd.append("--embedded")
    else:
        cmd.append("--mosquitto")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=out.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code: int | str = proc.returncode
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", ""
    wall = time.monotonic() - started
    closed = aborted = 0
    report = out / "report.json"
    if report.exists():
        rows = json.loads(report.read_text())["rounds"]
        closed = sum(1 for r in rows if r.get("state") == "closed")
        aborted = sum(1 for r in rows if r.get("state") == "aborted")
    return {
        "broker": broker,
        "code": code,
        "closed": closed,
        "aborted": aborted,
        "wall": wall,
        "command": shlex.join(["python", "-m", "fleetlearn", "demo", *cmd[4:]]),
        "tail": tail,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per broker mode")
    parser.add_argument("--brokers", default="mosquitto,embedded")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="the demo's --rounds")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per demo run")
    parser.add_argument("demo_args", nargs="*", help="more arguments for the demo (after --)")
    args = parser.parse_args()
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-load-"))
    extra = ["--rounds", str(args.rounds), *args.demo_args]
    print(
        f"command: python bench/load_demo.py --runs {args.runs} --brokers {','.join(brokers)} "
        f"--busy {args.busy} --rounds {args.rounds}"
        + (f" -- {shlex.join(args.demo_args)}" if args.demo_args else ""),
        flush=True,
    )
    results = []
    busy = start_busy(args.busy)
    try:
        print(f"{len(busy)} busy-loop processes running; load average {os.getloadavg()[0]:.1f}")
        for broker in brokers:
            for run in range(1, args.runs + 1):
                out = work / f"{broker}-{run}" / "report"
                out.parent.mkdir(parents=True)
                load_before = os.getloadavg()[0]
                r = run_demo(broker, out, extra, args.timeout)
                r["run"], r["load"] = run, max(load_before, os.getloadavg()[0])
                results.append(r)
                print(
                    f"{broker:<9} run {run}: exit {r['code']}, {r['closed']} closed, "
                    f"{r['aborted']} aborted, {r['wall']:.0f} s wall, load average "
                    f"~{r['load']:.1f} | {r['command']}",
                    flush=True,
                )
                if r["code"] != 0:
                    print("  last output:\n  " + str(r["tail"]).replace("\n", "\n  "), flush=True)
    finally:
        stop_busy(busy)
    good = [r for r in results if r["code"] == 0 and r["closed"] == args.rounds]
    print(f"{len(good)}/{len(results)} runs closed all {args.rounds} rounds and exited 0")
    return 0 if len(good) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

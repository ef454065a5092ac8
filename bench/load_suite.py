"""The whole test suite on a loaded machine: two busy-loop processes for all of it.

    python bench/load_suite.py [--runs 3] [--busy 2] [-- PYTEST ARGS]

Starts `--busy` processes that spin on the CPU (the same spinners as bench/load_demo.py: they
stop by themselves when this bench is gone, and are ended in a `finally`), then runs
`python -m pytest` (CI=true, as CI does) `--runs` times in a row. Prints per run the exit code,
pytest's summary line and the wall time, then the command. Exit status 0 only if every run
passed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_demo import start_busy, stop_busy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes (default 2)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    if args.runs < 1 or args.busy < 0:
        parser.error("need --runs >= 1 and --busy >= 0")
    print(
        f"command: python bench/load_suite.py --runs {args.runs} --busy {args.busy}"
        + (f" -- {shlex.join(args.pytest_args)}" if args.pytest_args else ""),
        flush=True,
    )
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    passed = 0
    busy = start_busy(args.busy)
    try:
        print(f"{len(busy)} busy-loop processes running; load average {os.getloadavg()[0]:.1f}")
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            wall = time.monotonic() - started
            lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
            summary = lines[-1] if lines else "(no output)"
            print(
                f"run {run}: exit {proc.returncode}, {summary.strip('= ')}, {wall:.0f} s wall, "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if proc.returncode == 0:
                passed += 1
            else:
                failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
                print("  " + "\n  ".join(failures[:20] or lines[-30:]), flush=True)
    finally:
        stop_busy(busy)
    print(f"{passed}/{args.runs} runs passed")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())

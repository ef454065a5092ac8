"""1000 simulated devices through the real CLI: `fleetlearn sim --devices 1000 --procs 2`.

    python bench/fleet_scale.py [--devices 1000] [--procs 2] [--cohort 200] [--rounds 3]

Starts mosquitto (fleetlearn broker runner, loopback), provisions the fleet, starts
`fleetlearn sim` and waits until every device's retained status says online (read as the
aggregator user), then starts `fleetlearn aggregator --cohort 200 --rounds 3` (secure) and
waits for both to finish. Prints the time to provision, to connect everything, and per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetlearn.broker import provision as prov  # noqa: E402
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings  # noqa: E402
from fleetlearn.shared import wire  # noqa: E402


async def wait_online(url_host: str, port: int, fleet_dir: Path, count: int, limit: float) -> float:
    agg = prov.load_aggregator(fleet_dir)
    online: set[str] = set()
    started = time.monotonic()
    async with aiomqtt.Client(
        url_host, port, username=agg.username, password=agg.password, identifier="scale-watch"
    ) as c:
        await c.subscribe(f"fl/{agg.fleet}/dev/+/status", qos=1)
        async with asyncio.timeout(limit):
            async for msg in c.messages:
                status = wire.decode(bytes(msg.payload), wire.DeviceStatus)  # type: ignore[arg-type]
                (online.add if status.online else online.discard)(status.device_id)
                if len(online) >= count:
                    break
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--cohort", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-scale-"))
    fleet_dir = work / "fleet"
    t0 = time.monotonic()
    prov.provision(fleet_dir, "plant-7", prov.device_ids(args.devices))
    provision_s = time.monotonic() - t0
    broker = BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet_dir), "mosquitto").start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "fleetlearn"]
    sim = subprocess.Popen(
        [*base, "sim", "--broker", broker.url, "--fleet", "plant-7", "--fleet-dir", str(fleet_dir),
         "--devices", str(args.devices), "--procs", str(args.procs), "--rounds", str(args.rounds)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        t1 = time.monotonic()
        connect_s = asyncio.run(wait_online(broker.host, broker.port, fleet_dir, args.devices, 600))
        agg = subprocess.run(
            [*base, "aggregator", "--broker", broker.url, "--fleet", "plant-7",
             "--fleet-dir", str(fleet_dir), "--state-dir", str(work / "state"),
             "--rounds", str(args.rounds), "--cohort", str(args.cohort),
             "--set", "rounds.over_select=1.0", "--set", "rounds.settle=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=True,
        )  # fmt: skip
        rounds_s = time.monotonic() - t1 - connect_s
        sim_out, _ = sim.communicate(timeout=120)
    finally:
        if sim.poll() is None:
            sim.terminate()
        broker.close()
    db = __import__("sqlite3").connect(work / "state" / "fleetlearn.sqlite3")
    rows = db.execute("SELECT round_id, status, metrics FROM rounds ORDER BY round_id").fetchall()
    print(f"command: python bench/fleet_scale.py --devices {args.devices} --procs {args.procs} "
          f"--cohort {args.cohort} --rounds {args.rounds}")  # fmt: skip
    print(f"provision {args.devices} devices: {provision_s:.1f} s")
    print(f"sim started -> all {args.devices} devices online (retained status): {connect_s:.1f} s")
    print(f"aggregator start -> {args.rounds} secure rounds done: {rounds_s:.1f} s")
    for round_id, status, metrics in rows:
        m = json.loads(metrics)
        print(
            f"  round {round_id}: {status}, {m.get('survivors')}/{m.get('cohort')} in the sum, "
            f"{m.get('duration_s')} s announce->outcome, "
            f"uplink {m.get('uplink_bytes_per_device')} B/device"
        )
    print("aggregator output:")
    print("  " + agg.stdout.strip().replace("\n", "\n  "))
    print("sim output (last lines):")
    print("  " + "\n  ".join(sim_out.strip().splitlines()[-6:]))


if __name__ == "__main__":
    main()

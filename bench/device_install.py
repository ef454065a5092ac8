"""What a gateway installs: `pip install 'fleetlearn[device]'` in a fresh venv, and a device there.

    python bench/device_install.py [--keep DIR]

Creates a virtualenv, installs this checkout with the [device] extra from PyPI (no editable
install, no extras of the developer's environment), and prints its size on disk with the
largest packages, and whether the libraries a gateway should not carry (matplotlib, amqtt, rich,
TensorFlow) are absent. Then it runs the installed `fleetlearn provision`, `fleetlearn aggregator`
(which needs only the core) and `fleetlearn device` against a broker on loopback (mosquitto if
installed, else the embedded one from this environment), waits until the device's retained
health report shows it verified the aggregator's signed release and ran LiteRT with it, and stops
both with SIGTERM. Prints the command at the end. Exit status 0 when the device
came up and stopped cleanly and nothing unwanted was installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetlearn.broker.runner import BrokerProcess, BrokerSettings, find_mosquitto  # noqa: E402
from fleetlearn.firmware_sim.data import MACHINE_TYPES, device_machine  # noqa: E402
from fleetlearn.shared import fleetdir, topics  # noqa: E402
from fleetlearn.transport import BrokerAddress, Endpoint, Incoming  # noqa: E402
from fleetlearn.transport import mqtt as transport_mqtt  # noqa: E402

UNWANTED = ("matplotlib", "amqtt", "rich", "tensorflow")
LIMIT_MB = 250


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def install(env: Path) -> tuple[Path, float]:
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    started = time.monotonic()
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[device]"],
        check=True,
    )
    return python, time.monotonic() - started


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


async def wait_health(url: str, fleet_dir: Path, device: str, within: float) -> dict[str, Any]:
    """The device's retained health report, read as the read-only dashboard user: it comes
    after the device verified the aggregator's release and ran LiteRT inference with it."""
    fleet = fleetdir.load_registry(fleet_dir).fleet
    got: asyncio.Queue[Incoming] = asyncio.Queue()
    link = transport_mqtt.connector(BrokerAddress.parse(url))(
        Endpoint(
            client_id=fleetdir.DASHBOARD_USER,
            username=fleetdir.DASHBOARD_USER,
            password=fleetdir.dashboard_password(fleet_dir),
            subscriptions=(topics.health(fleet, device),),
            persistent=False,
            on_message=got.put_nowait,
        )
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(within):
            while True:
                report: dict[str, Any] = json.loads((await got.get()).payload)
                if report.get("model_version"):
                    return report
    finally:
        await link.close()
        task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build the virtualenv here and keep it")
    args = parser.parse_args()
    print("command: python bench/device_install.py", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fl-device-install-"))
    env = args.keep or work / "venv"
    python, seconds = install(env)
    site = site_packages(python)
    total, site_total = tree_bytes(env), tree_bytes(site)
    sizes = sorted(
        ((tree_bytes(p) if p.is_dir() else p.stat().st_size, p.name) for p in site.iterdir()),
        reverse=True,
    )
    print(f"pip install '.[device]': {seconds:.0f} s")
    print(
        f"virtualenv: {total / 1e6:.0f} MB (site-packages {site_total / 1e6:.0f} MB; "
        f"limit {LIMIT_MB} MB)"
    )
    print("largest: " + ", ".join(f"{name} {size / 1e6:.0f} MB" for size, name in sizes[:8]))
    probe = subprocess.run(
        [
            python,
            "-I",
            "-c",
            "import importlib.util as u, sys;"
            f"print(' '.join(m for m in {UNWANTED!r} if u.find_spec(m)))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
    )
    present = probe.stdout.split()
    print(
        f"absent: {', '.join(m for m in UNWANTED if m not in present) or '-'}; "
        f"present: {', '.join(present) or '-'}"
    )

    fleet = work / "fleet"
    bin_dir = env / "bin"
    subprocess.run(
        [
            bin_dir / "fleetlearn",
            "provision",
            "--out",
            fleet,
            "--fleet",
            "plant-7",
            "--devices",
            "1",
        ],
        check=True,
        cwd=work,
        capture_output=True,
    )
    kinds = list(MACHINE_TYPES)
    x, y = device_machine(11, 0, 0, kinds[0]).windows(300)
    np.savez(work / "data.npz", x=x, y=y)
    mode = "mosquitto" if find_mosquitto() else "embedded"
    broker = BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet), mode)  # type: ignore[arg-type]
    broker.start()
    device_cmd = [
        str(bin_dir / "fleetlearn"),
        "device",
        "--broker",
        broker.url,
        "--keys",
        str(fleet / "devices" / "dev-0001"),
        "--data",
        str(work / "data.npz"),
    ]
    aggregator_cmd = [
        str(bin_dir / "fleetlearn"),
        "aggregator",
        "--broker",
        broker.url,
        "--fleet",
        "plant-7",
        "--fleet-dir",
        str(fleet),
        "--state-dir",
        str(work / "agg-state"),
    ]
    log_path = work / "device.log"
    ok = False
    try:
        with open(log_path, "wb") as log, open(work / "aggregator.log", "wb") as agg_log:
            aggregator = subprocess.Popen(
                aggregator_cmd, stdout=agg_log, stderr=subprocess.STDOUT, cwd=work
            )
            started = time.monotonic()
            proc = subprocess.Popen(device_cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
            try:
                report = asyncio.run(wait_health(broker.url, fleet, "dev-0001", within=120))
                up = time.monotonic() - started
                print(
                    f"device agent ({mode} broker): release v{report['model_version']} verified "
                    f"and loaded, health published ({report['windows']} windows inferred), "
                    f"after {up:.1f} s"
                )
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=60)
                print(f"device agent stopped on SIGTERM: exit {code}")
                ok = code == 0
            except TimeoutError:
                print("device agent: no health report within 120 s")
            finally:
                for p in (proc, aggregator):
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                        try:
                            p.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait()
    finally:
        broker.close()
    if not ok:
        print(log_path.read_text(errors="replace")[-3000:])
        print((work / "aggregator.log").read_text(errors="replace")[-3000:])
    within = total <= LIMIT_MB * 1e6
    print(
        f"result: size {'within' if within else 'OVER'} {LIMIT_MB} MB, "
        f"unwanted {present or 'none'}, device {'ok' if ok else 'FAILED'}"
    )
    print("command: " + shlex.join(["python", "bench/device_install.py"]))
    return 0 if within and not present and ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Secure rounds over a slow, lossy network (issue 13, acceptance 4): the simulated devices run
in a network namespace made here, behind a link that delays every packet 300 ms +/- 100 ms and
drops 2% of them in each direction (tc netem, or the same in user space where the kernel has
no netem: tests/netem.py); broker and aggregator are on this side of the link.

Needs root or CAP_NET_ADMIN: skipped without (on a developer machine). Under CI as root it
always runs, and a missing `ip`/`tc` fails it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings
from tests.conftest import require_mosquitto
from tests.fleet_harness import Harness
from tests.netem import NetemUnavailableError, ShapedLink, can_admin_network, missing_tools

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8


def _require_netns() -> None:
    ci_root = bool(os.environ.get("CI")) and os.geteuid() == 0
    if not can_admin_network() and not ci_root:
        pytest.skip("needs root or CAP_NET_ADMIN to make a network namespace")
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install iproute2")


async def test_secure_rounds_close_over_a_slow_lossy_link(tmp_path: Path) -> None:
    require_mosquitto()
    _require_netns()
    fleet_dir = tmp_path / "fleet"
    devices = prov.device_ids(DEVICES)
    prov.provision(fleet_dir, "plant-7", devices)
    try:
        link = ShapedLink(delay=0.3, jitter=0.1, loss=0.02)
        link.__enter__()
    except NetemUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    sim: subprocess.Popen[bytes] | None = None
    broker: BrokerProcess | None = None
    try:
        broker = BrokerProcess(
            # No state_dir: the runner's own, which mosquitto's user can reach when run by root.
            BrokerSettings(host=link.host_ip, port=0, fleet_dir=fleet_dir),
            "mosquitto",
        )
        broker.start()
        sim = subprocess.Popen(
            [
                *link.exec_prefix,
                sys.executable,
                "-m",
                "fleetlearn",
                "sim",
                "--broker",
                broker.url,
                "--fleet",
                "plant-7",
                "--fleet-dir",
                str(fleet_dir),
                "--devices",
                str(DEVICES),
                "--duration",
                "600",
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        h = Harness(broker, fleet_dir, "plant-7", devices, tmp_path / "state")
        # Every message takes 0.2-0.4 s each way and lost packets wait for TCP to resend
        # them, so limits are set for seconds per stage, not milliseconds.
        service, summaries = await h.run_aggregator(
            timeout=400,
            **{
                "rounds.count": "3",
                "rounds.max_aborts": "2",
                "rounds.wait_for_devices": "120",
                "rounds.settle": "3",
                "stages.advertise": "10",
                "stages.share": "10",
                "stages.collect": "15",
                "stages.unmask": "10",
                "stages.advertise_hard": "60",
                "stages.share_hard": "60",
                "stages.collect_hard": "90",
                "stages.unmask_hard": "60",
            },
        )
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGINT)  # devices say goodbye, through the slow link
            try:
                sim.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.communicate(timeout=10)
        if broker is not None:
            broker.close()
        link.close()
    assert not link.exists(), "the namespace or its link was left behind"
    assert [s.state for s in summaries] == ["closed"] * 3, [
        (s.round_id, s.state, s.metrics.get("reason")) for s in summaries
    ]
    assert all(s.metrics["mode"] == "secure" for s in summaries)
    assert all(s.metrics["survivors"] >= 3 for s in summaries)
    # The link really was slow: no stage with a device round trip closed in under one.
    shares = [e for e in service.recent_events if e["event"] == "stage_closed"]
    assert all(e["stage_s"] >= 0.4 for e in shares if e["stage"] == "share"), shares
    print(f"shaper: {link.shaper} {link.netem_problem}")

"""`fleetlearn demo` end to end, with mosquitto and with the embedded broker (as after a bare
`pip install` on a machine without mosquitto). Each run is the real default demo: 200 devices
over 2 processes, 10 secure rounds."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo(tmp_path: Path, broker: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if broker == "mosquitto":
        require_mosquitto()
    else:
        env["FLEETLEARN_MOSQUITTO"] = "none"
    out = tmp_path / "report"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fleetlearn", "demo", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=330,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 300, f"demo took {elapsed:.0f} s"
    if broker == "embedded":
        assert "mosquitto not found: using the embedded amqtt broker" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["broker"] == broker
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 11))
    assert all(r["state"] == "closed" for r in rounds)
    assert all(r["cohort"] == 60 for r in rounds)
    assert sum(r["dropouts_recovered"] for r in rounds) > 0  # the scenario's 10% at collect
    accuracy = [r["accuracy"] for r in rounds]
    assert statistics.mean(accuracy[-3:]) > statistics.mean(accuracy[:3]) + 0.1, accuracy
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("round", "in sum", "recovered", "uplink B/dev", "accuracy"):
        assert line in proc.stdout

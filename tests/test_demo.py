"""`fleetlearn demo` end to end, with mosquitto and with the embedded broker (as after a bare
`pip install` on a machine without mosquitto). Each run is the real default demo: 200 devices
over 2 processes, 10 secure rounds."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlearn.shared import dataset
from tests.conftest import require_mosquitto
from tests.fleet_harness import machine_csv

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
    proc = subprocess.run(
        [sys.executable, "-m", "fleetlearn", "demo", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed claim: a loaded machine may be slow
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    # The survivors' cost reports, summed securely: every survivor trained and downloaded.
    for r in rounds:
        assert r["cost"]["devices"] == r["survivors"], r["cost"]
        assert r["cost"]["cpu_s"] > 0, r["cost"]
        assert r["cost"]["bytes_down"] > 0, r["cost"]
    assert "devices spent (their reports, summed over 10 rounds)" in proc.stdout


def test_demo_reports_aborted_rounds_and_stops_after_three_in_a_row(tmp_path: Path) -> None:
    """Nobody ever advertises: every round aborts at ADVERTISE, is reported, retried with a
    fresh cohort, and the third abort in a row stops the demo (exit 1, clear message)."""
    require_mosquitto()
    scenario = tmp_path / "silent.toml"
    scenario.write_text("[dropout]\nadvertise = 1.0\n")
    out = tmp_path / "report"
    cmd = [
        sys.executable, "-m", "fleetlearn", "demo", "--mosquitto", "--out", str(out),
        "--devices", "8", "--cohort", "4", "--procs", "1", "--rounds", "2",
        "--scenario", str(scenario),
        "--set", "stages.advertise=1", "--set", "stages.advertise_hard=2",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("aborted (ADVERTISE") == 3, proc.stdout[-3000:]
    assert "0 of 2 rounds closed, 3 aborted" in proc.stdout
    assert "demo stopped: 3 rounds in a row aborted" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["state"] for r in report["rounds"]] == ["aborted"] * 3
    assert (report["rounds_closed"], report["rounds_aborted"]) == (0, 3)
    assert report["stopped"].startswith("3 rounds in a row aborted")


def test_demo_on_the_users_own_data(tmp_path: Path) -> None:
    """`fleetlearn demo --data FILE`: a fifth of the CSV is the aggregator's test set, the rest
    is split over the devices (label skew), and the rounds train on it, not on generated data
    (a round's held-out rows are at most the CSV's; generated data would give each device
    256 rows); every release is judged on the test set."""
    require_mosquitto()

    source = tmp_path / "plant.csv"
    total = machine_csv(source, seed=9, per_machine=100)
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetlearn",
            "demo",
            "--data",
            str(source),
            "--partition",
            "dirichlet",
            "--alpha",
            "1",
            "--devices",
            "12",
            "--cohort",
            "6",
            "--rounds",
            "2",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{total} examples, 16 features" in proc.stdout
    assert "using the packaged default model" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"file": str(source), "split": "dirichlet"}
    rounds = report["rounds"]
    assert [r["state"] for r in rounds] == ["closed", "closed"]
    assert all(0 < r["samples"] <= total for r in rounds)
    test_rows = int(dataset.holdout_rows(total, 0.2).sum())
    assert f"{test_rows} kept as the aggregator's test set" in proc.stdout
    # Federated evaluation per class: rows add up to the round's held-out rows.
    assert "recall per class, round 2 (held-out rows):" in proc.stdout
    for r in rounds:
        assert sum(c["samples"] for c in r["per_class"]) == r["samples"]
        assert sum(c["samples"] for c in r["server_eval"]["per_class"]) == test_rows
    for r in rounds:
        assert r["server_eval"]["model_version"] == r["new_version"]
        assert r["server_eval"]["samples"] == test_rows
        assert 0.0 <= r["server_eval"]["accuracy"] <= 1.0

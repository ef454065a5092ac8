"""`fleetlearn broker` in both modes: mosquitto present, and absent (embedded fallback).

Each run starts in a temporary working directory the broker's user can enter, since the
command keeps its state in ./broker-state by default.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import free_port
from tests.conftest import FLEET, require_mosquitto

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent


def _start(
    port: int, fleet_dir: Path, env_extra: dict[str, str], *flags: str, cwd: Path
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn",
            "broker",
            "--port",
            str(port),
            "--fleet-dir",
            str(fleet_dir),
            *flags,
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _round_trip(port: int, fleet_dir: Path) -> bytes:
    agg = prov.load_aggregator(fleet_dir)
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    async with (
        aiomqtt.Client(
            "127.0.0.1", port, username=agg.username, password=agg.password, timeout=10
        ) as a,
        aiomqtt.Client(
            "127.0.0.1", port, username=dev.username, password=dev.password, timeout=10
        ) as d,
    ):
        await d.subscribe(f"fl/{FLEET}/model", qos=1)
        await a.publish(f"fl/{FLEET}/model", b"v1", qos=1, retain=True)
        async with asyncio.timeout(10):
            msg = await anext(aiter(d.messages))
        return bytes(msg.payload)  # type: ignore[arg-type]


def _wait_listening(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return line


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.parametrize("mode", ["mosquitto", "embedded"])
async def test_broker_command_serves_with_auth(
    mode: str, fleet_dir: Path, reachable_tmp: Path
) -> None:
    env: dict[str, str] = {}
    if mode == "mosquitto":
        require_mosquitto()
    else:
        env["FLEETLEARN_MOSQUITTO"] = "none"  # as on a machine without mosquitto
    port = free_port()
    proc = _start(port, fleet_dir, env, cwd=reachable_tmp)
    try:
        line = _wait_listening(proc)
        assert line.startswith(f"{mode} ")
        assert await _round_trip(port, fleet_dir) == b"v1"
    finally:
        out, err = _stop(proc)
    assert "broker stopped" in out
    if mode == "embedded":
        assert "mosquitto not found: running the embedded amqtt broker" in err


def test_require_mosquitto_when_absent_is_a_clear_error(
    fleet_dir: Path, reachable_tmp: Path
) -> None:
    proc = _start(
        free_port(), fleet_dir, {"FLEETLEARN_MOSQUITTO": "none"}, "--mosquitto", cwd=reachable_tmp
    )
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "mosquitto is not installed" in err
    assert "Traceback" not in err


def test_port_in_use_is_a_clear_error(mosquitto, fleet_dir: Path, reachable_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    proc = _start(mosquitto.port, fleet_dir, {}, cwd=reachable_tmp)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "already in use" in err


def test_missing_fleet_dir_is_a_clear_error(tmp_path: Path, reachable_tmp: Path) -> None:
    proc = _start(free_port(), tmp_path / "nothing", {}, cwd=reachable_tmp)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "run `fleetlearn provision` first" in err


async def test_defaults_keep_the_retained_model_across_restarts(
    fleet_dir: Path, reachable_tmp: Path
) -> None:
    """`fleetlearn broker --fleet-dir F`, stopped and started again: devices still get the
    release without waiting for the aggregator to republish it."""
    require_mosquitto()
    port = free_port()
    agg = prov.load_aggregator(fleet_dir)
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    proc = _start(port, fleet_dir, {}, cwd=reachable_tmp)
    try:
        _wait_listening(proc)
        async with aiomqtt.Client(
            "127.0.0.1", port, username=agg.username, password=agg.password, timeout=10
        ) as a:
            await a.publish(f"fl/{FLEET}/model", b"release-3", qos=1, retain=True)
    finally:
        _stop(proc)
    proc = _start(port, fleet_dir, {}, cwd=reachable_tmp)
    try:
        _wait_listening(proc)
        async with aiomqtt.Client(
            "127.0.0.1", port, username=dev.username, password=dev.password, timeout=10
        ) as d:
            await d.subscribe(f"fl/{FLEET}/model", qos=1)
            async with asyncio.timeout(10):
                msg = await anext(aiter(d.messages))
        assert msg.payload == b"release-3"
    finally:
        _stop(proc)
    state = reachable_tmp / "broker-state"
    assert (state / "mosquitto.db").is_file()
    assert "user root" not in (state / "mosquitto.conf").read_text()

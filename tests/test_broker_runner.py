"""broker.runner's generated mosquitto: persistence on by default, never root, private files.

Tests here run as whatever user CI uses (root on the CI image). As root, the checks that the
broker dropped its privileges are real; as an ordinary user mosquitto keeps that user, which is
not root either, so every assertion holds in both cases.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import (
    BROKER_USER,
    BrokerError,
    BrokerProcess,
    BrokerSettings,
    mosquitto_config,
)
from fleetlearn.shared import topics
from tests.conftest import FLEET, require_mosquitto

pytestmark = pytest.mark.broker


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


async def _publish_retained(broker: BrokerProcess, fleet_dir: Path, payload: bytes) -> None:
    agg = prov.load_aggregator(fleet_dir)
    async with aiomqtt.Client(
        broker.host, broker.port, username=agg.username, password=agg.password, timeout=10
    ) as client:
        await client.publish(topics.model(FLEET), payload, qos=1, retain=True)


async def _retained_model(broker: BrokerProcess, fleet_dir: Path) -> bytes:
    """The retained release a device gets on subscribing (TimeoutError when there is none)."""
    dev = prov.load_device(fleet_dir / "devices" / "dev-0001")
    async with aiomqtt.Client(
        broker.host, broker.port, username=dev.username, password=dev.password, timeout=10
    ) as client:
        await client.subscribe(topics.model(FLEET), qos=1)
        async with asyncio.timeout(10):
            msg = await anext(aiter(client.messages))
        return bytes(msg.payload)  # type: ignore[arg-type]


@pytest.fixture
def mosquitto_runner(fleet_dir: Path) -> BrokerProcess:
    require_mosquitto()
    return BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet_dir), "mosquitto")


async def test_retained_model_survives_a_restart_with_default_settings(
    mosquitto_runner: BrokerProcess, fleet_dir: Path
) -> None:
    broker = mosquitto_runner
    with broker:
        await _publish_retained(broker, fleet_dir, b"release-7")
        broker.restart()
        assert await _retained_model(broker, fleet_dir) == b"release-7"


async def test_mosquitto_never_runs_as_root(
    mosquitto_runner: BrokerProcess, fleet_dir: Path
) -> None:
    broker = mosquitto_runner
    with broker:
        # A round trip first: mosquitto drops privileges before its main loop serves anyone.
        await _publish_retained(broker, fleet_dir, b"x")
        assert broker.pid is not None
        uids = _uids(broker.pid)
        assert 0 not in uids, uids
        conf = (broker.state_dir / "mosquitto.conf").read_text()
        assert "user root" not in conf
        if os.geteuid() == 0:
            account = pwd.getpwnam(BROKER_USER)
            assert set(uids) == {account.pw_uid}
            assert f"user {BROKER_USER}\n" in conf


async def test_broker_files_are_private(mosquitto_runner: BrokerProcess, fleet_dir: Path) -> None:
    broker = mosquitto_runner
    with broker:
        await _publish_retained(broker, fleet_dir, b"x")
        state = broker.state_dir
        assert _mode(state) == 0o700
        assert _mode(broker.log_path) == 0o600
        assert _mode(state / "mosquitto.conf") == 0o600
        if os.geteuid() == 0:
            # Copies its user can read wherever the fleet directory is; nobody else can.
            account = pwd.getpwnam(BROKER_USER)
            assert state.stat().st_uid == account.pw_uid
            for name in ("passwd", "acl"):
                copy = state / name
                assert _mode(copy) == 0o600, name
                assert copy.stat().st_uid == account.pw_uid, name
                assert copy.read_bytes() == (fleet_dir / name).read_bytes(), name


def test_generated_config_binds_ids_and_persists(tmp_path: Path, fleet_dir: Path) -> None:
    text = mosquitto_config(BrokerSettings(port=1884, fleet_dir=fleet_dir), tmp_path)
    lines = text.splitlines()
    assert "use_username_as_clientid true" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert "allow_anonymous false" in lines
    assert not any(line.startswith("user ") for line in lines)  # only when asked to drop
    dropped = mosquitto_config(BrokerSettings(fleet_dir=fleet_dir), tmp_path, run_as="mosquitto")
    assert "user mosquitto" in dropped.splitlines()
    off = mosquitto_config(BrokerSettings(persistence=False), tmp_path).splitlines()
    assert "persistence false" in off


def test_unreachable_state_dir_is_a_clear_error(tmp_path: Path, fleet_dir: Path) -> None:
    require_mosquitto()
    if os.geteuid() != 0:
        pytest.skip("only root hands the broker to another user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    broker = BrokerProcess(
        BrokerSettings(port=0, fleet_dir=fleet_dir, state_dir=closed / "state"), "mosquitto"
    )
    try:
        with pytest.raises(BrokerError, match="cannot reach the state directory") as info:
            broker.start()
        assert "\n" not in str(info.value)
        assert not broker.running()
    finally:
        broker.close()  # also when it wrongly started


def test_state_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(BrokerError, match="cannot create the broker state directory"):
        BrokerProcess(BrokerSettings(port=0, state_dir=path), "mosquitto")

"""Shared fixtures: provisioned fleets and real brokers on free loopback ports.

Broker tests use a real mosquitto started here. When mosquitto is missing they are skipped on a
developer machine but fail under CI (CI=true), so a CI image without mosquitto cannot pass by
skipping the tests that matter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings, find_mosquitto

# Under CI the property tests draw the same examples every run, so a landing never depends on
# luck; on developer machines they explore new examples each run (which is how edge cases such
# as a weight grid rounding every weight to zero were found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

FLEET = "plant-7"
DEVICES = ("dev-0001", "dev-0002", "dev-0003")


def require_mosquitto() -> str:
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "mosquitto is not installed; .ci/run must install it (apt-get install mosquitto)"
            )
        pytest.skip("mosquitto is not installed")
    return binary


@pytest.fixture(scope="session")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet provisioned once per session with three devices (read-only for tests)."""
    root = tmp_path_factory.mktemp("fleet")
    prov.provision(root, FLEET, list(DEVICES))
    return root


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A temporary directory the broker's own user can enter.

    Tests run as root on CI, and mosquitto started by root drops to user `mosquitto`, which
    cannot enter pytest's 0700 tmp_path. Brokers the fixtures start keep their state in a
    temporary directory of the runner's (directly under /tmp, handed to that user)."""
    path = Path(tempfile.mkdtemp(prefix="fleetlearn-test-"))
    path.chmod(0o711)  # others may pass through, not list
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _broker(mode: str, fleet_dir: Path | None) -> Iterator[BrokerProcess]:
    if mode == "mosquitto":
        require_mosquitto()
    # state_dir None: the runner's own temporary directory, which its broker user can reach.
    settings = BrokerSettings(port=0, fleet_dir=fleet_dir)
    proc = BrokerProcess(settings, mode)  # type: ignore[arg-type]
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def mosquitto(fleet_dir: Path) -> Iterator[BrokerProcess]:
    """A real mosquitto with the provisioned password and ACL files, on a free port."""
    yield from _broker("mosquitto", fleet_dir)


@pytest.fixture
def embedded(fleet_dir: Path) -> Iterator[BrokerProcess]:
    """The embedded amqtt broker with the same password and ACL files."""
    yield from _broker("embedded", fleet_dir)


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest, fleet_dir: Path) -> Iterator[BrokerProcess]:
    """Each test using this runs once against mosquitto and once against the embedded broker."""
    yield from _broker(request.param, fleet_dir)

"""`fleetlearn provision`: files, permissions, re-runs, rotation, and bad input."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.acl import Access, Acl
from fleetlearn.cli import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_permissions(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    assert main(["provision", "--fleet", "plant-7", "--devices", "3", "--out", str(root)]) == 0
    assert _mode(root / "aggregator") == 0o700
    assert _mode(root / "devices") == 0o700
    assert _mode(root / "simulator") == 0o700
    for secret in [
        root / "aggregator" / "identity.key",
        root / "aggregator" / "password",
        root / "aggregator" / "ingest-password",
        root / "dashboard" / "password",
        root / "simulator" / "password",
        *(
            root / "devices" / d / n
            for d in ("dev-0001", "dev-0003")
            for n in ("identity.key", "password")
        ),
    ]:
        assert _mode(secret) == 0o600, secret
    assert _mode(root / "passwd") == 0o640
    assert _mode(root / "acl") == 0o640  # who may do what is the broker's business only
    passwd = (root / "passwd").read_text()
    creds = prov.load_device(root / "devices" / "dev-0002")
    assert creds.password not in passwd  # only hashes reach the broker
    users = dict(line.split(":", 1) for line in passwd.splitlines())
    # One user per connection: the aggregator has two, the simulator's view its own.
    assert set(users) == {
        "aggregator",
        "aggregator-ingest",
        "dashboard",
        "simulator",
        "dev-0001",
        "dev-0002",
        "dev-0003",
    }
    assert prov.check_password(creds.password, users["dev-0002"])
    assert not prov.check_password("nope", users["dev-0002"])
    registry = prov.load_registry(root)
    assert registry.device_keys["dev-0002"] == creds.identity.verify_key
    assert creds.aggregator_key == prov.load_aggregator(root).identity.verify_key


def test_rerun_adds_devices_without_rotating(tmp_path: Path) -> None:
    prov.provision(tmp_path, "plant-7", prov.device_ids(2))
    before = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name in ("identity.key", "password")
    }
    passwd_before = (tmp_path / "passwd").read_text().splitlines()
    report = prov.provision(tmp_path, "plant-7", prov.device_ids(4))
    assert report.added == ("dev-0003", "dev-0004")
    assert report.kept == ("dev-0001", "dev-0002")
    for rel, content in before.items():
        assert (tmp_path / rel).read_bytes() == content, rel
    passwd_after = (tmp_path / "passwd").read_text().splitlines()
    assert passwd_before == passwd_after[: len(passwd_before)]  # hashes kept as they were
    assert len(passwd_after) == len(passwd_before) + 2


def test_rotate_replaces_keys(tmp_path: Path) -> None:
    prov.provision(tmp_path, "plant-7", ["a1"])
    old = prov.load_device(tmp_path / "devices" / "a1")
    prov.provision(tmp_path, "plant-7", ["a1"], rotate=True)
    new = prov.load_device(tmp_path / "devices" / "a1")
    assert old.password != new.password
    assert old.identity.encode() != new.identity.encode()
    assert old.aggregator_key != new.aggregator_key


def test_acl_grants_match_architecture(tmp_path: Path) -> None:
    prov.provision(tmp_path, "plant-7", ["d1", "d2"])
    acl = Acl.load(tmp_path / "acl")
    ok = acl.allowed
    assert ok("d1", "c", "fl/plant-7/dev/d1/status", Access.WRITE)
    assert not ok("d1", "c", "fl/plant-7/dev/d2/status", Access.WRITE)
    assert ok("d1", "c", "fl/plant-7/r/4/masked/d1", Access.WRITE)
    assert not ok("d1", "c", "fl/plant-7/r/4/masked/d2", Access.WRITE)
    assert ok("d1", "c", "fl/plant-7/model", Access.READ)
    assert not ok("d1", "c", "fl/plant-7/model", Access.WRITE)
    assert ok("d1", "c", "fl/plant-7/r/+/inbox/d1", Access.READ)
    assert not ok("d1", "c", "fl/plant-7/r/+/inbox/+", Access.READ)
    assert not ok("d1", "c", "fl/plant-7/#", Access.READ)
    assert not ok("d1", "c", "fl/plant-7/metrics", Access.READ)
    assert ok("dashboard", "c", "fl/plant-7/dev/+/health", Access.READ)
    assert not ok("dashboard", "c", "fl/plant-7/round", Access.READ)
    # The dashboard's device table reads statuses; round traffic and the model stay closed,
    # and it writes nothing.
    assert ok("dashboard", "c", "fl/plant-7/dev/+/status", Access.READ)
    assert not ok("dashboard", "c", "fl/plant-7/dev/d1/status", Access.WRITE)
    assert not ok("dashboard", "c", "fl/plant-7/r/+/inbox/+", Access.READ)
    assert not ok("dashboard", "c", "fl/plant-7/r/4/update/d1", Access.READ)
    assert not ok("dashboard", "c", "fl/plant-7/model", Access.READ)
    assert not ok("dashboard", "c", "fl/plant-7/metrics", Access.WRITE)
    assert ok("aggregator", "c", "fl/plant-7/model", Access.WRITE)
    assert not ok("aggregator", "c", "fl/other/model", Access.WRITE)
    assert not ok(None, "c", "fl/plant-7/model", Access.READ)
    # The aggregator's receiving connection reads what devices send and publishes nothing.
    assert ok("aggregator-ingest", "c", "fl/plant-7/dev/+/status", Access.READ)
    assert ok("aggregator-ingest", "c", "fl/plant-7/r/+/masked/+", Access.READ)
    assert not ok("aggregator-ingest", "c", "fl/plant-7/model", Access.WRITE)
    assert not ok("aggregator-ingest", "c", "fl/other/dev/+/status", Access.READ)
    # The simulator's progress view reads what dashboards read, nothing more.
    assert ok("simulator", "c", "fl/plant-7/metrics", Access.READ)
    assert not ok("simulator", "c", "fl/plant-7/round", Access.READ)
    assert not ok("simulator", "c", "fl/plant-7/metrics", Access.WRITE)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--fleet", "bad/fleet"], "fleet id"),
        (["--ids", "ok1,no#pe"], "device id"),
        (["--ids", "aggregator"], "reserved"),
        (["--devices", "-3"], "outside"),
        (["--broker-owner", "root"], "UID"),
    ],
)
def test_bad_input_is_one_clear_error(
    tmp_path: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code: int | str | None
    try:
        code = main(["provision", "--out", str(tmp_path / "f"), *argv])
    except SystemExit as exc:  # argparse rejects the flag itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_other_fleet_in_same_directory_refused(tmp_path: Path) -> None:
    prov.provision(tmp_path, "plant-7", ["d1"])
    with pytest.raises(prov.ProvisionError, match="already holds fleet"):
        prov.provision(tmp_path, "plant-8", ["d1"])


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    prov.provision(tmp_path, "plant-7", ["d1"])
    (tmp_path / "devices" / "d1" / "identity.key").write_text("zz")
    with pytest.raises(prov.ProvisionError, match="not hex"):
        prov.load_device(tmp_path / "devices" / "d1")
    (tmp_path / "fleet.json").write_text("{")
    with pytest.raises(prov.ProvisionError, match="not valid JSON"):
        prov.load_registry(tmp_path)
    (tmp_path / "fleet.json").write_text(json.dumps({"fleet": "x", "devices": {"d1": "00"}}))
    with pytest.raises(prov.ProvisionError, match="expected 32"):
        prov.load_registry(tmp_path)
    with pytest.raises(prov.ProvisionError, match="run `fleetlearn provision`"):
        prov.load_device(tmp_path / "devices" / "nobody")

"""Every command's input errors: one line on stderr, exit status 2, never a traceback.

Tried as a new user and as an attacker would: files that are not text, random key bytes,
directories where files belong, paths that cannot exist, numbers out of range (nan, inf,
negative, 10^23), settings that contradict each other, bad fleet ids, URLs and ports. Each case
must fail before the command connects or starts any work, so none needs a broker.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.cli import main

FLEET = "plant-7"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned fleet, plus the broken files the cases point at."""
    root = tmp_path_factory.mktemp("cli")
    fleet = root / "fleet"
    prov.provision(fleet, FLEET, ["dev-0001", "dev-0002"])
    (root / "latin1.toml").write_bytes(b"[rounds]\ncount = 3 # caf\xe9\n")
    (root / "huge.toml").write_text("[rounds]\ncount = 100000000000000000000000\n")
    (root / "wrong-type.toml").write_text('[rounds]\ncohort = "many"\n')
    (root / "unknown.toml").write_text("[rounds]\ncohorts = 5\n")
    (root / "adir").mkdir()
    (root / "afile").write_text("not a directory\n")
    (root / "garbage.pem").write_text("not a certificate\n")
    (root / "nan-latency.toml").write_text("[network]\nlatency = nan\n")
    (root / "negative-energy.toml").write_text("[cost]\njoules_per_cpu_second = -1.0\n")
    (root / "huge-samples.toml").write_text("[fleet]\nsamples = 100000000000000000000000\n")
    np.savez(root / "data.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    x = np.zeros((4, 8), np.float32)
    x[1, 2] = np.nan
    np.savez(root / "nan-data.npz", x=x, y=np.zeros(4, np.int64))

    # A device whose identity key was overwritten with random bytes.
    broken_dev = root / "broken-device"
    shutil.copytree(fleet / "devices" / "dev-0001", broken_dev)
    (broken_dev / "identity.key").write_bytes(bytes(range(256)) * 4)
    # A fleet whose aggregator key, registry, password file or ACL is damaged.
    for name in ("bad-agg-key", "bad-registry", "bad-passwd", "bad-acl"):
        shutil.copytree(fleet, root / name)
    (root / "bad-agg-key" / "aggregator" / "identity.key").write_bytes(b"\x8f\xff\x00" * 20)
    (root / "bad-registry" / "fleet.json").write_text('{"fleet": ')
    (root / "bad-passwd" / "passwd").write_bytes(b"aggregator:\xff\xfe\n")
    (root / "bad-acl" / "acl").write_text("topic read #\nallow everything\n")
    return root


# (argv, environment, text the one line must contain). {w} is the work directory.
# Each of these printed a traceback, several lines, or nothing (exit 0) before issue 13.
CASES = [
    # -- the cases of issue 13, item 10
    (["aggregator", "--config", "{w}/latin1.toml", "--print-config"], {}, "not UTF-8"),
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/broken-device",
      "--data", "{w}/data.npz"], {}, "is not text"),
    (["provision", "--devices", "1", "--out", "/proc/fleetlearn-test"], {}, "cannot write"),
    (["aggregator", "--set", "secagg.threshold=1", "--set", "secagg.neighbours=10",
      "--print-config"], {}, "secagg.threshold: must be in 6..10"),
    (["aggregator", "--broker", "http://x", "--print-config"], {}, "broker.url"),
    (["aggregator", "--config", "{w}/huge.toml", "--print-config"], {}, "rounds.count"),
    (["provision", "--devices", "0", "--out", "{w}/empty-fleet"], {}, "needs devices"),
    # -- aggregator settings: numbers, types, contradictions, from file, env and flags
    (["aggregator", "--set", "rounds.over_select=nan", "--print-config"], {}, "finite"),
    (["aggregator", "--set", "compression.clip=inf", "--print-config"], {}, "finite"),
    (["aggregator", "--set", "rounds.cohort=100000000", "--print-config"], {}, "rounds.cohort"),
    (["aggregator", "--set", "rounds.over_select=1000", "--print-config"], {}, "over_select"),
    (["aggregator", "--set", "secagg.neighbours=-3", "--print-config"], {}, "secagg.neighbours"),
    (["aggregator", "--set", "secagg.threshold=3", "--print-config"], {}, "needs secagg.neighb"),
    (["aggregator", "--set", "secagg.neighbours=10", "--print-config"], {}, "min_cohort to 11"),
    (["aggregator", "--set", "aggregation.clip_norm=-1", "--print-config"], {}, "clip_norm"),
    (["aggregator", "--set", "fleet.dir=a\x00b", "--print-config"], {}, "NUL"),
    (["aggregator", "--broker", "mqtt://x:99999", "--print-config"], {}, "invalid port"),
    (["aggregator", "--broker", "mqtt://", "--print-config"], {}, "has no host"),
    (["aggregator", "--set", "broker.ca_file=/etc/hostname", "--print-config"], {},
     "only used with an mqtts://"),
    (["aggregator", "--print-config"], {"FLEETLEARN_SERVER_LR": "inf"}, "finite"),
    (["aggregator", "--fleet-dir", "{w}/bad-agg-key", "--broker", "mqtt://127.0.0.1:1",
      "--state-dir", "{w}/agg-state-1"], {}, "is not text"),
    (["aggregator", "--fleet-dir", "{w}/fleet", "--broker", "mqtts://127.0.0.1:1",
      "--set", "broker.ca_file={w}/garbage.pem", "--state-dir", "{w}/agg-state-2"], {},
     "CA certificate"),
    # -- provision
    (["provision", "--devices", "1", "--out", "{w}/afile"], {}, "not a directory"),
    (["provision", "--devices", "1", "--out", "{w}/bad-passwd"], {}, "is not text"),
    (["provision", "--devices", "100001", "--out", "{w}/f2"], {}, "outside 0..100000"),
    (["provision", "--devices", "1", "--broker-owner", "99999999999:1", "--out", "{w}/f3"], {},
     "must be below"),
    # -- broker
    (["broker", "--state-dir", "/proc/fleetlearn-test"], {}, "cannot create the broker state"),
    (["broker", "--state-dir", "{w}/afile"], {}, "cannot create the broker state"),
    (["broker", "--host", "999.1.1.1"], {}, "--host"),
    (["broker", "--port", "70000"], {}, "outside 0..65535"),
    (["broker", "--fleet-dir", "{w}/bad-acl", "--state-dir", "{w}/bs", "--port", "0"], {},
     "unknown directive"),
    # -- model
    (["model", "build", "--spec", "{w}/latin1.toml", "--out", "{w}/m.tflite"], {}, "not UTF-8"),
    (["model", "build", "--out", "{w}/adir"], {}, "is a directory"),
    # -- device
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz", "--state-dir", "/proc/fleetlearn-test"], {}, "--state-dir"),
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz", "--ca-file", "{w}/garbage.pem"], {}, "only used with"),
    (["device", "--broker", "mqtts://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz", "--ca-file", "{w}/nothing.pem"], {}, "CA certificate"),
    # -- sim
    (["sim", "--broker", "http://x", "--fleet-dir", "{w}/fleet", "--devices", "1"], {},
     "--broker"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--duration", "nan"], {}, "finite"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--rounds", "-1"], {}, "outside"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--procs", "100000"], {}, "outside 1..64"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--fleet", "a/b"], {}, "fleet id"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--scenario", "{w}/latin1.toml"], {}, "not UTF-8"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--state-dir", "{w}/afile"], {}, "not a directory"),
    # -- demo (each fails before it provisions or starts a broker)
    (["demo", "--out", "/proc/fleetlearn-test"], {}, "--out"),
    (["demo", "--devices", "100000000"], {}, "outside 3..10000"),
    (["demo", "--scenario", "{w}/latin1.toml"], {}, "not UTF-8"),
    (["demo", "--dashboard", "--dashboard-port", "{taken}"], {}, "--dashboard-port"),
    (["demo", "--dashboard-port", "70000"], {}, "outside 0..65535"),
    # -- the dispatcher itself
    (["no-such-command"], {}, "invalid choice"),
    (["aggregator", "--no-such-flag"], {}, "unrecognized arguments"),
]  # fmt: skip

# Already one line before issue 13; kept so that the boundaries stay where they are.
GUARDS = [
    # -- aggregator settings: numbers, types, contradictions, from file, env and flags
    (["aggregator", "--config", "{w}/adir", "--print-config"], {}, "cannot read"),
    (["aggregator", "--config", "{w}/wrong-type.toml", "--print-config"], {}, "must be an int"),
    (["aggregator", "--config", "{w}/unknown.toml", "--print-config"], {}, "unknown setting"),
    (["aggregator", "--print-config"], {"FLEETLEARN_ROUNDS_COHORT": "lots"}, "must be an int"),
    # -- provision
    (["provision", "--devices", "1", "--out", "{w}/bad-registry"], {}, "not valid JSON"),
    # -- model
    (["model", "inspect", "{w}/adir"], {}, "cannot read"),
    (["model", "inspect", "{w}/data.npz"], {}, "not a TFLite model"),
    # -- device
    (["device", "--broker", "mqtt://127.0.0.1:x", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz"], {}, "invalid port"),
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/nan-data.npz"], {}, "finite"),
    # -- sim
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--scenario", "{w}/nan-latency.toml"], {}, "network.latency"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--scenario", "{w}/huge-samples.toml"], {}, "fleet.samples"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", "{w}/fleet", "--devices", "1",
      "--scenario", "{w}/negative-energy.toml"], {}, "cost.joules_per_cpu_second"),
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz", "--joules-per-cpu-second", "nan"], {},
     "--joules-per-cpu-second"),
    (["device", "--broker", "mqtt://127.0.0.1:1", "--keys", "{w}/fleet/devices/dev-0001",
      "--data", "{w}/data.npz", "--microjoules-per-byte-up", "1e30"], {},
     "--microjoules-per-byte-up"),
]  # fmt: skip


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A loopback port something listens on for the module's tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    CASES + GUARDS,
    ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)]
    + [f"guard-{i:02d}-{c[0][0]}" for i, c in enumerate(GUARDS)],
)
def test_input_error_is_one_line(
    argv: list[str],
    env: dict[str, str],
    needle: str,
    work: Path,
    taken_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code: int | str | None
    try:
        code = main(
            [arg.replace("{w}", str(work)).replace("{taken}", str(taken_port)) for arg in argv]
        )
    except SystemExit as exc:  # argparse refuses the flag itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fleetlearn"), err
    assert needle in lines[0], err
    assert "Traceback" not in err

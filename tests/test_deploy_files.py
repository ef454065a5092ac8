"""docker-compose.yml and mosquitto.conf agree with each other and with the CLI.

There is no Docker engine on CI machines, so the compose file is checked structurally; the
production mosquitto.conf is loaded by the real mosquitto with its paths pointed at a
temporary fleet directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import posixpath
import pwd
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BROKER_USER, DEFAULT_PORT, free_port, port_open
from fleetlearn.cli import build_parser
from tests.conftest import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent


def _conf() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in (ROOT / "mosquitto.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source, for short-syntax volume entries."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        out[target] = source
    return out


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_services_present(compose: dict[str, Any]) -> None:
    assert {
        "mosquitto",
        "aggregator",
        "simulator",
        "provision",
        "dashboard",
        "prometheus",
        "grafana",
    } <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
    for named in ("mosquitto-data", "aggregator-state", "prometheus-data", "grafana-data"):
        assert named in compose["volumes"]


def test_every_published_port_is_on_the_hosts_loopback(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), (name, entry)
            published += 1
    assert published >= 4  # broker, dashboard, Prometheus, Grafana


def test_prometheus_scrapes_the_dashboard_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dashboard = services["dashboard"]["command"]
    assert dashboard[0] == "dashboard"
    port = _flag(dashboard, "--port")
    assert services["dashboard"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if "config.file" in a)
    source = mounts[config_path]
    config = yaml.safe_load((ROOT / source).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"dashboard:{port}"]
    # The dashboard reads the fleet the others run, as the read-only dashboard user.
    provision = services["provision"]["command"]
    assert _flag(dashboard, "--fleet") == _flag(provision, "--fleet")
    assert _mounts(services["dashboard"])[_flag(dashboard, "--fleet-dir")] == "./fleet"
    assert _flag(dashboard, "--broker") == f"mqtt://mosquitto:{DEFAULT_PORT}"
    # Listening on every interface of the container, it must still refuse Host names other
    # than the host's loopback names and the one Prometheus uses (DNS rebinding).
    assert _flag(dashboard, "--host") == "0.0.0.0"
    allowed = {dashboard[i + 1] for i, a in enumerate(dashboard) if a == "--allowed-host"}
    assert allowed == {"localhost", "127.0.0.1", "dashboard"}
    assert targets[0].split(":")[0] in allowed


def test_grafana_is_provisioned_with_prometheus_and_the_fleet_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: source.removesuffix(":ro") for target, source in _mounts(grafana).items()}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "fleetlearn.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    boards = sorted((ROOT / mounts[folder]).glob("*.json"))
    assert boards, "no Grafana dashboard JSON is mounted"
    # No default admin password: compose refuses to start without one.
    assert "?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_mosquitto_service_matches_conf(compose: dict[str, Any]) -> None:
    conf = _conf()
    service = compose["services"]["mosquitto"]
    mounts = _mounts(service)
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    assert (ROOT / "mosquitto.conf").is_file()
    # passwd and acl live in the mounted fleet directory, which provision writes.
    fleet_target = posixpath.dirname(conf["password_file"][0])
    assert posixpath.dirname(conf["acl_file"][0]) == fleet_target
    assert posixpath.basename(conf["password_file"][0]) == "passwd"
    assert posixpath.basename(conf["acl_file"][0]) == "acl"
    assert mounts[fleet_target] == "./fleet"
    # persistence lands on a named volume.
    assert conf["persistence"] == ["true"]
    assert mounts[conf["persistence_location"][0].rstrip("/")] == "mosquitto-data"
    # The plain listener is the CLI's default port, published on loopback only.
    listeners = [v.split()[0] for v in conf["listener"]]
    assert listeners == [str(DEFAULT_PORT)]
    assert service["ports"] == [f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}"]
    assert conf["allow_anonymous"] == ["false"]


def test_conf_binds_client_ids_and_never_runs_as_root(compose: dict[str, Any]) -> None:
    conf = _conf()
    assert conf["use_username_as_clientid"] == ["true"]
    # The image starts mosquitto as root; it must drop to its own user, which owns the
    # persistence volume and is what provision hands passwd and acl to (1883 in the image).
    assert conf["user"] == [BROKER_USER]
    provision = compose["services"]["provision"]["command"]
    assert _flag(provision, "--broker-owner") == "1883:1883"


def test_fleetlearn_services_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    provision = services["provision"]["command"]
    fleet = _flag(provision, "--fleet")
    fleet_out = _flag(provision, "--out")
    assert _mounts(services["provision"])[fleet_out] == "./fleet"
    # the broker user of the eclipse-mosquitto image must be able to read passwd and acl
    assert _flag(provision, "--broker-owner") == "1883:1883"
    for name in ("aggregator", "simulator"):
        command = services[name]["command"]
        assert _flag(command, "--broker") == f"mqtt://mosquitto:{DEFAULT_PORT}", name
        assert _flag(command, "--fleet") == fleet, name
        fleet_dir = _flag(command, "--fleet-dir")
        assert _mounts(services[name])[fleet_dir] == "./fleet", name
        assert fleet_dir == fleet_out


def test_commands_parse_with_the_cli(compose: dict[str, Any]) -> None:
    """Every command the compose file runs is accepted by `fleetlearn`'s own parser."""
    parser = build_parser()
    registered = set()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            registered = set(action.choices)
    checked = []
    for name, service in compose["services"].items():
        if "build" not in service:
            continue  # mosquitto, Prometheus, Grafana: their own images
        command = service["command"]
        if command[0] not in registered:
            pytest.skip(f"`fleetlearn {command[0]}` is not built yet ({name} service)")
        parser.parse_args(command)  # SystemExit on any flag the CLI does not accept
        checked.append(name)
    assert checked


def test_dockerfile_installs_the_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fleetlearn"]' in text
    # Every folder the namespace links to (fleetlearn/*) is copied, and the links themselves.
    linked = sorted(p.name for p in (ROOT / "fleetlearn").iterdir() if p.is_symlink())
    assert set(linked) >= {"shared", "transport", "aggregator", "device", "firmware_sim", "broker"}
    for package in ["fleetlearn", *linked]:
        assert f"COPY {package} ./{package}" in text
    # The aggregator in the image can run private rounds (dp-accounting: docs/privacy.md).
    install = next(line for line in text.splitlines() if line.startswith("RUN pip install"))
    extras = install.split('".[', 1)[1].split("]", 1)[0].split(",")
    assert {"sim", "privacy", "dashboard"} <= set(extras)


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a running process."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x[:4] == "Uid:")
    return [int(v) for v in line.split()[1:]]


@pytest.mark.broker
async def test_production_conf_runs_in_real_mosquitto(reachable_tmp: Path) -> None:
    """The production conf, paths pointed at a temporary fleet, in the real mosquitto: as in
    the image, provision hands passwd and acl to the broker's user, which mosquitto drops to
    when started as root; client ids are bound to usernames."""
    binary = require_mosquitto()
    fleet = reachable_tmp / "fleet"
    data = reachable_tmp / "data"
    data.mkdir(mode=0o700)
    owner = None
    if os.geteuid() == 0:
        account = pwd.getpwnam(BROKER_USER)
        owner = (account.pw_uid, account.pw_gid)
        os.chown(data, *owner)
    prov.provision(fleet, "plant-7", ["dev-0001", "dev-0002"], broker_owner=owner)
    for name in ("passwd", "acl"):
        assert stat.S_IMODE((fleet / name).stat().st_mode) == 0o640, name
    port = free_port()
    text = (ROOT / "mosquitto.conf").read_text()
    text = text.replace("/fleet/", f"{fleet}/").replace("/mosquitto/data/", f"{data}/")
    text = text.replace(f"listener {DEFAULT_PORT}", f"listener {port} 127.0.0.1")
    assert "user root" not in [line.strip() for line in text.splitlines()]
    conf = reachable_tmp / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port) or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        one = prov.load_device(fleet / "devices" / "dev-0001")
        two = prov.load_device(fleet / "devices" / "dev-0002")
        async with aiomqtt.Client(
            "127.0.0.1", port, username=one.username, password=one.password, identifier="dev-0001"
        ) as first:
            status = f"fl/plant-7/dev/{one.device_id}/status"
            # dev-0002's credentials claiming dev-0001's client id get their own session.
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                username=two.username,
                password=two.password,
                identifier="dev-0001",
            ):
                await first.publish(status, b"still here", qos=1)  # fails if it was kicked
            assert 0 not in _uids(proc.pid)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, username="dev-0001", password="bad"):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (data / "mosquitto.db").is_file()  # persisted on shutdown, by the dropped user


def test_the_grafana_dashboard_queries_only_documented_series() -> None:
    """Every series the Grafana dashboard plots is one the dashboard's /metrics serves (the
    table of docs/dashboard.md, which tests/test_dashboard_web.py holds /metrics to), with
    the labels it has; and every documented series is plotted somewhere."""
    from tests.test_dashboard_web import documented_series

    documented = documented_series()
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "fleetlearn.json").read_text())
    used: set[str] = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "fleetlearn-prometheus", panel["title"]
        for target in panel["targets"]:
            for name, labels in re.findall(r"(fleetlearn_[a-z_]+)(\{[^}]*\})?", target["expr"]):
                assert name in documented, (panel["title"], name)
                for label in re.findall(r"([a-z_]+)=", labels):
                    assert label == documented[name]["label"], (panel["title"], name, label)
                used.add(name)
            for label in re.findall(r"by \(([a-z_]+)\)", target["expr"]):
                names = re.findall(r"fleetlearn_[a-z_]+", target["expr"])
                assert all(documented[n]["label"] == label for n in names), target["expr"]
    assert used == set(documented), set(documented) - used
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))

"""Faults over a real mosquitto: late devices, a SIGKILLed aggregator, a restarted broker,
forged and tampered releases, and the metrics topic read by the real mosquitto_sub."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.shared import topics, wire
from fleetlearn.shared.release import ModelRelease, release_weights, verify_release
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from tests.conftest import require_mosquitto
from tests.fleet_harness import FAST_STAGES, Harness, fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
# Fixed stage lengths (soft = hard): COLLECT closes 7 s after SHARE closed (a plain round's
# COLLECT: 7 s after the announcement), whoever answered.
SHORT = {
    "stages.advertise": "2",
    "stages.advertise_hard": "2",
    "stages.share": "2",
    "stages.share_hard": "2",
    "stages.collect": "7",
    "stages.collect_hard": "7",
    "stages.unmask": "3",
    "stages.unmask_hard": "3",
}


def _client(h: Harness, user: str, password: str, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        h.broker.host, h.broker.port, username=user, password=password, identifier=ident, timeout=10
    )


async def _retained(h: Harness, topic: str, user: str, password: str) -> bytes:
    async with _client(h, user, password, f"probe-{time.monotonic_ns()}") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            msg = await anext(aiter(c.messages))
        return bytes(msg.payload)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ 6.2


async def test_late_device_is_excluded_and_counted(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 6) as h:
        slow = "dev-0002"

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            if kind is topics.Kind.MASKED:
                await asyncio.sleep(10)  # past COLLECT's hard limit (7 s after SHARE closed)
            return True

        h.hooks[slow] = hook
        h.start_devices()
        service, summaries = await h.run_aggregator(timeout=90, **{"rounds.count": "1", **SHORT})
        r1 = summaries[0]
        assert r1.state == "closed", r1.metrics["reason"]
        assert slow not in r1.survivors
        assert len(r1.survivors) == 5
        assert r1.metrics["stragglers"] >= 1
        assert r1.metrics["stages"]["collect"]["dropped"] == 1
        dropped = [
            e
            for e in service.recent_events
            if e["event"] == "stage_closed" and e["stage"] == "collect"
        ]
        assert dropped[0]["dropped"] == [slow]
        # The late masked input reached the broker after the round; it changed nothing: the
        # applied update is the survivors' weighted mean (checked in the dropout test), and the
        # slow device's input is not part of it.
        assert r1.metrics["dropouts_recovered"] == 1  # its pairwise masks were removed


async def test_late_plain_update_has_no_effect(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 5) as h:
        slow = "dev-0004"
        arrived = asyncio.Event()
        sent_at: list[float] = []

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            if kind is topics.Kind.UPDATE and round_id == 1:
                await asyncio.sleep(9.5)  # past the collect limit (7 s after the announcement)
                sent_at.append(time.time())
                arrived.set()
            return True

        h.hooks[slow] = hook
        h.start_devices()
        service = h.aggregator(
            **{"rounds.count": "2", "rounds.mode": "plain", **SHORT, "rounds.settle": "3"}
        )
        async with asyncio.timeout(120):
            summaries = await service.run()
        r1 = summaries[0]
        assert r1.state == "closed"
        assert slow not in r1.survivors
        assert r1.metrics["stages"]["collect"]["dropped"] == 1
        assert arrived.is_set()
        late = [e for e in service.recent_events if e["event"] == "late" and e["device"] == slow]
        assert late, "the late update was not counted"
        assert service.engine.late_after_close[1] == 1
        assert r1.metrics["survivors"] == 4
        # No effect: round 1's release was built and stored before the late update was even
        # sent, the late update was refused as late, and round 2 is a new round of its own.
        db = sqlite3.connect(h.state_dir / "fleetlearn.sqlite3")
        try:
            created = dict(db.execute("SELECT version, created_at FROM releases").fetchall())
        finally:
            db.close()
        assert created[2] < sent_at[0]
        assert sorted(created) == [1, 2, 3]
        assert summaries[1].state == "closed"
        assert slow in summaries[1].survivors  # on time in round 2


# ------------------------------------------------------------------------------------ 6.3


def _aggregator_cmd(h: Harness, rounds: int, extra: dict[str, str]) -> list[str]:
    cmd = [
        sys.executable, "-m", "fleetlearn", "aggregator",
        "--broker", h.broker.url, "--fleet", h.fleet, "--fleet-dir", str(h.fleet_dir),
        "--state-dir", str(h.state_dir), "--rounds", str(rounds), "--cohort", str(len(h.devices)),
    ]  # fmt: skip
    sets = {
        "rounds.over_select": "1.0",
        "rounds.wait_for_devices": "20",
        "rounds.settle": "1",
        "training.max_samples": "256",
        **FAST_STAGES,
        **extra,
    }
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def _rounds_table(state_dir: Path) -> list[tuple[int, str, str, int | None]]:
    """The aggregator's rounds; none while it has not made its database (polled while the
    aggregator starts: never create the file, never assume the schema is there yet)."""
    path = state_dir / "fleetlearn.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        made = db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'rounds'"
        ).fetchone()[0]
        if not made:
            return []
        return db.execute(
            "SELECT round_id, status, reason, new_version FROM rounds ORDER BY round_id"
        ).fetchall()
    finally:
        db.close()


def _versions(state_dir: Path) -> list[int]:
    db = sqlite3.connect(state_dir / "fleetlearn.sqlite3")
    try:
        return [r[0] for r in db.execute("SELECT version FROM releases ORDER BY version")]
    finally:
        db.close()


async def test_aggregator_sigkill_mid_round_and_restart(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 6) as h:

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            if round_id == 2 and kind is topics.Kind.MASKED:
                # Keep round 2 open long enough to kill it. (The hook delays this device's
                # message queue, so it must end before the restarted aggregator's next round.)
                await asyncio.sleep(2.5)
            return True

        for dev in h.devices:
            h.hooks[dev] = hook
        h.start_devices()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.Popen(
            _aggregator_cmd(h, 0, {}),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(600):
                await asyncio.sleep(0.1)
                if any(r[0] == 2 and r[1] == "running" for r in _rounds_table(h.state_dir)):
                    break
            else:
                raise AssertionError("round 2 never started")
            await asyncio.sleep(0.5)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        assert _rounds_table(h.state_dir)[1][1] == "running"  # killed mid-round
        assert _versions(h.state_dir) == [1, 2]

        user = h.observer()  # not dev-0001's own credentials: that device is running
        watcher = _client(h, user.username, user.password, "watcher")
        async with watcher:
            await watcher.subscribe(topics.model(h.fleet), qos=1)
            retained = await anext(aiter(watcher.messages))
            assert wire.decode(bytes(retained.payload), ModelRelease).manifest.version == 2  # type: ignore[arg-type]
            second = await asyncio.create_subprocess_exec(
                *_aggregator_cmd(h, 1, {}),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            # the restarted aggregator republishes the latest release (live, not retained)
            async with asyncio.timeout(30):
                live = await anext(aiter(watcher.messages))
            assert wire.decode(bytes(live.payload), ModelRelease).manifest.version == 2  # type: ignore[arg-type]
            # ... and announces that round 2 is over, on the round topic
            await watcher.subscribe(topics.round_announce(h.fleet), qos=1)
            rounds_seen = []
            async with asyncio.timeout(60):
                async for msg in watcher.messages:
                    if str(msg.topic) == topics.round_announce(h.fleet):
                        rounds_seen.append(wire.decode(bytes(msg.payload), RoundAnnounce))  # type: ignore[arg-type]
                        if rounds_seen[-1].round_id == 3:
                            break
            out, _ = await asyncio.wait_for(second.communicate(), timeout=120)
        assert second.returncode == 0, out.decode()
        table = _rounds_table(h.state_dir)
        assert [(r[0], r[1]) for r in table] == [(1, "done"), (2, "aborted"), (3, "done")], table
        assert table[1][2] == "aggregator restarted during the round"
        assert [r[3] for r in table] == [2, None, 3]
        assert _versions(h.state_dir) == [1, 2, 3]  # none lost, none duplicated
        aborted = [a for a in rounds_seen if a.round_id == 2]
        assert aborted, [(a.round_id, a.state) for a in rounds_seen]
        assert aborted[-1].state is RoundState.ABORTED
        assert aborted[-1].reason == "aggregator restarted during the round"
        ann = await _retained(h, topics.round_announce(h.fleet), user.username, user.password)
        assert wire.decode(ann, RoundAnnounce).round_id == 3


# ------------------------------------------------------------------------------------ 6.4


async def test_broker_restart_mid_round(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 6, persistence=True) as h:

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            if round_id == 1 and kind is topics.Kind.SHARES:
                await asyncio.sleep(1.0)
            return True

        for dev in h.devices:
            h.hooks[dev] = hook
        h.start_devices()
        service = h.aggregator(**{"rounds.count": "2", "rounds.settle": "2"})
        run = asyncio.create_task(service.run())
        for _ in range(300):
            await asyncio.sleep(0.1)
            if service.engine.running:
                break
        else:
            raise AssertionError("round 1 never started")
        await asyncio.sleep(0.3)
        h.broker.stop()
        await asyncio.sleep(2.0)
        h.broker.start()
        async with asyncio.timeout(180):
            summaries = await run
        r1, r2 = summaries
        assert r1.state == "closed" or r1.metrics["reason"], r1.metrics
        assert r2.state == "closed", r2.metrics["reason"]
        assert service.link.connects >= 2
        assert service.ingest.connects >= 2
        assert all(a.link.connects >= 2 for a in h.agents.values())


# ------------------------------------------------------------------------------------ 6.5


async def test_forged_and_tampered_releases(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 4) as h:
        h.start_devices()
        _, summaries = await h.run_aggregator(timeout=90, **{"rounds.count": "1"})
        assert summaries[0].new_version == 2
        for _ in range(100):
            if all(a.participant.model_version == 2 for a in h.agents.values()):
                break
            await asyncio.sleep(0.1)
        agg = prov.load_aggregator(h.fleet_dir)
        dev = h.observer()  # a device's credentials, of one that is not running
        genuine = await _retained(h, topics.model(h.fleet), dev.username, dev.password)
        release = wire.decode(genuine, ModelRelease)

        # 1. a device's credentials cannot publish a release: the ACL drops it
        model, _ = verify_release(release, agg.identity.verify_key, min_version=2)
        forged = release_weights(
            model,
            np.zeros(release.manifest.parameter_count, np.float32),
            version=3,
            signing_key=dev.identity,
        )
        async with _client(h, dev.username, dev.password, "forger") as c:
            await c.publish(topics.model(h.fleet), wire.encode(forged), qos=1, retain=True)
        assert await _retained(h, topics.model(h.fleet), dev.username, dev.password) == genuine

        # 2. with the aggregator's credentials, a tampered release reaches devices: all refuse
        tampered_zst = bytearray(release.model_zst)
        tampered_zst[len(tampered_zst) // 2] ^= 0x01
        tampered = ModelRelease(
            manifest=release.manifest,
            model_size=release.model_size,
            model_zst=bytes(tampered_zst),
            signature=release.signature,
        )
        bumped = release_weights(
            model,
            np.ones(release.manifest.parameter_count, np.float32),
            version=3,
            signing_key=agg.identity,
        )
        resigned = ModelRelease(
            manifest=bumped.manifest,
            model_size=bumped.model_size,
            model_zst=bumped.model_zst,
            signature=bytes(64),
        )
        async with _client(h, agg.username, agg.password, "attacker") as c:
            await c.publish(topics.model(h.fleet), wire.encode(tampered), qos=1, retain=True)
            await asyncio.sleep(1.0)
            await c.publish(topics.model(h.fleet), wire.encode(resigned), qos=1, retain=True)
            await asyncio.sleep(1.5)
            statuses = {}
            await c.subscribe(f"fl/{h.fleet}/dev/+/status", qos=1)
            async with asyncio.timeout(10):
                async for msg in c.messages:
                    s = wire.decode(bytes(msg.payload), wire.DeviceStatus)  # type: ignore[arg-type]
                    statuses[s.device_id] = s
                    if len(statuses) == len(h.devices):
                        break
        for d, agent in h.agents.items():
            assert agent.participant.model_version == 2, d
            assert agent.trainer is not None
            assert agent.trainer.version == 2
            assert len(agent.participant.refused) == 2, agent.participant.refused
            assert statuses[d].model_version == 2
            assert "refused" in statuses[d].note, statuses[d].note


# ------------------------------------------------------------------------------------ 6.7


def _documented_metrics_fields() -> dict[str, str]:
    text = (ROOT / "docs" / "topics.md").read_text()
    section = text.split("## `fl/{fleet}/metrics`", 1)[1].split("\n## ", 1)[0]
    fields = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            fields[cells[0].strip("`")] = cells[3]
    return fields


def test_documented_metrics_fields_parse() -> None:
    fields = _documented_metrics_fields()
    assert len(fields) >= 25
    assert fields["round"] == "all"
    assert fields["update_norm"] == "applied"


async def test_metrics_topic_read_with_mosquitto_sub(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 4) as h:
        h.start_devices()
        _, summaries = await h.run_aggregator(timeout=90, **{"rounds.count": "1"})
        assert summaries[0].state == "closed"
        password = prov.dashboard_password(h.fleet_dir)
        out = subprocess.run(
            ["mosquitto_sub", "-h", h.broker.host, "-p", str(h.broker.port), "-u", "dashboard",
             "-P", password, "-t", topics.metrics(h.fleet), "-C", "1", "-W", "10"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        data = json.loads(out.stdout)
        documented = _documented_metrics_fields()
        # A classifier's round, without a test set at the aggregator: the fields of the other
        # tasks and of `eval.data` are absent.
        others = ("eval.data", "regression", "anomaly", "privacy", "async")
        expected = {name for name, present in documented.items() if present not in others}
        assert set(data) == expected, set(data) ^ expected
        types = {
            "integer": int,
            "number": (int, float),
            "string": str,
            "object": dict,
            "array": list,
        }
        section = (ROOT / "docs" / "topics.md").read_text()
        for name, value in data.items():
            row = re.search(rf"\| `{name}` \| ([^|]+) \|", section)
            assert row is not None
            declared = row.group(1).strip()
            if value is None:
                assert "null" in declared, name
                continue
            expected = types[declared.split(" or ")[0]]
            assert isinstance(value, expected), (name, value, declared)
        assert data["round"] == 1
        assert data["state"] == "closed"
        assert data["new_version"] == 2
        # the dashboard user cannot read round traffic
        denied = subprocess.run(
            ["mosquitto_sub", "-h", h.broker.host, "-p", str(h.broker.port), "-u", "dashboard",
             "-P", password, "-t", topics.round_announce(h.fleet), "-C", "1", "-W", "2"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert denied.stdout == ""

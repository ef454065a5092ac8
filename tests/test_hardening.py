"""Issue 13 over real brokers and processes: what used to stop the fleet no longer does.

- a malformed retained status (31 bytes, nested 1000 deep) is counted, on every restart too;
- a bug while handling one message costs that message, not the aggregator;
- SIGTERM/SIGINT end an aggregator that is still waiting for an unreachable broker, and the
  failed connection is logged with its reason;
- a device restarted next to an older, validly signed retained release keeps its newer one;
- `round_closed` is never sent for a round whose release is not committed, and a crash between
  the commit and the announcements does not turn a closed round into an aborted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import zstandard

from fleetlearn.aggregator.service import RoundsAbortedError
from fleetlearn.aggregator.store import Store
from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import free_port
from fleetlearn.shared import tflite, topics, wire
from fleetlearn.shared.release import ModelRelease, make_release, release_weights
from tests.conftest import require_mosquitto
from tests.fleet_harness import Harness, fleet

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
# The payload from issue 13: a status map whose version field is nested 1000 lists deep.
DEEP_STATUS = zstandard.ZstdCompressor(write_content_size=True).compress(
    b"\x81\xa1v" + b"\x91" * 1000 + b"\xc0"
)
ONE_ROUND = {"rounds.count": "1", "rounds.cohort": "3", "rounds.min_cohort": "3"}


def _client(h: Harness, user: str, password: str, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        h.broker.host, h.broker.port, username=user, password=password, identifier=ident, timeout=10
    )


async def _publish_as_device(h: Harness, device: str, topic: str, payload: bytes) -> None:
    creds = prov.load_device(h.fleet_dir / "devices" / device)
    async with _client(h, creds.username, creds.password, creds.username) as c:
        await c.publish(topic, payload, qos=1, retain=True)


async def _publish_as_aggregator(h: Harness, topic: str, payload: bytes) -> None:
    creds = prov.load_aggregator(h.fleet_dir)
    async with _client(h, creds.username, creds.password, f"{creds.username}-test") as c:
        await c.publish(topic, payload, qos=1, retain=True)


# ------------------------------------------------------------------------------ bad input


async def test_retained_deep_nesting_status_is_counted_also_after_a_restart(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    assert len(DEEP_STATUS) <= 31
    async with fleet(tmp_path, 4) as h:
        attacker = h.devices[0]
        await _publish_as_device(h, attacker, topics.status(h.fleet, attacker), DEEP_STATUS)
        for dev in h.devices[1:]:
            h.start_device(dev)
        for run in range(2):  # the retained garbage is delivered again after each restart
            service, summaries = await h.run_aggregator(timeout=120, **ONE_ROUND)
            assert [s.state for s in summaries] == ["closed"], run
            assert service.engine.rejected_total["bad_payload"] >= 1
            assert summaries[0].metrics["rejected_total"]["bad_payload"] >= 1
            refused = [
                e
                for e in service.recent_events
                if e["event"] == "rejected" and e.get("device") == attacker
            ]
            assert refused, list(service.recent_events)
            assert "status" in refused[0]["detail"]


async def test_a_failure_handling_one_message_costs_only_that_message(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 4) as h:
        h.start_devices()
        service = h.aggregator(**{"rounds.count": "1"})
        receive = service.engine.receive
        failed: list[str] = []

        def flaky_receive(topic: topics.Topic, payload: bytes, now: float, **kw: Any) -> Any:
            if topic.kind is topics.Kind.MASKED and not failed:
                failed.append(topic.device_id or "")
                raise RuntimeError("a bug on this one message")
            return receive(topic, payload, now, **kw)

        service.engine.receive = flaky_receive  # type: ignore[method-assign]
        async with asyncio.timeout(120):
            summaries = await service.run()
        assert [s.state for s in summaries] == ["closed"]
        assert failed
        assert service.engine.rejected_total["internal_error"] == 1
        # The device whose masked input was lost is a dropout the protocol recovered from.
        assert failed[0] not in summaries[0].survivors
        assert summaries[0].metrics["dropouts_recovered"] >= 1


# ------------------------------------------------------------------------------- signals


def _aggregator_waiting_for(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    fleet_dir = tmp_path / "fleet"
    prov.provision(fleet_dir, "plant-7", prov.device_ids(3))
    cmd = [
        sys.executable, "-m", "fleetlearn", "aggregator",
        "--broker", f"mqtt://127.0.0.1:{port}", "--fleet", "plant-7",
        "--fleet-dir", str(fleet_dir), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_an_aggregator_waiting_for_an_unreachable_broker(
    tmp_path: Path, sig: signal.Signals
) -> None:
    port = free_port()  # nothing listens there
    proc = _aggregator_waiting_for(tmp_path, port)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "refused" in line and f"127.0.0.1:{port}" in line:
                break
        else:
            raise AssertionError("no warning about the failed connection:\n" + "".join(lines))
        assert any("WARNING" in line and "refused" in line for line in lines), lines
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            raise AssertionError("the aggregator ignored the signal:\n" + "".join(lines))
    assert proc.returncode == 0, "".join(lines) + out
    assert "Traceback" not in "".join(lines) + out


# ------------------------------------------------------------------------------ rollback


async def test_a_restarted_device_refuses_an_older_retained_release(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 3) as h:
        creds = prov.load_aggregator(h.fleet_dir)
        base = (ROOT / "aggregator" / "models" / "pdm_default.tflite").read_bytes()
        manifest = tflite.read_manifest(base)
        assert manifest is not None
        base, manifest = tflite.embed_manifest(base, model_id=manifest.model_id, version=1)
        v1 = make_release(base, manifest, creds.identity)
        weights = tflite.flatten(tflite.read_weights(base), manifest.layout)
        v2 = release_weights(
            base, (weights + 0.01).astype(np.float32), version=2, signing_key=creds.identity
        )
        model_topic = topics.model(h.fleet)
        device = h.devices[0]

        await _publish_as_aggregator(h, model_topic, wire.encode(v2))
        h.start_device(device)
        await _until(lambda: h.agents[device].participant.model_version == 2, 60)
        await h.stop_device(device)

        # Someone with the aggregator's topic rights (or a restored broker backup) puts the
        # older, validly signed v1 back as the retained model; then the device restarts.
        await _publish_as_aggregator(h, model_topic, wire.encode(v1))
        h.start_device(device)
        agent = h.agents[device]
        await _until(lambda: agent.stats.releases_refused >= 1, 60)
        assert agent.participant.model_version == 2
        assert agent.trainer is not None
        assert agent.trainer.version == 2
        assert "roll back" in agent.participant.refused[-1]
        status = await _retained_status(h, device)
        assert status.model_version == 2
        assert "roll back" in status.note


async def _retained_status(h: Harness, device: str) -> wire.DeviceStatus:
    creds = prov.load_aggregator(h.fleet_dir)
    topic = topics.status(h.fleet, device)
    async with _client(h, creds.username, creds.password, f"{creds.username}-probe") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(20):
            async for msg in c.messages:
                status = wire.decode(bytes(msg.payload), wire.DeviceStatus)  # type: ignore[arg-type]
                if status.note:
                    return status
    raise AssertionError("unreachable")


async def _until(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.1)


# --------------------------------------------------------------- events vs persisted state


async def test_round_closed_is_not_sent_when_the_update_is_not_applied(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 3) as h:
        h.start_devices()
        service = h.aggregator(**ONE_ROUND, **{"rounds.max_aborts": "1"})

        class Diverged:  # an optimizer step that blows up: the update must not be applied
            state: dict[str, np.ndarray] = {}

            def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
                return np.full_like(weights, np.nan)

        service.optimizer = Diverged()  # type: ignore[assignment]
        with pytest.raises(RoundsAbortedError):  # rounds.max_aborts = 1: no retry
            async with asyncio.timeout(120):
                await service.run()
        summaries = list(service.summaries)
        assert [s.state for s in summaries] == ["aborted"]
        assert summaries[0].metrics["reason"].startswith("update not applied")
        ends = [e for e in service.recent_events if e["event"].startswith("round_")]
        assert [(e["event"], e["round"]) for e in ends if e["event"] != "round_started"] == [
            ("round_aborted", 1)
        ], ends
        store = Store(h.state_dir)
        try:
            assert [(r.round_id, r.status) for r in store.rounds()] == [(1, "aborted")]
            assert store.latest_version() == 1
        finally:
            store.close()


class _Crash(BaseException):
    """Stands for the process dying at one instant (raised past every `except Exception`)."""


async def test_a_crash_after_the_release_is_committed_keeps_the_round_closed(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 3) as h:
        h.start_devices()
        first = h.aggregator(**ONE_ROUND)
        publish = first.link.publish
        model_topic = topics.model(h.fleet)

        async def dies_on_new_release(topic: str, payload: bytes, **kw: Any) -> None:
            if topic == model_topic:
                release = wire.decode(payload, ModelRelease)
                if release.manifest.version >= 2:
                    raise _Crash  # the new release is persisted; the process dies here
            await publish(topic, payload, **kw)

        first.link.publish = dies_on_new_release  # type: ignore[method-assign]
        with pytest.raises(BaseException) as crashed:  # noqa: PT011 - any form the crash takes
            async with asyncio.timeout(120):
                await first.run()
        assert crashed.errisinstance((_Crash, BaseExceptionGroup))

        # Restart on the same state directory, watching what dashboards would see.
        dash = prov.dashboard_password(h.fleet_dir)
        seen: list[dict[str, Any]] = []
        async with _client(h, "dashboard", dash, "dashboard") as watcher:
            await watcher.subscribe(topics.events(h.fleet), qos=1)
            await watcher.subscribe(topics.metrics(h.fleet), qos=1)

            async def watch() -> None:
                async for msg in watcher.messages:
                    seen.append({"topic": str(msg.topic), **json.loads(bytes(msg.payload))})  # type: ignore[arg-type]

            watching = asyncio.create_task(watch())
            try:
                second = h.aggregator(**ONE_ROUND)
                async with asyncio.timeout(120):
                    summaries = await second.run()
                await asyncio.sleep(1.0)
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        store = Store(h.state_dir)
        try:
            table = [(r.round_id, r.status, r.new_version) for r in store.rounds()]
        finally:
            store.close()
        assert table == [(1, "done", 2), (2, "done", 3)], table
        assert [s.state for s in summaries] == ["closed"]
        round1 = [m for m in seen if m.get("round") == 1]
        assert not [m for m in round1 if m.get("event") == "round_aborted"], round1
        assert not [m for m in round1 if m.get("state") == "aborted"], round1
        # The restarted aggregator republished round 1's summary as stored: closed, v2.
        summary = [m for m in round1 if m["topic"] == topics.metrics(h.fleet)]
        assert summary, seen
        assert summary[0]["state"] == "closed"
        assert summary[0]["new_version"] == 2

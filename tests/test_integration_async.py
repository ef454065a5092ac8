"""Asynchronous rounds (FedBuff) over a real mosquitto: releases every `fedbuff.buffer`
updates, a stale update refused and counted, and an aggregator SIGKILLed with a half-full
buffer that loses no release version."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from fleetlearn.shared import topics
from tests.conftest import require_mosquitto
from tests.fleet_harness import fleet
from tests.test_integration_faults import (
    ROOT,
    _aggregator_cmd,
    _documented_metrics_fields,
    _rounds_table,
    _versions,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ASYNC = {
    "rounds.mode": "async",
    "fedbuff.buffer": "3",
    "fedbuff.concurrency": "6",
    "compression.sparsity": "dense",
    "rounds.min_cohort": "1",
    # An invitation lapses after collect_hard: room for a loaded machine.
    "stages.collect": "30",
    "stages.collect_hard": "90",
}


async def test_async_rounds_release_every_buffer_and_refuse_a_stale_update(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 8) as h:
        slow = h.devices[0]
        held: list[int] = []

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            # slow's first update waits until the fleet is two releases past the version it
            # trained from (round r of an async run trains v <= r): it arrives stale.
            if kind is topics.Kind.UPDATE and not held:
                held.append(round_id)
                while max(a.participant.model_version for a in h.agents.values()) < round_id + 2:  # noqa: ASYNC110 (polls other devices' state; nothing to wait on)
                    await asyncio.sleep(0.1)
            return True

        h.hooks[slow] = hook
        h.start_devices()
        service, summaries = await h.run_aggregator(
            timeout=240,
            # Every device is invited in round 1 (concurrency 8 of 8): slow's update from v1
            # then waits for v3 while rounds still run.
            **{
                **ASYNC,
                "rounds.count": "5",
                "fedbuff.max_staleness": "1",
                "fedbuff.concurrency": "8",
            },
        )
        await h.stop_all()
    assert [s.state for s in summaries if s.state == "closed"] == ["closed"] * 5
    closed = [s for s in summaries if s.state == "closed"]
    assert [s.new_version for s in closed] == [2, 3, 4, 5, 6]
    for s in closed:
        figures = s.metrics["async"]
        assert figures["updates_applied"] == 3
        assert sum(figures["staleness"].values()) == 3
        assert all(int(t) <= 1 for t in figures["staleness"])
        assert s.metrics["mode"] == "async"
    assert held == [1]
    # slow's update was refused as stale and counted (on a loaded machine another device's
    # may be too: every count covers all of them).
    stale = [e for e in service.recent_events if e.get("reason") == "stale"]
    assert slow in {e["device"] for e in stale}
    detail = next(e for e in stale if e["device"] == slow)["detail"]
    behind = re.match(r"trained from v1, (\d+) releases behind v(\d+);", detail)
    assert behind is not None, detail
    assert int(behind.group(1)) >= 2
    assert service.engine.rejected_total["stale"] == len(stale)
    assert closed[-1].metrics["rejected_total"]["stale"] == len(stale)
    assert closed[-1].metrics["async"]["stale_refused_total"] == len(stale)
    # Every field of an async summary is documented (docs/topics.md), `async` among them.
    documented = _documented_metrics_fields()
    assert documented["async"] == "async"
    assert set(closed[-1].metrics) <= set(documented), set(closed[-1].metrics) - set(documented)


async def test_sigkill_mid_buffer_loses_no_release_version(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 6) as h:
        sent = 0
        gate = asyncio.Event()

        async def hook(kind: topics.Kind, round_id: int) -> bool:
            # The first 7 updates go out: two releases of 3, and one in the third buffer.
            # Later ones wait at the devices until the aggregator was killed and restarted.
            nonlocal sent
            if kind is topics.Kind.UPDATE:
                sent += 1
                if sent > 7:
                    await gate.wait()
            return True

        for dev in h.devices:
            h.hooks[dev] = hook
        h.start_devices()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.Popen(
            _aggregator_cmd(h, 0, ASYNC),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(1200):
                await asyncio.sleep(0.1)
                if sent >= 8 and any(r[0] == 3 for r in _rounds_table(h.state_dir)):
                    break
            else:
                raise AssertionError(f"{sent} updates sent; round 3 never started")
            await asyncio.sleep(1.0)  # the 7th update reaches the aggregator's buffer
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        table = _rounds_table(h.state_dir)
        assert [(r[0], r[1], r[3]) for r in table] == [
            (1, "done", 2),
            (2, "done", 3),
            (3, "running", None),
        ], table
        assert _versions(h.state_dir) == [1, 2, 3]
        second = await asyncio.create_subprocess_exec(
            *_aggregator_cmd(h, 2, ASYNC),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        gate.set()  # the held updates answer invitations the restart forgot: refused
        out, _ = await asyncio.wait_for(second.communicate(), timeout=180)
        await h.stop_all()
    assert second.returncode == 0, out.decode()
    table = _rounds_table(h.state_dir)
    assert [(r[0], r[1], r[3]) for r in table] == [
        (1, "done", 2),
        (2, "done", 3),
        (3, "aborted", None),
        (4, "done", 4),
        (5, "done", 5),
    ], table
    assert table[2][2] == "aggregator restarted during the round"
    assert _versions(h.state_dir) == [1, 2, 3, 4, 5]  # none lost, none duplicated


async def test_secure_async_groups_release_only_sums_of_the_buffer(tmp_path: Path) -> None:
    require_mosquitto()
    async with fleet(tmp_path, 8) as h:
        h.start_devices()
        _service, summaries = await h.run_aggregator(
            timeout=240,
            **{
                **ASYNC,
                "rounds.mode": "async-secure",
                "rounds.count": "3",
                "rounds.min_cohort": "3",
                "fedbuff.buffer": "3",
                "rounds.over_select": "1.33",  # groups of 4, at least 3 survivors
            },
        )
        await h.stop_all()
    closed = [s for s in summaries if s.state == "closed"]
    assert [s.new_version for s in closed] == [2, 3, 4]
    for s in closed:
        assert s.metrics["mode"] == "async-secure"
        assert s.metrics["cohort"] == 4
        assert s.metrics["survivors"] >= 3
        figures = s.metrics["async"]
        assert figures["updates_applied"] == s.metrics["survivors"]
        assert sum(figures["staleness"].values()) == s.metrics["survivors"]
        assert s.metrics["stages"]["unmask"]["closed_by"] in ("complete", "quorum")

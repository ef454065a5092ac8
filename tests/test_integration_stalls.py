"""Hung devices over a real mosquitto (issue 13, item 8): half of a 36-device fleet is frozen
with SIGSTOP. Their connections stay open until the broker's keepalive runs out, so they still
look online and eligible; the engine has to notice that they stall, leave them out, retry at
once with a fresh cohort, and close rounds again no later than the round after the stall."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiomqtt
import pytest

from fleetlearn.aggregator.service import AggregatorService, RoundSummary, default_model
from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings
from fleetlearn.firmware_sim.fleet import SimSpec, Simulator
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import tflite, topics, wire
from fleetlearn.shared.release import make_release
from tests.conftest import require_mosquitto
from tests.fleet_harness import Harness

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STAGES = {
    "stages.advertise": "2",
    "stages.share": "2",
    "stages.collect": "4",
    "stages.unmask": "2",
    "stages.advertise_hard": "6",
    "stages.share_hard": "6",
    "stages.collect_hard": "12",
    "stages.unmask_hard": "6",
}


def _wait_loaded(sim: Simulator, count: int, timeout: float) -> None:
    """Until `count` devices run release v1 (and so have published an eligible status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.poll()["models"].get(1, 0) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"devices did not load v1: {sim.poll()['models']}")


async def _publish_release_v1(broker: BrokerProcess, fleet_dir: Path) -> None:
    """The release the aggregator will publish when it starts (same key, same bytes), so the
    devices can load it and look eligible before any round exists."""
    creds = prov.load_aggregator(fleet_dir)
    model = default_model()
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    assert manifest.version == 1
    release = make_release(model, manifest, creds.identity)
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=creds.username,
        password=creds.password,
        identifier="stall-test-release",
    ) as client:
        await client.publish(topics.model("plant-7"), wire.encode(release), qos=1, retain=True)


def _cohorts(state_dir: Path) -> dict[int, set[str]]:
    db = sqlite3.connect(state_dir / "fleetlearn.sqlite3")
    try:
        rows = db.execute("SELECT round_id, cohort FROM rounds ORDER BY round_id").fetchall()
    finally:
        db.close()
    return {r: set(json.loads(c)) for r, c in rows}


async def test_sigstopped_half_of_the_fleet_is_left_out_and_rounds_close(tmp_path: Path) -> None:
    require_mosquitto()
    devices = prov.device_ids(36)
    fleet_dir = tmp_path / "fleet"
    prov.provision(fleet_dir, "plant-7", devices)
    broker = BrokerProcess(
        BrokerSettings(port=0, fleet_dir=fleet_dir),
        "mosquitto",  # runner's own state dir
    )
    broker.start()
    live_ids, hung_ids = devices[:18], devices[18:]

    def spec(ids: list[str]) -> SimSpec:
        return SimSpec(
            broker=broker.url,
            fleet="plant-7",
            fleet_dir=str(fleet_dir),
            devices=tuple(ids),
            scenario=Scenario(),
        )

    live, hung = Simulator(spec(live_ids), procs=1), Simulator(spec(hung_ids), procs=1)
    stopped: list[int] = []
    try:
        await _publish_release_v1(broker, fleet_dir)
        live.start()
        hung.start()
        await asyncio.to_thread(_wait_loaded, live, 18, 120)
        await asyncio.to_thread(_wait_loaded, hung, 18, 120)
        for pid in hung.pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        h = Harness(broker, fleet_dir, "plant-7", devices, tmp_path / "state")
        online_after_first: list[str] = []

        def on_round(summary: RoundSummary) -> None:
            if not online_after_first:
                online_after_first.extend(service.engine.online())

        service = AggregatorService(
            h.settings(
                **{
                    "rounds.count": "3",
                    "rounds.max_aborts": "3",
                    "rounds.settle": "1",
                    **STAGES,
                }
            ),
            prov.load_aggregator(fleet_dir),
            prov.load_registry(fleet_dir),
            on_round=on_round,
        )
        async with asyncio.timeout(240):
            summaries = await service.run()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        await asyncio.to_thread(hung.stop)
        await asyncio.to_thread(live.stop)
        broker.close()

    hung_set = set(hung_ids)
    first = summaries[0].metrics
    # Round 1 chose everyone: the hung half never advertised and the stage waited for its
    # hard limit (too few for the quorum), then aborted or went on with the live half.
    assert first["cohort"] == 36
    assert first["stages"]["advertise"]["dropped"] == 18
    assert first["stages"]["advertise"]["closed_by"] == "hard_limit"
    # They still looked online to the aggregator when round 2 was chosen: they were left out
    # because they stalled, not because the broker had given up on them.
    assert hung_set <= set(online_after_first)
    cohorts = _cohorts(tmp_path / "state")
    assert hung_set <= cohorts[1]
    for round_id, cohort in cohorts.items():
        if round_id > 1:
            assert not cohort & hung_set, (round_id, sorted(cohort & hung_set))
    # Every round after the stall closed: at most the first aborted, and it was retried.
    states = [s.state for s in summaries]
    assert states[1:] == ["closed"] * (len(states) - 1), [
        (s.round_id, s.state, s.metrics.get("reason")) for s in summaries
    ]
    assert states.count("closed") == 3

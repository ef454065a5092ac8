"""The fleet simulator against a real mosquitto: every scenario knob shows in the round metrics.

Each test runs a small fleet in a worker process (the real `Simulator`) and the aggregator
service in this process, for one or two secure rounds with short stages.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from fleetlearn.broker import provision as prov
from fleetlearn.broker.runner import BrokerProcess, BrokerSettings
from fleetlearn.firmware_sim.fleet import SimSpec, Simulator
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import dataset
from tests.conftest import require_mosquitto
from tests.fleet_harness import Harness, machine_csv

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SHORT = {  # stage durations: soft limit, then hard limit, each from the previous close
    "stages.advertise": "3",
    "stages.share": "3",
    "stages.collect": "4",
    "stages.unmask": "4",
    "stages.advertise_hard": "6",
    "stages.share_hard": "6",
    "stages.collect_hard": "6",
    "stages.unmask_hard": "8",
    "rounds.settle": "1",
    "rounds.wait_for_devices": "30",
}


async def run(
    tmp: Path,
    n: int,
    scenario: str,
    rounds: int = 1,
    data_dir: Path | None = None,
    **overrides: str,
) -> tuple[list[Any], dict[str, Any], Any]:
    require_mosquitto()
    fleet_dir = tmp / "fleet"
    devices = prov.device_ids(n)
    prov.provision(fleet_dir, "plant-7", devices)
    broker = BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet_dir), "mosquitto")
    broker.start()
    parsed = Scenario.parse(scenario)
    spec = SimSpec(
        broker=broker.url,
        fleet="plant-7",
        fleet_dir=str(fleet_dir),
        devices=tuple(devices),
        scenario=parsed,
        data_dir=None if data_dir is None else str(data_dir),
    )
    sim = Simulator(spec, procs=1)
    try:
        sim.start()
        await asyncio.to_thread(sim.wait_connected, n, 60)
        h = Harness(broker, fleet_dir, "plant-7", devices, tmp / "state")
        sets = {"rounds.count": str(rounds), **SHORT, **overrides}
        service, summaries = await h.run_aggregator(timeout=180, **sets)
        totals = sim.poll()
    finally:
        sim.stop()
        broker.close()
    return summaries, totals, service


def _events(service: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in service.recent_events if e["event"] == kind]


async def test_calm_fleet_baseline(tmp_path: Path) -> None:
    summaries, totals, _ = await run(tmp_path, 8, "")
    m = summaries[0].metrics
    assert m["state"] == "closed"
    assert m["survivors"] == 8
    assert m["stragglers"] == 0
    assert totals["dropped_by_scenario"] == 0


def _scenario_with_drops(stage: str, n: int) -> tuple[str, list[int]]:
    """A seed whose draws drop 1-2 of n devices at `stage` in round 1 (few enough that the
    threshold holds, so the round must finish)."""
    for seed in range(1000):
        text = f"[fleet]\nseed = {seed}\n[dropout]\n{stage} = 0.15\n"
        parsed = Scenario.parse(text)
        drops = [i for i in range(n) if parsed.drop_stage(i, 1) == stage]
        if 1 <= len(drops) <= 2:
            return text, drops
    raise AssertionError("no seed found")


@pytest.mark.parametrize("stage", ["advertise", "share", "collect", "unmask"])
async def test_dropout_per_stage(tmp_path: Path, stage: str) -> None:
    text, drops = _scenario_with_drops(stage, 12)
    summaries, totals, _ = await run(tmp_path, 12, text)
    m = summaries[0].metrics
    assert totals["dropped_by_scenario"] == len(drops)
    assert m["state"] == "closed", m["reason"]
    stats = m["stages"][stage]
    if stage == "unmask":
        # their masked inputs are in the sum; the stage need not wait for them
        assert m["survivors"] == 12
        assert stats["dropped"] + stats["not_needed"] >= len(drops)
        assert stats["arrived"] <= 12 - len(drops)
    else:
        assert stats["dropped"] == len(drops)
        assert m["survivors"] == 12 - len(drops)
    if stage == "collect":
        assert m["dropouts_recovered"] == stats["dropped"]
    if stage in ("advertise", "share"):
        assert m["dropouts_recovered"] == 0  # they left before anything needed recovering


async def test_slow_compute_makes_stragglers(tmp_path: Path) -> None:
    # 12 s: past COLLECT's hard limit (6 s after SHARE closed)
    scenario = "[compute]\nslow_fraction = 0.3\nslow_delay = 12.0\n"
    summaries, _, _ = await run(tmp_path, 10, scenario)
    m = summaries[0].metrics
    slow = sum(Scenario.parse(scenario).is_slow(i) for i in range(10))
    assert slow >= 1
    assert m["stages"]["collect"]["dropped"] == slow
    assert m["stragglers"] == slow
    assert m["survivors"] == 10 - slow


async def test_network_latency_delays_every_stage(tmp_path: Path) -> None:
    summaries, _, service = await run(tmp_path, 6, "[network]\nlatency = 0.8\njitter = 0.4\n")
    assert summaries[0].metrics["state"] == "closed"
    closed = {e["stage"]: e["after_s"] for e in _events(service, "stage_closed") if e["round"] == 1}
    # every message waits >= 0.8 s before it leaves the device, and the stages are sequential
    assert closed["advertise"] >= 0.8
    assert closed["share"] >= 1.6
    assert closed["collect"] >= 2.4


async def test_churn_disconnects_and_reconnects(tmp_path: Path) -> None:
    for seed in range(1000):  # 1-2 of 10 devices lose their connection in round 1
        scenario = f"[fleet]\nseed = {seed}\n[churn]\ndisconnect = 0.15\nreconnect_after = 1.0\n"
        lost = [i for i in range(10) if Scenario.parse(scenario).disconnects(i, 1)]
        if 1 <= len(lost) <= 2:
            break
    summaries, totals, _ = await run(tmp_path, 10, scenario, rounds=2, **{"rounds.settle": "4"})
    r1, r2 = (s.metrics for s in summaries)
    assert totals["disconnects_by_scenario"] >= len(lost)
    assert r1["state"] == "closed", r1["reason"]
    assert r1["stages"]["collect"]["dropped"] == len(lost)
    assert r1["dropouts_recovered"] == len(lost)
    assert r2["cohort"] == 10  # everyone came back and was selected again
    assert totals["connected"] == 10


async def test_busy_devices_are_not_selected(tmp_path: Path) -> None:
    scenario = "[eligibility]\nbusy = 0.4\n"
    summaries, _, _ = await run(tmp_path, 10, scenario, **{"rounds.wait_for_devices": "3"})
    idle = sum(not Scenario.parse(scenario).is_busy(i) for i in range(10))
    assert 3 <= idle < 10
    assert summaries[0].metrics["cohort"] == idle


async def test_low_battery_devices_are_not_selected(tmp_path: Path) -> None:
    scenario = "[eligibility]\ncharging = 0.0\nbattery_min = 0.0\nbattery_max = 0.5\n"
    summaries, _, _ = await run(
        tmp_path, 10, scenario, **{"rounds.wait_for_devices": "3", "rounds.battery_floor": "0.2"}
    )
    parsed = Scenario.parse(scenario)
    ok = sum(parsed.battery(i) >= 0.2 for i in range(10))
    assert 3 <= ok < 10
    assert summaries[0].metrics["cohort"] == ok


async def test_samples_per_device_show_in_metrics(tmp_path: Path) -> None:
    summaries, _, _ = await run(tmp_path, 6, "[fleet]\nsamples = 40\n")
    m = summaries[0].metrics
    # Each device holds out about a fifth of its 40 rows (training.eval_fraction, default
    # 0.2) for evaluation and trains on the rest: `samples` counts the first, the weight the
    # rest, so together they are every row of every survivor.
    assert 0 < m["samples"] < 40 * m["survivors"] / 2
    assert m["samples"] + m["weight_sum"] == pytest.approx(40 * m["survivors"], rel=1e-3)


def test_scenario_errors_name_the_key(tmp_path: Path) -> None:
    from fleetlearn.shared.errors import ConfigError

    cases = {
        "[dropout]\nunmask = 1.5\n": "dropout.unmask",
        "[dropout]\nlater = 0.1\n": "dropout.later",
        "[network]\nlatency = 'x'\n": "network.latency",
        "[fleet]\nsamples = 1\n": "fleet.samples",
        "[[sites]]\nname = 'a'\nmachines = { turbine = 1.0 }\n": "sites[0].machines.turbine",
        "[eligibility]\nbattery_min = 0.9\nbattery_max = 0.1\n": "eligibility.battery_min",
        "[weather]\nrain = 1\n": "weather",
        "not toml [": "scenario",
    }
    for text, key in cases.items():
        with pytest.raises(ConfigError) as info:
            Scenario.parse(text)
        assert info.value.key == key, (text, info.value)


def test_sites_and_non_iid_shape_the_data() -> None:
    """The data knobs: site shares set the machine mix; non_iid skews each site's fault mix."""
    import numpy as np

    from fleetlearn.firmware_sim.data import device_machine

    skewed = Scenario.parse("[fleet]\nnon_iid = 0.2\n")
    even = Scenario.parse("[fleet]\nnon_iid = 50.0\n")

    def spread(s: Scenario) -> float:
        mixes = [
            device_machine(s.seed, i, s.site_of(i)[0], s.machine_of(i), s.non_iid).mix
            for i in range(30)
        ]
        return float(np.std(mixes, axis=0).mean())

    assert spread(skewed) > 3 * spread(even)
    one_site = Scenario.parse("[[sites]]\nname = 'x'\nshare = 1\nmachines = { fan = 1.0 }\n")
    assert {one_site.machine_of(i) for i in range(50)} == {"fan"}
    started = time.monotonic()
    assert Scenario().uniform("a", 1) == Scenario().uniform("a", 1)  # reproducible draws
    assert time.monotonic() - started < 1


async def test_partitioned_user_data_drives_the_simulator(tmp_path: Path) -> None:
    """A user's CSV, split by `fleetlearn partition`, is what the simulated devices train on:
    the round's held-out and training rows add up to the rows of their files."""
    from fleetlearn.cli import main

    source = tmp_path / "plant.csv"
    total = machine_csv(source, seed=5, per_machine=60)
    parts = tmp_path / "parts"
    argv = [
        "partition",
        "--data",
        str(source),
        "--devices",
        "6",
        "--scheme",
        "dirichlet",
        "--alpha",
        "1",
        "--min-rows",
        "8",
        "--out",
        str(parts),
    ]
    assert main(argv) == 0
    summaries, _, _ = await run(
        tmp_path, 6, "", data_dir=parts, **{"training.max_samples": str(total)}
    )
    m = summaries[0].metrics
    assert m["state"] == "closed", m.get("reason")
    assert m["survivors"] == 6
    loaded = [dataset.load(f) for f in sorted(parts.glob("*.npz"))]
    assert sum(len(d) for d in loaded) == total
    held = sum(int(dataset.evaluation_rows(d.x, 0.2).sum()) for d in loaded)
    assert m["samples"] == held
    assert m["weight_sum"] == pytest.approx(total - held, rel=1e-3)


async def test_async_rounds_on_heavy_tailed_speeds_and_a_flaky_link(tmp_path: Path) -> None:
    scenario = (
        '[compute]\ntrain_seconds = 0.5\nspeed = "lognormal"\nspeed_sigma = 1.0\n'
        "[network]\nloss = 0.5\n"
    )
    summaries, totals, _ = await run(
        tmp_path,
        10,
        scenario,
        # 16 updates arrive at least: all 16 and more sent without one lost has probability
        # below 2e-5 at loss 0.5.
        rounds=8,
        **{
            "rounds.mode": "async",
            "rounds.min_cohort": "1",
            # Half the updates are lost; a release needs two of those that arrive. A lost
            # one holds its slot until its invitation lapses (8 s), so 6 slots of 10
            # devices leave others to invite meanwhile.
            "fedbuff.buffer": "2",
            "fedbuff.concurrency": "6",
            "compression.sparsity": "dense",
            "stages.collect": "4",
            "stages.collect_hard": "8",
        },
    )
    closed = [s for s in summaries if s.state == "closed"]
    assert len(closed) == 8
    assert all(s.metrics["async"]["updates_applied"] == 2 for s in closed)
    assert totals["lost_by_scenario"] > 0  # lost updates: their invitations lapse
    # Every device's compute time is its lognormal factor times 0.5 s.
    parsed = Scenario.parse(scenario)
    assert len({round(parsed.compute_seconds(i), 6) for i in range(10)}) == 10


async def test_shifts_take_devices_offline_and_back(tmp_path: Path) -> None:
    require_mosquitto()
    fleet_dir = tmp_path / "fleet"
    devices = prov.device_ids(6)
    prov.provision(fleet_dir, "plant-7", devices)
    broker = BrokerProcess(BrokerSettings(port=0, fleet_dir=fleet_dir), "mosquitto")
    broker.start()
    scenario = Scenario.parse("[shifts]\nday = 6.0\nonline = 0.5\n")
    spec = SimSpec(
        broker=broker.url,
        fleet="plant-7",
        fleet_dir=str(fleet_dir),
        devices=tuple(devices),
        scenario=scenario,
    )
    sim = Simulator(spec, procs=1)
    counts: list[int] = []
    try:
        sim.start()
        for _ in range(300):  # at most 60 s; a day of the fleet is 6 s
            await asyncio.sleep(0.2)
            totals = sim.poll()
            counts.append(totals["connected"])
            if totals["shifts_ended"] >= 8 and max(counts) > min(counts):
                break
    finally:
        sim.stop()
        broker.close()
    assert totals["shifts_ended"] >= 8
    low = counts.index(min(counts))
    assert min(counts) < 6  # some devices were off shift...
    assert max(counts[low:]) > min(counts)  # ...and came back for their next one

"""Stage timing (ARCHITECTURE §7): soft and hard limits as durations, quorum closes, stalled
devices left out of selection, device-side limits on the device's own clock, and one meaning
of `[stages]` from the settings file through --print-config to the round announcement.

In memory (tests.test_rounds_inmemory's fleet): the real engine, SecAgg+ and participants,
with time advanced by the test, so every limit is checked exactly rather than raced.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.cli import main as fleetlearn_main
from fleetlearn.device.participant import NoteKind
from fleetlearn.shared import settings, tflite, topics, wire
from fleetlearn.shared.rounds import RoundAnnounce, RoundState, StageTimes
from fleetlearn.shared.secagg.client import SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig, Stage
from fleetlearn.shared.secagg.server import SecAggServer, ServerState
from tests.secagg_support import deterministic_random, graph_draws, identities, tickets_of
from tests.test_rounds_inmemory import MODEL, Fleet, make_fleet, run_round

VERSION = 1


def _times(**overrides: float) -> StageTimes:
    values: dict[str, float] = {
        "advertise": 5.0,
        "share": 5.0,
        "collect": 10.0,
        "unmask": 5.0,
        "advertise_hard": 60.0,
        "share_hard": 60.0,
        "collect_hard": 100.0,
        "unmask_hard": 60.0,
    }
    values.update(overrides)
    return StageTimes(**values)


def _stage_closes(fleet: Fleet, round_id: int = 1) -> dict[str, dict[str, object]]:
    return {
        str(e["stage"]): e
        for e in fleet.engine.events
        if e["event"] == "stage_closed" and e["round"] == round_id
    }


def _start(fleet: Fleet, round_id: int = 1) -> None:
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    fleet.publish(
        fleet.engine.start_round(
            round_id=round_id, model_version=manifest.version, dim=fleet.dim, now=fleet.now
        )
    )


def test_a_stage_closes_after_its_soft_limit_once_a_quorum_answered() -> None:
    fleet = make_fleet(10, times=_times(), quorum=0.8, adapt=False)
    fleet.offline.add("d09")  # hangs: never answers anything
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    adv = out.metrics["stages"]["advertise"]
    assert adv["closed_by"] == "quorum"
    assert adv["arrived"] == 9
    assert adv["dropped"] == 1
    # Closed at the soft limit, not at the hard one (60 s).
    assert adv["seconds"] == pytest.approx(5.0, abs=0.51)
    assert out.metrics["duration_s"] < 60
    # Stages that everyone answered closed at once.
    assert out.metrics["stages"]["share"]["closed_by"] == "complete"
    assert out.metrics["stages"]["share"]["seconds"] < 1


def test_below_a_quorum_a_stage_waits_for_its_hard_limit() -> None:
    fleet = make_fleet(10, times=_times(advertise_hard=20.0), quorum=0.8, adapt=False)
    fleet.offline |= {"d07", "d08", "d09"}  # 7 of 10 answer: below the quorum of 8
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    adv = out.metrics["stages"]["advertise"]
    assert adv["closed_by"] == "hard_limit"
    assert adv["seconds"] == pytest.approx(20.0, abs=0.51)
    assert adv["arrived"] == 7


def test_stage_durations_count_from_the_previous_stage_close() -> None:
    fleet = make_fleet(10, times=_times(), quorum=0.8, adapt=False)
    fleet.offline.add("d08")  # never advertises: ADVERTISE closes at its soft limit, 5 s
    fleet.drop_kinds = {"d09": {topics.Kind.SHARES}}  # advertises, then vanishes
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    closes = _stage_closes(fleet)
    assert closes["advertise"]["after_s"] == pytest.approx(5.0, abs=0.51)
    # SHARE's 5 s start when ADVERTISE closed: it closes at 10 s, not 5 s after the announcement.
    assert closes["share"]["closed_by"] == "quorum"
    assert closes["share"]["stage_s"] == pytest.approx(5.0, abs=0.51)
    assert closes["share"]["after_s"] == pytest.approx(10.0, abs=1.01)


def test_stalled_devices_are_left_out_until_they_show_life() -> None:
    # A third of the cohort never advertises: below the devices' default advertised fraction
    # (0.8), so the fleet's floor is set to let the round go on; stalls are what is tested.
    fleet = make_fleet(
        12,
        times=_times(advertise_hard=10.0),
        stall_cooldown=300.0,
        adapt=False,
        floor=PrivacyFloor(min_advertised_fraction=0.5),
    )
    stalled = {"d08", "d09", "d10", "d11"}
    fleet.offline |= stalled
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.metrics["stages"]["advertise"]["dropped"] == 4
    engine = fleet.engine
    assert engine.stalled(fleet.now) == stalled
    cohort = set(engine.select(VERSION, fleet.now))
    assert cohort == {f"d{i:02d}" for i in range(8)}
    # A fresh online status (it reconnected) or any message brings a device back.
    fleet.status("d08")
    late = topics.parse(topics.per_device("plant-9", 1, topics.Kind.ADVERTISE, "d09"))
    engine.receive(late, b"late and garbled", fleet.now)
    assert set(engine.select(VERSION, fleet.now)) == cohort | {"d08", "d09"}
    # Stalled devices are still taken when nothing else reaches min_cohort...
    for dev in sorted(cohort)[1:]:
        gone = wire.DeviceStatus(device_id=dev, online=False)
        engine.observe_status(dev, wire.encode(gone), fleet.now)
    assert set(engine.select(VERSION, fleet.now)) >= {"d00", "d08", "d09"}
    assert len(engine.select(VERSION, fleet.now)) == 3  # min_cohort
    # ... and after the cooldown they are ordinary candidates again.
    assert engine.stalled(fleet.now + 300.0) == frozenset()


def test_a_stalled_cohort_is_not_selected_again_and_the_next_round_closes() -> None:
    fleet = make_fleet(12, times=_times(advertise_hard=10.0), adapt=False)
    hung = {"d06", "d07", "d08", "d09", "d10", "d11"}  # half the fleet hangs
    fleet.offline |= hung
    run_round(fleet, 1)
    first = fleet.engine.outcome
    assert first is not None
    assert first.state is RoundState.ABORTED  # 6 of 12 advertised: neighbourhoods too thin
    run_round(fleet, 2)  # what the service does after an abort: a fresh cohort at once
    second = fleet.engine.outcome
    assert second is not None
    assert second.state is RoundState.CLOSED, second.reason
    announce = wire.decode(fleet.retained[topics.round_announce("plant-9")], RoundAnnounce)
    assert announce.round_id == 2
    assert not set(announce.cohort) & hung
    assert len(announce.cohort) == 6


def test_devices_apply_hard_limits_on_their_own_clock() -> None:
    times = _times(advertise_hard=10.0, share_hard=20.0, collect_hard=35.0, unmask_hard=40.0)
    # Waiting for the roster: the device gives up at (announcement seen) + 10 + 20 s of its
    # own clock, whatever the aggregator's clock says.
    fleet = make_fleet(5, times=times, adapt=False)
    fleet.skew = {"d00": 10_000.0, "d01": -500.0}
    fleet.offline.add("d04")  # ADVERTISE cannot complete; the test never ticks the aggregator
    _start(fleet)
    for dev, seen in (("d00", 10_000.0), ("d01", -500.0)):
        part = fleet.devices[dev]
        assert part.round is not None
        assert part.tick(seen + 29.9) == []
        assert part.round is not None
        notes = part.tick(seen + 30.0)
        assert part.round is None
        assert "timed out in advertise" in notes[0].text  # type: ignore[attr-defined]
        assert notes[0].kind is NoteKind.ROUND_LEFT  # type: ignore[attr-defined]

    # Share inbox in, training not done: the masked input is due within collect_hard of the
    # inbox's arrival on the device's clock, after which it gives up.
    fleet = make_fleet(5, times=times, adapt=False)
    fleet.skew = dict.fromkeys(fleet.devices, 7_777.0)
    _start(fleet)  # everyone answers at once: roster and inbox arrive at device time 7777
    part = fleet.devices["d00"]
    assert part.round is not None
    assert part.tick(7_777.0 + 34.9) == []
    notes = part.tick(7_777.0 + 35.0)
    assert part.round is None
    assert "timed out in collect" in notes[0].text  # type: ignore[attr-defined]


def test_stage_times_reject_a_hard_limit_below_the_soft_one() -> None:
    with pytest.raises(wire.SchemaError, match="collect_hard"):
        _times(collect=30.0, collect_hard=20.0)
    with pytest.raises(wire.SchemaError, match="advertise"):
        _times(advertise=0.0)


def test_settings_print_config_and_announcement_agree_on_stage_durations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stages = {
        "advertise": 3.0,
        "share": 4.0,
        "collect": 12.0,
        "unmask": 2.5,
        "advertise_hard": 9.0,
        "share_hard": 8.0,  # durations need not grow from stage to stage
        "collect_hard": 50.0,
        "unmask_hard": 7.0,
        "quorum": 0.9,
        "adapt": False,
    }
    text = "[stages]\n" + "".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in stages.items()
    )
    conf = tmp_path / "agg.toml"
    conf.write_text(text)
    assert fleetlearn_main(["aggregator", "--config", str(conf), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["stages"] == stages
    loaded = settings.load(AggregatorSettings, toml_text=text)
    config = loaded.engine_config()
    fleet = make_fleet(4, times=config.times, quorum=config.quorum, adapt=config.adapt)
    _start(fleet)
    announce = wire.decode(fleet.retained[topics.round_announce("plant-9")], RoundAnnounce)
    for stage in ("advertise", "share", "collect", "unmask"):
        assert getattr(announce.times, stage) == stages[stage]
        assert getattr(announce.times, f"{stage}_hard") == stages[f"{stage}_hard"]


def test_soft_limits_follow_recent_arrivals_within_bounds() -> None:
    fleet = make_fleet(6, times=_times(advertise=1.0, advertise_hard=8.0), adapt=True)
    engine = fleet.engine
    for seconds in (3.0, 4.0, 30.0):  # one slow round does not move the median much
        engine.history.record(Stage.ADVERTISE, seconds)
    _start(fleet)
    announce = wire.decode(fleet.retained[topics.round_announce("plant-9")], RoundAnnounce)
    assert announce.times.advertise == 6.0  # 1.5 x median 4 s, above the configured 1 s
    assert announce.times.advertise_hard == 8.0  # hard limits never move
    assert announce.times.share == 5.0  # no history: the configured soft limit
    for _ in range(5):
        engine.history.record(Stage.ADVERTISE, 60.0)
    assert engine.history.adapted(engine.config.times).advertise == 8.0  # never above hard


def test_server_without_deadlines_closes_only_when_told_and_says_why_not_yet() -> None:
    """SecAggServer(deadlines=None): never closes by time itself; close_problem() tells the
    adapter whether an early close would go on, close_stage() makes it."""
    config = SecAggConfig.create(cohort_size=6, dimension=3, neighbours=4, threshold=3)
    ids = identities(6)
    verify = {d: bytes(k.verify_key) for d, k in ids.items()}
    seed = b"\x02" * 32
    draws = graph_draws(list(ids), seed)
    server = SecAggServer(
        config=config,
        round_id=1,
        round_seed=seed,
        verify_keys=verify,
        tickets=tickets_of(draws),
        deadlines=None,
    )
    assert server.deadline is None
    adverts = []
    for d, key in sorted(ids.items()):
        client = SecAggClient(
            config=config,
            round_id=1,
            device_id=d,
            signing_key=key,
            verify_keys=verify,
            round_seed=seed,
            tickets=tickets_of(draws),
            draw=draws[d],
            floor=PrivacyFloor.minimal(),
            random=deterministic_random(f"early/{d}"),
        )
        adverts += client.start(0.0)
    for message in adverts[:2]:
        server.receive(message, 1.0)
    assert server.tick(1e9) == []  # no deadline: time alone closes nothing
    assert server.state is ServerState.ADVERTISE
    problem = server.close_problem()
    assert problem is not None
    assert "only 2 devices advertised" in problem
    for message in adverts[2:5]:
        server.receive(message, 2.0)
    assert server.close_problem() is None  # 5 of 6, each with >= t live neighbours
    rosters = server.close_stage(2.0)
    assert server.state is ServerState.SHARE
    assert len(rosters) == 5
    assert set(server.dropped) == {sorted(ids)[5]}

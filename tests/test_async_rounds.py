"""Asynchronous rounds (FedBuff) in the engine, sans-IO: invitations, the buffer, staleness.

The engine is driven by hand with dense `PlainUpdate`s whose values are known, so that what a
release applies can be computed here: sum(s(tau) * w * u) / sum(w) over the buffer, with
s(tau) = (1 + tau)^-exponent. Then the participant's side (who trains when), and the in-memory
fleet on a heavy-tailed scenario.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from nacl.signing import SigningKey

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine import EngineConfig, EngineError, RoundEngine
from fleetlearn.aggregator.modes import staleness_weight
from fleetlearn.device.participant import LocalResult, Note, Participant, PublishStatus, Train
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import topics, wire
from fleetlearn.shared.compression.messages import Compression, DenseUpdate, SparseMode
from fleetlearn.shared.rounds import (
    PlainUpdate,
    RoundAnnounce,
    RoundMode,
    RoundState,
    StageTimes,
    TrainingPlan,
)

FLEET = "plant-9"
DIM = 6


def _engine(n: int = 8, **cfg: object) -> RoundEngine:
    ids = [f"d{i:02d}" for i in range(n)]
    keys = {d: bytes(SigningKey.generate().verify_key) for d in ids}
    config = EngineConfig(
        **{
            "mode": "async",
            "sparsity": "dense",
            "min_cohort": 1,
            "buffer": 2,
            "concurrency": 4,
            "max_staleness": 1,
            **cfg,
        }  # type: ignore[arg-type]
    )
    engine = RoundEngine(fleet=FLEET, config=config, verify_keys=keys, random=os.urandom)
    for d in ids:
        status = wire.DeviceStatus(device_id=d, online=True, model_version=1)
        engine.observe_status(d, wire.encode(status), 0.0)
    return engine


def _announce(engine: RoundEngine, round_id: int, version: int, now: float) -> RoundAnnounce:
    pubs = engine.start_round(round_id=round_id, model_version=version, dim=DIM, now=now)
    (pub,) = pubs
    assert isinstance(pub.payload, bytes)
    return wire.decode(pub.payload, RoundAnnounce)


def _send(
    engine: RoundEngine,
    device: str,
    invited_in: int,
    base: int,
    values: list[float],
    now: float,
    weight: float = 10.0,
) -> None:
    update = PlainUpdate(
        round_id=invited_in,
        sender=device,
        update=DenseUpdate(values=np.asarray(values, dtype="<f4")),
        weight=weight,
        loss=0.5,
        correct=1,
        samples=2,
        base_version=base,
    )
    topic = topics.parse(topics.per_device(FLEET, invited_in, topics.Kind.UPDATE, device))
    engine.receive(topic, wire.encode(update), now)


def test_each_release_applies_the_staleness_weighted_mean_of_the_buffer() -> None:
    engine = _engine(staleness_exponent=0.5)
    first = _announce(engine, 1, 1, now=0.0)
    assert first.mode is RoundMode.ASYNC
    assert len(first.cohort) == 4  # concurrency
    assert first.invited == first.cohort  # plain: the invited devices send updates
    assert first.invited_in == (1, 1, 1, 1)
    assert first.max_staleness == 1
    a, b, c, d = first.cohort
    _send(engine, a, 1, 1, [1, 0, 0, 0, 0, 0], now=1.0, weight=10)
    assert engine.outcome is None  # one of two
    _send(engine, b, 1, 1, [0, 2, 0, 0, 0, 0], now=2.0, weight=30)
    outcome = engine.take_outcome()
    assert outcome is not None
    assert outcome.state is RoundState.CLOSED
    assert outcome.survivors == (a, b)
    # Both fresh: the FedAvg mean.
    np.testing.assert_allclose(outcome.mean_update, [10 / 40, 60 / 40, 0, 0, 0, 0])
    figures = outcome.metrics["async"]
    assert figures["updates_applied"] == 2
    assert figures["staleness"] == {"0": 2}
    assert figures["buffer_wait_s"] == {"median": 0.5, "max": 1.0}
    assert figures["in_flight"] == 2

    # Release v2: c and d still train for round 1; two new invitations for the free slots.
    second = _announce(engine, 2, 2, now=3.0)
    invited = dict(zip(second.cohort, second.invited_in, strict=True))
    assert invited[c] == invited[d] == 1
    new = sorted(dev for dev, r in invited.items() if r == 2)
    assert len(new) == 2
    # c answers on round 1's topic from v1 (one release behind), a new one from v2.
    _send(engine, c, 1, 1, [0, 0, 4, 0, 0, 0], now=4.0, weight=10)
    _send(engine, new[0], 2, 2, [0, 0, 0, 8, 0, 0], now=5.0, weight=10)
    outcome = engine.take_outcome()
    assert outcome is not None
    assert outcome.state is RoundState.CLOSED
    s1 = staleness_weight(1, 0.5)
    assert s1 == pytest.approx(2**-0.5)
    np.testing.assert_allclose(outcome.mean_update, [0, 0, s1 * 40 / 20, 80 / 20, 0, 0])
    assert outcome.metrics["async"]["staleness"] == {"0": 1, "1": 1}
    assert outcome.metrics["weight_sum"] == pytest.approx(10 * s1 + 10)


def test_a_stale_update_is_refused_counted_and_frees_its_slot() -> None:
    engine = _engine(max_staleness=1)
    first = _announce(engine, 1, 1, now=0.0)
    a, b, c, _d = first.cohort
    _send(engine, a, 1, 1, [1] * DIM, now=1.0)
    _send(engine, b, 1, 1, [1] * DIM, now=1.5)
    assert engine.take_outcome() is not None  # v2
    second = _announce(engine, 2, 2, now=2.0)
    fresh = [dev for dev, r in zip(second.cohort, second.invited_in, strict=True) if r == 2]
    _send(engine, fresh[0], 2, 2, [1] * DIM, now=3.0)
    _send(engine, fresh[1], 2, 2, [1] * DIM, now=3.5)
    assert engine.take_outcome() is not None  # v3
    third = _announce(engine, 3, 3, now=4.0)
    assert third.invitation(c) == 1  # still training since round 1
    # c's update from v1 arrives while v3 is out: two releases behind, max_staleness 1.
    _send(engine, c, 1, 1, [1] * DIM, now=5.0)
    assert engine.rejected_total["stale"] == 1
    stale = [e for e in engine.drain_events() if e.get("reason") == "stale"]
    assert stale
    assert stale[0]["device"] == c
    assert "2 releases behind v3" in stale[0]["detail"]
    assert c not in engine.training()  # it answered: its slot is free
    # The round goes on with fresh updates, and its summary counts the refusal.
    fresh3 = [dev for dev, r in zip(third.cohort, third.invited_in, strict=True) if r == 3]
    for i, dev in enumerate(fresh3[:2]):
        _send(engine, dev, 3, 3, [1] * DIM, now=6.0 + i)
    outcome = engine.take_outcome()
    assert outcome is not None
    assert outcome.state is RoundState.CLOSED
    assert outcome.metrics["rejected_by_reason"] == {"stale": 1}
    assert outcome.metrics["async"]["stale_refused_total"] == 1
    assert c not in outcome.survivors


def test_refused_async_updates_change_nothing() -> None:
    engine = _engine()
    first = _announce(engine, 1, 1, now=0.0)
    a, b, *_ = first.cohort
    outsider = next(d for d in [f"d{i:02d}" for i in range(8)] if d not in first.cohort)
    _send(engine, a, 1, 2, [1] * DIM, now=1.0)  # claims another base version
    _send(engine, outsider, 1, 1, [1] * DIM, now=1.0)  # not invited
    _send(engine, a, 1, 1, [1] * (DIM - 1), now=1.0)  # wrong dimension
    assert engine.rejected_total == {"bad_payload": 2, "not_in_cohort": 1}
    assert engine.outcome is None
    assert a in engine.training()
    _send(engine, a, 1, 1, [1] * DIM, now=2.0)
    _send(engine, a, 1, 1, [1] * DIM, now=2.0)  # its invitation is answered
    assert engine.rejected_total["not_invited"] == 1
    _send(engine, b, 1, 1, [3] * DIM, now=3.0)
    outcome = engine.take_outcome()
    assert outcome is not None
    np.testing.assert_allclose(outcome.mean_update, [2.0] * DIM)


def test_an_unfilled_buffer_waits_for_the_next_round_and_invitations_lapse() -> None:
    times = StageTimes(collect=5.0, collect_hard=10.0)
    engine = _engine(times=times, buffer=2, concurrency=2)
    first = _announce(engine, 1, 1, now=0.0)
    a, b = first.cohort
    _send(engine, a, 1, 1, [2] * DIM, now=1.0)
    # b never answers: at the hard limit the round aborts, the buffer stays, b's lapses.
    assert engine.next_deadline is not None
    engine.tick(11.0)
    outcome = engine.take_outcome()
    assert outcome is not None
    assert outcome.state is RoundState.ABORTED
    assert "buffer held 1 of 2 updates" in outcome.reason
    assert outcome.metrics["stragglers"] == 1
    assert b in engine.stalled(11.0)
    assert engine.training() == []
    second = _announce(engine, 2, 1, now=11.0)  # same release: nothing was applied
    assert b not in second.cohort  # stalled devices wait while others are eligible
    assert len(second.cohort) == 2
    dev = second.cohort[0]
    _send(engine, dev, 2, 1, [4] * DIM, now=12.0)
    outcome = engine.take_outcome()
    assert outcome is not None
    assert outcome.state is RoundState.CLOSED
    np.testing.assert_allclose(outcome.mean_update, [3.0] * DIM)  # a's from round 1 and dev's


def test_async_settings_are_checked() -> None:
    with pytest.raises(EngineError, match=r"fedbuff\.concurrency"):
        EngineConfig(mode="async", buffer=10, concurrency=5)
    with pytest.raises(EngineError, match=r"fedbuff\.buffer"):
        EngineConfig(mode="async", buffer=0)
    with pytest.raises(EngineError, match=r"privacy\.mechanism central runs in plain"):
        EngineConfig(mode="async", privacy="central", training=TrainingPlan(error_feedback=False))
    with pytest.raises(EngineError, match="top_k"):
        EngineConfig(mode="async", sparsity="top_k")


def test_announcement_checks_invitations() -> None:
    engine = _engine()
    ann = _announce(engine, 1, 1, now=0.0)
    with pytest.raises(wire.WireError, match="invited_in"):
        RoundAnnounce(**{**_fields(ann), "invited_in": ann.invited_in[:-1]})
    with pytest.raises(wire.WireError, match="invited"):
        RoundAnnounce(**{**_fields(ann), "invited": ("no such id!",) * len(ann.invited)})
    with pytest.raises(wire.WireError, match="invited_in"):
        RoundAnnounce(**{**_fields(ann), "invited_in": (2,) * len(ann.cohort)})  # the future
    with pytest.raises(wire.WireError, match="only asynchronous"):
        RoundAnnounce(**{**_fields(ann), "mode": RoundMode.PLAIN})
    closed = ann.closed(RoundState.CLOSED)
    assert closed.invited_in == ann.invited_in
    assert closed.max_staleness == ann.max_staleness


def _fields(ann: RoundAnnounce) -> dict[str, object]:
    return {name: getattr(ann, name) for name in ann.__dataclass_fields__}


# ------------------------------------------------------------------------- the participant


def test_a_device_trains_once_per_invitation_and_drops_a_lapsed_one() -> None:
    engine = _engine(n=4, buffer=2, concurrency=4)
    agg = SigningKey.generate()
    participant = Participant(
        fleet=FLEET,
        device_id="d00",
        identity=SigningKey.generate(),
        aggregator_key=agg.verify_key,
        registry={},
        random=os.urandom,
    )
    participant.manifest = None  # no release loaded: an invitation waits for it
    first = _announce(engine, 1, 1, now=0.0)
    payload = wire.encode(first)
    actions = participant.on_round(payload, 0.0)
    assert [type(a) for a in actions] == [Train]
    assert participant.on_round(payload, 0.5) == []  # the retained announcement again
    # A later announcement that still lists it for round 1: it goes on training.
    again = RoundAnnounce(**{**_fields(first), "round_id": 2, "model_version": 2})
    assert participant.on_round(wire.encode(again), 1.0) == []
    assert participant.round is not None
    assert participant.round.round_id == 1
    # Not in the next one: the invitation lapsed, nothing is pending.
    others = tuple(d for d in first.cohort if d != "d00")
    gone = RoundAnnounce(
        **{
            **_fields(first),
            "round_id": 3,
            "model_version": 2,
            "cohort": others,
            "invited": others,
            "invited_in": (3,) * len(others),
        }
    )
    assert participant.on_round(wire.encode(gone), 2.0) == []
    assert participant.round is None


# ------------------------------------------------------------------------ in-memory fleet


def test_the_in_memory_fleet_runs_async_rounds_on_heavy_tailed_devices() -> None:
    scenario = Scenario.parse(
        '[compute]\ntrain_seconds = 10.0\nspeed = "lognormal"\nspeed_sigma = 1.5\n'
        "[network]\nloss = 0.2\n"
    )
    config = EngineConfig(
        mode="async",
        sparsity="dense",
        min_cohort=1,
        buffer=5,
        concurrency=12,
        max_staleness=4,
        training=TrainingPlan(steps=5, max_samples=128, error_feedback=False),
    )
    fleet = InMemoryFleet(40, config, scenario, optimizer=rules.OptimizerConfig(), seed=3)
    history = fleet.run_async(6)
    closed = [m for m in history if m["state"] == "closed"]
    assert len(closed) == 6
    assert fleet.version == 7
    for metrics in closed:
        figures = metrics["async"]
        assert figures["updates_applied"] == 5
        assert sum(figures["staleness"].values()) == 5
        assert all(int(t) <= 4 for t in figures["staleness"])
    # Simulated time moved with the devices' compute times, not with the real clock.
    times = [m["sim_time"] for m in closed]
    assert times == sorted(times)
    assert times[-1] > 10.0
    assert fleet.lost > 0  # the flaky link lost some updates; the buffer filled anyway


# ------------------------------------------------------------------- secure asynchronous


def _secure_fleet(devices: int, scenario: str = "", **cfg: object) -> InMemoryFleet:
    config = EngineConfig(
        **{
            "mode": "async-secure",
            "sparsity": "dense",
            "min_cohort": 3,
            "buffer": 4,
            "over_select": 1.25,
            "concurrency": 8,
            "max_staleness": 3,
            "training": TrainingPlan(steps=5, max_samples=128, error_feedback=False),
            **cfg,
        }  # type: ignore[arg-type]
    )
    spec = '[compute]\ntrain_seconds = 10.0\nspeed = "lognormal"\nspeed_sigma = 1.0\n' + scenario
    return InMemoryFleet(devices, config, Scenario.parse(spec), seed=5)


def test_secure_async_sums_each_group_of_discounted_updates() -> None:
    fleet = _secure_fleet(16)
    outcomes = []
    take = fleet.engine.take_outcome

    def keep() -> object:
        outcome = take()
        outcomes.append(outcome)
        return outcome

    fleet.engine.take_outcome = keep  # type: ignore[method-assign]
    checked = []

    def check(metrics: dict[str, object]) -> bool:
        outcome = outcomes[-1]
        assert outcome is not None
        assert outcome.mean_update is not None
        version = int(metrics["model_version"])  # type: ignore[call-overload]
        total, weights = 0.0, 0.0
        for dev in outcome.survivors:
            participant = fleet.devices[dev].participant
            _, vector, weight = participant.inputs[outcome.round_id]
            held = fleet.round_results[dev]  # what it trained, before the discount
            figures = metrics["async"]
            assert isinstance(figures, dict)
            # The device scaled its own update by the discount of its staleness.
            trained = np.asarray(held.update, dtype=np.float64)
            moved = np.abs(trained) > 1e-6
            ratio = vector[moved] / trained[moved]
            discounts = {staleness_weight(t, 0.5) for t in range(4)}
            assert any(np.allclose(ratio, d, rtol=1e-5) for d in discounts)
            total = total + vector * weight
            weights += weight
        np.testing.assert_allclose(
            outcome.mean_update, total / weights, atol=outcome.error_bound + 1e-9
        )
        assert len(outcome.survivors) >= 4
        # Their masked inputs went out: the updates are spent, none is offered again.
        assert all(fleet.devices[d].participant.ready_version == 0 for d in outcome.survivors)
        assert sum(metrics["async"]["staleness"].values()) == len(outcome.survivors)  # type: ignore[index]
        assert metrics["mode"] == "async-secure"
        assert version >= 1
        checked.append(outcome.round_id)
        return False

    history = fleet.run_async(4, on_release=check)
    assert len(checked) == 4
    assert fleet.version == 5
    assert all(m["state"] == "closed" for m in history)


def test_secure_async_never_reveals_a_sum_of_fewer_than_the_buffer() -> None:
    # Half the group vanishes before its masked input: many groups end below the buffer.
    fleet = _secure_fleet(24, "[dropout]\ncollect = 0.4\n", buffer=4, over_select=1.5)
    announcements = []
    deliver = fleet._deliver

    def spy(pubs: list[object]) -> None:
        for pub in pubs:
            if topics.parse(pub.topic).kind is topics.Kind.ROUND:  # type: ignore[attr-defined]
                announcements.append(wire.decode(pub.payload, RoundAnnounce))  # type: ignore[attr-defined]
        deliver(pubs)  # type: ignore[arg-type]

    fleet._deliver = spy  # type: ignore[method-assign]
    history = fleet.run_async(3, max_seconds=20_000)
    closed = [m for m in history if m["state"] == "closed"]
    aborted = [m for m in history if m["state"] == "aborted"]
    assert len(closed) == 3
    assert aborted, "no group fell below the buffer: the test proves nothing"
    assert all(m["survivors"] >= 4 for m in closed)
    assert all("at least 4 are required" in str(m["reason"]) for m in aborted)
    groups = [a for a in announcements if a.cohort and a.state is RoundState.OPEN]
    assert groups
    assert all(a.secagg is not None and a.secagg.min_survivors >= 4 for a in groups)
    calls = [a for a in announcements if not a.cohort and a.state is RoundState.OPEN]
    assert calls
    assert all(a.invited and a.secagg is None for a in calls)


def _device() -> Participant:
    return Participant(
        fleet=FLEET,
        device_id="d00",
        identity=SigningKey.generate(),
        aggregator_key=SigningKey.generate().verify_key,
        registry={},
        random=os.urandom,
    )


def _call(round_id: int) -> RoundAnnounce:
    """A secure asynchronous call (no group) inviting d00 from `round_id`."""
    return RoundAnnounce(
        round_id=round_id,
        mode=RoundMode.ASYNC_SECURE,
        model_version=1,
        cohort=(),
        seed=bytes(32),
        compression=Compression(mode=SparseMode.DENSE),
        training=TrainingPlan(),
        times=StageTimes(),
        invited=("d00",),
        invited_in=(round_id,),
        max_staleness=2,
    )


def test_a_held_update_too_stale_for_any_group_is_dropped_and_the_device_invited_again() -> None:
    participant = _device()
    call = _call(1)
    assert [type(a) for a in participant.on_round(wire.encode(call), 0.0)] == [Train]
    result = LocalResult(update=np.ones(4, np.float32), weight=5.0, loss=0.1, correct=1, samples=2)
    assert [type(a) for a in participant.trained(1, result, 1.0)] == [PublishStatus]
    assert participant.ready_version == 1  # its status says it holds an update from v1
    # Two releases later it may still be grouped: kept.
    later = RoundAnnounce(
        **{**_fields(call), "round_id": 3, "model_version": 3, "invited": (), "invited_in": ()}
    )
    assert participant.on_round(wire.encode(later), 2.0) == []
    assert participant.ready_version == 1
    # Three: no group will take it; dropped, and the device takes a new invitation.
    too_old = RoundAnnounce(
        **{**_fields(call), "round_id": 4, "model_version": 4, "invited_in": (4,)}
    )
    kinds = [type(a) for a in participant.on_round(wire.encode(too_old), 3.0)]
    assert kinds == [Note, PublishStatus, Train]
    assert participant.ready_version == 0


# ------------------------------------------------------------------------- hostile input


def test_a_claimed_weight_counts_at_most_max_samples() -> None:
    engine = _engine(training=TrainingPlan(max_samples=100, error_feedback=False))
    first = _announce(engine, 1, 1, now=0.0)
    a, b, *_ = first.cohort
    _send(engine, a, 1, 1, [1] * DIM, now=1.0, weight=1e9)  # claims a billion examples
    _send(engine, b, 1, 1, [3] * DIM, now=2.0, weight=100)
    outcome = engine.take_outcome()
    assert outcome is not None
    np.testing.assert_allclose(outcome.mean_update, [2.0] * DIM)  # 100 against 100


def test_an_update_waiting_between_rounds_keeps_its_invitation() -> None:
    times = StageTimes(collect=5.0, collect_hard=10.0)
    for waiting in (True, False):
        engine = _engine(times=times, buffer=1, concurrency=2)
        first = _announce(engine, 1, 1, now=0.0)
        a, b = first.cohort
        _send(engine, a, 1, 1, [1] * DIM, now=1.0)
        assert engine.take_outcome() is not None
        # b's update arrived at 9.5 s, while the release was built; the next round starts
        # at 12 s, past b's invitation's hard limit.
        keep = frozenset({b}) if waiting else frozenset()
        engine.start_round(round_id=2, model_version=2, dim=DIM, now=12.0, waiting=keep)
        assert (b in engine.training()) is waiting
        _send(engine, b, 1, 1, [5] * DIM, now=12.0)
        if waiting:
            outcome = engine.take_outcome()
            assert outcome is not None
            assert outcome.survivors == (b,)
        else:  # its invitation lapsed: the update counts as late and changes nothing
            assert engine.outcome is None
            assert engine.late_total == 1


def test_async_secure_settings_are_checked() -> None:
    with pytest.raises(EngineError, match=r"secagg\.neighbours"):
        EngineConfig(mode="async-secure", buffer=3, neighbours=4)
    with pytest.raises(EngineError, match="SecAgg"):
        EngineConfig(mode="async-secure", buffer=60_000, concurrency=60_000, over_select=2.0)
    with pytest.raises(EngineError, match=r"error_feedback"):
        EngineConfig(mode="async-secure", training=TrainingPlan(error_feedback=True))


def test_a_holding_status_without_a_ticket_is_never_grouped() -> None:
    fleet = _secure_fleet(12)
    # One device claims to hold an update, with no graph ticket to open: before, it was
    # grouped first and the round could not even be built.
    bogus = wire.DeviceStatus(device_id="dev-0000", online=True, model_version=1, ready_version=1)
    fleet.engine.observe_status("dev-0000", wire.encode(bogus), 0.0)
    fleet.devices["dev-0000"].online = False  # and it hears nothing: a stolen identity
    history = fleet.run_async(2)
    closed = [m for m in history if m["state"] == "closed"]
    assert len(closed) == 2
    assert all("dev-0000" not in fleet.survivors for _ in closed)


def test_holding_keeps_its_place_in_line_when_the_status_is_republished() -> None:
    engine = _engine(n=3)
    devices = engine._devices

    def status(version: int, ticket: bytes) -> None:
        s = wire.DeviceStatus(
            device_id="d00", online=True, model_version=1, ready_version=version, ticket=ticket
        )
        devices.observe("d00", s, now)

    now = 1.0
    status(1, bytes(16))
    now = 5.0
    status(1, bytes(range(16)))  # a new ticket after an advert: the same update
    assert devices.ready_since("d00") == 1.0
    now = 6.0
    status(2, bytes(16))  # a new update
    assert devices.ready_since("d00") == 6.0
    now = 7.0
    status(0, bytes(16))  # spent
    assert devices.ready_since("d00") == float("inf")
    assert [s.device_id for s, _ in devices.holding()] == []


def test_a_lapsed_invitation_renewed_under_the_same_id_is_taken() -> None:
    participant = _device()
    call = _call(5)
    assert [type(a) for a in participant.on_round(wire.encode(call), 0.0)] == [Train]
    assert participant.on_round(wire.encode(call), 1.0) == []  # the same call: training
    participant.untrained(5)  # the adapter could not train (say the model did not load)
    # The aggregator lapsed it and invites it again from the same (next) round id.
    assert [type(a) for a in participant.on_round(wire.encode(call), 2.0)] == [Train]


def test_a_fleet_whose_every_device_lapsed_still_gets_invited() -> None:
    # A flaky link loses updates: their invitations lapse and the devices count as stalled.
    # Once every device did, the next round must still invite enough to fill a buffer.
    times = StageTimes(collect=5.0, collect_hard=10.0)
    engine = _engine(n=8, times=times, buffer=2, concurrency=4)
    now = 0.0
    for round_id in (1, 2):
        _announce(engine, round_id, 1, now=now)
        now += 11.0
        engine.tick(now)  # nobody answered: aborted, invitations lapsed
        outcome = engine.take_outcome()
        assert outcome is not None
        assert outcome.state is RoundState.ABORTED
    assert len(engine.stalled(now)) == 8
    third = _announce(engine, 3, 1, now=now)
    assert len(third.invited) >= 2  # stalled devices, as a last resort

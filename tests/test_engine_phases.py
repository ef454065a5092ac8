"""The round engine as a state machine: its phase table, and what an unexpected exception does.

In memory (tests.test_rounds_inmemory's fleet: the real engine, SecAgg+ and participants).
Bugs are injected by replacing one method for one call; a round that meets one must end
aborted with the error as its reason, tell its cohort, and leave the engine able to run and
close the next round.
"""

from __future__ import annotations

import gc
import types
from typing import Any

import numpy as np
import pytest

from fleetlearn.aggregator import engine as engine_module
from fleetlearn.aggregator import report, rules
from fleetlearn.aggregator.engine import TRANSITIONS, EngineError, Event, Phase
from fleetlearn.shared import topics, wire
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.server import SecAggServer
from tests.test_rounds_inmemory import FLEET, Fleet, make_fleet, run_round


def _once(original: Any, error: str) -> tuple[Any, list[str]]:
    """A stand-in for `original` that raises RuntimeError(error) on its first call only."""
    calls: list[str] = []

    def replacement(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(error)
            raise RuntimeError(error)
        return original(*args, **kwargs)

    return replacement, calls


def _retained_announce(fleet: Fleet) -> RoundAnnounce:
    return wire.decode(fleet.retained[topics.round_announce(FLEET)], RoundAnnounce)


# ------------------------------------------------------------------------------ the table


def test_the_phase_table_lists_every_move_and_refuses_the_rest() -> None:
    fleet = make_fleet(4, mode="plain", sparsity="top_k", density=0.2)
    engine = fleet.engine
    assert engine.phase is Phase.IDLE
    with pytest.raises(EngineError, match="no transition from IDLE on RESULT"):
        engine._transition(Event.RESULT)
    assert engine.phase is Phase.IDLE
    run_round(fleet, 1)
    assert engine.phase is Phase.CLOSED
    fleet.publish(engine.start_round(round_id=2, model_version=1, dim=fleet.dim, now=fleet.now))
    assert engine.phase is Phase.RUNNING
    with pytest.raises(EngineError, match="round 2 is still running"):
        engine.start_round(round_id=3, model_version=1, dim=fleet.dim, now=fleet.now)
    assert engine.phase is Phase.RUNNING
    assert engine.round_id == 2
    # Only a round that is over takes a new one; only a live one can fail or hit a bug.
    for phase in Phase:
        assert (TRANSITIONS.get((phase, Event.START)) is Phase.RUNNING) == (
            phase not in (Phase.RUNNING, Phase.CLOSING)
        )
        assert ((phase, Event.BUG) in TRANSITIONS) == (phase in (Phase.RUNNING, Phase.CLOSING))


# --------------------------------------------------------------------- bugs inside a round


def test_a_bug_inside_secagg_mid_round_aborts_that_round_and_the_next_one_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = make_fleet(6)
    broken, calls = _once(SecAggServer._on_masked, "masked input handler broke")
    monkeypatch.setattr(SecAggServer, "_on_masked", broken)
    run_round(fleet, 1)
    assert calls  # the bug was met, during COLLECT
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert out.reason.startswith("internal error while taking masked from d0")
    assert "RuntimeError: masked input handler broke" in out.reason
    assert out.metrics["state"] == "aborted"
    assert out.metrics["reason"] == out.reason
    assert out.metrics["stages"]["share"]["closed_by"] == "complete"  # what ran is reported
    assert out.mean_update is None
    assert fleet.engine.phase is Phase.ERROR
    assert [type(e) for e in fleet.engine.drain_errors()] == [RuntimeError]
    # The cohort was told: the retained announcement says aborted, with the reason, and an
    # Abort went to the survivors topic; every device left the round.
    ended = _retained_announce(fleet)
    assert (ended.round_id, ended.state, ended.reason) == (1, RoundState.ABORTED, out.reason)
    assert all(part.round is None for part in fleet.devices.values())

    run_round(fleet, 2)
    second = fleet.engine.outcome
    assert second is not None
    assert second.state is RoundState.CLOSED, second.reason
    assert len(second.survivors) == 6
    assert fleet.engine.phase is Phase.CLOSED


def test_a_bug_while_closing_a_stage_on_tick_aborts_that_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = make_fleet(5, mode="plain", sparsity="top_k", density=0.2, defer_close=True)
    broken, calls = _once(rules.aggregate, "rule exploded")
    monkeypatch.setattr(rules, "aggregate", broken)
    run_round(fleet, 1)
    assert calls
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert out.reason == "internal error while closing collect: RuntimeError: rule exploded"
    assert out.metrics["reason"] == out.reason
    assert out.metrics["stages"]["collect"]["arrived"] == 5
    assert fleet.engine.phase is Phase.ERROR
    assert fleet.closes == 1  # the close ran on tick(), as the service runs it
    assert _retained_announce(fleet).state is RoundState.ABORTED

    run_round(fleet, 2)
    assert fleet.engine.outcome is not None
    assert fleet.engine.outcome.state is RoundState.CLOSED, fleet.engine.outcome.reason


def test_a_bug_while_checking_one_message_costs_that_message_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before a message reaches the round nothing has changed: the round goes on without it,
    and SecAgg+ recovers from the missing masked input like from any dropout."""
    fleet = make_fleet(8)
    real_decode = wire.decode
    failed: list[str] = []

    def decode(payload: bytes, expect: Any = None, **kw: Any) -> Any:
        if expect is sm.MaskedInput and not failed:
            failed.append(kw["context"]["sender"])
            raise RuntimeError("decoder bug on this input")
        return real_decode(payload, expect, **kw)

    monkeypatch.setattr(engine_module.wire, "decode", decode)
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.CLOSED, out.reason
    assert failed
    assert failed[0] not in out.survivors
    assert out.metrics["rejected_by_reason"] == {"internal_error": 1}
    assert out.metrics["dropouts_recovered"] >= 1
    assert fleet.engine.phase is Phase.CLOSED
    assert [str(e) for e in fleet.engine.drain_errors()] == ["decoder bug on this input"]


def test_a_round_whose_summary_fails_still_ends_with_the_bare_facts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = make_fleet(4, mode="plain", sparsity="top_k", density=0.2)

    def summary(**kw: Any) -> dict[str, Any]:
        raise ZeroDivisionError("summary bug")

    monkeypatch.setattr(report, "summary", summary)
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert out.metrics["reason"] == out.reason
    assert "ZeroDivisionError: summary bug" in out.reason
    assert fleet.engine.phase is Phase.ERROR
    assert not fleet.engine.running
    assert _retained_announce(fleet).state is RoundState.ABORTED
    monkeypatch.undo()
    run_round(fleet, 2)
    assert fleet.engine.outcome is not None
    assert fleet.engine.outcome.state is RoundState.CLOSED


def test_a_failing_close_due_check_ends_the_round_on_the_next_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`close_due` is asked outside any engine step (the service's intake loop): it must not
    raise, and the tick it asks for ends the round."""
    fleet = make_fleet(5, defer_close=True)
    broken, calls = _once(SecAggServer.close_problem, "close_problem broke")
    # close_problem is asked only once a quorum answered after the soft limit.
    fleet.offline.add("d04")
    monkeypatch.setattr(SecAggServer, "close_problem", broken)
    run_round(fleet, 1)
    assert calls
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is RoundState.ABORTED
    assert "RuntimeError: close_problem broke" in out.reason
    assert fleet.engine.phase is Phase.ERROR
    fleet.offline.clear()
    run_round(fleet, 2)
    assert fleet.engine.outcome is not None
    assert fleet.engine.outcome.state is RoundState.CLOSED, fleet.engine.outcome.reason


# ---------------------------------------------------------------------------------- memory


def _arrays_reachable(root: object, min_size: int) -> list[np.ndarray]:
    """ndarrays of at least `min_size` elements reachable from `root` (not through modules,
    classes or functions: those are shared with everything else)."""
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)
    seen: set[int] = set()
    found: list[np.ndarray] = []
    todo: list[object] = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            if obj.size >= min_size:
                found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def test_the_engine_keeps_no_full_size_update_once_the_outcome_is_taken() -> None:
    fleet = make_fleet(6)
    for round_id in (1, 2):
        run_round(fleet, round_id)
        assert _arrays_reachable(fleet.engine, fleet.dim)  # the outcome's mean update
        outcome = fleet.engine.take_outcome()
        assert outcome is not None
        assert outcome.mean_update is not None
        assert outcome.mean_update.size == fleet.dim
        assert fleet.engine.outcome is None
        assert _arrays_reachable(fleet.engine, fleet.dim) == []


def test_undrained_events_are_bounded() -> None:
    engine = make_fleet(3).engine
    stranger = topics.parse(topics.per_device(FLEET, 1, topics.Kind.ADVERTISE, "stranger"))
    for _ in range(engine_module.MAX_EVENTS + 50):
        engine.receive(stranger, b"x", 0.0)
    assert len(engine.events) == engine_module.MAX_EVENTS
    assert engine.rejected_total["unknown_round"] == engine_module.MAX_EVENTS + 50

"""FleetView (dashboard/view.py) alone: what it keeps from each dashboard topic, replays of
retained messages, bounds, and that garbage on any topic only counts a rejection."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.dashboard import payloads
from fleetlearn.dashboard.view import FIGURES, MAX_TOTAL, FleetView, RoundShare
from fleetlearn.shared import wire

FLEET = "plant-7"
METRICS = f"fl/{FLEET}/metrics"
EVENTS = f"fl/{FLEET}/events"


def status_topic(dev: str) -> str:
    return f"fl/{FLEET}/dev/{dev}/status"


def health_topic(dev: str) -> str:
    return f"fl/{FLEET}/dev/{dev}/health"


def summary(round_id: int, **overrides: Any) -> dict[str, Any]:
    """A closed plain round's summary, as the aggregator publishes it (docs/topics.md)."""
    s: dict[str, Any] = {
        "fleet": FLEET,
        "round": round_id,
        "mode": "plain",
        "state": "closed",
        "reason": "",
        "task": "classification",
        "model_version": round_id,
        "new_version": round_id + 1,
        "learning_rate": 0.05,
        "cohort": 4,
        "ts": 1_700_000_000.0 + round_id,
        "survivors": 4,
        "stragglers": 0,
        "late_messages": 0,
        "rejected": 0,
        "rejected_by_reason": {},
        "rejected_total": {},
        "stages": {
            "collect": {
                "expected": 4,
                "arrived": 4,
                "late": 0,
                "dropped": 0,
                "not_needed": 0,
                "closed_by": "complete",
                "seconds": 1.5,
            }
        },
        "uplink_bytes_per_device": 1000,
        "downlink_bytes_per_device": 400,
        "duration_s": 2.25,
        "dimension": 1000,
        "coordinates": 100,
        "quantization_bound": 0.0,
        "mean_loss": 0.5,
        "accuracy": 0.75,
        "samples": 200,
        "device_accuracy": 0.75,
        "dropouts_recovered": 0,
        "per_class": [{"label": "ok", "samples": 10, "correct": 9, "recall": 0.9}],
        "weight_sum": 800.0,
        "update_norm": 0.1,
        "cost": {"devices": 4, "cpu_s": 2.0, "bytes_up": 4000.0, "bytes_down": 1600.0,
                 "energy_j": 8.0},
    }  # fmt: skip
    s.update(overrides)
    return s


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def status(dev: str, **fields: Any) -> bytes:
    return wire.encode(wire.DeviceStatus(device_id=dev, **{"online": True, **fields}))


def health(dev: str, **overrides: Any) -> bytes:
    report: dict[str, Any] = {
        "device_id": dev,
        "fleet": FLEET,
        "model_version": 2,
        "ts": 1_700_000_100.0,
        "windows": 64,
        "latest": {"label": "ok", "confidence": 0.9},
        "predicted_share": {"ok": 0.9, "fault": 0.1},
        "accuracy": 0.8125,
    }
    report.update(overrides)
    return js(report)


def event(name: str, **fields: Any) -> bytes:
    return js({"event": name, "round": 1, "fleet": FLEET, "ts": 1_700_000_000.5, **fields})


def rejected(view: FleetView) -> dict[str, int]:
    return {k: v for k, v in view.rejected.items() if v}


# ------------------------------------------------------------------------------- summaries


def test_summary_is_kept_with_its_figures() -> None:
    view = FleetView(FLEET)
    updates = view.ingest(METRICS, js(summary(1)), now=10.0)
    assert [u["type"] for u in updates] == ["round"]
    record = updates[0]["round"]
    assert record["round"] == 1
    assert record["accuracy"] == 0.75
    assert record["stages"]["collect"]["closed_by"] == "complete"
    assert record["cost"] == {
        "devices": 4,
        "cpu_s": 2.0,
        "bytes_up": 4000.0,
        "bytes_down": 1600.0,
        "energy_j": 8.0,
    }
    assert record["received"] == 10.0
    assert "per_class" not in record  # not shown, not kept
    assert view.latest_round() == record
    assert view.model_version() == 2
    assert view.totals.rounds == {"closed": 1, "aborted": 0, "refused": 0}
    assert view.totals.uplink_bytes == 4000  # 1000 per survivor
    assert view.totals.downlink_bytes == 1600  # 400 per cohort member
    assert view.totals.energy_j == 8.0
    json.dumps(view.snapshot(), allow_nan=False)  # JSON-ready as it is


def test_replayed_retained_summary_changes_nothing() -> None:
    """The broker hands the retained summary again on every reconnect."""
    view = FleetView(FLEET)
    view.ingest(METRICS, js(summary(1)), now=10.0)
    before = copy.deepcopy(view.snapshot())
    assert view.ingest(METRICS, js(summary(1)), now=20.0) == []
    assert view.replays == 1
    assert view.snapshot() == before
    assert view.totals.rounds["closed"] == 1
    assert view.totals.uplink_bytes == 4000


def counters(view: FleetView) -> dict[str, float]:
    """Every running total, as the Prometheus counters show them."""
    rounds = {f"rounds_{state}": n for state, n in view.totals.rounds.items()}
    return {**rounds, **{name: getattr(view.totals, name) for name in FIGURES}}


def test_a_summary_replacing_a_kept_one_only_adds_to_the_counters() -> None:
    """The aggregator uses a refused round's id again for the next round that runs: the
    summary replaces the kept one, and every counter still only grows (Prometheus reads a
    decrease as a restart)."""
    view = FleetView(FLEET)
    view.ingest(METRICS, js(summary(5, state="refused", survivors=0, cost=None)), now=1.0)
    assert view.latest_round() is None  # a refused round never ran
    assert view.latest_summary() is not None
    assert view.totals.uplink_bytes == 4000  # no survivors: over the cohort
    updates = view.ingest(METRICS, js(summary(5)), now=2.0)
    assert updates[0]["round"]["state"] == "closed"
    assert len(view.rounds()) == 1
    assert view.rounds()[0]["state"] == "closed"
    assert view.totals.rounds == {"closed": 1, "aborted": 0, "refused": 1}  # two summaries
    assert view.totals.cpu_s == 2.0
    assert view.totals.uplink_bytes == 4000  # 1000 to each of 4 survivors: nothing beyond
    # Lower figures for the same round add nothing; a higher one adds what it has beyond the
    # highest counted for the round, field by field.
    lower = {"devices": 4, "cpu_s": 1.0, "bytes_up": 100.0, "bytes_down": 1.0, "energy_j": 1.0}
    view.ingest(METRICS, js(summary(5, cost=lower, uplink_bytes_per_device=10)), now=3.0)
    assert view.totals.rounds["closed"] == 2
    assert (view.totals.cpu_s, view.totals.bytes_up, view.totals.energy_j) == (2.0, 4000, 8.0)
    assert view.totals.uplink_bytes == 4000
    higher = {**lower, "cpu_s": 3.5}
    view.ingest(METRICS, js(summary(5, cost=higher)), now=4.0)
    assert (view.totals.cpu_s, view.totals.bytes_up, view.totals.energy_j) == (3.5, 4000, 8.0)
    assert view.totals.rounds == {"closed": 3, "aborted": 0, "refused": 1}


def test_aborted_round_without_survivors_counts_uplink_over_the_cohort() -> None:
    view = FleetView(FLEET)
    aborted = summary(2, state="aborted", survivors=0, accuracy=None, mean_loss=None, cost=None)
    view.ingest(METRICS, js(aborted), now=1.0)
    assert view.totals.uplink_bytes == 4000  # the aggregator averaged over the cohort
    assert view.totals.cpu_s == 0.0
    assert view.latest_round()["accuracy"] is None  # type: ignore[index]


HUGE = [
    {"cost": {"devices": 4, "cpu_s": 2.0, "bytes_up": 1e308, "bytes_down": 1.0, "energy_j": 1.0}},
    {"cost": {"devices": 4, "cpu_s": 2.0, "bytes_up": 1.0, "bytes_down": 1.0, "energy_j": 1e308}},
    {"cost": {"cpu_s": payloads.MAX_FIGURE * 1.01}},
    {"uplink_bytes_per_device": 1e308},
    {"downlink_bytes_per_device": 1e16},
]


@pytest.mark.parametrize("overrides", HUGE)
def test_figures_beyond_their_bound_are_refused_and_the_state_stays_json(
    overrides: dict[str, Any],
) -> None:
    """Two summaries with bytes_up 1e308 once made the total inf: round() raised, /api/state
    answered 500, and the stream sent `Infinity`, which JSON.parse refuses."""
    view = FleetView(FLEET)
    for r in (1, 2):
        assert view.ingest(METRICS, js(summary(r, **overrides)), now=float(r)) == []
    assert rejected(view) == {"bad_payload": 2}
    json.dumps(view.snapshot(), allow_nan=False)
    # At the bound, a figure is kept.
    most = payloads.MAX_FIGURE
    bound = {"devices": 4, "cpu_s": most, "bytes_up": most, "bytes_down": most, "energy_j": most}
    assert view.ingest(METRICS, js(summary(3, cost=bound, uplink_bytes_per_device=most)), 3.0)
    assert view.totals.uplink_bytes == most * 4
    json.dumps(view.snapshot(), allow_nan=False)


def test_totals_saturate_rather_than_becoming_infinite() -> None:
    """Whatever reaches the totals (here past the payload checks), they stay finite and
    JSON-ready, and they still never go down."""
    view = FleetView(FLEET)
    share = RoundShare(**{name: 1e308 for name in FIGURES if name != "dropouts_recovered"})
    for _ in range(3):
        view.totals.add("closed", share, None)
        assert all(math.isfinite(value) for value in counters(view).values())
    assert view.totals.bytes_up == MAX_TOTAL
    assert view.totals.energy_j == MAX_TOTAL
    json.dumps(view.snapshot(), allow_nan=False)
    view.totals.add("closed", RoundShare(bytes_up=1.0), None)
    assert view.totals.bytes_up == MAX_TOTAL


def test_rounds_are_bounded_and_an_older_one_is_refused_when_full() -> None:
    view = FleetView(FLEET, max_rounds=3)
    for r in range(1, 6):
        view.ingest(METRICS, js(summary(r)), now=float(r))
    assert [r["round"] for r in view.rounds()] == [3, 4, 5]
    assert view.totals.rounds["closed"] == 5  # totals outlive the kept list
    assert view.ingest(METRICS, js(summary(1)), now=9.0) == []
    assert rejected(view) == {"stale_round": 1}
    assert [r["round"] for r in view.rounds()] == [3, 4, 5]


def test_privacy_and_async_figures_are_kept() -> None:
    view = FleetView(FLEET)
    privacy = {
        "mechanism": "distributed",
        "released": True,
        "noise_multiplier": 1.1,
        "sampling_rate": 0.5,
        "rounds_charged": 1,
        "epsilon_amplified": 0.4,
        "epsilon_cohort_known": 0.9,
        "epsilon": 0.9,
        "amplification": False,
        "delta": 1e-5,
        "epsilon_budget": 8.0,
    }
    figures = {
        "updates_applied": 3,
        "staleness": {"0": 2, "1": 1},
        "mean_staleness": 0.33,
        "mean_discount": 0.9,
        "buffer_wait_s": {"median": 0.5, "max": 1.0},
        "stale_refused_total": 0,
        "in_flight": 2,
        "buffered": 0,
    }
    view.ingest(METRICS, js(summary(1, mode="async", privacy=privacy, **{"async": figures})), 1.0)
    record = view.latest_round()
    assert record is not None
    assert record["privacy"]["epsilon_budget"] == 8.0
    assert record["async"]["staleness"] == {"0": 2, "1": 1}
    assert view.latest_privacy() == record["privacy"]


# --------------------------------------------------------------------------------- devices


def test_status_and_health_fill_one_device_row() -> None:
    view = FleetView(FLEET)
    view.ingest(status_topic("dev-0001"), status("dev-0001", battery=0.5, model_version=2), 5.0)
    updates = view.ingest(health_topic("dev-0001"), health("dev-0001"), 6.0)
    row = updates[0]["device"]
    assert row["device_id"] == "dev-0001"
    assert row["online"] is True
    assert row["eligibility"] == "eligible"
    assert row["battery"] == 0.5
    assert row["model_version"] == 2
    assert row["health"]["accuracy"] == 0.8125
    assert row["health"]["label"] == "ok"
    assert row["last_seen"] == 6.0
    assert (view.online, view.offline, view.eligible) == (1, 0, 1)


def test_anomaly_health_figures_are_kept() -> None:
    view = FleetView(FLEET)
    report = health(
        "dev-0002",
        latest={"score": 0.25, "anomaly": True},
        accuracy=None,
        predicted_share=None,
        threshold=0.2,
        anomalous_share=0.125,
        max_score=0.5,
    )
    row = view.ingest(health_topic("dev-0002"), report, 1.0)[0]["device"]
    assert row["health"]["score"] == 0.25
    assert row["health"]["anomaly"] is True
    assert row["health"]["anomalous_share"] == 0.125
    assert row["online"] is None  # no status yet
    assert (view.online, view.offline) == (0, 0)


def test_last_will_moves_a_device_to_offline_and_counts_follow() -> None:
    view = FleetView(FLEET)
    for dev in ("dev-0001", "dev-0002"):
        view.ingest(status_topic(dev), status(dev), 1.0)
    view.ingest(status_topic("dev-0002"), status("dev-0002", eligibility=wire.Eligibility.BUSY), 2)
    assert (view.online, view.offline, view.eligible) == (2, 0, 1)
    will = status("dev-0001", online=False, eligibility=wire.Eligibility.OFFLINE)
    view.ingest(status_topic("dev-0001"), will, 3.0)
    assert (view.online, view.offline, view.eligible) == (1, 1, 0)
    assert view.device("dev-0001")["online"] is False  # type: ignore[index]


def test_retained_messages_do_not_make_a_device_seen() -> None:
    """A retained status arrives whenever the dashboard connects: it tells nothing about when
    the device was last heard of; a health report's own timestamp does, unless it is in the
    future."""
    view = FleetView(FLEET)
    view.ingest(status_topic("dev-0001"), status("dev-0001"), 1_000.0, retained=True)
    assert view.device("dev-0001")["last_seen"] is None  # type: ignore[index]
    view.ingest(health_topic("dev-0001"), health("dev-0001", ts=900.0), 1_000.0, retained=True)
    assert view.device("dev-0001")["last_seen"] == 900.0  # type: ignore[index]
    future = health("dev-0001", ts=1e9, model_version=3)
    view.ingest(health_topic("dev-0001"), future, 1_000.0, retained=True)
    assert view.device("dev-0001")["last_seen"] == 900.0  # type: ignore[index]
    # The same retained status again: nothing changes, no update.
    assert view.ingest(status_topic("dev-0001"), status("dev-0001"), 2_000.0, retained=True) == []


def test_devices_are_bounded() -> None:
    view = FleetView(FLEET, max_devices=2)
    for dev in ("dev-0001", "dev-0002", "dev-0003"):
        view.ingest(status_topic(dev), status(dev), 1.0)
    assert view.device_count == 2
    assert view.device("dev-0003") is None
    assert rejected(view) == {"device_limit": 1}
    # Known devices still update.
    assert view.ingest(health_topic("dev-0002"), health("dev-0002"), 2.0)
    assert len(view.devices(limit=1)) == 1


def test_a_payload_naming_another_device_is_refused() -> None:
    view = FleetView(FLEET)
    assert view.ingest(status_topic("dev-0001"), status("dev-0002"), 1.0) == []
    assert view.ingest(health_topic("dev-0001"), health("dev-0002"), 1.0) == []
    assert rejected(view) == {"device_mismatch": 2}
    assert view.device_count == 0


# ---------------------------------------------------------------------------------- events


def test_events_are_bounded_and_numbered() -> None:
    view = FleetView(FLEET, max_events=3)
    for i in range(5):
        view.ingest(EVENTS, event("stage_closed", stage="collect", arrived=i, dropped=["d1"]), i)
    kept = view.events()
    assert [e["arrived"] for e in kept] == [2, 3, 4]
    assert [e["seq"] for e in kept] == [3, 4, 5]
    assert kept[0]["dropped"] == ["d1"]


def test_an_event_with_a_bad_device_id_is_refused() -> None:
    view = FleetView(FLEET)
    assert view.ingest(EVENTS, event("rejected", device="no/such", reason="x"), 1.0) == []
    assert rejected(view) == {"bad_device_id": 1}


# --------------------------------------------------------------------------------- garbage


def _frame(obj: Any) -> bytes:
    raw = msgpack.packb(obj, use_bin_type=True)
    return zstandard.ZstdCompressor().compress(raw)


GARBAGE: list[tuple[str, str, bytes]] = [
    ("bad_topic", "fl/plant-7/nonsense", b"{}"),
    ("bad_topic", "not/ours", b"{}"),
    ("bad_topic", "", b"{}"),
    ("bad_device_id", "fl/plant-7/dev/$SYS/status", status("dev-0001")),
    ("bad_device_id", "fl/plant-7/dev/" + "d" * 65 + "/health", b"{}"),
    ("other_fleet", "fl/plant-8/metrics", js(summary(1))),
    ("other_fleet", METRICS, js(summary(1, fleet="plant-8"))),
    ("other_fleet", health_topic("dev-0001"), health("dev-0001", fleet="plant-8")),
    ("unexpected_topic", f"fl/{FLEET}/model", b"release"),
    ("unexpected_topic", f"fl/{FLEET}/r/3/update/dev-0001", b"update"),
    ("too_large", METRICS, b" " * (payloads.MAX_SUMMARY_BYTES + 1)),
    ("too_large", status_topic("dev-0001"), b"x" * (payloads.MAX_STATUS_BYTES + 1)),
    ("bad_json", METRICS, b"\xff\xfe"),
    ("bad_json", METRICS, b"[1, 2]"),
    ("bad_json", METRICS, b'{"round": NaN}'),
    ("bad_json", METRICS, b'{"round": Infinity}'),
    ("bad_json", METRICS, b'{"round": ' + b"9" * 5000 + b"}"),
    ("bad_json", METRICS, b"[" * 100_000),
    ("bad_json", EVENTS, b"not json"),
    ("bad_payload", METRICS, js(summary(1)).replace(b'"accuracy": 0.75', b'"accuracy": 1e999')),
    ("bad_payload", METRICS, js(summary(1, accuracy=1.5))),
    ("bad_payload", METRICS, js(summary(1, round=-1))),
    ("bad_payload", METRICS, js(summary(1, round=True))),
    ("bad_payload", METRICS, js(summary(1, round=2**31))),
    ("bad_payload", METRICS, js(summary(1, state="exploded"))),
    ("bad_payload", METRICS, js(summary(1, reason="x" * 10_000))),
    ("bad_payload", METRICS, js(summary(1, survivors="4"))),
    ("bad_payload", METRICS, js(summary(1, stages={"collect": []}))),
    ("bad_payload", METRICS, js(summary(1, stages={f"s{i}": {} for i in range(9)}))),
    ("bad_payload", METRICS, js(summary(1, cost={"cpu_s": -1}))),
    ("bad_payload", METRICS, js(summary(1, privacy={"epsilon": "lots"}))),
    ("bad_payload", METRICS, js(summary(1, mode="<script>alert(1)</script>"))),
    ("bad_payload", METRICS, js({"state": "closed"})),
    ("bad_payload", EVENTS, js({"round": 1})),
    ("bad_payload", EVENTS, event("x", detail="d" * 1000)),
    ("too_large", EVENTS, event("x", detail="d" * 100_000)),
    ("bad_payload", EVENTS, event("x", nested={"a": 1})),
    ("bad_payload", EVENTS, event("x", dropped=list(range(21)))),
    ("bad_payload", EVENTS, js({"event": "x", **{f"f{i}": i for i in range(30)}})),
    ("bad_payload", health_topic("dev-0001"), health("dev-0001", accuracy="high")),
    ("bad_payload", health_topic("dev-0001"), health("dev-0001", latest={"label": "x" * 500})),
    ("bad_payload", health_topic("dev-0001"), health("dev-0001", ts=-5)),
    ("bad_payload", health_topic("dev-0001"), js({"device_id": "dev-0001", "ts": 5.0})),
    ("bad_payload", health_topic("dev-0001"), js({"device_id": "dev-0001", "model_version": 2})),
    ("bad_payload", status_topic("dev-0001"), b"garbage"),
    ("bad_payload", status_topic("dev-0001"), js({"device_id": "dev-0001", "online": True})),
    ("bad_payload", status_topic("dev-0001"), _frame({"v": 1, "t": "status"})),
    ("bad_payload", status_topic("dev-0001"), _frame({"v": 1, "t": "round.plain_update"})),
    ("bad_payload", status_topic("dev-0001"), _frame({"v": 9, "t": "status"})),
    (
        "bad_payload",
        status_topic("dev-0001"),
        _frame({"v": 1, "t": "status", "device_id": "dev-0001", "online": True, "battery": 7.0}),
    ),
    (
        "bad_payload",
        status_topic("dev-0001"),
        status("dev-0001", sdk_version="v" * 200),
    ),
]


@pytest.mark.parametrize(("reason", "topic", "payload"), GARBAGE)
def test_garbage_only_counts_a_rejection(reason: str, topic: str, payload: bytes) -> None:
    view = FleetView(FLEET)
    view.ingest(METRICS, js(summary(1)), now=1.0)
    view.ingest(status_topic("dev-0001"), status("dev-0001"), now=1.0)
    before = copy.deepcopy(view.snapshot())
    assert view.ingest(topic, payload, now=2.0) == []
    assert rejected(view) == {reason: 1}
    after = view.snapshot()
    after["counts"]["rejected"][reason] = 0
    assert after == before


def test_an_unexpected_failure_costs_the_message_not_the_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view = FleetView(FLEET)
    view.ingest(METRICS, js(summary(1)), now=1.0)

    def broken(payload: bytes, fleet: str) -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(payloads, "summary", broken)
    assert view.ingest(METRICS, js(summary(2)), now=2.0) == []
    assert rejected(view) == {"internal_error": 1}
    assert "RuntimeError: a bug" in view.last_internal_error
    assert [r["round"] for r in view.rounds()] == [1]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = sorted(
    {*summary(1), *json.loads(health("d")), "event", "device", "latest", "privacy", "async"}
)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=8)
TOPICS = [
    METRICS,
    EVENTS,
    status_topic("dev-0001"),
    health_topic("dev-0001"),
    f"fl/{FLEET}/model",
    "fl/other/metrics",
    "fl/plant-7/dev/a+b/status",
]


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from(TOPICS) | st.text(max_size=40),
    payload=st.binary(max_size=200)
    | objects.map(lambda o: json.dumps(o).encode())
    | st.builds(
        lambda s, extra: json.dumps({**s, **extra}).encode(),
        st.builds(summary, st.integers(0, 3)),
        objects,
    )
    | objects.map(_frame),
)
def test_any_input_is_kept_whole_or_counted_and_never_raises(topic: str, payload: bytes) -> None:
    view = FleetView(FLEET)
    view.ingest(METRICS, js(summary(1)), now=1.0)
    before = copy.deepcopy(view.snapshot())
    refused = sum(view.rejected.values())
    replays = view.replays
    updates = view.ingest(topic, payload, now=2.0)
    if updates:
        json.dumps(updates, allow_nan=False)  # what is kept is JSON-ready and finite
        json.dumps(view.snapshot(), allow_nan=False)
    else:
        assert sum(view.rejected.values()) + view.replays == refused + replays + 1
        after = view.snapshot()
        after["counts"] = before["counts"]
        assert after == before
    assert view.rejected["internal_error"] == 0, view.last_internal_error


# Figures near and beyond their bounds, as JSON numbers (ints too: JSON has no float type).
figures = st.one_of(
    st.floats(0, 1e6),
    st.floats(0, 1e308),
    st.integers(0, 2**64),
    st.sampled_from([0, payloads.MAX_FIGURE, payloads.MAX_FIGURE * 1.5, 1e308]),
)
count_values = st.integers(0, 5) | st.integers(0, payloads.MAX_COUNT)
costs = st.none() | st.fixed_dictionaries(
    dict.fromkeys(("cpu_s", "bytes_up", "bytes_down", "energy_j"), figures)
    | {"devices": count_values}
)
summaries = st.builds(
    lambda r, state, survivors, cohort, dropouts, up, down, cost: summary(
        r,
        state=state,
        survivors=survivors,
        cohort=cohort,
        dropouts_recovered=dropouts,
        uplink_bytes_per_device=up,
        downlink_bytes_per_device=down,
        cost=cost,
    ),
    st.integers(1, 5),  # ids again and again: replacements, and (3 kept) evictions
    st.sampled_from(payloads.ROUND_STATES),
    count_values,
    count_values,
    count_values,
    figures,
    figures,
    costs,
)


@settings(max_examples=300, deadline=None)
@given(sequence=st.lists(summaries, max_size=12))
def test_any_sequence_of_summaries_keeps_the_state_finite_and_the_counters_rising(
    sequence: list[dict[str, Any]],
) -> None:
    view = FleetView(FLEET, max_rounds=3)
    before = counters(view)
    for i, s in enumerate(sequence):
        view.ingest(METRICS, js(s), now=float(i))
        json.dumps(view.snapshot(), allow_nan=False)
        after = counters(view)
        for name, value in after.items():
            assert math.isfinite(value), (name, value)
            assert value >= before[name], (name, before[name], value)
        before = after
    assert view.rejected["internal_error"] == 0, view.last_internal_error

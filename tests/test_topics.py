"""The topic namespace: builders and parsers agree, and bad ids or topics are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.shared import topics
from tests.wire_strategies import ids

KINDS = list(topics.Kind)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(KINDS), fleet=ids, device=ids, round_id=st.integers(0, topics.MAX_ROUND)
)
def test_build_then_parse_round_trips(
    kind: topics.Kind, fleet: str, device: str, round_id: int
) -> None:
    needs_round = kind in topics.PER_ROUND or kind in topics.PER_ROUND_DEVICE
    needs_device = kind in topics.PER_DEVICE or kind in topics.PER_ROUND_DEVICE
    text = topics.build(
        kind, fleet, round_id if needs_round else None, device if needs_device else None
    )
    parsed = topics.parse(text)
    assert parsed.kind is kind
    assert parsed.fleet == fleet
    assert parsed.round_id == (round_id if needs_round else None)
    assert parsed.device_id == (device if needs_device else None)
    assert str(parsed) == text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a/b",
        "a+b",
        "a#",
        "$SYS",
        "x" * 65,
        "tab\there",
        "new\nline",
        "-lead",
        ".hidden",
        "sp ace",
        "é",
    ],
)
def test_bad_ids_refused(bad: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.status("plant-7", bad)
    with pytest.raises(topics.TopicError):
        topics.model(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "fl/plant-7",
        "fl/plant-7/",
        "fl/plant-7/nope",
        "xx/plant-7/model",
        "fl/plant-7/model/extra",
        "fl/plant-7/r/01/survivors",
        "fl/plant-7/r/-1/survivors",
        "fl/plant-7/r/99999999999/survivors",
        "fl/plant-7/r/1/adv",
        "fl/plant-7/r/1/adv/+",
        "fl/plant-7/r/1/adv/#",
        "fl/plant-7/dev/d1/adv",
        "fl/plant-7/r/1/status/d1",
        "fl/+/model",
        "fl/plant-7/r/1/roster",
        "fl/plant-7/dev/d1/status" + "x" * 300,
    ],
)
def test_unknown_or_malformed_topics_refused(topic: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.parse(topic)


def test_build_checks_parts() -> None:
    with pytest.raises(topics.TopicError):
        topics.build(topics.Kind.MODEL, "f", round_id=1)
    with pytest.raises(topics.TopicError):
        topics.per_device("f", 1, topics.Kind.SURVIVORS, "d")
    with pytest.raises(topics.TopicError):
        topics.per_round("f", -1, topics.Kind.SURVIVORS)


def test_filters_cover_exactly_the_role_topics() -> None:
    agg = topics.aggregator_filters("f")
    assert "fl/f/dev/+/status" in agg
    assert "fl/f/r/+/masked/+" in agg
    dev = topics.device_filters("f", "d1")
    assert "fl/f/r/+/inbox/d1" in dev
    assert not any(t.endswith("/+") for t in dev)  # never another device's topics
    assert topics.dashboard_filters("f") == (
        "fl/f/metrics",
        "fl/f/events",
        "fl/f/dev/+/health",
        "fl/f/dev/+/status",  # the dashboard's device table
    )
    # Dashboards read fleet-wide JSON and per-device state, never a round's or the model.
    read = {topics.parse(f.replace("+", "d")).kind for f in topics.dashboard_filters("f")}
    K = topics.Kind
    assert read == {K.METRICS, K.EVENTS, K.HEALTH, K.STATUS}

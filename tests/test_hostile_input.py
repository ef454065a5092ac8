"""Hostile input at every decoder and handler that takes bytes from the network.

An attacker holding one device's credentials can publish anything on that device's topics
(and a broken broker can hand a device anything). What is checked here, bounded by hypothesis:
- `wire.decode` raises only `WireError` (or returns a message) for deep nesting (down to and past
  msgpack's own 1024-level stack), huge declared lengths (array/map/str/bin headers claiming up
  to 2^32 - 1 items), and type confusion (any field of any valid message, at any depth,
  replaced by a value of another type);
- the aggregator's round engine (`observe_status`, `receive` for every device topic kind) and a
  device's participant (`on_model`, `on_round`, `on_message`) never raise on such payloads,
  count or report each refusal, and a round fed garbage at every stage still closes with the
  right sum.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleetlearn.aggregator.engine import RoundEngine
from fleetlearn.device.participant import Note, Participant
from fleetlearn.shared import rounds, topics, wire
from fleetlearn.shared.compression import DenseUpdate
from fleetlearn.shared.secagg import messages as sm
from tests.test_rounds_inmemory import FLEET, make_fleet, run_round
from tests.wire_strategies import for_type, full_map

_ZSTD = zstandard.ZstdCompressor(write_content_size=True)
SENTINEL = b"\x00fleetlearn-fuzz-sentinel\x00"
PACKED_SENTINEL = msgpack.packb(SENTINEL, use_bin_type=True)
TYPES = sorted(wire.registered_types().items())


def frame(raw: bytes) -> bytes:
    return _ZSTD.compress(raw)


def nested(depth: int, kind: str, leaf: bytes = b"\xc0") -> bytes:
    """Raw msgpack: `depth` one-item arrays (or one-entry maps) around `leaf`."""
    head = b"\x91" if kind == "array" else b"\x81\xa1k"
    return head * depth + leaf


# Raw msgpack values that lie about their size or nest absurdly deep.
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8,  # array32 claiming 2^32 - 1 items
    b"\xdf\xff\xff\xff\xff\xa1k\xc0",  # map32 claiming 2^32 - 1 entries
    b"\xdb\xff\xff\xff\xffabc",  # str32 claiming 4 GiB
    b"\xc6\xff\xff\xff\xffabc",  # bin32 claiming 4 GiB
    b"\xc9\xff\xff\xff\xff\x01abc",  # ext32 (extension types are refused anyway)
    b"\xdc\xff\xff" + b"\x91" * 3,  # array16 with 65535 items, 3 present
    b"\xde\xff\xff\xa1v\x01",  # map16 with 65535 entries, 1 present
]


@st.composite
def hostile_raw(draw: st.DrawFn) -> bytes:
    """One raw msgpack value chosen to break a decoder."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return nested(draw(st.integers(1, 1100)), draw(st.sampled_from(["array", "map"])))
    if choice == 1:
        return draw(st.sampled_from(HUGE_HEADERS))
    if choice == 2:  # extremes of every scalar type
        return draw(
            st.sampled_from(
                [
                    b"\xcf" + b"\xff" * 8,  # uint64 max
                    b"\xd3\x80" + b"\x00" * 7,  # int64 min
                    b"\xcb" + struct.pack(">d", math.nan),
                    b"\xcb" + struct.pack(">d", -math.inf),
                    b"\xc3",
                    b"\xc0",
                    b"\xa0",
                    b"\xc4\x00",
                ]
            )
        )
    if choice == 3:  # a long string where a short one is expected
        return msgpack.packb("x" * draw(st.sampled_from([5000, 70000])))
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.binary(max_size=40),
    )
    value = draw(
        st.recursive(
            scalars,
            lambda inner: st.one_of(
                st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
            ),
            max_leaves=20,
        )
    )
    return msgpack.packb(value, use_bin_type=True)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a decoded message map where a value can be swapped."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj[:3]):
            out += _paths(value, (*prefix, index))
    return out


def _replace(obj: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return SENTINEL
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[path[0]] = _replace(obj[path[0]], path[1:])
    return copy


@st.composite
def confused_payloads(draw: st.DrawFn) -> tuple[type[wire.Message], bytes]:
    """A valid message of some type with one value, at any depth, replaced by hostile bytes."""
    _, cls = draw(st.sampled_from(TYPES))
    message = draw(for_type(cls))
    body = full_map(message)  # fields at their default too
    path = draw(st.sampled_from(_paths(body)))
    raw = msgpack.packb(_replace(body, path), use_bin_type=True)
    assert raw.count(PACKED_SENTINEL) == 1
    return cls, frame(raw.replace(PACKED_SENTINEL, draw(hostile_raw())))


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(confused_payloads())[1]
    if kind == 1:  # a hostile value where the envelope's version or tag goes
        _, cls = draw(st.sampled_from(TYPES))
        field = draw(st.sampled_from([b"\xa1v", b"\xa1t"]))
        other = b"\xa1t" + msgpack.packb(cls.TAG) if field == b"\xa1v" else b"\xa1v\x01"
        return frame(b"\x82" + field + draw(hostile_raw()) + other)
    return frame(draw(hostile_raw()))


def decode_or_wire_error(payload: bytes, expect: Any = None) -> wire.Message | None:
    try:
        return wire.decode(payload, expect)
    except wire.WireError:
        return None


# ------------------------------------------------------------------------------ the decoder

HOSTILE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_reported_payload_is_refused_with_a_wire_error() -> None:
    """The 31-byte payload of issue 13: the version field nested 1000 deep."""
    payload = frame(b"\x81\xa1v" + nested(1000, "array"))
    assert len(payload) <= 31
    with pytest.raises(wire.WireError):
        wire.decode(payload)
    with pytest.raises(wire.WireError):
        wire.decode(payload, wire.DeviceStatus)


def _examples() -> dict[str, wire.Message]:
    _, engine = _engine_with_round()
    assert engine.announce is not None
    dense = DenseUpdate(values=np.zeros(4, np.float32))
    # Fields at their default are not encoded: the places below need values of their own.
    announce = dataclasses.replace(
        engine.announce, training=dataclasses.replace(engine.announce.training, epochs=2)
    )
    return {
        "status": wire.DeviceStatus(
            device_id="d00", online=True, eligibility=wire.Eligibility.BUSY
        ),
        "plain": rounds.PlainUpdate(
            round_id=1, sender="d00", update=dense, weight=1.0, loss=0.1, correct=0, samples=1
        ),
        "announce": announce,
        "dense": dense,
    }


# (message, path to the value replaced): the envelope, an enum, a nested tagged message and its
# fields, a record and its fields, a tuple and its items, an array map and its parts.
PLACES = [
    ("status", ("v",)),
    ("status", ("t",)),
    ("status", ("eligibility",)),
    ("status", ("device_id",)),
    ("plain", ("update",)),
    ("plain", ("update", "t")),
    ("plain", ("update", "values")),
    ("announce", ("training",)),
    ("announce", ("training", "epochs")),
    ("announce", ("cohort",)),
    ("announce", ("cohort", 0)),
    ("announce", ("secagg", "neighbours")),
    ("announce", ("mode",)),
    ("dense", ("values", "s")),
    ("dense", ("values", "s", 0)),
    ("dense", ("values", "d")),
]


@pytest.mark.parametrize("kind", ["array", "map"])
@pytest.mark.parametrize("depth", [1000, 1024, 5000])
@pytest.mark.parametrize(
    ("name", "path"), PLACES, ids=[f"{n}.{'.'.join(map(str, p))}" for n, p in PLACES]
)
def test_deep_nesting_anywhere_is_a_wire_error(
    kind: str, depth: int, name: str, path: tuple[Any, ...]
) -> None:
    message = _examples()[name]
    raw = msgpack.packb(_replace(wire.to_map(message), path), use_bin_type=True)
    assert raw.count(PACKED_SENTINEL) == 1
    payload = frame(raw.replace(PACKED_SENTINEL, nested(depth, kind)))
    with pytest.raises(wire.WireError):
        wire.decode(payload)
    with pytest.raises(wire.WireError):
        wire.decode(payload, type(message))


@pytest.mark.parametrize("header", HUGE_HEADERS)
def test_huge_declared_lengths_are_refused_without_allocating(header: bytes) -> None:
    inside = msgpack.packb({"v": 1, "t": "status", "device_id": SENTINEL})
    for raw in (header, inside.replace(PACKED_SENTINEL, header)):
        with pytest.raises(wire.WireError):
            wire.decode(frame(raw))


@HOSTILE
@given(confused_payloads())
def test_type_confusion_at_any_depth_only_raises_wire_error(
    case: tuple[type[wire.Message], bytes],
) -> None:
    cls, payload = case
    decode_or_wire_error(payload)
    decode_or_wire_error(payload, cls)


@HOSTILE
@given(hostile_payloads())
def test_hostile_payloads_only_raise_wire_error(payload: bytes) -> None:
    decode_or_wire_error(payload)


# ----------------------------------------------------------------------------- the handlers

DEVICE_KINDS = [
    topics.Kind.ADVERTISE,
    topics.Kind.SHARES,
    topics.Kind.MASKED,
    topics.Kind.UNMASK,
    topics.Kind.UPDATE,
]


def _engine_with_round() -> tuple[Any, RoundEngine]:
    fleet = make_fleet(4)
    manifest_version = next(iter(fleet.devices.values())).model_version
    fleet.publish(
        fleet.engine.start_round(
            round_id=1, model_version=manifest_version, dim=fleet.dim, now=fleet.now
        )
    )
    return fleet, fleet.engine


@HOSTILE
@given(payloads=st.lists(hostile_payloads(), min_size=1, max_size=4), data=st.data())
def test_engine_counts_hostile_payloads_on_every_device_topic(
    payloads: list[bytes], data: st.DataObject
) -> None:
    fleet, engine = _engine_with_round()
    device = data.draw(st.sampled_from(sorted(fleet.devices)))
    before = sum(engine.rejected_total.values())
    for payload in payloads:
        kind = data.draw(st.sampled_from([*DEVICE_KINDS, topics.Kind.STATUS]))
        if kind is topics.Kind.STATUS:
            engine.observe_status(device, payload, fleet.now)
            continue
        topic = topics.parse(topics.per_device(FLEET, 1, kind, device))
        assert engine.receive(topic, payload, fleet.now) == []
    # Every payload was refused and counted (none of them is a valid message for its topic).
    assert sum(engine.rejected_total.values()) - before == len(payloads)
    assert engine.running


def test_a_round_fed_garbage_at_every_stage_still_closes_exactly() -> None:
    """Between every two real messages each device also sends deep-nesting and huge-length
    garbage on the same topic: the round closes with every device in the sum."""
    fleet = make_fleet(6)
    garbage = [frame(b"\x81\xa1v" + nested(1000, "array")), *map(frame, HUGE_HEADERS)]
    real_receive = fleet.receive

    def noisy_receive(topic: topics.Topic, payload: bytes) -> list[Any]:
        for junk in garbage:
            assert fleet.engine.receive(topic, junk, fleet.now) == []
        return real_receive(topic, payload)

    fleet.receive = noisy_receive  # type: ignore[method-assign]
    run_round(fleet)
    outcome = fleet.engine.outcome
    assert outcome is not None
    assert outcome.state is rounds.RoundState.CLOSED, outcome.reason
    assert len(outcome.survivors) == 6
    # advertise, shares and masked input of every device came with garbage (unmask answers
    # may come after the round closed early, when they are not even decoded)
    assert outcome.metrics["rejected_by_reason"]["bad_payload"] >= 3 * 6 * len(garbage)
    inputs = {d: p.inputs[1] for d, p in fleet.devices.items()}
    idx = next(iter(inputs.values()))[0]
    total = sum(i[2] for i in inputs.values())
    mean = sum(i[2] * i[1] for i in inputs.values()) / total
    assert outcome.mean_update is not None
    assert np.max(np.abs(outcome.mean_update[idx] - mean)) <= outcome.error_bound


def _participant() -> Participant:
    fleet = make_fleet(3)
    return next(iter(fleet.devices.values()))


@HOSTILE
@given(payload=hostile_payloads())
def test_participant_reports_hostile_payloads_and_keeps_its_model(payload: bytes) -> None:
    device = _participant()
    version = device.model_version
    assert version >= 1
    for handler in (device.on_model, device.on_round):
        actions = handler(payload, 0.0)
        assert all(isinstance(a, Note) for a in actions)
    assert device.model_version == version
    assert device.round is None


@HOSTILE
@given(payload=hostile_payloads())
def test_participant_in_a_round_ignores_hostile_round_messages(payload: bytes) -> None:
    # A mutation can land on a well-formed unmask request or abort for this round: only the
    # aggregator can publish there (broker ACL), and such a message may end the round (a
    # device the request leaves out stops). That is the protocol, not garbage.
    try:
        real = wire.decode(payload)
    except wire.WireError:
        real = None
    assume(not (isinstance(real, sm.UnmaskRequest | sm.Abort) and real.round_id == 1))
    fleet, _ = _engine_with_round()
    device_id, device = next(iter(fleet.devices.items()))
    assert device.round is not None
    for kind in (topics.Kind.INBOX, topics.Kind.SURVIVORS):
        name = (
            topics.per_device(FLEET, 1, kind, device_id)
            if kind is topics.Kind.INBOX
            else topics.per_round(FLEET, 1, kind)
        )
        actions = device.on_message(topics.parse(name), payload, fleet.now)
        assert all(isinstance(a, Note) for a in actions)
    assert device.round is not None  # garbage from the network does not end its round


def test_device_messages_larger_than_the_round_needs_are_refused_unread() -> None:
    """Each device topic has the size an honest device of this round can need (plus room for
    the envelope), far below the wire's 16 MB: larger payloads are refused before anything is
    decompressed, and counted."""
    fleet, engine = _engine_with_round()
    device = sorted(fleet.devices)[0]
    # 64 kB of random padding: incompressible, so the frame itself is that large.
    padded = frame(msgpack.packb({"v": 1, "t": "status", "pad": os.urandom(64 * 1024)}))
    kinds = [topics.Kind.ADVERTISE, topics.Kind.SHARES, topics.Kind.MASKED, topics.Kind.UNMASK]
    for kind in kinds:
        topic = topics.parse(topics.per_device(FLEET, 1, kind, device))
        assert engine.receive(topic, padded, fleet.now) == []
    engine.observe_status(device, padded, fleet.now)
    refusals = [e for e in engine.drain_events() if e["event"] == "rejected"]
    assert len(refusals) == len(kinds) + 1
    assert all("limit" in e["detail"] and e["reason"] == "bad_payload" for e in refusals)
    assert engine.running

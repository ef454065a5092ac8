"""Acceptance 4: garbage at every stage only ever hurts its sender.

Random bytes through `wire.decode(expect=...)` raise only WireError. Well-formed messages that are
wrong for the machine (another round, another stage, another sender, wrong lengths, wrong
neighbours, bad signatures, duplicates) raise only RemoteProtocolError. Whole rounds with such
garbage injected before and after every real message, in both directions, still finish with the
exact sum for everyone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetlearn.shared import wire
from fleetlearn.shared.secagg.config import SecAggConfig
from fleetlearn.shared.secagg.errors import RemoteProtocolError
from fleetlearn.shared.secagg.harness import AGGREGATOR
from fleetlearn.shared.secagg.messages import (
    TO_AGGREGATOR,
    TO_DEVICE,
    Advertise,
    MaskedInput,
    RevealedShare,
    Roster,
    SealedShare,
    ShareInbox,
    Shares,
    Unmask,
)
from fleetlearn.shared.secagg.server import ServerState
from tests.secagg_strategies import STRATEGIES
from tests.secagg_support import device_ids, run_round
from tests.wire_strategies import full_map

CONFIG = SecAggConfig.create(cohort_size=6, dimension=8, neighbours=4)
DEVICES = device_ids(CONFIG.cohort_size)
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _other_round(round_id: int, shift: int) -> int:
    """A valid round id that is not `round_id` (the harness runs round 1)."""
    other = (round_id + shift) % (2**63)
    return other if other != 1 else 2


def _frame(obj: Any) -> bytes:
    raw = msgpack.packb(obj, use_bin_type=True)
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


# ------------------------------------------------------------------------------ decode level


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_decode_only_to_wire_error(data: bytes) -> None:
    for expect in (TO_AGGREGATOR, TO_DEVICE):
        with pytest.raises(wire.WireError):
            wire.decode(data, expect=expect)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),  # what msgpack can carry
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=200),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from([*TO_AGGREGATOR, *TO_DEVICE]), st.data())
def test_random_maps_with_our_tags_decode_only_to_wire_error(
    cls: type[wire.Message], data: st.DataObject
) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    body = {
        name: data.draw(values) for name in names if data.draw(st.booleans(), label=f"has {name}")
    }
    payload = _frame({"v": 1, "t": cls.TAG, **body})
    try:
        decoded = wire.decode(payload, expect=(*TO_AGGREGATOR, *TO_DEVICE))
    except wire.WireError:
        return
    assert isinstance(decoded, cls)  # rare, but then it is a valid message


# -------------------------------------------------------------------------- whole rounds


def _map_mutation(message: wire.Message, data: st.DataObject) -> bytes:
    """The message's map with one field's value replaced by a value of the wrong shape."""
    body = full_map(message)  # fields at their default too
    field = data.draw(st.sampled_from(sorted(k for k in body if k not in ("v", "t"))))
    original = body[field]
    replacement = data.draw(values.filter(lambda v: type(v) is not type(original)))
    body[field] = replacement
    return _frame(body)


def _wrong_length(message: wire.Message, device: str) -> wire.Message | None:
    """A well-formed message from `device` that its machine must refuse on content."""
    if isinstance(message, Advertise):
        return dataclasses.replace(message, signature=bytes(64))
    if isinstance(message, Shares) and message.shares:
        stranger = SealedShare(recipient=device, ciphertext=message.shares[0].ciphertext)
        return dataclasses.replace(message, shares=(*message.shares[1:], stranger))
    if isinstance(message, MaskedInput):
        return dataclasses.replace(message, masked=message.masked[:-1])
    if isinstance(message, Unmask):
        own = RevealedShare(owner=device, share=bytes(66))  # nobody holds a share of itself
        return dataclasses.replace(message, seed_shares=(*message.seed_shares, own))
    return None


def _uplink_garbage(
    data: st.DataObject, device: str, message: wire.Message
) -> list[wire.Message | bytes]:
    before: list[wire.Message | bytes] = []
    kinds = data.draw(
        st.lists(
            st.sampled_from(
                [
                    "bytes",
                    "corrupt",
                    "map",
                    "round",
                    "stage",
                    "sender",
                    "content",
                    "foreign",
                    "duplicate",
                ]
            ),
            max_size=3,
        ),
        label=f"garbage from {device} at {type(message).__name__}",
    )
    after: list[wire.Message | bytes] = []
    for kind in kinds:
        if kind == "bytes":
            before.append(data.draw(st.binary(max_size=200)))
        elif kind == "corrupt":
            frame = bytearray(wire.encode(message))
            where = data.draw(st.integers(0, len(frame) - 1))
            frame[where] ^= 0xFF
            before.append(bytes(frame))
        elif kind == "map":
            before.append(_map_mutation(message, data))
        elif kind == "round":
            shift = data.draw(st.integers(1, 2**40))
            wrong = _other_round(message.round_id, shift)  # type: ignore[attr-defined]
            before.append(dataclasses.replace(message, round_id=wrong))  # type: ignore[type-var]
        elif kind == "stage":
            other = data.draw(
                st.sampled_from([c for c in TO_AGGREGATOR if not isinstance(message, c)])
            )
            forged = data.draw(STRATEGIES[other.TAG]())
            before.append(dataclasses.replace(forged, round_id=1, sender=device))  # type: ignore[type-var]
        elif kind == "sender":
            other_device = data.draw(st.sampled_from([d for d in DEVICES if d != device]))
            before.append(dataclasses.replace(message, sender=other_device))  # type: ignore[type-var]
        elif kind == "content":
            wrong = _wrong_length(message, device)
            if wrong is not None:
                before.append(wrong)
        elif kind == "foreign" and isinstance(message, Advertise):
            forged = data.draw(STRATEGIES[Advertise.TAG]())
            before.append(dataclasses.replace(forged, round_id=1, sender=device))  # type: ignore[type-var]
        elif kind == "duplicate":
            after.append(message)
    return [*before, message, *after]


def _downlink_garbage(
    data: st.DataObject, device: str, message: wire.Message, history: dict[str, list[wire.Message]]
) -> list[wire.Message | bytes]:
    before: list[wire.Message | bytes] = []
    after: list[wire.Message | bytes] = []
    kinds = data.draw(
        st.lists(
            st.sampled_from(["bytes", "round", "not_mine", "stale", "foreign", "duplicate"]),
            max_size=3,
        ),
        label=f"garbage to {device} at {type(message).__name__}",
    )
    for kind in kinds:
        if kind == "bytes":
            before.append(data.draw(st.binary(max_size=200)))
        elif kind == "round":
            shift = data.draw(st.integers(1, 2**40))
            wrong = _other_round(message.round_id, shift)  # type: ignore[attr-defined]
            before.append(dataclasses.replace(message, round_id=wrong))  # type: ignore[type-var]
        elif kind == "not_mine" and isinstance(message, Roster | ShareInbox):
            other_device = data.draw(st.sampled_from([d for d in DEVICES if d != device]))
            before.append(dataclasses.replace(message, recipient=other_device))
        elif kind == "stale" and history[device]:
            after.append(data.draw(st.sampled_from(history[device])))
        elif kind == "foreign":
            cls = data.draw(st.sampled_from(TO_DEVICE))
            forged = data.draw(STRATEGIES[cls.TAG]())
            wrong = _other_round(forged.round_id, 2)  # type: ignore[attr-defined]
            before.append(dataclasses.replace(forged, round_id=wrong))  # type: ignore[type-var]
        elif kind == "duplicate":
            after.append(message)
    history[device].append(message)
    return [*before, message, *after]


@pytest.mark.parametrize("noisy", [["dev-0002"], DEVICES], ids=["one-device", "every-device"])
@FUZZ
@given(data=st.data())
def test_garbage_never_breaks_the_round(noisy: list[str], data: st.DataObject) -> None:
    history: dict[str, list[wire.Message]] = {d: [] for d in DEVICES}

    def uplink(device: str, message: wire.Message) -> list[wire.Message | bytes]:
        if device not in noisy:
            return [message]
        return _uplink_garbage(data, device, message)

    def downlink(device: str, message: wire.Message) -> list[wire.Message | bytes]:
        if device not in noisy:
            return [message]
        return _downlink_garbage(data, device, message, history)

    run = run_round(CONFIG, uplink=uplink, downlink=downlink, input_seed=17)
    server = run.server
    assert server.state is ServerState.DONE, server.reason
    result = server.result
    assert result is not None
    assert result.survivors == tuple(DEVICES)  # the noisy devices' real messages still count
    assert np.array_equal(result.vector, run.expected[: CONFIG.dimension])
    assert result.extra_grid == tuple(int(v) for v in run.expected[CONFIG.dimension :])
    for device, client in run.clients.items():
        assert client.state.name == "DONE", (device, client.reason)
    for who, error in run.rejected:
        event(
            f"rejected by {'a device' if who == AGGREGATOR else 'the aggregator'}: "
            f"{type(error).__name__}"
        )
        assert isinstance(error, wire.WireError | RemoteProtocolError), repr(error)
        if isinstance(error, RemoteProtocolError):
            if who == AGGREGATOR:  # a device refused something sent to it
                assert error.sender == AGGREGATOR
            else:
                assert error.sender == who
                # Honest devices are refused only for answering after the early close.
                assert who in noisy or "round is over" in str(error)

"""The wire contract: round trips, garbage, mutations and the decompression-bomb guard."""

from __future__ import annotations

import importlib.util
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlearn.shared import wire
from fleetlearn.shared.wire import codec, schema
from tests.wire_strategies import for_type, full_map

ALL_TYPES = sorted(wire.registered_types().items())
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _frame(obj: Any) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(
        msgpack.packb(obj, use_bin_type=True)
    )


def _status(**kw: Any) -> wire.DeviceStatus:
    return wire.DeviceStatus(**{"device_id": "dev-1", "online": True, **kw})


# ---------------------------------------------------------------------------------- round trip


def test_registry_holds_the_foundation_types() -> None:
    assert "status" in dict(ALL_TYPES)


# decode() imports the modules the registry names to learn their tags, and skips a missing one
# (a module not written yet); a module that moved without the list following it would quietly
# take its tags out of decode() wherever nothing else imported it.
@pytest.mark.parametrize("name", schema._MESSAGE_MODULES)
def test_every_module_the_registry_names_exists(name: str) -> None:
    assert importlib.util.find_spec(name) is not None, f"{name} is listed but does not exist"


def test_every_message_type_is_declared_in_a_module_the_registry_names() -> None:
    unlisted = {
        tag: cls.__module__
        for tag, cls in ALL_TYPES
        if cls.__module__ not in schema._MESSAGE_MODULES
    }
    assert not unlisted, f"add these modules to wire.schema._MESSAGE_MODULES: {unlisted}"


@pytest.mark.parametrize(("tag", "cls"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
@FAST
@given(data=st.data())
def test_every_message_type_round_trips(
    tag: str, cls: type[wire.Message], data: st.DataObject
) -> None:
    msg = data.draw(for_type(cls))
    payload = wire.encode(msg)
    back = wire.decode(payload)
    assert type(back) is cls
    assert back == msg
    assert wire.encode(back) == payload  # canonical: one message, one encoding


def test_arrays_travel_as_bytes_dtype_shape() -> None:
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    field = codec._array_out(arr)
    assert field == {"d": "<f4", "s": [3, 4], "b": arr.tobytes()}
    back = codec._array_in(field, wire.DEFAULT_LIMITS)
    assert back.dtype == np.float32
    assert back.shape == (3, 4)
    assert not back.flags.writeable


def test_fields_at_their_default_are_left_out_and_filled_back_in() -> None:
    # A field added later with a default must not reach a peer that predates it unless used:
    # at its default it is not encoded, and the decoder fills the default back in.
    status = wire.DeviceStatus(device_id="d1", online=True)
    raw = wire.to_map(status)
    assert "battery" not in raw
    assert "device_id" in raw
    assert wire.decode(wire.encode(status), wire.DeviceStatus) == status
    charged = wire.DeviceStatus(device_id="d1", online=True, battery=0.5)
    assert wire.to_map(charged)["battery"] == 0.5
    assert wire.decode(wire.encode(charged), wire.DeviceStatus) == charged
    # NaN is never equal to a default, and any value other than the default travels.
    assert "battery" in wire.to_map(wire.DeviceStatus(device_id="d1", online=True, battery=0.0))


# --------------------------------------------------------------------------------- hostile input


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_wire_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except wire.WireError:
        pass


@FAST
@given(data=st.data())
def test_mutated_frames_only_raise_wire_error(data: st.DataObject) -> None:
    payload = bytearray(wire.encode(_status(battery=0.25, samples=7, note="n")))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(payload) - 1)))
        if op == "flip" and payload:
            payload[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and payload:
            del payload[pos]
        elif op == "truncate":
            del payload[pos:]
    try:
        wire.decode(bytes(payload))
    except wire.WireError:
        pass


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.parametrize(("tag", "cls"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
@FAST
@given(data=st.data())
def test_mutated_fields_only_raise_wire_error(
    tag: str, cls: type[wire.Message], data: st.DataObject
) -> None:
    """Well-framed msgpack with one field replaced, dropped or added: schema errors only."""
    body = full_map(data.draw(for_type(cls)))  # fields at their default too
    keys = sorted(body)
    op = data.draw(st.sampled_from(["replace", "drop", "add"]))
    key = data.draw(st.sampled_from(keys))
    if op == "replace":
        body[key] = data.draw(JSONISH)
    elif op == "drop":
        del body[key]
    else:
        body[data.draw(st.text(max_size=6))] = data.draw(JSONISH)
    try:
        wire.decode(_frame(body))
    except wire.WireError:
        pass


@pytest.mark.parametrize(("tag", "cls"), ALL_TYPES, ids=[t for t, _ in ALL_TYPES])
@FAST
@given(data=st.data())
def test_defaults_spelled_out_decode_to_the_same_message(
    tag: str, cls: type[wire.Message], data: st.DataObject
) -> None:
    """A peer that sends fields at their default (as encoders before the rule did) is read
    the same: leaving defaults out is an encoding choice, not a new format."""
    message = data.draw(for_type(cls))
    assert wire.decode(_frame(full_map(message))) == message


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([1, 2], "top level must be a map"),
        ({"t": "status"}, "schema version"),
        ({"v": 2, "t": "status"}, "schema version"),
        ({"v": 1, "t": "nope"}, "unknown message type"),
        ({"v": 1, "t": 5}, "type tag"),
        ({"v": 1, "t": "status", "online": True}, "device_id: missing"),
        ({"v": 1, "t": "status", "device_id": "a/b", "online": True}, "device_id"),
        ({"v": 1, "t": "status", "device_id": "d", "online": 1}, "online: expected bool"),
        ({"v": 1, "t": "status", "device_id": "d", "online": True, "battery": 2.0}, "battery"),
        (
            {"v": 1, "t": "status", "device_id": "d", "online": True, "extra": 1},
            "unknown field 'extra'",
        ),
        (
            {"v": 1, "t": "status", "device_id": "d", "online": True, "eligibility": "x"},
            "eligibility",
        ),
    ],
)
def test_schema_errors_name_the_field(obj: Any, needle: str) -> None:
    with pytest.raises(wire.SchemaError, match=needle):
        wire.decode(_frame(obj))


@pytest.mark.parametrize(
    ("share", "field", "needle"),
    [
        (
            {"recipient": "d2", "ciphertext": "text"},
            "Shares.shares[1].ciphertext",
            "expected bytes",
        ),
        ({"ciphertext": b"x"}, "Shares.shares[1].recipient", "missing"),
        ({"recipient": "d2", "ciphertext": b"x", "more": 1}, "Shares.shares[1]", "unknown field"),
        ([1], "Shares.shares[1]", "expected a map"),
    ],
)
def test_nested_errors_name_the_full_path(share: object, field: str, needle: str) -> None:
    from fleetlearn.shared.secagg.messages import SEALED_SHARE_BYTES

    good = {"recipient": "d1", "ciphertext": b"\0" * SEALED_SHARE_BYTES}
    body = {"v": 1, "t": "secagg.shares", "round_id": 1, "sender": "d0", "shares": [good, share]}
    with pytest.raises(wire.SchemaError, match=needle) as caught:
        wire.decode(_frame(body))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_array_shape_must_match_bytes() -> None:
    with pytest.raises(wire.SchemaError, match="needs 16 bytes, got 12"):
        codec._array_in({"d": "<f4", "s": [4], "b": b"\0" * 12}, wire.DEFAULT_LIMITS)
    with pytest.raises(wire.SchemaError, match="not allowed"):
        codec._array_in({"d": "|O", "s": [1], "b": b"\0" * 8}, wire.DEFAULT_LIMITS)
    with pytest.raises(wire.LimitError, match="exceeds"):
        codec._array_in({"d": "|u1", "s": [2**20, 2**20], "b": b""}, wire.DEFAULT_LIMITS)


def test_extension_types_and_trailing_bytes_refused() -> None:
    ext = zstandard.ZstdCompressor(write_content_size=True).compress(
        msgpack.packb({"v": 1, "t": "status", "x": msgpack.ExtType(5, b"pickle?")})
    )
    with pytest.raises(wire.FrameError, match="extension"):
        wire.decode(ext)
    good = wire.encode(_status())
    with pytest.raises(wire.FrameError):
        wire.decode(good + good)
    with pytest.raises(wire.FrameError):
        wire.decode(good + b"\0")
    extra_msgpack = zstandard.ZstdCompressor(write_content_size=True).compress(
        msgpack.packb({"v": 1}) + b"\x01"
    )
    with pytest.raises(wire.FrameError, match="msgpack"):
        wire.decode(extra_msgpack)


def test_frame_without_declared_size_refused() -> None:
    raw = msgpack.packb(wire.to_map(_status()))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(wire.FrameError, match="does not declare"):
        wire.decode(frame)


def test_context_mismatch_is_a_context_error() -> None:
    payload = wire.encode(_status())
    assert wire.decode(payload, context={"device_id": "dev-1"}).device_id == "dev-1"
    with pytest.raises(wire.ContextError, match="device_id"):
        wire.decode(payload, context={"device_id": "dev-2"})
    with pytest.raises(wire.SchemaError, match="expected"):
        wire.decode(payload, expect=wire.Message)  # type: ignore[type-abstract]


def test_encode_refuses_what_decode_would_refuse() -> None:
    tight = wire.Limits(max_decompressed=64)
    with pytest.raises(wire.LimitError):
        wire.encode(_status(note="x" * 200), limits=tight)


# ------------------------------------------------------------------------------------ the bomb


def _bomb(declared: int, chunk: int = 1 << 24) -> bytes:
    """A valid zstd frame of `declared` zero bytes: a few KB that expand to `declared`."""
    cobj = zstandard.ZstdCompressor(level=19, write_content_size=True).compressobj(size=declared)
    zeros = bytes(chunk)
    parts = []
    for _ in range(declared // chunk):
        parts.append(cobj.compress(zeros))
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def gigabyte_bomb() -> bytes:
    return _bomb(1 << 30)


def test_bomb_is_small_and_declares_a_gigabyte(gigabyte_bomb: bytes) -> None:
    assert len(gigabyte_bomb) < 64 * 1024
    assert zstandard.frame_content_size(gigabyte_bomb) == 1 << 30


def test_bomb_refused_without_allocating(gigabyte_bomb: bytes) -> None:
    # Raise the compressed limit too, so it is the declared-size check that must refuse it.
    limits = wire.Limits(max_compressed=1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(wire.LimitError, match="declares 1073741824 bytes"):
            wire.decode(gigabyte_bomb, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"decode allocated {peak} bytes for a refused payload"


def test_frame_lying_about_its_size_refused() -> None:
    """A header declaring less than the frame holds: zstd stops at the declared size."""
    real = zstandard.ZstdCompressor(write_content_size=True).compress(
        msgpack.packb(wire.to_map(_status(note="y" * 100)))
    )
    small = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x80")
    # Splice the small frame's header onto the big frame's blocks.
    header_len = zstandard.frame_header_size(real)
    forged = small[: zstandard.frame_header_size(small)] + real[header_len:]
    with pytest.raises(wire.FrameError):
        wire.decode(forged)

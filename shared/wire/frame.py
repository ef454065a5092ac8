"""The envelope: `encode`, `decode`, `unframe`, `to_map`. The only place messages become bytes
and bytes become messages.

Rules it keeps:
- A payload is exactly one zstd frame that declares its decompressed size, holding one msgpack
  map `{"v": WIRE_VERSION, "t": <type tag>, ...}`: no trailing bytes, no second frame, no
  msgpack extension types, never pickle.
- Sizes are checked before anything is allocated for them: the compressed length, the size the
  frame header declares (the bomb guard), msgpack string/bin/array/map lengths; the field
  codecs then check each array and string.
- `decode` returns a valid message of a registered (and, with `expect`, an expected) type that
  matches `context`, or raises `WireError`; anything else escaping it is a bug.
Holds one zstd compressor and decompressor per thread, nothing else.
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Mapping
from typing import Any

import msgpack
import zstandard

from fleetlearn.shared.wire.codec import (
    _fields_from_wire,
    _fields_to_wire,
    _located,
    _shown,
    _type_name,
)
from fleetlearn.shared.wire.errors import (
    ContextError,
    FrameError,
    LimitError,
    SchemaError,
    WireError,
)
from fleetlearn.shared.wire.limits import DEFAULT_LIMITS, Limits
from fleetlearn.shared.wire.schema import _REGISTRY, M, Message, Record, _load_message_modules

WIRE_VERSION = 1
_COMPRESSION_LEVEL = 3


class _Zstd(threading.local):
    """One compressor and one decompressor per thread: building a zstd context costs about as
    much as compressing a small message, and the aggregator handles thousands per round.
    (zstandard's objects must not be shared between threads.)"""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(
            level=_COMPRESSION_LEVEL, write_content_size=True, write_checksum=True
        )
        self.decompressor = zstandard.ZstdDecompressor()


_zstd = _Zstd()


def to_map(msg: Message) -> dict[str, Any]:
    """The msgpack-able map for `msg`, with version and type tag."""
    if not isinstance(msg, Message) or isinstance(msg, Record):
        raise SchemaError(f"cannot encode {_type_name(msg)}: not a wire message")
    try:
        body = _fields_to_wire(msg)
    except WireError as exc:
        raise _located(exc, type(msg).__name__) from None
    return {"v": WIRE_VERSION, "t": type(msg).TAG, **body}


def encode(msg: Message, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialize `msg` into one zstd frame. Raises LimitError when it would exceed `limits`."""
    raw = msgpack.packb(to_map(msg), use_bin_type=True)
    if len(raw) > limits.max_decompressed:
        raise LimitError(
            f"{type(msg).__name__} packs to {len(raw)} bytes; limit {limits.max_decompressed}"
        )
    frame = _zstd.compressor.compress(raw)
    if len(frame) > limits.max_compressed:
        raise LimitError(
            f"{type(msg).__name__} compresses to {len(frame)} bytes; limit {limits.max_compressed}"
        )
    return frame


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed")


def unframe(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Check and decompress one frame, then unpack the msgpack object inside it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(f"payload must be bytes, got {_type_name(data)}")
    data = bytes(data)
    if len(data) > limits.max_compressed:
        raise LimitError(f"payload of {len(data)} bytes; limit {limits.max_compressed}")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"not a zstd frame ({exc})") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN or declared < 0:
        raise FrameError("zstd frame does not declare its decompressed size")
    if declared > limits.max_decompressed:
        raise LimitError(
            f"frame declares {declared} bytes decompressed; limit {limits.max_decompressed}"
        )
    try:
        raw = _zstd.decompressor.decompress(data, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FrameError(f"corrupt zstd frame ({exc})") from None
    if len(raw) != declared:
        raise FrameError(f"frame declared {declared} bytes but held {len(raw)}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=limits.max_decompressed,
            max_bin_len=limits.max_decompressed,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=limits.max_decompressed,
        )
    except WireError:
        raise
    except Exception as exc:
        raise FrameError(f"bad msgpack ({type(exc).__name__}: {exc})") from None


def decode(
    data: bytes | bytearray | memoryview,
    expect: type[M] | tuple[type[M], ...] | None = None,
    *,
    context: Mapping[str, object] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> M:
    """Decode one payload into a message.

    `expect` restricts the accepted types (a payload of another type raises SchemaError).
    `context` maps attribute names to the values the arrival point implies, e.g.
    `{"sender": topic_device_id, "round_id": current_round}`; a mismatch raises ContextError.
    """
    obj = unframe(data, limits=limits)
    if not isinstance(obj, dict):
        raise SchemaError(f"top level must be a map, got {_type_name(obj)}")
    version = obj.pop("v", None)
    if version != WIRE_VERSION:
        raise SchemaError(
            f"unsupported schema version {_shown(version)}; this side speaks {WIRE_VERSION}",
            field="v",
        )
    tag = obj.pop("t", None)
    if not isinstance(tag, str):
        raise SchemaError(f"type tag must be a string, got {_type_name(tag)}", field="t")
    cls = _REGISTRY.get(tag)
    if cls is None:
        _load_message_modules()
        cls = _REGISTRY.get(tag)
    if cls is None:
        raise SchemaError(f"unknown message type {_shown(tag)}", field="t")
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if cls not in allowed:
            names = ", ".join(c.__name__ for c in allowed)
            raise SchemaError(f"expected {names}, got {cls.__name__}", field="t")
    try:
        msg = _fields_from_wire(cls, obj, limits)
    except WireError as exc:
        raise _located(exc, cls.__name__) from None
    except RecursionError:
        # A backstop: converters only descend into typed structure and never repr a value
        # whole, so this should not happen; if it does, it is the sender's nesting.
        raise LimitError("nested too deeply", field=cls.__name__) from None
    if context:
        for attr, wanted in context.items():
            actual = getattr(msg, attr, None)
            if actual != wanted:
                raise ContextError(
                    f"{actual!r} does not match {wanted!r} implied by where it arrived",
                    field=f"{cls.__name__}.{attr}",
                )
    return typing.cast(M, msg)

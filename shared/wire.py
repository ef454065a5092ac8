"""The wire contract: typed messages and the one encoder/decoder.

Rules this module keeps:
- A payload is exactly one zstd frame that declares its decompressed size, holding one msgpack
  map `{"v": WIRE_VERSION, "t": <type tag>, <field>: <value>, ...}`. Nothing else is accepted:
  no trailing bytes, no second frame, no msgpack extension types, never pickle.
- Sizes are checked before anything is allocated for them: the compressed length, the size the
  frame header declares (the bomb guard), msgpack string/bin/array/map lengths, and each array's
  element count against its declared shape and dtype.
- Messages are frozen, slotted, keyword-only dataclasses declared with `@message("tag")`. Their
  fields are typed with the small vocabulary below, which is also the schema the decoder
  enforces; `__post_init__` checks the domain rules, so a message that exists is valid.
- Every failure raises `WireError` (or a subclass) whose message names the field at fault.
  Anything else escaping `decode` is a bug.

Field vocabulary: `int`, `float`, `bool`, `str`, `bytes`, `numpy.ndarray` (little-endian numeric
dtypes, shipped as bytes + dtype + shape), `tuple[T, ...]`, `dict[str, T]`, `T | None`, a
`@record` dataclass (nested map without a type tag), `enum.Enum` with str values, and another
`@message` type or a union of them (nested map with its type tag, e.g. an update inside the
envelope that adds its round metrics).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import math
import operator
import threading
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, dataclass_transform

import msgpack
import numpy as np
import zstandard

from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.ids import id_problem

WIRE_VERSION = 1

# Modules that declare messages; imported on demand so that decode() knows every tag.
_MESSAGE_MODULES = (
    "fleetlearn.shared.secagg.messages",
    "fleetlearn.shared.sparse",
    "fleetlearn.shared.tflite_model",
    "fleetlearn.shared.rounds",
)


# --------------------------------------------------------------------------------------- errors


class WireError(FleetlearnError, ValueError):
    """A payload or message is malformed. `field` names the offending field when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.problem = message
        self.field = field


class FrameError(WireError):
    """The bytes are not one well-formed zstd frame holding one msgpack map."""


class LimitError(FrameError):
    """A size limit was exceeded (compressed, declared decompressed, array, string...)."""


class SchemaError(WireError):
    """The map does not match the schema: unknown type, missing field, wrong type or shape."""


class ContextError(WireError):
    """A well-formed message arrived where it does not belong (wrong round, sender, stage...)."""


# --------------------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied by encode() and decode(). Defaults suit models up to ~4M parameters."""

    max_compressed: int = 16 * 1024 * 1024
    max_decompressed: int = 64 * 1024 * 1024
    max_array_elements: int = 16 * 1024 * 1024
    max_array_ndim: int = 4
    max_items: int = 100_000  # elements of one msgpack array or map
    max_str: int = 4096  # characters of one string field

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise WireError("must be a positive integer", field=f"Limits.{f.name}")


DEFAULT_LIMITS = Limits()

# Numeric dtypes allowed on the wire, by their canonical little-endian string.
ARRAY_DTYPES = frozenset(
    {"|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1"}
)


# ------------------------------------------------------------------------------ message classes


class Message:
    """Base of every wire message. Subclasses are made with `@message(tag)`."""

    __slots__ = ()
    TAG: ClassVar[str]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _values_equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    __hash__ = None  # type: ignore[assignment]


class Record(Message):
    """Base of nested value types (no type tag of their own). Made with `@record`."""

    __slots__ = ()


M = TypeVar("M", bound=Message)
_REGISTRY: dict[str, type[Message]] = {}
_CODECS: dict[type[Message], tuple[_FieldCodec, ...]] = {}
_NAMES: dict[type[Message], frozenset[str]] = {}


@dataclass_transform(kw_only_default=True, frozen_default=True, eq_default=False)
def message(tag: str) -> Callable[[type[M]], type[M]]:
    """Declare a top-level wire message with type tag `tag`."""
    if not isinstance(tag, str) or not tag or len(tag) > 64:
        raise WireError(f"bad message tag {tag!r}")

    def wrap(cls: type[M]) -> type[M]:
        if not issubclass(cls, Message) or issubclass(cls, Record):
            raise TypeError(f"{cls.__name__} must derive from wire.Message")
        made = dataclass(frozen=True, slots=True, kw_only=True, eq=False)(cls)
        if tag in _REGISTRY and _REGISTRY[tag].__qualname__ != made.__qualname__:
            raise TypeError(f"message tag {tag!r} is used by {_REGISTRY[tag].__qualname__}")
        for f in dataclasses.fields(made):  # type: ignore[arg-type]
            if f.name in ("v", "t"):
                raise TypeError(f"{cls.__name__}: field names 'v' and 't' are reserved")
        made.TAG = tag
        _REGISTRY[tag] = made
        return made

    return wrap


@dataclass_transform(kw_only_default=True, frozen_default=True, eq_default=False)
def record(cls: type[M]) -> type[M]:
    """Declare a nested value type (a map inside a message, no type tag)."""
    if not issubclass(cls, Record):
        raise TypeError(f"{cls.__name__} must derive from wire.Record")
    return dataclass(frozen=True, slots=True, kw_only=True, eq=False)(cls)


def registered_types() -> dict[str, type[Message]]:
    """Every message type known to the decoder, by tag (imports the declaring modules)."""
    _load_message_modules()
    return dict(_REGISTRY)


def _load_message_modules() -> None:
    for name in _MESSAGE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A module not written yet is fine; a broken import inside one is not.
            if exc.name != name:
                raise


def _values_equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    return a == b


# ------------------------------------------------------------------- validation helpers (public)


def require(condition: bool, field: str, problem: str) -> None:
    """Raise SchemaError(problem, field) unless `condition` holds. For __post_init__ checks."""
    if not condition:
        raise SchemaError(problem, field=field)


def require_id(value: str, field: str) -> None:
    problem = id_problem(value)
    if problem is not None:
        raise SchemaError(problem, field=field)


def require_ids(values: Iterable[str], field: str, *, unique: bool = True) -> None:
    seen: set[str] = set()
    for value in values:
        require_id(value, field)
        if unique and value in seen:
            raise SchemaError(f"{value!r} appears twice", field=field)
        seen.add(value)


def require_unique(values: Iterable[str], field: str) -> None:
    """No value twice. For ids that nested records already validated when they were built."""
    items = list(values)
    if len(set(items)) != len(items):
        seen: set[str] = set()
        for value in items:
            if value in seen:
                raise SchemaError(f"{value!r} appears twice", field=field)
            seen.add(value)


def require_array(
    value: np.ndarray, field: str, *, dtype: str | None = None, ndim: int | None = None
) -> None:
    if dtype is not None and value.dtype != np.dtype(dtype):
        raise SchemaError(f"dtype must be {np.dtype(dtype)}, not {value.dtype}", field=field)
    if ndim is not None and value.ndim != ndim:
        raise SchemaError(f"must have {ndim} dimension(s), not {value.ndim}", field=field)


# ------------------------------------------------------------------------------- field codecs


class _FieldCodec:
    """Turns one field's Python value into msgpack-able data and back, checking as it goes.

    Converters take no path: building "Msg.items[3].owner" for every value costs more than
    checking it. They raise with `field` None or relative ("[3].owner"), and each level that
    catches the error puts its own step in front (`_located`); only failures pay for paths."""

    __slots__ = ("default", "from_wire", "has_default", "name", "to_wire")

    def __init__(
        self,
        name: str,
        to_wire: Callable[[Any], Any],
        from_wire: Callable[[Any, Limits], Any],
        has_default: bool,
        default: Any,
    ) -> None:
        self.name = name
        self.to_wire = to_wire
        self.from_wire = from_wire
        self.has_default = has_default
        self.default = default


def _located(exc: WireError, step: str) -> WireError:
    """`exc` with `step` put in front of its relative field path. A field that names itself
    absolutely (a `__post_init__` check says "recipient" or "SparseUpdate.scale") stays."""
    field = exc.field
    if field is not None and not field.startswith((".", "[")):
        return exc
    return type(exc)(exc.problem, field=step + (field or ""))


def _codecs_for(cls: type[Message]) -> tuple[_FieldCodec, ...]:
    cached = _CODECS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    codecs = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        to_wire, from_wire = _converters(hints[f.name], f"{cls.__name__}.{f.name}")
        has_default = f.default is not dataclasses.MISSING or (
            f.default_factory is not dataclasses.MISSING
        )
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        codecs.append(_FieldCodec(f.name, to_wire, from_wire, has_default, default))
    result = tuple(codecs)
    _NAMES[cls] = frozenset(c.name for c in result)
    _CODECS[cls] = result
    return result


def _type_name(value: object) -> str:
    return type(value).__name__


def _shown(value: object, width: int = 40) -> str:
    """A short, safe description of an untrusted value for an error message. Never `repr` a
    decoded value whole: a list nested a thousand deep makes repr raise RecursionError, and a
    64 MB string would become a 64 MB message."""
    if value is None or type(value) in (bool, int, float):
        text = repr(value)
    elif type(value) in (str, bytes):
        text = repr(value[:width])  # type: ignore[index]
        if len(value) > width:  # type: ignore[arg-type]
            text += f"... ({len(value)} long)"  # type: ignore[arg-type]
        return text
    elif type(value) in (list, dict):
        return f"a {_type_name(value)} of {len(value)} items"  # type: ignore[arg-type]
    else:
        return f"a {_type_name(value)}"
    return text if len(text) <= width else text[:width] + "..."


def _converters(hint: Any, where: str) -> tuple[Callable[[Any], Any], Callable[[Any, Limits], Any]]:
    """Build (to_wire, from_wire) for one annotation. `where` only names the field in bugs."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if hint is int:

        def int_out(v: Any) -> Any:
            if type(v) is not int:
                raise SchemaError(f"expected int, got {_type_name(v)}")
            return v

        def int_in(v: Any, limits: Limits) -> Any:
            if type(v) is not int:
                raise SchemaError(f"expected int, got {_type_name(v)}")
            return v

        return int_out, int_in

    if hint is float:

        def float_out(v: Any) -> Any:
            if type(v) not in (float, int):
                raise SchemaError(f"expected float, got {_type_name(v)}")
            return float(v)

        def float_in(v: Any, limits: Limits) -> Any:
            if type(v) not in (float, int):
                raise SchemaError(f"expected float, got {_type_name(v)}")
            return float(v)

        return float_out, float_in

    if hint is bool or hint is bytes or hint is str:
        expected = typing.cast(type, hint)

        def plain_out(v: Any) -> Any:
            if type(v) is not expected:
                raise SchemaError(f"expected {expected.__name__}, got {_type_name(v)}")
            return v

        def plain_in(v: Any, limits: Limits) -> Any:
            if type(v) is not expected:
                raise SchemaError(f"expected {expected.__name__}, got {_type_name(v)}")
            if isinstance(v, str) and len(v) > limits.max_str:
                raise LimitError(f"string of {len(v)} characters; limit {limits.max_str}")
            return v

        return plain_out, plain_in

    if hint is np.ndarray or origin is np.ndarray:
        return _array_out, _array_in

    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        enum_type = hint

        def enum_out(v: Any) -> Any:
            if not isinstance(v, enum_type):
                raise SchemaError(f"expected {enum_type.__name__}, got {_shown(v)}")
            return v.value

        by_value = {m.value: m for m in enum_type}

        def enum_in(v: Any, limits: Limits) -> Any:
            # A dict lookup, not enum_type(v): Enum's own error reprs the value whole.
            member = by_value.get(v) if type(v) is str else None
            if member is None:
                allowed = ", ".join(repr(m.value) for m in enum_type)
                raise SchemaError(f"{_shown(v)} is not one of {allowed}")
            return member

        return enum_out, enum_in

    nested = _message_alternatives(hint)
    if nested:
        by_tag = {cls.TAG: cls for cls in nested}

        def msg_out(v: Any) -> Any:
            if type(v) not in nested:
                names = ", ".join(c.__name__ for c in nested)
                raise SchemaError(f"expected one of {names}, got {_type_name(v)}")
            return {"t": type(v).TAG, **_fields_to_wire(v)}

        def msg_in(v: Any, limits: Limits) -> Any:
            if not isinstance(v, dict):
                raise SchemaError(f"expected a map, got {_type_name(v)}")
            body = dict(v)
            tag = body.pop("t", None)
            cls = by_tag.get(tag) if isinstance(tag, str) else None
            if cls is None:
                raise SchemaError(f"type {_shown(tag)} is not allowed here")
            return _fields_from_wire(cls, body, limits)

        return msg_out, msg_in

    if isinstance(hint, type) and issubclass(hint, Record):
        rec_type = hint

        def rec_out(v: Any) -> Any:
            if type(v) is not rec_type:
                raise SchemaError(f"expected {rec_type.__name__}, got {_type_name(v)}")
            return _fields_to_wire(v)

        def rec_in(v: Any, limits: Limits) -> Any:
            if not isinstance(v, dict):
                raise SchemaError(f"expected a map, got {_type_name(v)}")
            return _fields_from_wire(rec_type, v, limits)

        return rec_out, rec_in

    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_out, item_in = _converters(args[0], where)
        flat = _FlatRecords.of(args[0])

        def tuple_out(v: Any) -> Any:
            if not isinstance(v, tuple):
                raise SchemaError(f"expected a tuple, got {_type_name(v)}")
            if flat is not None:
                done = flat.to_wire(v)
                if done is not None:
                    return done
            try:
                return [item_out(x) for x in v]
            except WireError as exc:
                raise _located(exc, f"[{_failing_index(v, item_out)}]") from None

        def tuple_in(v: Any, limits: Limits) -> Any:
            if not isinstance(v, list):
                raise SchemaError(f"expected a list, got {_type_name(v)}")
            if flat is not None:
                done = flat.from_wire(v, limits)
                if done is not None:
                    return done
            try:
                return tuple([item_in(x, limits) for x in v])
            except WireError as exc:
                at = _failing_index(v, lambda x: item_in(x, limits))
                raise _located(exc, f"[{at}]") from None

        return tuple_out, tuple_in

    if origin is dict and len(args) == 2 and args[0] is str:
        val_out, val_in = _converters(args[1], where)

        def dict_out(v: Any) -> Any:
            if not isinstance(v, dict):
                raise SchemaError(f"expected a dict, got {_type_name(v)}")
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise SchemaError(f"keys must be str, got {_type_name(k)}")
                try:
                    out[k] = val_out(x)
                except WireError as exc:
                    raise _located(exc, f"[{k!r}]") from None
            return out

        def dict_in(v: Any, limits: Limits) -> Any:
            if not isinstance(v, dict):
                raise SchemaError(f"expected a map, got {_type_name(v)}")
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise SchemaError(f"keys must be str, got {_type_name(k)}")
                if len(k) > limits.max_str:
                    raise LimitError(f"key of {len(k)} characters")
                try:
                    out[k] = val_in(x, limits)
                except WireError as exc:
                    raise _located(exc, f"[{k!r}]") from None
            return out

        return dict_out, dict_in

    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        some_out, some_in = _converters(inner, where)

        def opt_out(v: Any) -> Any:
            return None if v is None else some_out(v)

        def opt_in(v: Any, limits: Limits) -> Any:
            return None if v is None else some_in(v, limits)

        return opt_out, opt_in

    raise TypeError(f"{where}: annotation {hint!r} is outside the wire vocabulary")


class _FlatRecords:
    """A fast path for lists of records whose fields are all required str/bytes/int/bool (the
    shares and adverts of SecAgg, 20 per message and thousands of messages per round).

    Same checks as the general path, done in bulk: exact field names, exact types, string
    limits, then the record's own `__post_init__`. Anything unusual returns None and the caller
    takes the general path, which then names the failing item and field."""

    __slots__ = ("_get", "_names", "_strings", "_type", "_types")

    def __init__(self, rec_type: type[Record], fields: list[tuple[str, type]]) -> None:
        self._type = rec_type
        self._names = tuple(name for name, _ in fields)
        self._types = tuple(t for _, t in fields)
        self._strings = tuple(name for name, t in fields if t is str)
        self._get = operator.attrgetter(*self._names)

    @classmethod
    def of(cls, hint: Any) -> _FlatRecords | None:
        if not (isinstance(hint, type) and issubclass(hint, Record)):
            return None
        hints = typing.get_type_hints(hint)
        fields = []
        for f in dataclasses.fields(hint):  # type: ignore[arg-type]
            kind = hints[f.name]
            if kind not in (str, bytes, int, bool) or (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            ):
                return None
            fields.append((f.name, kind))
        return cls(hint, fields) if len(fields) >= 2 else None

    def from_wire(self, items: list[Any], limits: Limits) -> tuple[Any, ...] | None:
        names, types, strings, make = self._names, self._types, self._strings, self._type
        out = []
        try:
            for x in items:
                if type(x) is not dict or len(x) != len(names):
                    return None
                if tuple(map(type, map(x.get, names))) != types:
                    return None
                for name in strings:
                    if len(x[name]) > limits.max_str:
                        return None
                out.append(make(**x))
        except Exception:  # the general path raises the proper WireError
            return None
        return tuple(out)

    def to_wire(self, items: tuple[Any, ...]) -> list[dict[str, Any]] | None:
        names, types, get, rec_type = self._names, self._types, self._get, self._type
        out = []
        for x in items:
            if type(x) is not rec_type:
                return None
            values = get(x)
            if tuple(map(type, values)) != types:
                return None
            out.append(dict(zip(names, values, strict=True)))
        return out


def _failing_index(items: Iterable[Any], convert: Callable[[Any], Any]) -> int:
    """Which item `convert` refuses (run again on the error path only, to name it)."""
    for i, x in enumerate(items):
        try:
            convert(x)
        except WireError:
            return i
    return -1  # pragma: no cover - the caller saw one fail


def _message_alternatives(hint: Any) -> tuple[type[Message], ...]:
    """The message classes a field may hold: `SomeMessage` or `A | B | C` of tagged messages."""
    candidates = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    if candidates and all(
        isinstance(c, type) and issubclass(c, Message) and not issubclass(c, Record)
        for c in candidates
    ):
        return tuple(candidates)
    return ()


def _array_out(v: Any) -> Any:
    if not isinstance(v, np.ndarray):
        raise SchemaError(f"expected numpy array, got {_type_name(v)}")
    dtype = v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else v.dtype
    if dtype.str not in ARRAY_DTYPES:
        raise SchemaError(f"dtype {v.dtype} cannot travel on the wire")
    data = np.ascontiguousarray(v, dtype=dtype)
    return {"d": dtype.str, "s": list(v.shape), "b": data.tobytes()}


def _array_in(v: Any, limits: Limits) -> Any:
    if not isinstance(v, dict) or set(v) != {"d", "s", "b"}:
        raise SchemaError("expected an array map with keys d, s, b")
    dtype_str, shape, data = v["d"], v["s"], v["b"]
    if not isinstance(dtype_str, str) or dtype_str not in ARRAY_DTYPES:
        raise SchemaError(f"dtype {_shown(dtype_str)} is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_array_ndim:
        raise SchemaError(f"shape must be a list of at most {limits.max_array_ndim} ints")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise SchemaError(f"shape holds {_shown(dim)}, not a size >= 0")
        count *= dim
        if count > limits.max_array_elements:
            raise LimitError(f"shape {shape!r} exceeds {limits.max_array_elements} elements")
    if not isinstance(data, bytes):
        raise SchemaError(f"array data must be bytes, got {_type_name(data)}")
    dtype = np.dtype(dtype_str)
    if len(data) != count * dtype.itemsize:
        raise SchemaError(
            f"shape {shape!r} of {dtype} needs {count * dtype.itemsize} bytes, got {len(data)}"
        )
    # frombuffer shares the (immutable) bytes: no copy, and the array comes out read-only.
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _fields_to_wire(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for codec in _codecs_for(type(msg)):
        name = codec.name
        try:
            out[name] = codec.to_wire(getattr(msg, name))
        except WireError as exc:
            raise _located(exc, f".{name}") from None
    return out


def _fields_from_wire(cls: type[M], data: Mapping[str, Any], limits: Limits) -> M:
    """Build `cls` from its field map; errors carry a field path relative to it."""
    codecs = _codecs_for(cls)
    if len(data) > len(codecs) or not _NAMES[cls].issuperset(data):
        unknown = next(key for key in data if key not in _NAMES[cls])
        raise SchemaError(f"unknown field {_shown(unknown)} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for codec in codecs:
        name = codec.name
        if name not in data:
            if not codec.has_default:
                raise SchemaError("missing", field=f".{name}")
            continue
        try:
            kwargs[name] = codec.from_wire(data[name], limits)
        except WireError as exc:
            raise _located(exc, f".{name}") from None
    try:
        return cls(**kwargs)
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise SchemaError(f"invalid {cls.__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- encode / decode

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


# ------------------------------------------------------------------- messages of the foundation


class Eligibility(enum.Enum):
    """Why a device may or may not join a cohort (ARCHITECTURE §7)."""

    ELIGIBLE = "eligible"
    BUSY = "busy"  # the machine it serves needs the CPU now
    LOW_BATTERY = "low_battery"
    OFFLINE = "offline"


@message("status")
class DeviceStatus(Message):
    """Retained on `fl/{fleet}/dev/{id}/status`; the last will is `online=False`."""

    device_id: str
    online: bool
    eligibility: Eligibility = Eligibility.ELIGIBLE
    charging: bool = False
    battery: float = 1.0  # fraction 0..1; mains-powered gateways report 1.0
    model_version: int = 0
    sdk_version: str = ""
    samples: int = 0  # local training examples available
    note: str = ""  # e.g. why the last release was refused
    # SHA-256 commitment to the device's current secret graph draw (shared.secagg.keys
    # .ticket_of), 16 bytes; empty when it has none (offline will, older devices). The
    # aggregator copies it into the announcement of a secure round; a new one follows each
    # round the device advertised in.
    ticket: bytes = b""

    def __post_init__(self) -> None:
        require_id(self.device_id, "device_id")
        require(len(self.ticket) in (0, 16), "ticket", "must be empty or 16 bytes")
        require(0.0 <= self.battery <= 1.0, "battery", f"{self.battery} is outside 0..1")
        require(self.model_version >= 0, "model_version", "must be >= 0")
        require(self.samples >= 0, "samples", "must be >= 0")
        require(len(self.note) <= 512, "note", "longer than 512 characters")

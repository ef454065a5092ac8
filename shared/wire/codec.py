"""Field codecs: each annotation of the wire vocabulary becomes a pair of converters, Python value
to msgpack-able data and back, that check as they go.

Rules it keeps:
- Decoding trusts nothing: exact types (a bool is not an int), strings and arrays within
  `Limits`, arrays only in `ARRAY_DTYPES` with a byte count that matches their shape, enums by
  value, nested messages only of the types the annotation names. It never `repr`s an untrusted
  value whole (`_shown`).
- A failure is a `WireError` whose field path is built only on the error path (`_located`).
- An annotation outside the vocabulary is a bug in the declaring module: TypeError at first use.
Converters are built once per class and cached; they hold no other state.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fleetlearn.shared.wire.errors import LimitError, SchemaError, WireError
from fleetlearn.shared.wire.limits import ARRAY_DTYPES, Limits
from fleetlearn.shared.wire.schema import M, Message, Record

_CODECS: dict[type[Message], tuple[_FieldCodec, ...]] = {}
_NAMES: dict[type[Message], frozenset[str]] = {}


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

    def is_default(self, value: Any) -> bool:
        """Whether `value` is this field's plain default (same type, equal). Such fields are
        left out of the encoding, so adding a field with a default to a message keeps every
        message that does not use it readable by peers built before it existed."""
        default = self.default
        if default is dataclasses.MISSING or type(value) is not type(default):
            return False
        try:
            return bool(value == default)
        except (TypeError, ValueError):  # an array-like compares element-wise: keep it
            return False


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
        value = getattr(msg, name)
        if codec.is_default(value):
            continue  # the decoder fills it in; a peer that predates the field never sees it
        try:
            out[name] = codec.to_wire(value)
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

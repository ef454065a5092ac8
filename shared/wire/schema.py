"""Declaring messages: `Message`, `Record`, `@message(tag)`, `@record`, the tag registry, and
the `require*` helpers that `__post_init__` checks use.

Rules it keeps:
- A message is a frozen, slotted, keyword-only dataclass; its `__post_init__` checks the domain
  rules, so a message that exists is valid. Equality compares arrays by dtype, shape and value
  (NaN equal to NaN), so a message equals its own decoding.
- One tag, one class: a second class under a used tag is refused; `v` and `t` are reserved.
- The registry knows every tag once the modules in `_MESSAGE_MODULES` are imported, which
  `registered_types()` and `decode` do on demand; keep that list in step with the modules that
  declare messages (tests/test_wire.py checks that each one exists).
Trusts nothing it is given: the helpers raise `SchemaError` naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar, dataclass_transform

import numpy as np

from fleetlearn.shared.ids import id_problem
from fleetlearn.shared.wire.errors import SchemaError, WireError

# Modules that declare messages; imported on demand so that decode() knows every tag.
_MESSAGE_MODULES = (
    "fleetlearn.shared.secagg.messages",
    "fleetlearn.shared.compression.messages",
    "fleetlearn.shared.compression.feedback",
    "fleetlearn.shared.tflite.manifest",
    "fleetlearn.shared.release",
    "fleetlearn.shared.rounds",
    "fleetlearn.shared.wire.status",
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

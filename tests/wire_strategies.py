"""Hypothesis strategies for wire messages, derived from their field annotations.

Every registered message type gets a strategy built from the wire vocabulary; types whose
`__post_init__` rules are too narrow for random fields register an explicit strategy in
`EXPLICIT` (keyed by tag). Invalid draws are discarded with `assume`, and a type whose draws are
nearly all invalid fails hypothesis' health check, which tells its author to add one here.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from shared import wire

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_.:"
ids = st.text(ID_ALPHABET, min_size=1, max_size=12).map(lambda s: "d" + s)
DTYPES = ["|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f4", "<f8"]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    count = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def for_annotation(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return st.integers(-(2**63), 2**64 - 1)
    if hint is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.one_of(ids, st.text(max_size=20))
    if hint is bytes:
        return st.binary(max_size=64)
    if hint is np.ndarray or origin is np.ndarray:
        return arrays()
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(list(hint))
    if isinstance(hint, type) and issubclass(hint, wire.Record):
        return for_type(hint)
    if origin is tuple:
        return st.lists(for_annotation(args[0]), max_size=5).map(tuple)
    if origin is dict:
        return st.dictionaries(ids, for_annotation(args[1]), max_size=5)
    if origin in (typing.Union, types.UnionType):
        inner = args[0] if args[1] is type(None) else args[1]
        return st.one_of(st.none(), for_annotation(inner))
    raise TypeError(f"no strategy for {hint!r}")


EXPLICIT: dict[str, Callable[[], st.SearchStrategy[wire.Message]]] = {}


def for_type(cls: type[wire.Message]) -> st.SearchStrategy[Any]:
    if not issubclass(cls, wire.Record) and cls.TAG in EXPLICIT:
        return EXPLICIT[cls.TAG]()
    hints = typing.get_type_hints(cls)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            has_default = f.default is not dataclasses.MISSING
            if has_default and draw(st.booleans()):
                continue
            kwargs[f.name] = draw(for_annotation(hints[f.name]))
        try:
            return cls(**kwargs)
        except wire.WireError:
            assume(False)
            raise  # unreachable: assume(False) aborts the example

    return build()

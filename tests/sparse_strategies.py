"""Hypothesis strategies for shared.compression's wire messages (valid instances only).

Random fields almost never satisfy these messages' rules (strictly increasing gaps, values on
the grid, a float32 scale), so the generic strategies of tests/wire_strategies.py discard every
draw; `STRATEGIES` (keyed by tag, the shape of wire_strategies.EXPLICIT) builds valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

from fleetlearn.shared import wire
from fleetlearn.shared.compression import DenseUpdate, ResidualState, SharedUpdate, SparseUpdate

_float32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def sparse_updates(draw: st.DrawFn) -> SparseUpdate:
    dim = draw(st.integers(1, 100_000))
    count = draw(st.integers(1, min(dim, 50)))
    chosen = draw(st.sets(st.integers(0, dim - 1), min_size=count, max_size=count))
    indices = np.array(sorted(chosen), dtype=np.int64)
    gaps = np.diff(indices, prepend=0)
    gap_dtype = draw(
        st.sampled_from([d for d in ("|u1", "<u2", "<u4") if gaps.max() <= np.iinfo(d).max])
    )
    bits = draw(st.sampled_from([8, 16]))
    levels = (1 << (bits - 1)) - 1
    values = draw(st.lists(st.integers(-levels, levels), min_size=count, max_size=count))
    scale = draw(st.floats(min_value=0.0, allow_infinity=False, width=32))
    return SparseUpdate(
        dim=dim,
        gaps=gaps.astype(gap_dtype),
        values=np.array(values, dtype=f"<i{bits // 8}"),
        scale=float(scale),
    )


@st.composite
def shared_updates(draw: st.DrawFn) -> SharedUpdate:
    dim = draw(st.integers(1, 100_000))
    count = draw(st.integers(1, min(dim, 50)))
    bits = draw(st.integers(1, 32))
    dtype = "|u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4"
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count))
    return SharedUpdate(
        dim=dim,
        bits=bits,
        clip=draw(st.floats(1e-6, 1e6)),
        values=np.array(values, dtype=dtype),
    )


@st.composite
def dense_updates(draw: st.DrawFn) -> DenseUpdate:
    values = draw(st.lists(_float32, min_size=1, max_size=50))
    return DenseUpdate(values=np.array(values, dtype="<f4"))


@st.composite
def residual_states(draw: st.DrawFn) -> ResidualState:
    values = draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=50)
    )
    return ResidualState(residual=np.array(values, dtype="<f8"), rounds=draw(st.integers(0, 2**40)))


STRATEGIES: dict[str, Callable[[], st.SearchStrategy[wire.Message]]] = {
    "update.sparse": sparse_updates,
    "update.randk": shared_updates,
    "update.dense": dense_updates,
    "sparse.residual": residual_states,
}

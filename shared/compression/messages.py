"""The wire types of compression: a round's `Compression` settings and the three update messages.

Owns `SparseMode`, `Compression` (a `wire.record` carried in the round announcement) and
`SparseUpdate` (top-k), `SharedUpdate` (rand-k) and `DenseUpdate`. Trusts nothing: every one
validates in `__post_init__`, so a message that exists is well-formed (hostile bytes raise
`wire.SchemaError` naming the field); whether it fits *this* round is `codec.check_update`'s
question. Tags: `update.sparse`, `update.randk`, `update.dense`.
"""

from __future__ import annotations

import enum
import math
from typing import cast

import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.compression.coordinates import MAX_DIM, coordinate_count
from fleetlearn.shared.compression.quantization import _VALUE_DTYPES, TOP_K_BITS, quant_dtype

# Index gaps (top-k) and grid values (rand-k) travel in the smallest of these that holds them.
_GAP_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


# ------------------------------------------------------------------------ round configuration


class SparseMode(enum.Enum):
    """How a round's updates are compressed (carried in the round announcement)."""

    DENSE = "dense"  # float32, every coordinate: the baseline
    TOP_K = "top_k"  # plain mode only: each device its own k largest, indices on the wire
    RAND_K = "rand_k"  # secure-compatible: the round seed picks the same k for every device


@wire.record
class Compression(wire.Record):
    """A round's compression settings. Every device of the round uses the same ones.

    `bits` is the value width: 8 or 16 for TOP_K (int8/int16 + scale), the grid width q in
    1..32 for RAND_K (secure aggregation needs b >= q + ceil(log2 n) ring bits). `clip` bounds
    each RAND_K coordinate before quantization; it must be shared because the aggregator
    dequantizes the *sum* with it. DENSE uses neither.
    """

    mode: SparseMode
    density: float = 1.0
    bits: int = 8
    clip: float = 1.0

    def __post_init__(self) -> None:
        wire.require(
            math.isfinite(self.density) and 0.0 < self.density <= 1.0,
            "Compression.density",
            f"{self.density!r} is outside (0, 1]",
        )
        wire.require(
            math.isfinite(self.clip) and self.clip > 0.0,
            "Compression.clip",
            f"{self.clip!r} must be finite and > 0",
        )
        if self.mode is SparseMode.DENSE:
            wire.require(self.density == 1.0, "Compression.density", "dense mode sends all")
        elif self.mode is SparseMode.TOP_K:
            wire.require(
                self.bits in TOP_K_BITS, "Compression.bits", f"top-k needs one of {TOP_K_BITS}"
            )
        else:
            wire.require(
                1 <= self.bits <= 32, "Compression.bits", f"rand-k needs 1..32, not {self.bits}"
            )

    @property
    def secure_compatible(self) -> bool:
        """True when every device sends the same coordinates, as masking requires."""
        return self.mode is SparseMode.RAND_K

    def k(self, dim: int) -> int:
        """How many coordinates one update carries for a model of `dim` parameters."""
        return dim if self.mode is SparseMode.DENSE else coordinate_count(dim, self.density)


# ----------------------------------------------------------------------------- wire messages


def _require_dim(dim: int, field: str) -> None:
    wire.require(1 <= dim <= MAX_DIM, field, f"{dim} is outside 1..{MAX_DIM}")


def _require_finite_float32(value: float, field: str) -> None:
    wire.require(
        math.isfinite(value)
        and abs(value) <= float(np.finfo(np.float32).max)
        and float(np.float32(value)) == value,
        field,
        f"{value!r} is not a finite float32 number",
    )


class _Sized:
    """Bytes accounting shared by the update messages."""

    __slots__ = ()
    dim: int

    @property
    def dense_bytes(self) -> int:
        """What the same update costs as a plain float32 vector: 4 * dim."""
        return 4 * self.dim

    @property
    def wire_bytes(self) -> int:
        """Length of wire.encode(self), i.e. what is published. Encodes on every access."""
        return len(wire.encode(cast(wire.Message, self)))


@wire.message("update.sparse")
class SparseUpdate(_Sized, wire.Message):
    """Plain-mode top-k update: delta-coded indices, int8/int16 values and one float32 scale.

    Index i is gaps[0] + ... + gaps[i]: gaps[0] is the first index, later gaps are >= 1 (so the
    indices are strictly increasing, hence sorted and distinct), and the last index is < dim.
    `gaps` uses the smallest unsigned dtype that holds the largest gap; zstd in the envelope
    takes care of the zero high bytes. Coordinate value = values[i] * scale.
    Round, sender and FedAvg weight travel in the envelope that carries it (rounds.PlainUpdate).
    """

    dim: int
    gaps: np.ndarray
    values: np.ndarray
    scale: float

    def __post_init__(self) -> None:
        _require_dim(self.dim, "SparseUpdate.dim")
        wire.require_array(self.gaps, "SparseUpdate.gaps", ndim=1)
        wire.require(
            self.gaps.dtype in _GAP_DTYPES,
            "SparseUpdate.gaps",
            f"dtype must be uint8, uint16 or uint32, not {self.gaps.dtype}",
        )
        wire.require_array(self.values, "SparseUpdate.values", ndim=1)
        wire.require(
            self.values.dtype in _VALUE_DTYPES.values(),
            "SparseUpdate.values",
            f"dtype must be int8 or int16, not {self.values.dtype}",
        )
        count = self.gaps.shape[0]
        wire.require(
            self.values.shape[0] == count,
            "SparseUpdate.values",
            f"holds {self.values.shape[0]} values for {count} indices",
        )
        wire.require(1 <= count <= self.dim, "SparseUpdate.gaps", f"{count} indices for {self.dim}")
        wire.require(
            bool(np.all(self.gaps[1:] > 0)),
            "SparseUpdate.gaps",
            "indices must be strictly increasing (a gap of 0 repeats an index)",
        )
        last = int(self.gaps.sum(dtype=np.int64))
        wire.require(last < self.dim, "SparseUpdate.gaps", f"index {last} is not below {self.dim}")
        levels = (1 << (self.bits - 1)) - 1
        wire.require(
            int(np.abs(self.values.astype(np.int32)).max()) <= levels,
            "SparseUpdate.values",
            f"values must lie in -{levels}..{levels}",
        )
        _require_finite_float32(self.scale, "SparseUpdate.scale")
        wire.require(self.scale >= 0.0, "SparseUpdate.scale", "must be >= 0")

    @property
    def bits(self) -> int:
        return 8 * self.values.dtype.itemsize

    @property
    def count(self) -> int:
        return int(self.gaps.shape[0])

    def indices(self) -> np.ndarray:
        """The coordinates, as a sorted int64 array."""
        return np.cumsum(self.gaps, dtype=np.int64)


def _grid_wire_dtype(bits: int) -> np.dtype:
    return _GAP_DTYPES[0 if bits <= 8 else 1 if bits <= 16 else 2]


@wire.message("update.randk")
class SharedUpdate(_Sized, wire.Message):
    """Secure-compatible rand-k update: q-bit grid values for the round's shared coordinates.

    No index list travels: the coordinates are `shared_coordinates(round seed, dim, k)`, and
    values[i] belongs to the i-th of them. values are grid points 0..2^bits-1 in the smallest
    unsigned dtype that holds them (uint8 up to 8 bits, uint16 up to 16, uint32 up to 32); in
    a secure round these are what SecAgg masks, widened to its ring.
    """

    dim: int
    bits: int
    clip: float
    values: np.ndarray

    def __post_init__(self) -> None:
        _require_dim(self.dim, "SharedUpdate.dim")
        wire.require(1 <= self.bits <= 32, "SharedUpdate.bits", f"{self.bits} is outside 1..32")
        wire.require(
            math.isfinite(self.clip) and self.clip > 0.0,
            "SharedUpdate.clip",
            f"{self.clip!r} must be finite and > 0",
        )
        expected = _grid_wire_dtype(self.bits)
        wire.require_array(self.values, "SharedUpdate.values", dtype=expected.str, ndim=1)
        count = self.values.shape[0]
        wire.require(
            1 <= count <= self.dim, "SharedUpdate.values", f"{count} values for {self.dim}"
        )
        top = int(self.values.max())
        wire.require(
            top < (1 << self.bits),
            "SharedUpdate.values",
            f"grid value {top} does not fit {self.bits} bits",
        )

    @property
    def count(self) -> int:
        return int(self.values.shape[0])

    def grid(self) -> np.ndarray:
        """The values widened to quantize()'s dtype (uint32), ready for masking or summing."""
        return self.values.astype(quant_dtype(self.bits))


@wire.message("update.dense")
class DenseUpdate(_Sized, wire.Message):
    """The baseline: every coordinate as float32."""

    values: np.ndarray

    def __post_init__(self) -> None:
        wire.require_array(self.values, "DenseUpdate.values", dtype="<f4", ndim=1)
        _require_dim(self.values.shape[0], "DenseUpdate.values")
        wire.require(
            bool(np.all(np.isfinite(self.values))),
            "DenseUpdate.values",
            "holds NaN or infinity",
        )

    @property
    def dim(self) -> int:  # type: ignore[override]
        return int(self.values.shape[0])


Update = SparseUpdate | SharedUpdate | DenseUpdate
_UPDATE_TYPE: dict[SparseMode, type[SparseUpdate | SharedUpdate | DenseUpdate]] = {
    SparseMode.DENSE: DenseUpdate,
    SparseMode.TOP_K: SparseUpdate,
    SparseMode.RAND_K: SharedUpdate,
}

"""Update compression: quantization, shared-seed rand-k, top-k, error feedback, packing.

What this module owns: turning a device's dense float update into a small wire message and back,
and the per-device error-feedback residual that makes lossy compression converge anyway.

Rules it keeps:
- Pure. No global RNG, no clock, no I/O. Randomness for stochastic rounding is a numpy Generator
  the caller passes in (device-local noise, never mask material). Coordinates that several
  devices must agree on come only from the round's 32-byte seed through a ChaCha20 keystream,
  so they are the same on every numpy version.
- Every lossy step states its error bound next to the code and in docs/compression.md.
- Local misuse (bad bits, non-finite update) raises `CompressionError`; anything that came off
  the wire and is wrong raises `wire.WireError` (a `SchemaError` naming the field, or a
  `ContextError` when a well-formed update does not fit the round).
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple, cast

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetlearn.shared import wire
from fleetlearn.shared.errors import FleetlearnError

# bits above 62 would leave no headroom in a uint64 for the sum of even a few contributions.
MAX_QUANT_BITS = 62
# Largest model dimension an update may declare; keeps delta-coded gaps and rand-k's 32-bit
# draws within uint32, and stops a hostile `dim` from making a receiver allocate gigabytes.
MAX_DIM = (1 << 31) - 1


class CompressionError(FleetlearnError, ValueError):
    """A compression function was called with values or parameters it cannot honour."""


# ------------------------------------------------------------------------------- quantization


def _check_clip_bits(clip: float, bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= MAX_QUANT_BITS:
        raise CompressionError(f"bits must be an int in 1..{MAX_QUANT_BITS}, got {bits!r}")
    if not isinstance(clip, float | int) or isinstance(clip, bool):
        raise CompressionError(f"clip must be a number, got {type(clip).__name__}")
    if not (np.isfinite(clip) and clip > 0):
        raise CompressionError(f"clip must be finite and > 0, got {clip!r}")


def quant_dtype(bits: int) -> np.dtype:
    """The unsigned dtype `quantize` returns for `bits`: uint32 up to 32 bits, else uint64."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def quant_step(clip: float, bits: int) -> float:
    """Distance between neighbouring grid points: 2*clip / (2^bits - 1)."""
    _check_clip_bits(clip, bits)
    return 2.0 * float(clip) / float((1 << bits) - 1)


def quantize(x: np.ndarray, *, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip] and stochastically round onto the grid {0, ..., 2^bits - 1}.

    -clip maps to 0 and +clip to 2^bits - 1. Rounding goes up with probability equal to the
    fractional part, so E[dequantize(quantize(x))] == clip(x) exactly (unbiased). Error bound,
    per coordinate: clipping moves a value by max(0, |x| - clip) (biased, so pick clip from the
    update's scale, and let error feedback carry it); rounding then adds a zero-mean error of
    magnitude < step = 2*clip/(2^bits - 1), variance <= step^2 / 4.
    Above 52 bits float64 cannot resolve the grid, so the bound there is the float64
    resolution instead: < max(step, clip * 2^-51) per coordinate.

    Returns uint32 for bits <= 32, uint64 otherwise.
    """
    _check_clip_bits(clip, bits)
    if not isinstance(rng, np.random.Generator):
        raise CompressionError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    values = np.asarray(x)
    if values.dtype.kind not in "fiu":
        raise CompressionError(f"cannot quantize dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise CompressionError("update holds NaN or infinity; refusing to quantize it")
    levels = (1 << bits) - 1
    scaled = np.clip(values, -clip, clip)
    scaled += clip
    scaled *= levels / (2.0 * clip)
    floor = np.floor(scaled)
    # Up with probability frac: E[floor + (u < frac)] = floor + frac = scaled.
    floor += rng.random(scaled.shape) < (scaled - floor)
    dtype = quant_dtype(bits)
    # Float rounding of scaled can land a hair above `levels`; the grid ends there.
    np.clip(floor, 0.0, float(levels), out=floor)
    q = floor.astype(dtype)
    if bits > 52:
        np.minimum(q, dtype.type(levels), out=q)
    return q


def dequantize(q: np.ndarray, *, clip: float, bits: int, count: int = 1) -> np.ndarray:
    """Map grid values back to floats; `q` may be the sum of `count` quantized vectors.

    Each contribution was shifted by +clip before scaling, so the sum of `count` of them carries
    count*clip of offset, which is removed here. The result is float64. A sum of `count`
    quantized vectors is within count * step of the sum of the clipped inputs (each rounding is
    < step and zero-mean, so the typical error grows like sqrt(count) * step / 2).
    A coordinate above count * (2^bits - 1) cannot be a sum of `count` honest contributions and
    raises CompressionError (overflowed ring, wrong count, or a corrupt vector).
    """
    _check_clip_bits(clip, bits)
    if type(count) is not int or count < 0:
        raise CompressionError(f"count must be an int >= 0, got {count!r}")
    grid = np.asarray(q)
    if grid.dtype.kind not in "iu":
        raise CompressionError(f"quantized values must be integers, got dtype {grid.dtype}")
    levels = (1 << bits) - 1
    if grid.size:
        low, high = int(grid.min()), int(grid.max())
        if low < 0 or high > count * levels:
            raise CompressionError(
                f"quantized values span {low}..{high}, outside 0..{count * levels} "
                f"for {count} contribution(s) of {bits} bits"
            )
    out = grid.astype(np.float64)
    out *= 2.0 * float(clip) / float(levels)
    out -= count * float(clip)
    return out


# -------------------------------------------------------------------- shared-seed coordinates

SEED_BYTES = 32
# Label for the key derivation: a seed used for masks elsewhere never yields these coordinates.
_RANDK_LABEL = b"fleetlearn/sparse/rand-k/v1"


def coordinate_count(dim: int, density: float) -> int:
    """k for a model of `dim` parameters at `density` (fraction in (0, 1]); at least 1.

    Rounds to nearest so that density 0.01 of 100_000 is 1000 on every platform even though
    0.01 * 100_000 is 1000.0000000000001 in binary floating point.
    """
    if type(dim) is not int or dim < 1:
        raise CompressionError(f"dim must be an int >= 1, got {dim!r}")
    if not isinstance(density, float | int) or not 0.0 < density <= 1.0:
        raise CompressionError(f"density must be in (0, 1], got {density!r}")
    return min(dim, max(1, round(density * dim)))


def _chacha(seed: bytes, dim: int) -> Cipher:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_RANDK_LABEL + dim.to_bytes(8, "big")
    ).derive(seed)
    # The key serves this purpose only, so the all-zero nonce and counter are safe.
    return Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None)


def _first_distinct(seed: bytes, dim: int, count: int) -> np.ndarray:
    """The first `count` distinct coordinates drawn from the seed's stream, sorted.

    Draws are little-endian uint32 words w of the keystream; w >= floor(2^32/dim) * dim is
    rejected so that w % dim is exactly uniform on 0..dim-1.
    """
    stream = _chacha(seed, dim).encryptor()
    limit = ((1 << 32) // dim) * dim
    # Expected draws for `count` distinct out of dim: -dim * ln(1 - count/dim); ask for a bit
    # more so that one pass nearly always suffices.
    want = int(-dim * math.log1p(-count / dim) * 1.05) + 64
    # first_seen[c] = position in the accepted stream where c first appeared (`never` if not):
    # minimum.at is order-independent, so this is the same on every numpy.
    never = np.iinfo(np.int64).max
    first_seen = np.full(dim, never, dtype=np.int64)
    drawn = 0
    while True:
        words = np.frombuffer(stream.update(bytes(4 * want)), dtype="<u4")
        draws = (words[words < limit] % dim).astype(np.int64)
        np.minimum.at(first_seen, draws, np.arange(drawn, drawn + draws.shape[0]))
        drawn += draws.shape[0]
        seen = np.flatnonzero(first_seen != never)
        if seen.shape[0] >= count:
            break
        want = max(64, want // 4)  # rare: the stream simply continues
    if seen.shape[0] == count:
        return seen
    # Positions are distinct, so the `count` earliest are one well-defined set; selecting it with
    # a threshold keeps `seen`'s ascending order.
    positions = first_seen[seen]
    last = np.partition(positions, count - 1)[count - 1]
    return seen[positions <= last]


def shared_coordinates(seed: bytes, dim: int, k: int) -> np.ndarray:
    """The k coordinates of a `dim`-vector that every device of a round sends (rand-k).

    Derived from the full 32-byte round seed alone, as a uniformly random k-subset: HKDF-SHA256
    of the seed, with a purpose label and `dim`, keys a ChaCha20 keystream; the stream's words,
    rejection-sampled onto 0..dim-1, are drawn until enough distinct coordinates have appeared.
    For k <= dim/2 the first k distinct ones are chosen; above that the first dim - k distinct
    ones are left out (fewer draws). Nothing depends on numpy's random generators, sort
    stability or tie-breaking, so every device and numpy version picks the same set.
    Costs ~2 ms for k = 10% of 1M on one core.

    Returns a sorted int64 array of length k.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise CompressionError(f"seed must be {SEED_BYTES} bytes")
    if type(dim) is not int or not 1 <= dim <= MAX_DIM:
        raise CompressionError(f"dim must be an int in 1..{MAX_DIM}, got {dim!r}")
    if type(k) is not int or not 1 <= k <= dim:
        raise CompressionError(f"k must be an int in 1..{dim}, got {k!r}")
    if k == dim:
        return np.arange(dim, dtype=np.int64)
    if 2 * k <= dim:
        return _first_distinct(seed, dim, k)
    keep = np.ones(dim, dtype=bool)
    keep[_first_distinct(seed, dim, dim - k)] = False
    return np.flatnonzero(keep).astype(np.int64, copy=False)


# ------------------------------------------------------------------------- top-k (plain mode)

TOP_K_BITS = (8, 16)  # int8 or int16 values
_GAP_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
_VALUE_DTYPES: dict[int, np.dtype] = {8: np.dtype(np.int8), 16: np.dtype(np.int16)}


def top_k_coordinates(update: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of the k largest-magnitude coordinates of a 1-D update.

    Ties are broken however numpy's introselect breaks them; that is fine for plain mode, where
    each device chooses for itself and the indices travel on the wire.
    """
    values = _as_update(update)
    dim = values.shape[0]
    if type(k) is not int or not 1 <= k <= dim:
        raise CompressionError(f"k must be an int in 1..{dim}, got {k!r}")
    if k == dim:
        return np.arange(dim, dtype=np.int64)
    chosen = np.argpartition(np.abs(values), dim - k)[dim - k :]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


def quantize_symmetric(
    values: np.ndarray, *, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Scale by max|v| and stochastically round to int8 (bits=8) or int16 (bits=16).

    Returns (ints, scale) with scale a float32 number and ints in [-L, L], L = 2^(bits-1) - 1;
    the decoded value is ints * scale. Unbiased; per coordinate the error is zero-mean and
    < scale = max|v| / L (max|v| / 127 for int8, / 32767 for int16). No clipping: the scale
    follows the largest value sent, so nothing is cut off.
    """
    if bits not in TOP_K_BITS:
        raise CompressionError(f"value bits must be one of {TOP_K_BITS}, got {bits!r}")
    v = np.asarray(values, dtype=np.float64)
    dtype = _VALUE_DTYPES[bits]
    levels = (1 << (bits - 1)) - 1
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    scale32 = np.float32(peak / levels)
    # The receiver only knows the float32 scale, so round it up rather than down: then
    # |v| / scale <= L and no value needs to be clipped (clipping would bias it).
    if float(scale32) * levels < peak:
        scale32 = np.nextafter(scale32, np.float32(np.inf))
    scale = float(scale32)
    if scale == 0.0 or not math.isfinite(scale):
        if not math.isfinite(scale):
            raise CompressionError(f"largest value {peak!r} does not fit a float32 scale")
        return np.zeros(v.shape, dtype=dtype), 0.0
    scaled = v / scale
    floor = np.floor(scaled)
    floor += rng.random(scaled.shape) < (scaled - floor)
    # Only float64 rounding of v / scale can reach L + 1 here, with probability ~1e-16.
    np.clip(floor, -levels, levels, out=floor)
    return floor.astype(dtype), scale


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


# ---------------------------------------------------------------------------------- encoders


def _as_update(update: np.ndarray) -> np.ndarray:
    values = np.asarray(update)
    if values.ndim != 1 or values.shape[0] < 1:
        raise CompressionError(f"an update is a non-empty 1-D vector, got shape {values.shape}")
    if values.dtype.kind not in "fiu":
        raise CompressionError(f"cannot compress dtype {values.dtype}")
    if values.shape[0] > MAX_DIM:
        raise CompressionError(f"{values.shape[0]} parameters exceed {MAX_DIM}")
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise CompressionError("update holds NaN or infinity; refusing to compress it")
    return values


def _gap_dtype(largest_gap: int) -> np.dtype:
    for dtype in _GAP_DTYPES:
        if largest_gap <= np.iinfo(dtype).max:
            return dtype
    raise CompressionError(f"gap {largest_gap} does not fit uint32")  # excluded by MAX_DIM


def encode_top_k(
    update: np.ndarray, *, k: int, bits: int, rng: np.random.Generator
) -> SparseUpdate:
    """Plain mode: the k largest-magnitude coordinates, int8/int16 values, delta-coded indices.

    Error: unsent coordinates are dropped whole (error feedback carries them); each sent one
    gets a zero-mean rounding error < max|sent| / (2^(bits-1) - 1).
    """
    values = _as_update(update)
    indices = top_k_coordinates(values, k)
    ints, scale = quantize_symmetric(values[indices], bits=bits, rng=rng)
    gaps = np.diff(indices, prepend=0)
    gaps = gaps.astype(_gap_dtype(int(gaps.max())))
    return SparseUpdate(dim=values.shape[0], gaps=gaps, values=ints, scale=scale)


def encode_rand_k(
    update: np.ndarray,
    *,
    seed: bytes,
    k: int,
    clip: float,
    bits: int,
    rng: np.random.Generator,
    coordinates: np.ndarray | None = None,
) -> SharedUpdate:
    """Secure-compatible: the round's shared coordinates, clipped and quantized to `bits`.

    `coordinates` may pass in shared_coordinates(seed, dim, k) when the caller already has
    it (it is the same for every device of the round). Error: unsent coordinates dropped whole,
    clipping max(0, |x| - clip), rounding zero-mean and < 2*clip/(2^bits - 1).
    """
    if type(bits) is not int or not 1 <= bits <= 32:
        raise CompressionError(f"rand-k values travel with 1..32 bits, got {bits!r}")
    values = _as_update(update)
    dim = values.shape[0]
    if coordinates is None:
        coordinates = shared_coordinates(seed, dim, k)
    elif coordinates.shape != (k,):
        raise CompressionError(f"{coordinates.shape[0]} coordinates passed for k = {k}")
    grid = quantize(values[coordinates], clip=clip, bits=bits, rng=rng)
    return SharedUpdate(
        dim=dim, bits=bits, clip=float(clip), values=grid.astype(_grid_wire_dtype(bits))
    )


def encode_dense(update: np.ndarray) -> DenseUpdate:
    """The float32 baseline. Error: float32 rounding, relative 2^-24 per coordinate."""
    values = _as_update(update)
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    if not np.all(np.isfinite(single)):
        raise CompressionError("update overflows float32")
    return DenseUpdate(values=single)


class Compressed(NamedTuple):
    """What compress() produced: the message to publish and what the aggregator will decode
    from it (a dense float64 vector), so error feedback can keep the difference."""

    message: Update
    sent: np.ndarray


def compress(
    update: np.ndarray,
    config: Compression,
    *,
    rng: np.random.Generator,
    seed: bytes | None = None,
) -> Compressed:
    """Compress one update as `config` says, with no memory of earlier rounds.

    `seed` (the round's 32 bytes) is required for RAND_K; `rng` feeds stochastic rounding.
    """
    values = _as_update(update)
    dim = values.shape[0]
    msg: Update
    if config.mode is SparseMode.DENSE:
        msg = encode_dense(values)
        return Compressed(msg, msg.values.astype(np.float64))
    k = config.k(dim)
    if config.mode is SparseMode.TOP_K:
        msg = encode_top_k(values, k=k, bits=config.bits, rng=rng)
        indices = msg.indices()
    else:
        if seed is None:
            raise CompressionError("rand-k needs the round seed")
        indices = shared_coordinates(seed, dim, k)
        msg = encode_rand_k(
            values,
            seed=seed,
            k=k,
            clip=config.clip,
            bits=config.bits,
            rng=rng,
            coordinates=indices,
        )
    return Compressed(msg, scatter(indices, _values_of(msg), dim))


# ---------------------------------------------------------------------------------- decoders


def _values_of(msg: SparseUpdate | SharedUpdate) -> np.ndarray:
    if isinstance(msg, SparseUpdate):
        return msg.values.astype(np.float64) * msg.scale
    return dequantize(msg.values, clip=msg.clip, bits=msg.bits)


def scatter(indices: np.ndarray, values: np.ndarray, dim: int) -> np.ndarray:
    """A dense float64 vector of `dim` zeros with `values` placed at `indices`."""
    dense = np.zeros(dim, dtype=np.float64)
    dense[indices] = values
    return dense


def check_update(msg: Update, *, config: Compression, dim: int) -> None:
    """Raise wire.ContextError unless `msg` is what this round's `config` asks of a `dim` model.

    The message validated itself when it was built; this checks it against the round: the type
    for the mode, the model size, the count k, and the value width/clip everyone agreed on.
    """
    name = type(msg).__name__
    wanted = _UPDATE_TYPE[config.mode]
    if not isinstance(msg, wanted):
        raise wire.ContextError(f"a {config.mode.value} round takes {wanted.__name__}", field=name)
    if msg.dim != dim:
        raise wire.ContextError(f"{msg.dim} parameters; the model has {dim}", field=f"{name}.dim")
    if isinstance(msg, DenseUpdate):
        return
    k = config.k(dim)
    if msg.count != k:
        raise wire.ContextError(
            f"{msg.count} coordinates; the round asks for k = {k}",
            field=f"{name}.{'gaps' if isinstance(msg, SparseUpdate) else 'values'}",
        )
    if msg.bits != config.bits:
        raise wire.ContextError(
            f"{msg.bits}-bit values; the round uses {config.bits}",
            field=f"{name}.{'values' if isinstance(msg, SparseUpdate) else 'bits'}",
        )
    if isinstance(msg, SharedUpdate) and msg.clip != config.clip:
        raise wire.ContextError(
            f"clip {msg.clip!r}; the round uses {config.clip!r}", field=f"{name}.clip"
        )


def decode_update(
    payload: bytes | bytearray | memoryview,
    *,
    config: Compression,
    dim: int,
    limits: wire.Limits = wire.DEFAULT_LIMITS,
) -> Update:
    """wire.decode a bare update payload and check it against the round (failures: WireError).

    An update nested in an envelope (rounds.PlainUpdate) is decoded with it; call
    check_update(envelope.update, ...) then.
    """
    # decode() already restricted the type to the mode's; cast() only tells mypy so.
    msg = cast(Update, wire.decode(payload, _UPDATE_TYPE[config.mode], limits=limits))
    check_update(msg, config=config, dim=dim)
    return msg


def to_sparse(
    msg: Update, *, config: Compression, dim: int, seed: bytes | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted int64 indices, float64 values) the update stands for; checks it first.

    `seed` is required for SharedUpdate (the coordinates are not on the wire).
    """
    check_update(msg, config=config, dim=dim)
    if isinstance(msg, DenseUpdate):
        return np.arange(dim, dtype=np.int64), msg.values.astype(np.float64)
    if isinstance(msg, SparseUpdate):
        return msg.indices(), _values_of(msg)
    if seed is None:
        raise CompressionError("decoding a rand-k update needs the round seed")
    return shared_coordinates(seed, dim, msg.count), _values_of(msg)


def to_dense(
    msg: Update, *, config: Compression, dim: int, seed: bytes | None = None
) -> np.ndarray:
    """The dense float64 vector the update stands for; checks it against the round first."""
    indices, values = to_sparse(msg, config=config, dim=dim, seed=seed)
    return scatter(indices, values, dim)


def unpack_shared_sum(
    total: np.ndarray, *, config: Compression, dim: int, seed: bytes, count: int
) -> np.ndarray:
    """Secure-mode aggregator: the unmasked sum of `count` SharedUpdate grids, as a dense vector.

    `total` holds, per shared coordinate, the sum of `count` grid vectors (already reduced out
    of SecAgg's ring, so 0 <= total <= count * (2^bits - 1)). Returns the float64 sum of the
    count decoded updates; error vs the sum of clipped inputs < count * 2*clip/(2^bits - 1).
    """
    if not config.secure_compatible:
        raise CompressionError(f"{config.mode.value} updates cannot be summed under masks")
    k = config.k(dim)
    grid = np.asarray(total)
    if grid.shape != (k,):
        raise CompressionError(f"sum has shape {grid.shape}; the round has k = {k}")
    values = dequantize(grid, clip=config.clip, bits=config.bits, count=count)
    return scatter(shared_coordinates(seed, dim, k), values, dim)


# ---------------------------------------------------------------------------- error feedback


@wire.message("sparse.residual")
class ResidualState(wire.Message):
    """A device's error-feedback residual, as saved between restarts."""

    residual: np.ndarray
    rounds: int = 0

    def __post_init__(self) -> None:
        wire.require_array(self.residual, "ResidualState.residual", dtype="<f8", ndim=1)
        _require_dim(self.residual.shape[0], "ResidualState.residual")
        wire.require(
            bool(np.all(np.isfinite(self.residual))),
            "ResidualState.residual",
            "holds NaN or infinity",
        )
        wire.require(self.rounds >= 0, "ResidualState.rounds", "must be >= 0")


class ErrorFeedback:
    """The device's memory of what it has not sent yet (error feedback / error compensation).

    Each round: accumulated = residual + update; send compress(accumulated); residual =
    accumulated - sent, where `sent` is exactly what the aggregator decodes (so quantization and
    clipping error are carried too, not only the unsent coordinates). Hence, over any number of
    rounds, sum(sent) + residual == sum(updates) up to float64 rounding.

    `compress()` does all of it for the encoders here. When another layer does the quantizing
    (SecAgg scales by the FedAvg weight, clips and rounds itself), use the two halves:
    `accumulate(update)` gives residual + update, and `commit(sent)` takes the dense vector the
    aggregator will decode from what was actually sent, in the same units.
    If a round's update never reaches the sum (round aborted, device not a survivor), call
    `reclaim(sent)` to put it back. Persist with save()/load() across restarts.
    """

    __slots__ = ("_pending", "_residual", "rounds")

    def __init__(self, dim: int) -> None:
        if type(dim) is not int or not 1 <= dim <= MAX_DIM:
            raise CompressionError(f"dim must be an int in 1..{MAX_DIM}, got {dim!r}")
        self._residual = np.zeros(dim, dtype=np.float64)
        self._pending: np.ndarray | None = None
        self.rounds = 0

    @property
    def dim(self) -> int:
        return int(self._residual.shape[0])

    @property
    def residual(self) -> np.ndarray:
        """A read-only view of what is owed to the aggregator."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def _check(self, vector: np.ndarray, name: str) -> np.ndarray:
        values = _as_update(vector)
        if values.shape[0] != self.dim:
            raise CompressionError(f"{name} has {values.shape[0]} parameters, expected {self.dim}")
        return values

    def accumulate(self, update: np.ndarray) -> np.ndarray:
        """residual + update (a new float64 array): what this round should try to send.

        Nothing changes until commit(); calling accumulate again replaces the pending sum.
        """
        self._pending = self._residual + self._check(update, "update")
        return self._pending.copy()

    def commit(self, sent: np.ndarray) -> None:
        """Keep accumulated - sent as the residual. `sent` is dense, in the update's units."""
        if self._pending is None:
            raise CompressionError("commit() without accumulate(): nothing is pending")
        self._residual = self._pending - self._check(sent, "sent")
        self._pending = None
        self.rounds += 1

    def compress(
        self,
        update: np.ndarray,
        config: Compression,
        *,
        rng: np.random.Generator,
        seed: bytes | None = None,
    ) -> Compressed:
        """Compress residual + update as `config` says and keep the rest for next round."""
        result = compress(self.accumulate(update), config, rng=rng, seed=seed)
        self.commit(result.sent)
        return result

    def reclaim(self, sent: np.ndarray) -> None:
        """Add back an update that was compressed but never applied by the aggregator."""
        self._residual = self._residual + self._check(sent, "sent")

    def save(self) -> bytes:
        """The residual as one wire payload, for the caller to store."""
        return wire.encode(ResidualState(residual=self._residual.copy(), rounds=self.rounds))

    @classmethod
    def load(cls, data: bytes | bytearray | memoryview, *, dim: int | None = None) -> ErrorFeedback:
        """Restore from save()'s bytes. Damaged or hostile bytes raise wire.WireError; a residual
        for a different model size (when `dim` is given) raises wire.ContextError."""
        state = wire.decode(data, ResidualState)
        if dim is not None and state.residual.shape[0] != dim:
            raise wire.ContextError(
                f"saved for {state.residual.shape[0]} parameters; the model has {dim}",
                field="ResidualState.residual",
            )
        restored = cls(int(state.residual.shape[0]))
        restored._residual = state.residual.astype(np.float64)  # writable copy
        restored.rounds = state.rounds
        return restored

"""Encoding a dense float update into an update message, and decoding one back.

Owns the encoders (`encode_top_k`, `encode_rand_k`, `encode_dense`, and `compress`, which
follows a round's `Compression`) and the decoders (`check_update`, `decode_update`, `to_sparse`,
`to_dense`, and `unpack_shared_sum` for the unmasked sum of a secure round).
Guarantees: `compress` returns, beside the message, exactly the dense vector the aggregator will
decode from it, so error feedback can keep the difference; each encoder states its error bound.
Trusts its caller's update only after `_as_update` (else `CompressionError`); trusts a received
message only after `check_update` has compared it with the round (else `wire.ContextError`).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.compression.coordinates import (
    _as_update,
    shared_coordinates,
    top_k_coordinates,
)
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.compression.messages import (
    _GAP_DTYPES,
    _UPDATE_TYPE,
    Compression,
    DenseUpdate,
    SharedUpdate,
    SparseMode,
    SparseUpdate,
    Update,
    _grid_wire_dtype,
)
from fleetlearn.shared.compression.quantization import dequantize, quantize, quantize_symmetric

# ---------------------------------------------------------------------------------- encoders


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

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

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import FleetlearnError

# bits above 62 would leave no headroom in a uint64 for the sum of even a few contributions.
MAX_QUANT_BITS = 62


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


def _keystream(key: bytes, nbytes: int) -> bytes:
    # ChaCha20 with a key used for this purpose only; the all-zero nonce/counter is then safe.
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None)
    return cipher.encryptor().update(b"\x00" * nbytes)


def shared_coordinates(seed: bytes, dim: int, k: int) -> np.ndarray:
    """The k coordinates of a `dim`-vector that every device of a round sends (rand-k).

    Derived from the full 32-byte round seed alone: HKDF-SHA256 with a purpose label and `dim`
    gives a ChaCha20 key; its keystream gives one 64-bit key per coordinate; the k coordinates
    with the smallest keys are chosen (a uniformly random k-subset). The low bits of each key are
    replaced by the coordinate's index, so keys are distinct and the chosen set does not depend
    on how a numpy release breaks ties. For one seed the selections for k1 < k2 are nested.

    Returns a sorted int64 array of length k.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise CompressionError(f"seed must be {SEED_BYTES} bytes")
    if type(dim) is not int or dim < 1:
        raise CompressionError(f"dim must be an int >= 1, got {dim!r}")
    if type(k) is not int or not 1 <= k <= dim:
        raise CompressionError(f"k must be an int in 1..{dim}, got {k!r}")
    if k == dim:
        return np.arange(dim, dtype=np.int64)
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_RANDK_LABEL + dim.to_bytes(8, "big")
    ).derive(seed)
    keys = np.frombuffer(_keystream(key, 8 * dim), dtype="<u8").copy()
    index_bits = max(1, (dim - 1).bit_length())
    keys >>= np.uint64(index_bits)
    keys <<= np.uint64(index_bits)
    keys |= np.arange(dim, dtype=np.uint64)
    chosen = np.argpartition(keys, k - 1)[:k]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)

"""Quantization: floats onto an integer grid and back.

Owns the two quantizers: `quantize`/`dequantize` (clip, then stochastic rounding onto the
unsigned grid 0..2^bits - 1; the one implementation of it, which SecAgg's input encoding uses
too) and `quantize_symmetric` (top-k values as int8/int16 with one float32 scale).
Guarantees: both are unbiased, and each states its error bound next to the code (and in
docs/compression.md). Trusts only its caller: bad parameters or non-finite values raise
`CompressionError`. Randomness is the numpy Generator passed in (device-local noise, never mask
material); no global RNG.
"""

from __future__ import annotations

import math

import numpy as np

from fleetlearn.shared.compression.errors import CompressionError

# bits above 62 would leave no headroom in a uint64 for the sum of even a few contributions.
MAX_QUANT_BITS = 62


# --------------------------------------------------------------- unsigned grid (rand-k, SecAgg)


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


# ------------------------------------------------------------- symmetric int8/int16 (top-k)

TOP_K_BITS = (8, 16)  # int8 or int16 values
_VALUE_DTYPES: dict[int, np.dtype] = {8: np.dtype(np.int8), 16: np.dtype(np.int16)}


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

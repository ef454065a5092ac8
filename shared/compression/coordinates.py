"""Which coordinates of an update travel: rand-k from the round's seed, top-k from the update.

Owns what an update vector is (`_as_update`: non-empty, 1-D, numeric, finite, at most MAX_DIM
parameters) and the two ways of choosing k of its coordinates:
- `shared_coordinates`: the same uniformly random k-subset on every device of a round, derived
  from the full 32-byte round seed alone through HKDF-SHA256 and a ChaCha20 keystream, so it is
  the same on every numpy version. Masking needs this: everyone sends the same coordinates.
- `top_k_coordinates`: each device its own k largest magnitudes (plain mode only).
Pure: no global RNG, no clock. Bad arguments raise `CompressionError`.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetlearn.shared.compression.errors import CompressionError

# ------------------------------------------------------------------------------- update vectors

# Largest model dimension an update may declare; keeps delta-coded gaps and rand-k's 32-bit
# draws within uint32, and stops a hostile `dim` from making a receiver allocate gigabytes.
MAX_DIM = (1 << 31) - 1


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

"""Mask expansion: a 32-byte seed becomes a vector of uniform words, by ChaCha20.

What it owns: the only pseudo-random generator masks are ever drawn from.

Rules it keeps:
- The whole 32-byte seed is the ChaCha20 key (RFC 8439 via `cryptography`); nothing is folded
  or truncated, and numpy's generators (PCG64, Mersenne Twister) are never used for masks.
- Each seed is single-purpose (derived in `keys` with its own label), so the all-zero
  counter/nonce block is safe: no two masks share a key.
- Keystream words are read little-endian, so every platform and numpy version expands a seed
  to the same vector. Words are uniform mod 2^32 (or 2^64), hence uniform mod 2^b for b below.
- Buffers are allocated once per expander and reused: no per-mask allocation on the hot path.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_ZERO_COUNTER_NONCE = b"\x00" * 16  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce


def chacha20_keystream(
    key: bytes, nbytes: int, *, counter_nonce: bytes = _ZERO_COUNTER_NONCE
) -> bytes:
    """Raw ChaCha20 keystream. `counter_nonce` is the 16-byte little-endian counter || nonce."""
    encryptor = Cipher(algorithms.ChaCha20(key, counter_nonce), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


class MaskExpander:
    """Expands seeds into masks of `words` little-endian words of `word_bits` (32 or 64) bits.

    One instance per party and vector length; `expand` returns the instance's own buffer, which
    the next call overwrites, so callers fold it into an accumulator straight away (`add_into`,
    `subtract_into`).
    """

    __slots__ = ("_buffer", "_bytes", "_zeros")

    def __init__(self, words: int, word_bits: int) -> None:
        if word_bits not in (32, 64):
            raise ValueError(f"word_bits must be 32 or 64, got {word_bits}")
        self._buffer = np.empty(words, dtype=np.dtype(f"<u{word_bits // 8}"))
        self._bytes = self._buffer.data.cast("B")
        # ChaCha20 XORs its keystream into the input; encrypting zeros yields the keystream.
        self._zeros = bytes(self._buffer.nbytes)

    @property
    def dtype(self) -> np.dtype:
        return self._buffer.dtype

    def expand(self, seed: bytes) -> np.ndarray:
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
        encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_COUNTER_NONCE), mode=None).encryptor()
        encryptor.update_into(self._zeros, self._bytes)
        return self._buffer

    def add_into(self, accumulator: np.ndarray, seed: bytes) -> None:
        """accumulator += mask(seed), wrapping modulo 2^word_bits."""
        np.add(accumulator, self.expand(seed), out=accumulator)

    def subtract_into(self, accumulator: np.ndarray, seed: bytes) -> None:
        """accumulator -= mask(seed), wrapping modulo 2^word_bits."""
        np.subtract(accumulator, self.expand(seed), out=accumulator)

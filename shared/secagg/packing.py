"""Bit-packing of Z_2^b vectors: exactly b bits per coordinate on the wire, not 32.

What it owns: `pack` and `unpack` for masked vectors. Masked words are uniformly random, so
zstd cannot shrink them; sending b = 26 bits instead of a 32-bit word is a fifth less uplink.

Layout: coordinate i occupies bits [i*b, (i+1)*b) of the byte string, little-endian (bit 0 of
coordinate 0 is the lowest bit of byte 0). The length is ceil(count*b / 8) bytes and the unused
high bits of the last byte are zero; `unpack` refuses any other length or non-zero padding, so
every vector has exactly one encoding.

How: eight coordinates of b bits are exactly b bytes, so the vector is processed in blocks of
eight, each block shifted into ceil(b/8) uint64 words with whole-column numpy operations (no
per-bit arrays, no Python loop over coordinates).
"""

from __future__ import annotations

import numpy as np

_LE_U64 = np.dtype("<u8")


def packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an int in 1..64, got {bits!r}")


def _column_plan(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 8 block columns: (word index, shift, spill shift or 0)."""
    plan = []
    for j in range(8):
        word, shift = divmod(j * bits, 64)
        spill = 64 - shift if shift and shift + bits > 64 else 0
        plan.append((word, shift, spill))
    return plan


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers (each < 2^bits) into ceil(len*bits/8) bytes."""
    _check_bits(bits)
    if values.ndim != 1 or values.dtype.kind != "u":
        raise ValueError("pack takes a 1-d unsigned integer array")
    count = values.size
    if count and bits < 64 and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    blocks = -(-count // 8)
    padded = np.zeros(blocks * 8, dtype=_LE_U64)
    padded[:count] = values
    columns = padded.reshape(blocks, 8)
    words_per_block = -(-bits // 8)  # 8*bits bits = bits bytes = ceil(bits/8) words
    out = np.zeros((blocks, words_per_block), dtype=_LE_U64)
    for j, (word, shift, spill) in enumerate(_column_plan(bits)):
        column = columns[:, j]
        out[:, word] |= column << np.uint64(shift) if shift else column
        if spill:
            out[:, word + 1] |= column >> np.uint64(spill)
    block_bytes = out.view(np.uint8).reshape(blocks, 8 * words_per_block)[:, :bits]
    return block_bytes.tobytes()[: packed_size(count, bits)]


def unpack(data: bytes, bits: int, count: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """Inverse of `pack`. ValueError unless `data` is the canonical packing of `count` values."""
    _check_bits(bits)
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise ValueError(
            f"{len(data)} bytes cannot hold {count} values of {bits} bits; expected {expected}"
        )
    blocks = -(-count // 8)
    words_per_block = -(-bits // 8)
    raw = np.zeros((blocks, 8 * words_per_block), dtype=np.uint8)
    flat = np.frombuffer(data, dtype=np.uint8)
    full = len(data) // bits  # complete blocks
    raw[:full, :bits] = flat[: full * bits].reshape(full, bits)
    if full < blocks:
        raw[full, : len(data) - full * bits] = flat[full * bits :]
    words = raw.view(_LE_U64)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    columns = np.empty((blocks, 8), dtype=_LE_U64)
    for j, (word, shift, spill) in enumerate(_column_plan(bits)):
        column = words[:, word] >> np.uint64(shift) if shift else words[:, word].copy()
        if spill:
            column |= words[:, word + 1] << np.uint64(spill)
        column &= mask
        columns[:, j] = column
    values = columns.reshape(-1)
    if np.any(values[count:]):
        raise ValueError("non-zero padding bits after the last value")
    return values[:count].astype(dtype, copy=False)

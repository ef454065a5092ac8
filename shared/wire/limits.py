"""Size limits and the array dtypes allowed on the wire.

Owns the numbers `encode`, `decode` and the field codecs check before they allocate anything.
A `Limits` is valid once built (every limit a positive int); the defaults suit models up to
~4M parameters, and broker/runner.py sizes the broker's own limits to match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fleetlearn.shared.wire.errors import WireError


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied by encode() and decode(). Defaults suit models up to ~4M parameters."""

    max_compressed: int = 16 * 1024 * 1024
    max_decompressed: int = 64 * 1024 * 1024
    max_array_elements: int = 16 * 1024 * 1024
    max_array_ndim: int = 4
    max_items: int = 100_000  # elements of one msgpack array or map
    max_str: int = 4096  # characters of one string field

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise WireError("must be a positive integer", field=f"Limits.{f.name}")


DEFAULT_LIMITS = Limits()

# Numeric dtypes allowed on the wire, by their canonical little-endian string.
ARRAY_DTYPES = frozenset(
    {"|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1"}
)

"""Update compression: what a device sends instead of its dense float update, and the
error-feedback residual that makes lossy compression converge anyway (docs/compression.md).

How it is split (each module imports only the ones above it):

    errors        CompressionError: local misuse; wire input raises wire.WireError instead
    quantization  quantize/dequantize (unsigned grid, also SecAgg's), quantize_symmetric
    coordinates   what an update vector is; rand-k from the round seed, top-k from the update
    messages      SparseMode, Compression (the round's settings), the three update messages
    codec         encode_*/compress, check_update/decode_update/to_dense/unpack_shared_sum
    feedback      ErrorFeedback and its saved form, ResidualState

Rules for all of it:
- Pure. No global RNG, no clock, no I/O. Randomness for stochastic rounding is a numpy Generator
  the caller passes in (device-local noise, never mask material). Coordinates that several
  devices must agree on come only from the round's 32-byte seed through a ChaCha20 keystream,
  so they are the same on every numpy version.
- Every lossy step states its error bound next to the code and in docs/compression.md.
- Local misuse (bad bits, non-finite update) raises `CompressionError`; anything that came off
  the wire and is wrong raises `wire.WireError` (a `SchemaError` naming the field, or a
  `ContextError` when a well-formed update does not fit the round).

The names below are the public surface; names with a leading underscore are shared between
these modules only.
"""

from fleetlearn.shared.compression.codec import (
    Compressed,
    check_update,
    compress,
    decode_update,
    encode_dense,
    encode_rand_k,
    encode_top_k,
    scatter,
    to_dense,
    to_sparse,
    unpack_shared_sum,
)
from fleetlearn.shared.compression.coordinates import (
    MAX_DIM,
    SEED_BYTES,
    coordinate_count,
    shared_coordinates,
    top_k_coordinates,
)
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.compression.feedback import ErrorFeedback, ResidualState
from fleetlearn.shared.compression.messages import (
    Compression,
    DenseUpdate,
    SharedUpdate,
    SparseMode,
    SparseUpdate,
    Update,
)
from fleetlearn.shared.compression.quantization import (
    MAX_QUANT_BITS,
    TOP_K_BITS,
    dequantize,
    quant_dtype,
    quant_step,
    quantize,
    quantize_symmetric,
)

__all__ = [
    "MAX_DIM",
    "MAX_QUANT_BITS",
    "SEED_BYTES",
    "TOP_K_BITS",
    "Compressed",
    "Compression",
    "CompressionError",
    "DenseUpdate",
    "ErrorFeedback",
    "ResidualState",
    "SharedUpdate",
    "SparseMode",
    "SparseUpdate",
    "Update",
    "check_update",
    "compress",
    "coordinate_count",
    "decode_update",
    "dequantize",
    "encode_dense",
    "encode_rand_k",
    "encode_top_k",
    "quant_dtype",
    "quant_step",
    "quantize",
    "quantize_symmetric",
    "scatter",
    "shared_coordinates",
    "to_dense",
    "to_sparse",
    "top_k_coordinates",
    "unpack_shared_sum",
]

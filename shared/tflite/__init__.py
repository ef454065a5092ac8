"""TensorFlow-free access to a .tflite model: operators, variables, weights, manifest
(ARCHITECTURE §6, docs/models.md). Signing and verifying releases is `shared.release`.

How it is split (each module imports only the ones above it):

    errors      ModelError, ModelFormatError, LayoutError, SharedBufferError
    flatbuffer  the bounds-checked flatbuffer reader (no TFLite knowledge)
    model       the TFLite schema read into ModelInfo: operators, signatures, variables
    weights     WeightSpec and the flat layout; read_weights, patch_weights
    manifest    ModelManifest embedded in the model's metadata; content_hash

Rules for all of it:
- Pure: no TensorFlow, no LiteRT, no sockets, no clock, no global RNG. A gateway and the
  aggregator use it without TensorFlow; only building a model needs it.
- Written for hostile input: malformed bytes raise `ModelFormatError` (never IndexError or
  struct.error), weights that do not fit raise `LayoutError`.
- Input bytes are never modified: functions that change a model return new bytes, and change
  only what they say (initial-value buffers, the manifest).
- Messages (`WeightSpec`, `ModelManifest`, `EmbeddedManifest`) go through `shared.wire`.

The names below are the public surface; names with a leading underscore are shared between
these modules (and `shared.release`) only.
"""

from fleetlearn.shared.tflite.errors import (
    LayoutError,
    ModelError,
    ModelFormatError,
    SharedBufferError,
)
from fleetlearn.shared.tflite.manifest import (
    ZERO_HASH,
    EmbeddedManifest,
    ModelManifest,
    Task,
    content_hash,
    embed_manifest,
    read_manifest,
)
from fleetlearn.shared.tflite.model import (
    MANIFEST_METADATA_NAME,
    OP_ASSIGN_VARIABLE,
    OP_CALL_ONCE,
    OP_CUSTOM,
    OP_VAR_HANDLE,
    ModelInfo,
    OpCode,
    SignatureInfo,
    SubgraphInfo,
    TensorInfo,
    Variable,
    describe_model,
)
from fleetlearn.shared.tflite.weights import (
    WeightSpec,
    default_layout,
    flatten,
    layout_size,
    mask_of,
    patch_flat,
    patch_weights,
    read_weights,
    unflatten,
)

__all__ = [
    "MANIFEST_METADATA_NAME",
    "OP_ASSIGN_VARIABLE",
    "OP_CALL_ONCE",
    "OP_CUSTOM",
    "OP_VAR_HANDLE",
    "ZERO_HASH",
    "EmbeddedManifest",
    "LayoutError",
    "ModelError",
    "ModelFormatError",
    "ModelInfo",
    "ModelManifest",
    "OpCode",
    "SharedBufferError",
    "SignatureInfo",
    "SubgraphInfo",
    "Task",
    "TensorInfo",
    "Variable",
    "WeightSpec",
    "content_hash",
    "default_layout",
    "describe_model",
    "embed_manifest",
    "flatten",
    "layout_size",
    "mask_of",
    "patch_flat",
    "patch_weights",
    "read_manifest",
    "read_weights",
    "unflatten",
]

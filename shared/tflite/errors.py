"""Errors about a model file and its weights. Release errors derive from `ModelError` too
(shared/release.py), so one `except ModelError` covers anything wrong with a model:

    ModelError (FleetlearnError)
    ├── ModelFormatError (ValueError)  not a TFLite model this package can read
    ├── LayoutError (ValueError)       weights or a layout that do not fit the variables
    ├── SharedBufferError              a variable whose initial value another tensor also uses
    └── release.ReleaseError           SignatureError, RollbackError, ContentMismatchError
"""

from __future__ import annotations

from fleetlearn.shared.errors import FleetlearnError


class ModelError(FleetlearnError):
    """Base of every error about a model file, its weights or its release."""


class ModelFormatError(ModelError, ValueError):
    """The bytes are not a TFLite model this package can read (truncated, corrupt, other schema)."""


class LayoutError(ModelError, ValueError):
    """Weights or a weight layout do not fit the model's variables (name, shape, dtype, value)."""


class SharedBufferError(ModelError):
    """A variable's initial value shares its buffer with another tensor, so it cannot be patched."""

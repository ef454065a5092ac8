"""A model's weights: the layout of the flat update vector, reading and patching initial values.

Owns `WeightSpec` (one variable of the layout, a `wire.record`), `flatten`/`unflatten` between
named arrays and the flat float32 vector, `read_weights`, and `patch_weights`, which rewrites
the variables' initial-value buffers in place so the aggregator ships new weights without
TensorFlow (docs/models.md has the timings).
Guarantees: patching changes only those buffers and returns new bytes (the input is never
modified); it refuses a variable whose buffer is shared with another tensor
(`SharedBufferError`: the converter merges identical constants), and a shape that differs
from the model's, a variable that is not floating point, or NaN or infinite weights
(`LayoutError`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.tflite.errors import LayoutError, SharedBufferError
from fleetlearn.shared.tflite.model import ModelInfo, Variable, _parse


@wire.record
class WeightSpec(wire.Record):
    """One variable of the weight layout: the flat update vector holds these in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        wire.require(0 < len(self.name) <= 256, "WeightSpec.name", "must be 1..256 characters")
        wire.require(self.name.isprintable(), "WeightSpec.name", "must be printable")
        wire.require(len(self.shape) <= 8, "WeightSpec.shape", "more than 8 dimensions")
        wire.require(
            all(0 < d < 2**31 for d in self.shape), "WeightSpec.shape", "dimensions must be 1..2^31"
        )
        # The update vector is float32; other dtypes would need their own conversion rules.
        wire.require(self.dtype == "float32", "WeightSpec.dtype", "only float32 is supported")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layout_size(layout: Sequence[WeightSpec]) -> int:
    """Length of the flat vector for `layout`."""
    return sum(spec.size for spec in layout)


def mask_of(layout: Sequence[WeightSpec], names: Sequence[str]) -> np.ndarray:
    """Boolean mask over the flat vector: True on the coordinates of the weights `names`."""
    mask = np.zeros(layout_size(layout), dtype=bool)
    start = 0
    for spec in layout:
        if spec.name in names:
            mask[start : start + spec.size] = True
        start += spec.size
    return mask


def flatten(weights: Mapping[str, np.ndarray], layout: Sequence[WeightSpec]) -> np.ndarray:
    """Concatenate `weights` into one float32 vector in `layout` order."""
    out = np.empty(layout_size(layout), dtype=np.float32)
    start = 0
    for spec in layout:
        if spec.name not in weights:
            raise LayoutError(f"weights lack {spec.name!r}, which the layout lists")
        value = np.asarray(weights[spec.name])
        if value.shape != spec.shape:
            raise LayoutError(f"{spec.name}: shape {value.shape} differs from layout {spec.shape}")
        out[start : start + spec.size] = value.reshape(-1)
        start += spec.size
    return out


def unflatten(vector: np.ndarray, layout: Sequence[WeightSpec]) -> dict[str, np.ndarray]:
    """Split a flat vector into named float32 arrays (copies) following `layout`."""
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != layout_size(layout):
        raise LayoutError(
            f"vector of shape {vector.shape} does not fit the layout's {layout_size(layout)} values"
        )
    out: dict[str, np.ndarray] = {}
    start = 0
    for spec in layout:
        out[spec.name] = vector[start : start + spec.size].astype(np.float32).reshape(spec.shape)
        start += spec.size
    return out


def _readable(var: Variable) -> tuple[int, int]:
    if var.offset is None:
        raise LayoutError(
            f"variable {var.name!r} has no constant, numeric initial value in the file, so it "
            "cannot be read or patched (was the model converted with resource variables?)"
        )
    return var.offset, var.nbytes


def _require_patchable(var: Variable) -> tuple[int, int]:
    location = _readable(var)
    if var.shared_with:
        raise SharedBufferError(
            f"variable {var.name!r} shares its initial-value buffer #{var.buffer} with "
            f"{', '.join(var.shared_with)}; the converter merges identical constants, so "
            "patching it would change them too. Rebuild the model with distinct initial values."
        )
    return location


def read_weights(data: bytes, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The initial values of the named variables (default: all readable ones), as copies."""
    info = _parse(data).info
    chosen = (
        [v for v in info.variables if v.offset is not None]
        if names is None
        else [info.variable(n) for n in names]
    )
    out: dict[str, np.ndarray] = {}
    for var in chosen:
        offset, _ = _readable(var)
        out[var.name] = (
            np.frombuffer(data, dtype=_variable_dtype(var), count=var.size, offset=offset)
            .reshape(var.shape)
            .copy()
        )
    return out


def _variable_dtype(var: Variable) -> np.dtype:
    return np.dtype(var.dtype).newbyteorder("<")  # TFLite stores little-endian


def patch_weights(data: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
    """Return a copy of the model whose variables start from `weights`.

    Only the initial-value buffers change, in place, so everything else stays byte-identical.
    The embedded manifest's content hash no longer matches afterwards: call `embed_manifest`.
    A patched model takes effect in a fresh interpreter (the initializer runs once per one).
    """
    info = _parse(data).info
    out = bytearray(data)
    for name, value in weights.items():
        var = info.variable(name)
        offset, nbytes = _require_patchable(var)
        array = np.asarray(value)
        if array.shape != var.shape:
            raise LayoutError(f"{name}: shape {array.shape} does not match the model's {var.shape}")
        dtype = _variable_dtype(var)
        if dtype.kind != "f":
            raise LayoutError(f"{name}: patching {var.dtype} variables is not supported")
        if array.dtype.kind not in "fiu":
            raise LayoutError(f"{name}: weights must be numbers, not {array.dtype}")
        converted = np.ascontiguousarray(array, dtype=dtype)
        if not np.all(np.isfinite(converted)):
            raise LayoutError(f"{name}: refusing to ship NaN or infinite weights")
        out[offset : offset + nbytes] = converted.tobytes()
    return bytes(out)


def patch_flat(data: bytes, vector: np.ndarray, layout: Sequence[WeightSpec]) -> bytes:
    """`patch_weights` from a flat float32 vector in `layout` order."""
    return patch_weights(data, unflatten(vector, layout))


def default_layout(data: bytes) -> tuple[WeightSpec, ...]:
    """The weights the `get_weights` signature returns, in its order, as a layout."""
    info = _parse(data).info
    specs = []
    for out in info.signature("get_weights").outputs:
        var = info.variable(out.name)
        specs.append(WeightSpec(name=var.name, shape=var.shape, dtype=var.dtype))
    return tuple(specs)


def _check_layout(info: ModelInfo, layout: Sequence[WeightSpec]) -> None:
    for spec in layout:
        var = info.variable(spec.name)
        if var.shape != spec.shape or var.dtype != spec.dtype:
            raise LayoutError(
                f"layout says {spec.name} is {spec.dtype}{list(spec.shape)}, "
                f"the model holds {var.dtype}{list(var.shape)}"
            )
        _require_patchable(var)

"""The manifest: what a model is (id, version, weight layout, labels, content hash), embedded in
the model's metadata so the .tflite file describes itself.

Owns `Task` (what the model's output means), `ModelManifest` (a `wire.record`, also carried
in a release), `EmbeddedManifest` (its
stored form, tag `model.manifest`), `content_hash`, `read_manifest` and `embed_manifest`, which
writes the manifest in place when its slot is large enough and otherwise inserts a metadata
buffer (moving the rest of the file by a multiple of 16 bytes, so alignments hold).
Guarantees: `content_hash` is SHA-256 of the file with the hash's own 32 bytes zeroed, so it
covers every other byte; `embed_manifest` checks its own rewrite (same variables, the manifest
reads back) and returns new bytes. Trusts nothing it reads: a malformed manifest raises
`ModelFormatError`.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import replace

from fleetlearn.shared import wire
from fleetlearn.shared.tflite.errors import ModelFormatError
from fleetlearn.shared.tflite.flatbuffer import _I32, _U16, _U32, _U64, _Flatbuffer
from fleetlearn.shared.tflite.model import (
    _MAX_MODEL_BYTES,
    MANIFEST_METADATA_NAME,
    _parse,
    _Parsed,
)
from fleetlearn.shared.tflite.weights import WeightSpec, _check_layout, default_layout, layout_size

# Buffer data is aligned to 16 bytes in the file (schema: force_align 16); any bytes this module
# inserts are a multiple of that, so everything after them keeps its alignment.
_BUFFER_ALIGN = 16

# Manifest payload in its metadata buffer: magic | content hash | body length (u32) | body | 0s.
# The hash sits at a fixed place so it can be computed over the file with those 32 bytes zeroed
# and written afterwards; the zero padding lets the next version be rewritten in place.
_MANIFEST_MAGIC = b"FLMANIF1"
_HASH_SIZE = 32
_MANIFEST_HEADER = len(_MANIFEST_MAGIC) + _HASH_SIZE + 4
_MANIFEST_SLACK = 256
ZERO_HASH = bytes(_HASH_SIZE)


class Task(enum.Enum):
    """What a model's output means, and so how it trains and how it is judged.

    classification  infer -> logits[N, classes]; trained on integer labels (cross-entropy);
                    judged by accuracy (and cross-entropy), per class by recall
    regression      infer -> prediction[N]; trained on float targets (MSE or Huber);
                    judged by mean absolute error
    anomaly         an autoencoder: infer -> reconstruction[N, F] and score[N] (the row's mean
                    squared reconstruction error); trained on normal rows only (no labels);
                    each device calibrates a threshold on its own normal data; judged by the
                    reconstruction error, and with labelled rows by detection per class
    """

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    ANOMALY = "anomaly"


@wire.record
class ModelManifest(wire.Record):
    """What a model is: travels inside the .tflite (metadata) and beside it in a release.

    `version` counts aggregation rounds applied, plus one: version 1 is the initial model.
    `content_hash` is SHA-256 of the .tflite bytes with this hash's own 32 bytes zeroed.
    """

    model_id: str
    version: int
    layout: tuple[WeightSpec, ...]
    content_hash: bytes
    labels: tuple[str, ...] = ()
    task: Task = Task.CLASSIFICATION

    def __post_init__(self) -> None:
        wire.require_id(self.model_id, "ModelManifest.model_id")
        wire.require(1 <= self.version < 2**63, "ModelManifest.version", "must be 1..2^63-1")
        wire.require(len(self.layout) > 0, "ModelManifest.layout", "lists no variable")
        names = [spec.name for spec in self.layout]
        wire.require(len(set(names)) == len(names), "ModelManifest.layout", "repeats a name")
        wire.require(
            len(self.content_hash) == _HASH_SIZE, "ModelManifest.content_hash", "must be 32 bytes"
        )
        wire.require(len(set(self.labels)) == len(self.labels), "ModelManifest.labels", "repeats")
        wire.require(
            all(0 < len(label) <= 64 and label.isprintable() for label in self.labels),
            "ModelManifest.labels",
            "each label must be 1..64 printable characters",
        )

    @property
    def parameter_count(self) -> int:
        return layout_size(self.layout)


@wire.message("model.manifest")
class EmbeddedManifest(wire.Message):
    """The manifest as stored in model metadata; its content_hash is zeros (see _MANIFEST_MAGIC)."""

    manifest: ModelManifest

    def __post_init__(self) -> None:
        wire.require(
            self.manifest.content_hash == ZERO_HASH,
            "EmbeddedManifest.manifest.content_hash",
            "must be zeros; the hash lives in the payload header",
        )


def _manifest_slot(parsed: _Parsed) -> tuple[int, int] | None:
    """(start, capacity) of the manifest payload in the file, or None without a manifest."""
    if parsed.manifest_buffer is None:
        return None
    start, capacity = parsed.buffers[parsed.manifest_buffer]
    if capacity < _MANIFEST_HEADER or parsed.data[start : start + 8] != _MANIFEST_MAGIC:
        raise ModelFormatError(f"metadata {MANIFEST_METADATA_NAME!r} is not a fleetlearn manifest")
    return start, capacity


def _content_hash(parsed: _Parsed) -> bytes:
    data = parsed.data
    slot = _manifest_slot(parsed)
    digest = hashlib.sha256()
    if slot is None:
        digest.update(data)
    else:
        at = slot[0] + len(_MANIFEST_MAGIC)
        view = memoryview(data)
        digest.update(view[:at])
        digest.update(ZERO_HASH)
        digest.update(view[at + _HASH_SIZE :])
    return digest.digest()


def content_hash(data: bytes) -> bytes:
    """SHA-256 of the model with its manifest's hash field zeroed (plain SHA-256 without one)."""
    return _content_hash(_parse(data))


def _read_manifest(parsed: _Parsed) -> ModelManifest | None:
    slot = _manifest_slot(parsed)
    if slot is None:
        return None
    start, capacity = slot
    data = parsed.data
    at = start + len(_MANIFEST_MAGIC)
    stored_hash = data[at : at + _HASH_SIZE]
    body_size = _U32.unpack_from(data, at + _HASH_SIZE)[0]
    if body_size > capacity - _MANIFEST_HEADER:
        raise ModelFormatError("manifest body runs past its buffer")
    body = data[start + _MANIFEST_HEADER : start + _MANIFEST_HEADER + body_size]
    try:
        embedded = wire.decode(body, EmbeddedManifest)
    except wire.WireError as exc:
        raise ModelFormatError(f"embedded manifest is unreadable: {exc}") from None
    return replace(embedded.manifest, content_hash=stored_hash)


def read_manifest(data: bytes) -> ModelManifest | None:
    """The manifest embedded in the model, or None when it has none."""
    return _read_manifest(_parse(data))


def embed_manifest(
    data: bytes,
    *,
    model_id: str,
    version: int,
    layout: Sequence[WeightSpec] | None = None,
    labels: Sequence[str] | None = None,
    task: Task | None = None,
) -> tuple[bytes, ModelManifest]:
    """Write a manifest into the model's metadata and return (new bytes, manifest with hash).

    `layout`, `labels` and `task` default to those of the manifest already embedded; without
    one, the layout is what `get_weights` returns, no labels, a classifier. Every layout
    variable must be patchable.
    """
    parsed = _parse(data)
    previous = _read_manifest(parsed)
    if layout is None:
        layout = previous.layout if previous else default_layout(data)
    if labels is None:
        labels = previous.labels if previous else ()
    if task is None:
        task = previous.task if previous else Task.CLASSIFICATION
    _check_layout(parsed.info, layout)
    manifest = ModelManifest(
        model_id=model_id,
        version=version,
        layout=tuple(layout),
        labels=tuple(labels),
        content_hash=ZERO_HASH,
        task=task,
    )
    body = wire.encode(EmbeddedManifest(manifest=manifest))
    payload = _MANIFEST_MAGIC + ZERO_HASH + _U32.pack(len(body)) + body

    slot = _manifest_slot(parsed)
    if slot is not None and slot[1] >= len(payload):
        start, capacity = slot
        out = bytearray(data)
        out[start : start + capacity] = payload.ljust(capacity, b"\0")
    else:
        capacity = -(-(len(payload) + _MANIFEST_SLACK) // 64) * 64
        out, start = _insert_manifest_buffer(parsed, capacity)
        out[start : start + len(payload)] = payload

    rewritten = _parse(bytes(out))
    digest = _content_hash(rewritten)
    at = start + len(_MANIFEST_MAGIC)
    out[at : at + _HASH_SIZE] = digest
    # Self-check of the rewrite: same variables (bar their position), and the manifest reads back.
    moved = [replace(v, offset=None, buffer=None) for v in parsed.info.variables]
    if [replace(v, offset=None, buffer=None) for v in rewritten.info.variables] != moved or (
        _read_manifest(rewritten) != manifest
    ):
        raise ModelFormatError("rewriting the manifest damaged the model; file a bug")
    return bytes(out), replace(manifest, content_hash=digest)


# Model table fields (schema.fbs): 0 version (scalar); 1..9 references to children.
_MODEL_BUFFERS = 4
_MODEL_METADATA = 6
_MODEL_REFERENCES = range(1, 10)


def _insert_manifest_buffer(parsed: _Parsed, capacity: int) -> tuple[bytearray, int]:
    """Add a metadata entry with a zeroed data buffer of `capacity` bytes; rewrite the rest.

    Flatbuffer references only point forward, and a converter writes the root Model table
    first, right after its vtable. So new vectors (buffers and metadata, one entry longer) go
    right after the Model table, where they can still point at every old table; the Model's
    references are rewritten and the rest of the file moves down by a multiple of 16 bytes,
    which keeps every alignment. Returns (new file, start of the new data buffer).
    """
    data, model = parsed.data, parsed.model
    end = model.pos + model.inline_size  # insertion point
    if not (model.vtable >= 8 and model.vtable + model.vtable_size <= model.pos):
        raise ModelFormatError("cannot add a manifest: unusual layout (model vtable moved)")
    if model.slots() > max(_MODEL_REFERENCES) + 1:
        raise ModelFormatError("cannot add a manifest: the model uses a newer TFLite schema")
    fields: dict[int, int] = {}
    for slot in _MODEL_REFERENCES:
        pos = model.field(slot, 4)
        if pos is not None:
            fields[slot] = pos
            if model.fb.deref(pos, "model field") < end:
                raise ModelFormatError("cannot add a manifest: unusual layout (backward reference)")
    if _MODEL_BUFFERS not in fields or _MODEL_METADATA not in fields:
        raise ModelFormatError("cannot add a manifest: the model has no buffers or metadata field")
    for table in parsed.buffer_tables:
        if table.scalar(1, _U64, 0) > 1:
            raise ModelFormatError("cannot add a manifest to a model with external buffer data")

    fb = model.fb
    old_buffers = _element_targets(fb, fields[_MODEL_BUFFERS])
    keep = [
        target
        for target, (name, _) in zip(
            _element_targets(fb, fields[_MODEL_METADATA]), parsed.metadata, strict=True
        )
        if name != MANIFEST_METADATA_NAME
    ]

    block = bytearray()

    def here() -> int:
        return end + len(block)

    def align(alignment: int, phase: int = 0) -> None:
        block.extend(b"\0" * ((phase - here()) % alignment))

    def put(kind: struct.Struct, value: int) -> int:
        pos = here()
        block.extend(kind.pack(value))
        return pos

    def put_vector(count: int) -> tuple[int, list[int]]:
        align(4)
        at = put(_U32, count)
        return at, [put(_U32, 0) for _ in range(count)]

    buffers_vec, buffer_slots = put_vector(len(old_buffers) + 1)
    metadata_vec, metadata_slots = put_vector(len(keep) + 1)
    # Metadata { name: string; buffer: uint } -- vtable first, so soffset is positive.
    align(4)
    meta_vtable = here()
    for value in (8, 12, 4, 8):
        put(_U16, value)
    meta_table = put(_I32, 0)
    meta_name = put(_U32, 0)
    put(_U32, len(old_buffers))
    # Buffer { data: [ubyte] }
    align(4)
    buf_vtable = here()
    for value in (6, 8, 4):
        put(_U16, value)
    align(4)
    buf_table = put(_I32, 0)
    buf_data = put(_U32, 0)
    align(4)
    name_at = put(_U32, len(MANIFEST_METADATA_NAME))
    block.extend(MANIFEST_METADATA_NAME.encode() + b"\0")
    align(_BUFFER_ALIGN, phase=_BUFFER_ALIGN - 4)  # the bytes after the length are aligned
    data_at = put(_U32, capacity)
    block.extend(bytes(capacity))
    # The shift itself must be a multiple of 16, so the moved rest of the file stays aligned.
    block.extend(bytes(-len(block) % _BUFFER_ALIGN))
    shift = len(block)

    def point(at: int, target: int) -> None:
        _U32.pack_into(block, at - end, target - at)

    buffer_targets = [*(t + shift for t in old_buffers), buf_table]
    metadata_targets = [*(t + shift for t in keep), meta_table]
    for at, target in zip(
        buffer_slots + metadata_slots, buffer_targets + metadata_targets, strict=True
    ):
        point(at, target)
    _I32.pack_into(block, meta_table - end, meta_table - meta_vtable)
    point(meta_name, name_at)
    _I32.pack_into(block, buf_table - end, buf_table - buf_vtable)
    point(buf_data, data_at)

    head = bytearray(data[:end])
    for slot, pos in fields.items():
        if slot == _MODEL_BUFFERS:
            target = buffers_vec
        elif slot == _MODEL_METADATA:
            target = metadata_vec
        else:
            target = fb.deref(pos, "model field") + shift
        _U32.pack_into(head, pos, target - pos)
    out = head + block + data[end:]
    if len(out) > _MAX_MODEL_BYTES:
        raise ModelFormatError(f"model would grow past {_MAX_MODEL_BYTES} bytes")
    return out, data_at + 4


def _element_targets(fb: _Flatbuffer, field_pos: int) -> list[int]:
    start, count = fb.vector(fb.deref(field_pos, "model field"), 4, "model field")
    return [fb.deref(start + 4 * i, "model field") for i in range(count)]

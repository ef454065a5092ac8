"""Signed model releases: what the aggregator publishes on `fl/{fleet}/model` and what a device
checks before it loads anything (ARCHITECTURE §3, §6).

Owns `ModelRelease` (tag `model.release`), `make_release` and `release_weights` (the
aggregator's one call per round: patch, re-embed the manifest, sign with Ed25519), and
`verify_release`, the device's gate.
Trusts: only the fleet's aggregator verify key. Guarantees of `verify_release`, in this order:
the signature covers every byte of the release (a canonical header of the manifest, the model
size and the SHA-256 of the compressed bytes) and is checked before anything is decompressed;
a version below the installed one is refused (no rollback); decompression is bounded by the
signed size; the model bytes must match the manifest's content hash and embedded manifest.
Any refusal is a `ReleaseError` (a `tflite.ModelError`). Pure: the signing key and the
installed version come from the caller.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import nacl.exceptions
import nacl.signing
import numpy as np
import zstandard

from fleetlearn.shared import wire
from fleetlearn.shared.tflite.errors import ModelError
from fleetlearn.shared.tflite.flatbuffer import _U32, _U64
from fleetlearn.shared.tflite.manifest import (
    _HASH_SIZE,
    ModelManifest,
    Task,
    _content_hash,
    _read_manifest,
    embed_manifest,
    read_manifest,
)
from fleetlearn.shared.tflite.model import _parse
from fleetlearn.shared.tflite.weights import _check_layout, patch_weights, unflatten


class ReleaseError(ModelError):
    """A model release cannot be made or must not be installed."""


class SignatureError(ReleaseError):
    """The release's signature does not verify with the aggregator's key."""


class RollbackError(ReleaseError):
    """The release is older than the model already installed."""


class ContentMismatchError(ReleaseError):
    """The model bytes do not match the manifest that was signed."""


_RELEASE_LABEL = b"fleetlearn/release/v1"
_ZSTD_LEVEL = 9  # ~3 ms for 1M parameters; releases are made once per round, fetched by all
MAX_RELEASE_MODEL_BYTES = 48 * 1024 * 1024  # inside wire's 64 MiB decompressed limit
_SIGNATURE_SIZE = 64


@wire.message("model.release")
class ModelRelease(wire.Message):
    """A signed model: retained on `fl/{fleet}/model` (ARCHITECTURE §3, §6).

    The Ed25519 signature covers a canonical header: a domain label, every manifest field, the
    model's size and the SHA-256 of the compressed bytes. So every byte of a release is signed
    (zstd ignores some bits of a frame; signing the frame itself leaves no byte to flip
    unnoticed), the signature is checked before anything is decompressed, and the manifest's
    content hash then binds the model bytes to the manifest.
    """

    manifest: ModelManifest
    model_size: int  # bytes of the .tflite once decompressed; bounds decompression
    model_zst: bytes  # one zstd frame declaring model_size
    signature: bytes

    def __post_init__(self) -> None:
        wire.require(
            0 < self.model_size <= MAX_RELEASE_MODEL_BYTES,
            "ModelRelease.model_size",
            f"must be 1..{MAX_RELEASE_MODEL_BYTES}",
        )
        wire.require(len(self.model_zst) > 0, "ModelRelease.model_zst", "is empty")
        wire.require(
            len(self.signature) == _SIGNATURE_SIZE, "ModelRelease.signature", "must be 64 bytes"
        )


def _release_header(manifest: ModelManifest, model_size: int, model_zst: bytes) -> bytes:
    """The signed bytes: every variable-length part is length-prefixed, so the encoding is
    unambiguous, and the label keeps these signatures from meaning anything elsewhere."""
    parts = [_RELEASE_LABEL, manifest.model_id.encode()]
    out = bytearray()
    for part in parts:
        out += _U32.pack(len(part)) + part
    out += _U64.pack(manifest.version) + _U64.pack(model_size)
    out += _U32.pack(_HASH_SIZE) + hashlib.sha256(model_zst).digest()
    out += _U32.pack(len(manifest.content_hash)) + manifest.content_hash
    out += _U32.pack(len(manifest.layout))
    for spec in manifest.layout:
        name, dtype = spec.name.encode(), spec.dtype.encode()
        out += _U32.pack(len(name)) + name + _U32.pack(len(dtype)) + dtype
        out += _U32.pack(len(spec.shape)) + b"".join(_U64.pack(d) for d in spec.shape)
    out += _U32.pack(len(manifest.labels))
    for label in manifest.labels:
        encoded = label.encode()
        out += _U32.pack(len(encoded)) + encoded
    # The task, for models other than classifiers: a classifier's header is what it was before
    # tasks existed, so devices built then still verify its releases.
    if manifest.task is not Task.CLASSIFICATION:
        task = manifest.task.value.encode()
        out += _U32.pack(len(task)) + task
    return bytes(out)


def make_release(
    model_bytes: bytes, manifest: ModelManifest, signing_key: nacl.signing.SigningKey
) -> ModelRelease:
    """Compress and sign a model whose embedded manifest is `manifest` (see embed_manifest)."""
    if len(model_bytes) > MAX_RELEASE_MODEL_BYTES:
        raise ReleaseError(f"model of {len(model_bytes)} bytes exceeds {MAX_RELEASE_MODEL_BYTES}")
    parsed = _parse(model_bytes)
    if _read_manifest(parsed) != manifest:
        raise ReleaseError("the manifest given is not the one embedded in the model")
    if _content_hash(parsed) != manifest.content_hash:
        raise ReleaseError(
            "the model changed after its manifest was embedded (patch first, then embed_manifest)"
        )
    _check_layout(parsed.info, manifest.layout)
    compressed = zstandard.ZstdCompressor(
        level=_ZSTD_LEVEL, write_content_size=True, write_checksum=True
    ).compress(model_bytes)
    header = _release_header(manifest, len(model_bytes), compressed)
    signature = signing_key.sign(header).signature
    return ModelRelease(
        manifest=manifest,
        model_size=len(model_bytes),
        model_zst=compressed,
        signature=signature,
    )


def release_weights(
    base_model: bytes,
    weights: Mapping[str, np.ndarray] | np.ndarray,
    *,
    version: int,
    signing_key: nacl.signing.SigningKey,
) -> ModelRelease:
    """The aggregator's one call per round: patch, re-embed the manifest, sign.

    `weights` is a name -> array mapping or a flat vector in the base manifest's layout.
    """
    base = read_manifest(base_model)
    if base is None:
        raise ReleaseError("the base model has no manifest; build it with `fleetlearn model build`")
    if isinstance(weights, np.ndarray):
        weights = unflatten(weights, base.layout)
    patched = patch_weights(base_model, weights)
    model, manifest = embed_manifest(patched, model_id=base.model_id, version=version)
    return make_release(model, manifest, signing_key)


def _decompress(release: ModelRelease) -> bytes:
    try:
        declared = zstandard.frame_content_size(release.model_zst)
    except zstandard.ZstdError:
        raise ContentMismatchError("model bytes are not a zstd frame") from None
    if declared != release.model_size:
        raise ContentMismatchError(
            f"compressed model declares {declared} bytes, the signed size is {release.model_size}"
        )
    try:
        model = zstandard.ZstdDecompressor().decompress(
            release.model_zst, max_output_size=release.model_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ContentMismatchError(f"compressed model is corrupt ({exc})") from None
    if len(model) != release.model_size:
        raise ContentMismatchError("compressed model holds a different size than it declares")
    return model


def verify_release(
    release: ModelRelease, verify_key: nacl.signing.VerifyKey, *, min_version: int
) -> tuple[bytes, ModelManifest]:
    """Check a release before anything loads it; return (model bytes, manifest).

    Refuses, with a ReleaseError subclass: a bad signature or another key (SignatureError), a
    version below `min_version`, normally the installed one (RollbackError; an equal version
    is accepted so a retained re-delivery verifies), and model bytes that differ from what the
    manifest describes (ContentMismatchError).
    """
    if not isinstance(release, ModelRelease):
        raise ReleaseError(f"expected a ModelRelease, got {type(release).__name__}")
    manifest = release.manifest
    try:
        header = _release_header(manifest, release.model_size, release.model_zst)
        verify_key.verify(header, release.signature)
    except nacl.exceptions.BadSignatureError:
        raise SignatureError(
            f"release {manifest.model_id} v{manifest.version} is not signed by this fleet's "
            "aggregator key (altered in transit, or signed with another key); not installing it"
        ) from None
    if manifest.version < min_version:
        raise RollbackError(
            f"release {manifest.model_id} v{manifest.version} is older than the installed "
            f"v{min_version}; refusing to roll back"
        )
    model = _decompress(release)
    try:
        parsed = _parse(model)
        if _content_hash(parsed) != manifest.content_hash:
            raise ContentMismatchError("model bytes do not match the signed content hash")
        if _read_manifest(parsed) != manifest:
            raise ContentMismatchError("the manifest inside the model differs from the signed one")
        _check_layout(parsed.info, manifest.layout)
    except ReleaseError:
        raise
    except ModelError as exc:
        raise ContentMismatchError(f"signed model is unusable: {exc}") from None
    return model, manifest

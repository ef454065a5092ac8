"""Signed model releases: round trip, tampering, wrong key, rollback, manifest/content mismatch.

An attacker on the broker can rewrite any byte and recompute every checksum, so tampering is
simulated on the release's msgpack map, re-framed with a valid zstd frame (flipping the outer
frame alone only ever trips its checksum). Acceptance 4.
"""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import zstandard

from fleetlearn.shared import tflite, wire
from fleetlearn.shared.release import (
    ContentMismatchError,
    ModelRelease,
    ReleaseError,
    RollbackError,
    SignatureError,
    _release_header,
    make_release,
    release_weights,
    verify_release,
)
from tests.model_fixtures import shipped_model, signing_key

KEY = signing_key(1)
OTHER_KEY = signing_key(2)
DETECTED = (wire.WireError, ReleaseError)


def _vector(seed: int) -> np.ndarray:
    layout = tflite.read_manifest(shipped_model()).layout  # type: ignore[union-attr]
    return np.random.default_rng(seed).normal(size=tflite.layout_size(layout)).astype(np.float32)


def _release(version: int = 2, seed: int = 0) -> ModelRelease:
    return release_weights(shipped_model(), _vector(seed), version=version, signing_key=KEY)


def _reframe(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def _verify_payload(payload: bytes, min_version: int = 1) -> tuple[bytes, tflite.ModelManifest]:
    release = wire.decode(payload, ModelRelease)
    return verify_release(release, KEY.verify_key, min_version=min_version)


def _signed(release: ModelRelease, **changes: object) -> ModelRelease:
    """`release` with `changes`, signed again with the real key: what a buggy aggregator, not an
    attacker, could produce. The content checks behind the signature must still catch it."""
    changed = dataclasses.replace(release, **changes)  # type: ignore[arg-type]
    header = _release_header(changed.manifest, changed.model_size, changed.model_zst)
    return dataclasses.replace(changed, signature=KEY.sign(header).signature)


def test_release_round_trips_through_the_wire() -> None:
    release = _release(version=5)
    model, manifest = _verify_payload(wire.encode(release))
    assert manifest == release.manifest
    assert manifest.version == 5
    assert manifest.model_id == "pdm-default"
    assert np.array_equal(tflite.flatten(tflite.read_weights(model), manifest.layout), _vector(0))
    assert tflite.read_manifest(model) == manifest
    assert len(release.model_zst) < len(model)


def test_every_single_byte_flip_is_detected() -> None:
    release = _release()
    raw = msgpack.packb(wire.to_map(release), use_bin_type=True)
    rng = np.random.default_rng(7)
    # Every byte outside the bulk of the compressed model, and a sample inside it.
    zst_at = raw.find(release.model_zst)
    edges = [*range(zst_at + 64), *range(zst_at + len(release.model_zst) - 64, len(raw))]
    sample = rng.choice(np.arange(zst_at + 64, zst_at + len(release.model_zst) - 64), 400)
    for at in [*edges, *sample.tolist()]:
        tampered = bytearray(raw)
        tampered[at] ^= int(rng.integers(1, 256))
        with pytest.raises(DETECTED):
            _verify_payload(_reframe(bytes(tampered)))
    _verify_payload(_reframe(raw))  # the untouched map verifies: the test can tell


def test_flipped_outer_frame_is_refused_by_the_wire() -> None:
    payload = wire.encode(_release())
    for at in range(0, len(payload), 97):
        tampered = bytearray(payload)
        tampered[at] ^= 0x10
        with pytest.raises(DETECTED):
            _verify_payload(bytes(tampered))


def test_wrong_key_is_refused() -> None:
    forged = release_weights(shipped_model(), _vector(1), version=2, signing_key=OTHER_KEY)
    with pytest.raises(SignatureError, match="not signed by this fleet's aggregator key"):
        verify_release(forged, KEY.verify_key, min_version=1)
    verify_release(forged, OTHER_KEY.verify_key, min_version=1)  # it is a valid release


def test_rollback_is_refused_and_the_same_version_accepted() -> None:
    release = _release(version=3)
    with pytest.raises(RollbackError, match="v3 is older than the installed v4"):
        verify_release(release, KEY.verify_key, min_version=4)
    verify_release(release, KEY.verify_key, min_version=3)  # retained re-delivery


def test_signed_fields_cannot_be_swapped() -> None:
    a, b = _release(version=2, seed=1), _release(version=3, seed=2)
    assert a.model_size == b.model_size  # in-place manifests: same size, different content
    with pytest.raises(SignatureError):  # b's model under a's signed manifest
        verify_release(dataclasses.replace(a, model_zst=b.model_zst), KEY.verify_key, min_version=1)
    bumped = dataclasses.replace(a.manifest, version=9)
    with pytest.raises(SignatureError):
        verify_release(dataclasses.replace(a, manifest=bumped), KEY.verify_key, min_version=1)
    with pytest.raises(SignatureError):
        verify_release(
            dataclasses.replace(a, model_size=a.model_size + 1), KEY.verify_key, min_version=1
        )


def test_content_that_does_not_match_the_manifest_is_refused_even_when_signed() -> None:
    a, b = _release(version=2, seed=1), _release(version=3, seed=2)
    with pytest.raises(ContentMismatchError, match="content hash"):
        verify_release(_signed(a, model_zst=b.model_zst), KEY.verify_key, min_version=1)

    other_labels = dataclasses.replace(a.manifest, labels=("a", "b", "c", "d"))
    with pytest.raises(ContentMismatchError, match="manifest inside the model differs"):
        verify_release(_signed(a, manifest=other_labels), KEY.verify_key, min_version=1)

    model = zstandard.ZstdDecompressor().decompress(a.model_zst)
    flipped = bytearray(model)
    flipped[len(model) // 2] ^= 1
    rezst = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(flipped))
    with pytest.raises(ContentMismatchError):
        verify_release(_signed(a, model_zst=rezst), KEY.verify_key, min_version=1)


def test_decompression_is_bounded_by_the_signed_size() -> None:
    a = _release()
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(40 * 1024 * 1024))
    with pytest.raises(ContentMismatchError, match="declares 41943040 bytes"):
        verify_release(_signed(a, model_zst=bomb), KEY.verify_key, min_version=1)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * a.model_size)
    with pytest.raises(ContentMismatchError):
        verify_release(_signed(a, model_zst=no_size), KEY.verify_key, min_version=1)
    with pytest.raises(ContentMismatchError, match="not a zstd frame"):
        verify_release(_signed(a, model_zst=b"not zstd"), KEY.verify_key, min_version=1)


def test_make_release_refuses_a_model_changed_after_its_manifest() -> None:
    data = shipped_model()
    manifest = tflite.read_manifest(data)
    assert manifest is not None
    make_release(data, manifest, KEY)  # consistent: fine
    patched = tflite.patch_weights(data, {"dense_2_bias": np.ones(4, np.float32)})
    with pytest.raises(ReleaseError, match="changed after its manifest"):
        make_release(patched, manifest, KEY)
    with pytest.raises(ReleaseError, match="not the one embedded"):
        make_release(data, dataclasses.replace(manifest, version=2), KEY)


def test_release_fields_are_validated() -> None:
    a = _release()
    with pytest.raises(wire.SchemaError, match="signature"):
        dataclasses.replace(a, signature=a.signature[:-1])
    with pytest.raises(wire.SchemaError, match="model_size"):
        dataclasses.replace(a, model_size=0)
    with pytest.raises(wire.SchemaError, match="version"):
        dataclasses.replace(a.manifest, version=0)
    with pytest.raises(wire.SchemaError, match="content_hash"):
        dataclasses.replace(a.manifest, content_hash=b"short")

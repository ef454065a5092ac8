"""shared.tflite without TensorFlow: parsing, weights, patching, manifest, hostile bytes.

Runs on the shipped pdm_default.tflite, so none of these tests needs TensorFlow. The patch path
is also run in a subprocess where importing TensorFlow or LiteRT fails (acceptance 3).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlearn.aggregator import model_build as mb
from fleetlearn.shared import tflite
from fleetlearn.shared.tflite.runtime import new_interpreter
from tests.model_fixtures import shipped_model

REPO = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUT_NAMES = [w.name for w in mb.load_spec().layout()]


def _new_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {w.name: rng.normal(size=w.shape).astype(np.float32) for w in mb.load_spec().layout()}


# ----------------------------------------------------------------------------------- parsing


def test_shipped_model_describes_itself() -> None:
    info = tflite.describe_model(shipped_model())
    assert {s.key for s in info.signatures} == {"train", "infer", "get_weights", "set_weights"}
    train = {t.name: t for t in info.signature("train").inputs}
    assert train["x"].shape == (32, 16)
    assert train["x"].dtype == "float32"
    assert train["y"].dtype == "int32"
    assert train["sample_weight"].shape == (32,)
    assert info.signature("infer").inputs[0].shape == (-1, 16)  # resized at run time
    assert info.custom_ops == ()
    # The weights, and FedProx's anchor for each (set with them by set_weights).
    names = sorted(v.name for v in info.variables)
    assert names == sorted([*LAYOUT_NAMES, *(f"anchor_{n}" for n in LAYOUT_NAMES)])
    assert train["learning_rate"].shape == ()
    assert train["prox_mu"].shape == ()
    # Each weight has its own buffer (patchable); the anchors start at zeros, may share.
    weights = [info.variable(n) for n in LAYOUT_NAMES]
    assert all(not v.shared_with and v.offset is not None for v in weights)
    assert info.initializer is not None
    assert "fleetlearn.manifest" in info.metadata


def test_initial_weights_are_those_the_spec_seeds() -> None:
    expected = mb.initial_weights(mb.load_spec())
    got = tflite.read_weights(shipped_model(), LAYOUT_NAMES)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


def test_shipped_manifest() -> None:
    data = shipped_model()
    manifest = tflite.read_manifest(data)
    assert manifest is not None
    assert (manifest.model_id, manifest.version) == ("pdm-default", 1)
    assert manifest.labels == ("healthy", "bearing_wear", "imbalance", "misalignment")
    assert [w.name for w in manifest.layout] == LAYOUT_NAMES
    assert manifest.parameter_count == 16 * 32 + 32 + 32 * 16 + 16 + 16 * 4 + 4
    assert tflite.content_hash(data) == manifest.content_hash


# ---------------------------------------------------------------------------------- patching


def test_patch_changes_only_the_weight_buffers() -> None:
    data = shipped_model()
    weights = _new_weights(1)
    patched = tflite.patch_weights(data, weights)
    assert len(patched) == len(data)
    got = tflite.read_weights(patched)
    for name, value in weights.items():
        assert np.array_equal(got[name], value)
    regions = [(v.offset, v.offset + v.nbytes) for v in tflite.describe_model(data).variables]
    diff = np.nonzero(np.frombuffer(patched, np.uint8) != np.frombuffer(data, np.uint8))[0]
    assert diff.size > 0
    assert all(any(lo <= i < hi for lo, hi in regions) for i in diff)
    assert (
        tflite.read_weights(data)["dense_0_bias"][0] != weights["dense_0_bias"][0]
    )  # input intact


def test_patch_flat_follows_the_layout() -> None:
    data = shipped_model()
    layout = tflite.read_manifest(data).layout  # type: ignore[union-attr]
    vector = np.arange(tflite.layout_size(layout), dtype=np.float32) / 1000.0
    patched = tflite.patch_flat(data, vector, layout)
    assert np.array_equal(tflite.flatten(tflite.read_weights(patched), layout), vector)
    first = layout[0]
    assert np.array_equal(
        tflite.read_weights(patched)[first.name].reshape(-1), vector[: first.size]
    )


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"nope": np.zeros(3, np.float32)}, "no variable 'nope'"),
        ({"dense_0_bias": np.zeros(31, np.float32)}, "shape"),
        ({"dense_0_bias": np.full(32, np.nan, np.float32)}, "NaN"),
        ({"dense_0_bias": np.array(["a"] * 32)}, "numbers"),
    ],
)
def test_patch_refuses_bad_weights(weights: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(tflite.LayoutError, match=message):
        tflite.patch_weights(shipped_model(), weights)


def test_flatten_unflatten_round_trip_and_errors() -> None:
    layout = mb.load_spec().layout()
    weights = _new_weights(2)
    vector = tflite.flatten(weights, layout)
    assert vector.dtype == np.float32
    assert vector.shape == (tflite.layout_size(layout),)
    back = tflite.unflatten(vector, layout)
    assert all(np.array_equal(back[k], weights[k]) for k in weights)
    with pytest.raises(tflite.LayoutError):
        tflite.unflatten(vector[:-1], layout)
    with pytest.raises(tflite.LayoutError):
        tflite.flatten({k: v for k, v in weights.items() if k != "dense_1_bias"}, layout)


def test_patched_model_runs_with_new_weights_in_a_fresh_interpreter() -> None:
    data = shipped_model()
    weights = _new_weights(3)
    patched = tflite.patch_weights(data, weights)
    got = new_interpreter(patched).get_signature_runner("get_weights")()
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


PATCH_WITHOUT_TF = textwrap.dedent(
    """
    import importlib.abc, json, sys, time
    BLOCKED = {"tensorflow", "ai_edge_litert", "tflite_runtime"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the patch path must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} imported despite the blocker")

    import numpy as np
    from fleetlearn.shared import tflite

    source, weights_file, out = sys.argv[1:4]
    data = open(source, "rb").read()
    weights = dict(np.load(weights_file))
    start = time.perf_counter()
    patched = tflite.patch_weights(data, weights)
    model, manifest = tflite.embed_manifest(patched, model_id="pdm-default", version=2)
    seconds = time.perf_counter() - start
    open(out, "wb").write(model)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "version": manifest.version, "seconds": seconds}))
    """
)


def test_patch_path_needs_neither_tensorflow_nor_litert(tmp_path: Path) -> None:
    """Acceptance 3: patch in a process where TF and LiteRT cannot be imported; load the file
    in a fresh interpreter here and get exactly the new weights back."""
    weights = _new_weights(4)
    np.savez(tmp_path / "weights.npz", **weights)
    out = tmp_path / "patched.tflite"
    proc = subprocess.run(
        [sys.executable, "-c", PATCH_WITHOUT_TF, str(mb.DEFAULT_MODEL_PATH),
         str(tmp_path / "weights.npz"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["version"] == 2

    model = out.read_bytes()
    got = new_interpreter(model).get_signature_runner("get_weights")()
    assert got.keys() == weights.keys()
    for name, value in weights.items():
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], value), name  # exact, not approximately
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    assert manifest.version == 2
    assert tflite.content_hash(model) == manifest.content_hash


# ---------------------------------------------------------------------------------- manifest


def test_embed_rewrites_in_place_and_rehashes() -> None:
    data = shipped_model()
    old = tflite.read_manifest(data)
    assert old is not None
    patched = tflite.patch_weights(data, _new_weights(5))
    assert tflite.content_hash(patched) != old.content_hash  # weights are covered by the hash
    model, manifest = tflite.embed_manifest(patched, model_id="pdm-default", version=7)
    assert len(model) == len(data)  # the reserved space took the new manifest
    assert tflite.read_manifest(model) == manifest
    assert manifest.version == 7
    assert manifest.layout == old.layout
    assert manifest.labels == old.labels
    assert tflite.content_hash(model) == manifest.content_hash != old.content_hash


def test_embed_grows_the_file_when_the_manifest_outgrows_its_space() -> None:
    data = shipped_model()
    # 40 incompressible labels: ~1.5 KB compressed, past the space reserved at build time.
    labels = tuple(hashlib.sha256(bytes([i])).hexdigest()[:60] for i in range(40))
    model, manifest = tflite.embed_manifest(data, model_id="pdm-default", version=2, labels=labels)
    assert len(model) > len(data)
    assert (len(model) - len(data)) % 16 == 0
    info = tflite.describe_model(model)
    old_offsets = {v.name: v.offset for v in tflite.describe_model(data).variables}
    for var in info.variables:  # moved by a multiple of 16: every alignment is kept
        assert var.offset is not None
        assert old_offsets[var.name] is not None
        assert var.offset % 16 == old_offsets[var.name] % 16  # type: ignore[operator]
    assert info.metadata.count("fleetlearn.manifest") == 1
    assert tflite.read_manifest(model) == manifest
    assert manifest.labels == labels
    assert tflite.content_hash(model) == manifest.content_hash
    before = tflite.read_weights(data, LAYOUT_NAMES)
    after = tflite.read_weights(model, LAYOUT_NAMES)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # The interpreter accepts the rewritten file (its flatbuffer verifier checks alignment).
    got = new_interpreter(model).get_signature_runner("get_weights")()
    assert all(np.array_equal(got[k], before[k]) for k in before)
    # And the next, smaller manifest fits in place again.
    again, _ = tflite.embed_manifest(model, model_id="pdm-default", version=3, labels=())
    assert len(again) == len(model)


def test_embed_refuses_a_layout_the_model_does_not_have() -> None:
    bad = (tflite.WeightSpec(name="dense_0_kernel", shape=(16, 33)),)
    with pytest.raises(tflite.LayoutError, match="dense_0_kernel"):
        tflite.embed_manifest(shipped_model(), model_id="pdm-default", version=2, layout=bad)


# ----------------------------------------------------------------------------- hostile bytes


def _all_readers(data: bytes) -> None:
    """Run every reader; each may succeed or raise ModelError, and nothing else."""
    for call in (
        tflite.describe_model,
        tflite.read_manifest,
        tflite.content_hash,
        tflite.read_weights,
        lambda d: tflite.patch_weights(d, {"dense_2_bias": np.ones(4, np.float32)}),
        lambda d: tflite.embed_manifest(d, model_id="pdm-default", version=2),
    ):
        try:
            call(data)
        except tflite.ModelError:
            pass


@pytest.mark.parametrize("data", [b"", b"TFL3", b"\0\0\0\0TFL3", b"\x08\0\0\0TFL3\xff\xff\xff\xff"])
def test_tiny_inputs_are_format_errors(data: bytes) -> None:
    with pytest.raises(tflite.ModelFormatError):
        tflite.describe_model(data)


def test_not_bytes_is_a_format_error() -> None:
    with pytest.raises(tflite.ModelFormatError):
        tflite.describe_model(bytearray(shipped_model()))  # type: ignore[arg-type]


def test_every_truncation_is_a_format_error() -> None:
    data = shipped_model()
    for size in [*range(0, 512), *range(512, len(data), 61)]:
        with pytest.raises(tflite.ModelFormatError):
            tflite.describe_model(data[:size])


@FUZZ
@given(st.data())
def test_flipped_bytes_only_raise_model_errors(data: st.DataObject) -> None:
    model = bytearray(shipped_model())
    # Tables, vtables and offsets live outside the weight buffers; aim most flips there.
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(model) - 1))
        model[at] ^= data.draw(st.integers(1, 255))
    _all_readers(bytes(model))


INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@FUZZ
@given(st.data())
def test_overwritten_offsets_only_raise_model_errors(data: st.DataObject) -> None:
    model = bytearray(shipped_model())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(model) // 4 - 1)) * 4
        value = data.draw(st.sampled_from([*INTERESTING_U32, len(model), len(model) - at]))
        model[at : at + 4] = value.to_bytes(4, "little")
    _all_readers(bytes(model))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_garbage_after_the_identifier_only_raises_model_errors(tail: bytes) -> None:
    _all_readers(b"\x0c\0\0\0TFL3" + tail)

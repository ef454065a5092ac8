"""Helpers for the model tests: the shipped model, models built once per session, test data,
keys, a numpy reference for one SGD step, and wire strategies for the model messages.

Building with TensorFlow costs seconds, so `built(name)` caches per process: every test module
that asks for the same model gets the same bytes and tf.Module. TensorFlow is imported only when
a test asks for a build (those tests are marked slow).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import nacl.signing
import numpy as np
from hypothesis import strategies as st

from fleetlearn.aggregator import model_build as mb
from fleetlearn.shared import tflite, wire
from fleetlearn.shared.release import MAX_RELEASE_MODEL_BYTES, ModelRelease
from tests.wire_strategies import ids

SHIPPED_MODEL = mb.DEFAULT_MODEL_PATH

# The two model sizes the acceptance tests build: the shipped default (SGD) and a deeper, wider
# one trained with Adam, whose optimizer slots exercise the shared-buffer rules. Its learning
# rate is an Adam-sized one: at SGD's 0.05, Adam turns float rounding in near-zero gradients
# into lr-sized steps, and TF and LiteRT drift apart by ~1e-3 within 10 steps (measured).
SPECS: dict[str, mb.ModelSpec] = {
    "pdm": mb.load_spec(),
    "wide-adam": replace(
        mb.load_spec(),
        model_id="wide-adam",
        hidden=(64, 64, 32),
        optimizer="adam",
        learning_rate=0.005,
    ),
}


@functools.cache
def shipped_model() -> bytes:
    return SHIPPED_MODEL.read_bytes()


@dataclass(frozen=True)
class Built:
    spec: mb.ModelSpec
    module: Any  # the tf.Module the model was converted from, at its initial weights
    model: bytes  # converted, with the version-1 manifest embedded
    manifest: tflite.ModelManifest

    def fresh_module(self) -> Any:
        """A new tf.Module at the model's initial weights (training mutates `module`)."""
        return mb.build_module(self.spec)


@functools.cache
def built(name: str) -> Built:
    """Build SPECS[name] with TensorFlow once per process."""
    spec = SPECS[name]
    module = mb.build_module(spec)
    data = mb.convert_module(module)
    model, manifest = tflite.embed_manifest(
        data, model_id=spec.model_id, version=1, layout=spec.layout(), labels=spec.labels
    )
    return Built(spec=spec, module=module, model=model, manifest=manifest)


def signing_key(seed: int = 1) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(seed.to_bytes(32, "little"))


def blobs(
    n: int, *, width: int = 16, classes: int = 4, seed: int = 0, spread: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class: easy data a working trainer must learn."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(0.0, 1.0, size=(classes, width))
    y = rng.integers(0, classes, size=n).astype(np.int32)
    x = centres[y] + rng.normal(0.0, spread, size=(n, width))
    return x.astype(np.float32), y


def reference_sgd_step(
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    lr: float,
    *,
    prox_mu: float = 0.0,
    anchor: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """One SGD step of the MLP on exactly these samples, in float64 numpy (no TF, no padding).
    With `prox_mu`, FedProx's proximal gradient mu * (w - anchor) is added to each weight's."""
    n_layers = len(weights) // 2
    kernels = [weights[f"dense_{i}_kernel"].astype(np.float64) for i in range(n_layers)]
    biases = [weights[f"dense_{i}_bias"].astype(np.float64) for i in range(n_layers)]
    inputs, pre = [x.astype(np.float64)], []
    h = inputs[0]
    for i in range(n_layers):
        z = h @ kernels[i] + biases[i]
        pre.append(z)
        h = np.maximum(z, 0.0) if i < n_layers - 1 else z
        inputs.append(h)
    shifted = h - h.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(y)
    loss = float(-log_p[np.arange(n), y].mean())
    dz = np.exp(log_p)
    dz[np.arange(n), y] -= 1.0
    dz /= n
    new: dict[str, np.ndarray] = {}

    def prox(name: str, value: np.ndarray) -> np.ndarray:
        if not prox_mu:
            return np.zeros_like(value)
        assert anchor is not None
        return prox_mu * (value - anchor[name].astype(np.float64))

    for i in reversed(range(n_layers)):
        k, b = f"dense_{i}_kernel", f"dense_{i}_bias"
        new[k] = kernels[i] - lr * (inputs[i].T @ dz + prox(k, kernels[i]))
        new[b] = biases[i] - lr * (dz.sum(axis=0) + prox(b, biases[i]))
        if i:
            dz = (dz @ kernels[i].T) * (pre[i - 1] > 0)
    return new, loss


# ------------------------------------------------------------------------ wire strategies

_names = st.lists(ids, min_size=1, max_size=4, unique=True)


@st.composite
def manifests(draw: st.DrawFn, *, zero_hash: bool = False) -> tflite.ModelManifest:
    names = draw(_names)
    layout = tuple(
        tflite.WeightSpec(name=name, shape=tuple(draw(st.lists(st.integers(1, 64), max_size=3))))
        for name in names
    )
    return tflite.ModelManifest(
        model_id=draw(ids),
        version=draw(st.integers(1, 2**63 - 1)),
        layout=layout,
        labels=tuple(draw(st.lists(ids, max_size=5, unique=True))),
        content_hash=tflite.ZERO_HASH if zero_hash else draw(st.binary(min_size=32, max_size=32)),
    )


@st.composite
def releases(draw: st.DrawFn) -> ModelRelease:
    return ModelRelease(
        manifest=draw(manifests()),
        model_size=draw(st.integers(1, MAX_RELEASE_MODEL_BYTES)),
        model_zst=draw(st.binary(min_size=1, max_size=64)),
        signature=draw(st.binary(min_size=64, max_size=64)),
    )


def embedded_manifests() -> st.SearchStrategy[wire.Message]:
    return manifests(zero_hash=True).map(lambda m: tflite.EmbeddedManifest(manifest=m))


# The wire property tests draw every registered message type; these two have rules (hash and
# signature lengths, float32 layouts) that random fields almost never meet. Same shape as
# wire_strategies.EXPLICIT, for its `_register_explicit` to merge.
STRATEGIES: dict[str, Callable[[], st.SearchStrategy[wire.Message]]] = {
    ModelRelease.TAG: releases,
    tflite.EmbeddedManifest.TAG: embedded_manifests,
}

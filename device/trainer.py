"""Local training on a device: a verified model release in a LiteRT interpreter.

What it owns: running the model's `train`, `infer`, `get_weights` and `set_weights` signatures
over numpy arrays, and handing the round its result as a flat float32 vector in the release
manifest's weight layout (the order every device and the aggregator agree on).

Rules it keeps:
- One trainer per release, each with a fresh interpreter: the variables' initializer runs once
  per interpreter, so a new release in an old interpreter would keep the old weights. Build it
  with `from_release`, which verifies the signature before any byte reaches the interpreter.
- The `train` signature has a fixed batch. A partial last batch is padded with zeros and given
  sample weight 0; the model's loss is the weighted mean, so padding changes nothing.
- No TensorFlow, no global RNG (shuffling takes a `numpy.random.Generator`), no clock.
  Training is CPU-bound: asyncio callers run it in a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.signing
import numpy as np

from fleetlearn.device.runtime import new_interpreter
from fleetlearn.shared import tflite
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.release import ModelRelease, verify_release

REQUIRED_SIGNATURES = ("train", "infer", "get_weights", "set_weights")
_EVAL_CHUNK = 1024  # rows per `infer` call; bounds the interpreter's tensor arena


class TrainerError(FleetlearnError, ValueError):
    """Training data or a model does not fit what the trainer needs."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training did: optimizer steps, samples seen (with repeats across epochs), and
    the mean loss over those samples, each measured just before its step."""

    steps: int
    samples: int
    loss: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    loss: float  # mean cross-entropy
    accuracy: float
    samples: int


class LiteRTTrainer:
    """Trains one model release on local data. `model` and `manifest` come from verify_release."""

    def __init__(
        self, model: bytes, manifest: tflite.ModelManifest, *, num_threads: int = 1
    ) -> None:
        info = tflite.describe_model(model)
        keys = {sig.key for sig in info.signatures}
        missing = [key for key in REQUIRED_SIGNATURES if key not in keys]
        if missing:
            raise TrainerError(f"model lacks the signature(s) {missing}; rebuild it")
        train = {t.name: t for t in info.signature("train").inputs}
        if set(train) != {"x", "y", "sample_weight"} or len(train["x"].shape) != 2:
            raise TrainerError("model's train signature is not train(x, y, sample_weight)")
        self.batch_size, self.input_width = train["x"].shape
        logits = {t.name: t for t in info.signature("infer").outputs}.get("logits")
        if logits is None or len(logits.shape) != 2 or self.batch_size < 1:
            raise TrainerError("model's infer signature does not return logits[N, classes]")
        self.classes = logits.shape[1]
        if manifest.labels and len(manifest.labels) != self.classes:
            raise TrainerError(
                f"manifest names {len(manifest.labels)} classes, the model has {self.classes}"
            )
        returned = {t.name for t in info.signature("get_weights").outputs}
        if returned != {spec.name for spec in manifest.layout}:
            raise TrainerError("model's get_weights does not return the manifest's layout")

        self.manifest = manifest
        self.layout = manifest.layout
        # The release's own weights: the update is measured from here.
        self.initial = tflite.flatten(tflite.read_weights(model, returned), self.layout)
        self._model = model  # the interpreter reads from this buffer; keep it alive
        self._interpreter = new_interpreter(model, num_threads=num_threads)
        self._train = self._interpreter.get_signature_runner("train")
        self._infer = self._interpreter.get_signature_runner("infer")
        self._get = self._interpreter.get_signature_runner("get_weights")
        self._set = self._interpreter.get_signature_runner("set_weights")
        self._x = np.zeros((self.batch_size, self.input_width), dtype=np.float32)
        self._y = np.zeros(self.batch_size, dtype=np.int32)
        self._w = np.zeros(self.batch_size, dtype=np.float32)

    @classmethod
    def from_release(
        cls,
        release: ModelRelease,
        verify_key: nacl.signing.VerifyKey,
        *,
        min_version: int,
        num_threads: int = 1,
    ) -> LiteRTTrainer:
        """Verify `release` (signature, rollback, content), then load it in a fresh interpreter."""
        model, manifest = verify_release(release, verify_key, min_version=min_version)
        return cls(model, manifest, num_threads=num_threads)

    @property
    def version(self) -> int:
        return self.manifest.version

    # ---------------------------------------------------------------------------- training

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on up to `batch_size` samples; returns the loss before the step."""
        x, y = self._check(x, y)
        if not 0 < x.shape[0] <= self.batch_size:
            raise TrainerError(f"a step takes 1..{self.batch_size} samples, got {x.shape[0]}")
        return self._step(x, y)

    def _step(self, x: np.ndarray, y: np.ndarray) -> float:
        n = x.shape[0]
        self._x[:n] = x
        self._x[n:] = 0.0
        self._y[:n] = y
        self._y[n:] = 0
        self._w[:n] = 1.0
        self._w[n:] = 0.0
        result = self._train(x=self._x, y=self._y, sample_weight=self._w)
        return float(result["loss"])

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        rng: np.random.Generator | None = None,
    ) -> TrainResult:
        """`epochs` passes over (x, y) in fixed-size batches, shuffled by `rng` when given."""
        x, y = self._check(x, y)
        n = x.shape[0]
        if n == 0:
            raise TrainerError("no training samples")
        if not 1 <= epochs <= 10_000:
            raise TrainerError(f"epochs must be 1..10000, got {epochs}")
        steps = 0
        loss_sum = 0.0
        for _ in range(epochs):
            order = rng.permutation(n) if rng is not None else np.arange(n)
            for start in range(0, n, self.batch_size):
                index = order[start : start + self.batch_size]
                loss_sum += self._step(x[index], y[index]) * len(index)
                steps += 1
        return TrainResult(steps=steps, samples=n * epochs, loss=loss_sum / (n * epochs))

    # -------------------------------------------------------------------------- inference

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = self._check_x(x)
        parts = [
            np.asarray(self._infer(x=x[start : start + _EVAL_CHUNK])["logits"], dtype=np.float32)
            for start in range(0, x.shape[0], _EVAL_CHUNK)
        ]
        if not parts:
            return np.zeros((0, self.classes), dtype=np.float32)
        return np.concatenate(parts)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, one row per sample."""
        logits = self.logits(x).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Mean cross-entropy and accuracy of the current weights on (x, y)."""
        x, y = self._check(x, y)
        if x.shape[0] == 0:
            return Evaluation(loss=math.nan, accuracy=math.nan, samples=0)
        logits = self.logits(x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return Evaluation(loss=loss, accuracy=accuracy, samples=int(x.shape[0]))

    # ----------------------------------------------------------------------------- weights

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: np.array(value, dtype=np.float32) for name, value in self._get().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every layout variable (all of them: the signature takes them together)."""
        if set(weights) != {spec.name for spec in self.layout}:
            raise TrainerError("set_weights needs exactly the manifest's layout names")
        arrays: dict[str, Any] = {}
        for spec in self.layout:
            value = np.asarray(weights[spec.name], dtype=np.float32)
            if value.shape != spec.shape:
                raise TrainerError(f"{spec.name}: shape {value.shape}, expected {spec.shape}")
            arrays[spec.name] = np.ascontiguousarray(value)
        self._set(**arrays)

    def flat_weights(self) -> np.ndarray:
        """The current weights as one float32 vector in the manifest's layout."""
        return tflite.flatten(self.get_weights(), self.layout)

    def set_flat_weights(self, vector: np.ndarray) -> None:
        self.set_weights(tflite.unflatten(vector, self.layout))

    def update(self) -> np.ndarray:
        """What local training changed: current minus release weights, flat float32, in layout."""
        return self.flat_weights() - self.initial

    # ------------------------------------------------------------------------------ checks

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_width:
            raise TrainerError(f"features must be [n, {self.input_width}], got {list(x.shape)}")
        if x.dtype.kind not in "fiu":
            raise TrainerError(f"features must be numbers, not {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise TrainerError("features hold NaN or infinity")
        return x

    def _check(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._check_x(x)
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise TrainerError(
                f"labels must be {x.shape[0]} integers, got {y.dtype}{list(y.shape)}"
            )
        if y.size and (y.min() < 0 or y.max() >= self.classes):
            raise TrainerError(f"labels must lie in 0..{self.classes - 1}")
        return x, y.astype(np.int32)

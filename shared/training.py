"""Training a fleet model with LiteRT: a model's four signatures over numpy arrays.

What it owns: `LiteRTTrainer`, which runs a model's `train`, `infer`, `get_weights` and
`set_weights` signatures in a LiteRT interpreter and reads its weights as a flat float32
vector in the manifest's weight layout (the order every device and the aggregator agree on).
Devices train releases with it (`device.trainer.local_round`); `fleetlearn model pretrain`
trains the initial model with it on proxy data, so both run the same steps.

Rules it keeps:
- One trainer per release, each with a fresh interpreter: the variables' initializer runs once
  per interpreter, so a new release in an old interpreter would keep the old weights. Build it
  with `from_release`, which verifies the signature before any byte reaches the interpreter.
- The `train` signature has a fixed batch. A partial last batch is padded with zeros and given
  sample weight 0; the model's loss is the weighted mean, so padding changes nothing.
- Models built since the learning rate became a round setting take it (and FedProx's mu) as
  train inputs; `train` anchors the proximal term at the weights it starts from. Older models
  have their rate built in: they train with it, and refuse a proximal term.
- The manifest's task says what the signatures take and give (`tflite.Task`): a classifier
  trains on integer labels and infers logits, a regressor on float targets and infers a
  prediction, an autoencoder on rows alone (no y) and infers a reconstruction and its score.
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

from fleetlearn.shared import tflite
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.evaluation import (
    Evaluation,
    anomaly_threshold,
    logits_of,
    outputs_of,
    score,
    score_anomaly,
    score_regression,
)
from fleetlearn.shared.release import ModelRelease, verify_release
from fleetlearn.shared.tflite.runtime import new_interpreter

REQUIRED_SIGNATURES = ("train", "infer", "get_weights", "set_weights")
_TRAIN_INPUTS = {"x", "y", "sample_weight", "learning_rate", "prox_mu"}
_LEGACY_TRAIN_INPUTS = {"x", "y", "sample_weight"}
_ANOMALY_TRAIN_INPUTS = {"x", "sample_weight", "learning_rate", "prox_mu"}
# What `infer` returns for each task: the output the trainer reads.
_INFER_OUTPUT = {
    tflite.Task.CLASSIFICATION: "logits",
    tflite.Task.REGRESSION: "prediction",
    tflite.Task.ANOMALY: "score",
}
MAX_LEARNING_RATE = 10.0
MAX_PROX_MU = 100.0


class TrainerError(FleetlearnError, ValueError):
    """Training data or a model does not fit what the trainer needs."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training did: optimizer steps, samples seen (with repeats across epochs), and
    the mean loss over those samples, each measured just before its step."""

    steps: int
    samples: int
    loss: float


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
        self.task = manifest.task
        train = {t.name: t for t in info.signature("train").inputs}
        expected = (
            (_ANOMALY_TRAIN_INPUTS,)
            if self.task is tflite.Task.ANOMALY
            else (_TRAIN_INPUTS, _LEGACY_TRAIN_INPUTS)
            if self.task is tflite.Task.CLASSIFICATION
            else (_TRAIN_INPUTS,)
        )
        if set(train) not in expected or len(train["x"].shape) != 2:
            raise TrainerError(
                f"model's train signature takes {sorted(train)}, not what a "
                f"{self.task.value} model trains with; rebuild it"
            )
        # False: a model from before the rate was an input; it trains at its built-in rate.
        self.takes_learning_rate = "learning_rate" in train
        self.batch_size, self.input_width = train["x"].shape
        output = {t.name: t for t in info.signature("infer").outputs}.get(_INFER_OUTPUT[self.task])
        rank = 2 if self.task is tflite.Task.CLASSIFICATION else 1
        if output is None or len(output.shape) != rank or self.batch_size < 1:
            raise TrainerError(
                f"model's infer signature does not return {_INFER_OUTPUT[self.task]} as a "
                f"{self.task.value} model does"
            )
        # Classes: a classifier's outputs; an autoencoder's kinds of row (normal, anomaly).
        if self.task is tflite.Task.CLASSIFICATION:
            self.classes = output.shape[1]
        elif self.task is tflite.Task.ANOMALY:
            self.classes = 2
        else:
            self.classes = 0
        if manifest.labels and len(manifest.labels) != self.classes:
            raise TrainerError(
                f"manifest names {len(manifest.labels)} classes, the model has {self.classes}"
            )
        if self.task is tflite.Task.REGRESSION and train["y"].dtype != "float32":
            raise TrainerError("a regression model's train signature must take float32 y")
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
        self._y = np.zeros(
            self.batch_size,
            dtype=np.int32 if self.task is tflite.Task.CLASSIFICATION else np.float32,
        )
        self._w = np.zeros(self.batch_size, dtype=np.float32)
        self._rates: dict[str, np.ndarray] = {}

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

    def train_step(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        *,
        learning_rate: float | None = None,
        prox_mu: float = 0.0,
    ) -> float:
        """One optimizer step on up to `batch_size` samples; returns the loss before the step.
        The proximal term (prox_mu > 0) pulls towards the weights `set_weights` last set."""
        x, y = self._check(x, y)
        if not 0 < x.shape[0] <= self.batch_size:
            raise TrainerError(f"a step takes 1..{self.batch_size} samples, got {x.shape[0]}")
        self._rates = self._check_rates(learning_rate, prox_mu)
        return self._step(x, y)

    def _check_rates(self, learning_rate: float | None, prox_mu: float) -> dict[str, np.ndarray]:
        if not (math.isfinite(prox_mu) and 0.0 <= prox_mu <= MAX_PROX_MU):
            raise TrainerError(f"prox_mu must be in [0, {MAX_PROX_MU}], got {prox_mu}")
        if learning_rate is not None and not (
            math.isfinite(learning_rate) and 0.0 < learning_rate <= MAX_LEARNING_RATE
        ):
            raise TrainerError(
                f"learning_rate must be in (0, {MAX_LEARNING_RATE}], got {learning_rate}"
            )
        if not self.takes_learning_rate:
            if prox_mu > 0.0:
                raise TrainerError("this model predates FedProx (no prox_mu input); rebuild it")
            return {}  # its rate is built in
        if learning_rate is None:
            raise TrainerError("this model takes its learning rate from the round; none given")
        return {
            "learning_rate": np.array(learning_rate, dtype=np.float32),
            "prox_mu": np.array(prox_mu, dtype=np.float32),
        }

    def _step(self, x: np.ndarray, y: np.ndarray | None) -> float:
        n = x.shape[0]
        self._x[:n] = x
        self._x[n:] = 0.0
        self._w[:n] = 1.0
        self._w[n:] = 0.0
        if self.task is tflite.Task.ANOMALY:  # trains on the rows alone
            result = self._train(x=self._x, sample_weight=self._w, **self._rates)
            return float(result["loss"])
        assert y is not None  # _check requires it for every task but anomaly
        self._y[:n] = y
        self._y[n:] = 0
        result = self._train(x=self._x, y=self._y, sample_weight=self._w, **self._rates)
        return float(result["loss"])

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        *,
        epochs: int = 1,
        steps: int = 0,
        learning_rate: float | None = None,
        prox_mu: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> TrainResult:
        """Optimizer steps over (x, y) in fixed-size batches, shuffled by `rng` when given.

        `epochs` passes over the data, or, when `steps` > 0, exactly that many steps (as many
        passes as they take, the last one cut short): a device with few examples then still
        takes the fleet's number of steps. With `prox_mu` > 0 every step is pulled towards the
        weights this call started from (FedProx).
        """
        x, y = self._check(x, y)
        n = x.shape[0]
        if n == 0:
            raise TrainerError("no training samples")
        if not 1 <= epochs <= 10_000:
            raise TrainerError(f"epochs must be 1..10000, got {epochs}")
        if not 0 <= steps <= 1_000_000:
            raise TrainerError(f"steps must be 0..1000000, got {steps}")
        self._rates = self._check_rates(learning_rate, prox_mu)
        if self.takes_learning_rate:
            self._set(**self.get_weights())  # anchors := the weights training starts from
        per_pass = -(-n // self.batch_size)
        total = steps if steps > 0 else epochs * per_pass
        done = 0
        seen = 0
        loss_sum = 0.0
        while done < total:
            order = rng.permutation(n) if rng is not None else np.arange(n)
            for start in range(0, n, self.batch_size):
                if done == total:
                    break
                index = order[start : start + self.batch_size]
                loss_sum += self._step(x[index], None if y is None else y[index]) * len(index)
                seen += len(index)
                done += 1
        return TrainResult(steps=done, samples=seen, loss=loss_sum / seen)

    # -------------------------------------------------------------------------- inference

    def logits(self, x: np.ndarray) -> np.ndarray:
        """A classifier's logits [n, classes]."""
        self._require(tflite.Task.CLASSIFICATION)
        return logits_of(self._infer, self._check_x(x), self.classes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """A classifier's class probabilities, one row per sample."""
        logits = self.logits(x).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict_values(self, x: np.ndarray) -> np.ndarray:
        """A regressor's prediction, one value per row."""
        self._require(tflite.Task.REGRESSION)
        return outputs_of(self._infer, self._check_x(x), "prediction", None)

    def anomaly_scores(self, x: np.ndarray) -> np.ndarray:
        """An autoencoder's anomaly score per row: its mean squared reconstruction error."""
        self._require(tflite.Task.ANOMALY)
        return outputs_of(self._infer, self._check_x(x), "score", None)

    def calibrate(self, x: np.ndarray) -> float:
        """An autoencoder's anomaly threshold from normal rows `x` (what the device trains on):
        the ANOMALY_QUANTILE of their scores under the current weights."""
        return anomaly_threshold(self.anomaly_scores(x))

    def evaluate(
        self, x: np.ndarray, y: np.ndarray | None, *, threshold: float | None = None
    ) -> Evaluation:
        """The current weights on (x, y), judged as the task says (`shared.evaluation`): a
        classifier's cross-entropy and accuracy, a regressor's mean absolute error, an
        autoencoder's reconstruction error and its rows judged right by `threshold`."""
        x, y = self._check(x, y)
        if self.task is tflite.Task.REGRESSION:
            assert y is not None  # _check requires targets
            return score_regression(self.predict_values(x), y.astype(np.float32))
        if self.task is tflite.Task.ANOMALY:
            if threshold is None:
                raise TrainerError("judging anomalies needs a threshold (calibrate first)")
            return score_anomaly(self.anomaly_scores(x), y, threshold)
        assert y is not None
        return score(self.logits(x), y)

    def _require(self, task: tflite.Task) -> None:
        if self.task is not task:
            raise TrainerError(f"this is a {self.task.value} model, not a {task.value} model")

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

    def _check(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows and their y as the task needs: class labels (int32), regression targets
        (float32, finite), or for an autoencoder nothing or row kinds (0 normal, any fault
        class above 0, returned as 1; used to judge, never to train)."""
        x = self._check_x(x)
        if y is None:
            if self.task is not tflite.Task.ANOMALY:
                raise TrainerError(f"a {self.task.value} model needs y for every row")
            return x, None
        y = np.asarray(y)
        if self.task is tflite.Task.REGRESSION:
            if y.shape != (x.shape[0],) or y.dtype.kind not in "fiu":
                raise TrainerError(
                    f"targets must be {x.shape[0]} numbers, got {y.dtype}{list(y.shape)}"
                )
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
                y = y.astype(np.float32)
            if not np.all(np.isfinite(y)):
                raise TrainerError("targets hold NaN or infinity (or overflow float32)")
            return x, y
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise TrainerError(
                f"labels must be {x.shape[0]} integers, got {y.dtype}{list(y.shape)}"
            )
        if self.task is tflite.Task.ANOMALY:  # any fault class counts as an anomaly
            if y.size and y.min() < 0:
                raise TrainerError("row kinds must be 0 (normal) or a fault class > 0")
            return x, (y != 0).astype(np.int32)
        if y.size and (y.min() < 0 or y.max() >= self.classes):
            raise TrainerError(f"labels must lie in 0..{self.classes - 1}")
        return x, y.astype(np.int32)

"""Judging a model on held-out examples: the one definition of each task's evaluation.

What it owns: `Evaluation` (the task's evaluation loss, accuracy, count, and per class the rows
and hits: a classifier can be 95% right and miss every row of a rare fault), the scoring of
each task (`tflite.Task`) from the model's outputs: `score` (classifier logits: cross-entropy
and accuracy), `score_regression` (predictions: mean absolute error), `score_anomaly`
(reconstruction errors against a threshold: mean error, and rows on the right side of it,
per kind of row), `anomaly_threshold` (a device's calibration on its own normal rows), and
`evaluate_model`, which runs a model's `infer` signature in a fresh LiteRT interpreter. Devices
score their held-out rows (federated evaluation); the aggregator uses `evaluate_model` on a
test set it holds (`eval.data`). Inference only: nothing here trains.

`Evaluation.loss` is what each task reports as its loss on `metrics`: cross-entropy for a
classifier, the mean absolute error for a regressor (the metric of regression: in the
target's own units), the mean squared reconstruction error for an autoencoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

EVAL_CHUNK = 1024  # rows per `infer` call; bounds the interpreter's tensor arena


# The quantile of a device's own normal rows' reconstruction errors above which a row is an
# anomaly: on normal data like the calibration rows, about 1% false alarms.
ANOMALY_QUANTILE = 0.99


@dataclass(frozen=True, slots=True)
class Evaluation:
    loss: float  # the task's evaluation loss (see the module docstring; NaN without samples)
    accuracy: float  # NaN without samples, and for a regressor
    samples: int
    # Per class (one entry per model output): rows with that label, and of those classified
    # right (recall = hits / rows). Empty when not computed.
    class_samples: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()

    @property
    def correct(self) -> int:
        if self.samples == 0 or not math.isfinite(self.accuracy):
            return 0
        return round(self.accuracy * self.samples)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "loss": round(self.loss, 6) if math.isfinite(self.loss) else None,
            "accuracy": round(self.accuracy, 6) if math.isfinite(self.accuracy) else None,
            "samples": self.samples,
        }


def score(logits: np.ndarray, y: np.ndarray) -> Evaluation:
    """Mean cross-entropy and accuracy of `logits` [n, classes] against integer labels `y`."""
    classes = int(logits.shape[1]) if logits.ndim == 2 else 0
    if logits.shape[0] == 0:
        empty = (0,) * classes
        return Evaluation(
            loss=math.nan, accuracy=math.nan, samples=0, class_samples=empty, class_correct=empty
        )
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    hit = values.argmax(axis=1) == y
    accuracy = float(hit.mean())
    labels = np.asarray(y, dtype=np.int64)
    return Evaluation(
        loss=loss,
        accuracy=accuracy,
        samples=int(values.shape[0]),
        class_samples=tuple(int(v) for v in np.bincount(labels, minlength=classes)[:classes]),
        class_correct=tuple(int(v) for v in np.bincount(labels[hit], minlength=classes)[:classes]),
    )


def score_regression(prediction: np.ndarray, y: np.ndarray) -> Evaluation:
    """Mean absolute error of `prediction` [n] against float targets `y` [n]."""
    n = int(prediction.shape[0])
    if n == 0:
        return Evaluation(loss=math.nan, accuracy=math.nan, samples=0)
    error = np.abs(np.asarray(prediction, np.float64) - np.asarray(y, np.float64))
    return Evaluation(loss=float(error.mean()), accuracy=math.nan, samples=n)


def anomaly_threshold(scores: np.ndarray, quantile: float = ANOMALY_QUANTILE) -> float:
    """The reconstruction error above which a row is flagged: the `quantile` of a device's
    own normal rows' errors (inf without rows: nothing is flagged)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    return float(np.quantile(values, quantile))


def score_anomaly(scores: np.ndarray, y: np.ndarray | None, threshold: float) -> Evaluation:
    """Mean reconstruction error, and how a threshold judges the rows: a row is flagged when
    its score exceeds `threshold`; it is judged right when flagged exactly if its label is
    not 0 (`y`: 0 normal, anything else a fault; None: every row normal). Per class: (normal,
    anomaly) rows and the rows judged right among them (specificity, detection rate)."""
    values = np.asarray(scores, dtype=np.float64)
    n = int(values.shape[0])
    if n == 0:
        return Evaluation(
            loss=math.nan, accuracy=math.nan, samples=0, class_samples=(0, 0), class_correct=(0, 0)
        )
    faulty = np.zeros(n, bool) if y is None else np.asarray(y) != 0
    flagged = ~(values <= threshold)  # a NaN score (a diverged model) is an alarm, not normal
    right = flagged == faulty
    return Evaluation(
        loss=float(values.mean()),
        accuracy=float(right.mean()),
        samples=n,
        class_samples=(int((~faulty).sum()), int(faulty.sum())),
        class_correct=(int((right & ~faulty).sum()), int((right & faulty).sum())),
    )


def outputs_of(
    infer: Callable[..., Mapping[str, Any]], x: np.ndarray, name: str, width: int | None
) -> np.ndarray:
    """Run an `infer` signature runner over `x` in chunks; its output `name`, float32 [n] when
    `width` is None, else [n, width]."""
    parts = [
        np.asarray(infer(x=x[start : start + EVAL_CHUNK])[name], dtype=np.float32)
        for start in range(0, x.shape[0], EVAL_CHUNK)
    ]
    if not parts:
        return np.zeros((0,) if width is None else (0, width), dtype=np.float32)
    return np.concatenate(parts)


def logits_of(infer: Callable[..., Mapping[str, Any]], x: np.ndarray, classes: int) -> np.ndarray:
    """Run an `infer` signature runner over `x` in chunks; float32 [n, classes]."""
    return outputs_of(infer, x, "logits", classes)


def y_problem(task: Any, y: np.ndarray | None) -> str:
    """Why `y` cannot judge a model of `task` (a `tflite.Task`), or "" when it can: a
    classifier needs integer labels, a regressor numeric targets, an autoencoder integer row
    kinds (0 normal) or nothing."""
    from fleetlearn.shared.tflite.manifest import Task

    if y is None:
        return "" if task is Task.ANOMALY else f"a {task.value} model is judged on labelled rows"
    kind = np.asarray(y).dtype.kind
    if task is Task.REGRESSION:
        return "" if kind in "fiu" else f"regression targets must be numbers, not {y.dtype}"
    if kind not in "iu":
        what = "class labels" if task is Task.CLASSIFICATION else "row kinds (0 normal)"
        return f"a {task.value} model needs integer {what}, not {y.dtype} values"
    return ""


def evaluate_model(model: bytes, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """The model's `infer` on (x, y), in a fresh interpreter (the model's own weights), judged
    as its manifest's task says (an autoencoder here without a device's threshold: its mean
    reconstruction error, with every row flagged as an anomaly above the 99th percentile of
    the normal rows' errors in `y`).

    Raises `shared.tflite.runtime.RuntimeMissingError` without a LiteRT runtime and
    ValueError when the data do not fit the model (width, labels out of range).
    """
    from fleetlearn.shared.tflite.manifest import Task, read_manifest
    from fleetlearn.shared.tflite.runtime import new_interpreter

    manifest = read_manifest(model)
    task = manifest.task if manifest is not None else Task.CLASSIFICATION
    problem = y_problem(task, y)
    if problem:
        raise ValueError(problem)
    infer = new_interpreter(model).get_signature_runner("infer")
    rows = np.ascontiguousarray(x, dtype=np.float32)
    if task is Task.REGRESSION:
        return score_regression(outputs_of(infer, rows, "prediction", None), y)
    if task is Task.ANOMALY:
        scores = outputs_of(infer, rows, "score", None)
        normal = scores if y is None else scores[np.asarray(y) == 0]
        return score_anomaly(scores, y, anomaly_threshold(normal))
    logits = logits_of(infer, rows, 0)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1} for this model")
    return score(logits, y)

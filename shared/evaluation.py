"""Judging a classifier on labelled examples: the one definition of loss and accuracy.

What it owns: `Evaluation` (mean cross-entropy, accuracy, count, and per class the rows and
hits: a classifier can be 95% right and miss every row of a rare fault), `score` (from
logits), and
`evaluate_model`, which runs a model's `infer` signature in a fresh LiteRT interpreter. Devices
use `score` on their held-out rows (federated evaluation); the aggregator uses
`evaluate_model` on a test set it holds (`eval.data`). Inference only: nothing here trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

EVAL_CHUNK = 1024  # rows per `infer` call; bounds the interpreter's tensor arena


@dataclass(frozen=True, slots=True)
class Evaluation:
    loss: float  # mean cross-entropy (NaN without samples)
    accuracy: float  # NaN without samples
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


def logits_of(infer: Callable[..., Mapping[str, Any]], x: np.ndarray, classes: int) -> np.ndarray:
    """Run an `infer` signature runner over `x` in chunks; float32 [n, classes]."""
    parts = [
        np.asarray(infer(x=x[start : start + EVAL_CHUNK])["logits"], dtype=np.float32)
        for start in range(0, x.shape[0], EVAL_CHUNK)
    ]
    if not parts:
        return np.zeros((0, classes), dtype=np.float32)
    return np.concatenate(parts)


def evaluate_model(model: bytes, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """The model's `infer` on (x, y), in a fresh interpreter (the model's own weights).

    Raises `shared.tflite.runtime.RuntimeMissingError` without a LiteRT runtime and
    ValueError when the data do not fit the model (width, labels out of range).
    """
    from fleetlearn.shared.tflite.runtime import new_interpreter

    infer = new_interpreter(model).get_signature_runner("infer")
    logits = logits_of(infer, np.ascontiguousarray(x, dtype=np.float32), 0)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1} for this model")
    return score(logits, y)

"""What a round measured and how it ended: per-stage counts, the result, the round summary.

What it owns: `StageStats` (one per stage: expected, arrived, late, dropped, how it closed),
`RoundTally` (a round's stages and byte and refusal counts), `Aggregate` (what a mode's
round yields when it closes), `RoundOutcome` (what the engine hands the service), and
`summary()`, the JSON-able dict published on `fl/{fleet}/metrics` and persisted.

Rules: the summary is written once, when the round ends, from typed state; nothing reads it
back to decide anything. The outcome holds the full-size mean update only until the service
takes it (`RoundEngine.take_outcome`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fleetlearn.aggregator.privacy import RoundCharge
from fleetlearn.shared.cost import CostTotals
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.secagg.config import Stage
from fleetlearn.shared.tflite.manifest import Task

ClosedBy = Literal["complete", "quorum", "hard_limit"]


@dataclass(slots=True)
class StageStats:
    expected: int = 0
    arrived: int = 0
    late: int = 0
    dropped: int = 0  # expected devices that had not answered when the stage closed
    # A stage may close with what it needs before everyone answered (secure UNMASK: every
    # secret has t shares); answers still on their way then are not needed, not dropouts.
    not_needed: int = 0
    closed_by: ClosedBy | Literal[""] = ""  # "" while open
    seconds: float = 0.0  # from the stage's opening to its close
    last: float = 0.0  # from the stage's opening to the last answer in time

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "arrived": self.arrived,
            "late": self.late,
            "dropped": self.dropped,
            "not_needed": self.not_needed,
            "closed_by": self.closed_by,
            "seconds": self.seconds,
        }


@dataclass(slots=True)
class RoundTally:
    """One round's counts, kept while it runs."""

    stages: dict[Stage, StageStats] = field(
        default_factory=lambda: {s: StageStats() for s in Stage}
    )
    uplink: Counter[str] = field(default_factory=Counter)  # device -> bytes it sent
    downlink: Counter[str] = field(default_factory=Counter)  # device -> bytes addressed to it
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> refused messages


@dataclass(frozen=True, slots=True)
class Aggregate:
    """What a round yields when it closes."""

    mean_update: np.ndarray  # full dimension, float64, in FedAvg direction
    error_bound: float  # max abs error of mean_update from quantization (0 for plain dense)
    survivors: tuple[str, ...]  # devices whose updates are in it
    # Federated evaluation over the survivors' held-out rows (`samples` of them): the round's
    # global model, and each device's own trained model (`local_accuracy`).
    mean_loss: float | None
    accuracy: float | None
    samples: int
    local_accuracy: float | None
    weight_sum: float
    # Devices that dropped after their data was committed and whose loss the protocol
    # recovered from (secure: sharers without a masked input, survivors that did not unmask).
    dropouts_recovered: int
    # Per class of the model (its labels), over the same held-out rows: rows with that
    # label and the global model's hits among them. Empty without labels.
    class_samples: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()
    # The contributing devices' cost reports, summed (secure rounds: only the sums exist).
    cost: CostTotals | None = None
    # Figures of the mode's own (asynchronous rounds: `async`), added to the summary as is.
    figures: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RoundOutcome:
    round_id: int
    state: RoundState
    reason: str
    model_version: int
    mean_update: np.ndarray | None  # full-dimension float64, in FedAvg direction
    error_bound: float  # max abs error of mean_update from quantization (0 for plain dense)
    survivors: tuple[str, ...]
    metrics: dict[str, Any]
    # With privacy: the charge of the round's noisy sum (None: none was computed), and the
    # most the round could have spent (what the store holds while the round runs).
    charge: RoundCharge | None = None
    planned_charge: RoundCharge | None = None


def summary(
    *,
    announce: RoundAnnounce,
    state: RoundState,
    reason: str,
    tally: RoundTally,
    stages: tuple[Stage, ...],
    started: float,
    now: float,
    dim: int,
    coordinates: int,
    aggregate: Aggregate | None,
    labels: tuple[str, ...] = (),
    task: Task = Task.CLASSIFICATION,
) -> dict[str, Any]:
    """The round's summary for `metrics` and the store. `stages`: those the mode ran; `task`:
    the model's, which says what `mean_loss` and `accuracy` are (`task_figures`)."""
    survivors = aggregate.survivors if aggregate is not None else ()
    cohort = len(announce.cohort)
    participants = max(1, len(survivors) or cohort)
    ran = {s: tally.stages[s] for s in stages}
    metrics: dict[str, Any] = {
        "round": announce.round_id,
        "mode": announce.mode.value,
        "state": state.value,
        "reason": reason,
        "task": task.value,
        "model_version": announce.model_version,
        "learning_rate": announce.training.learning_rate,
        "cohort": cohort,
        "survivors": len(survivors),
        "stragglers": sum(s.dropped for s in ran.values()),
        "late_messages": sum(s.late for s in tally.stages.values()),
        "rejected": sum(tally.rejected.values()),
        "rejected_by_reason": dict(tally.rejected),
        "stages": {s.value: st.as_dict() for s, st in ran.items()},
        "uplink_bytes_per_device": round(sum(tally.uplink.values()) / participants),
        "downlink_bytes_per_device": round(sum(tally.downlink.values()) / max(1, cohort)),
        "duration_s": round(now - started, 3),
        "dimension": dim,
        "coordinates": coordinates,
        "quantization_bound": 0.0,
        "mean_loss": None,
        "accuracy": None,
        "samples": 0,
        "device_accuracy": None,
        "dropouts_recovered": 0,
    }
    if aggregate is not None:
        metrics.update(
            quantization_bound=aggregate.error_bound,
            mean_loss=finite(aggregate.mean_loss),
            accuracy=finite(aggregate.accuracy),
            samples=aggregate.samples,
            device_accuracy=finite(aggregate.local_accuracy),
            weight_sum=aggregate.weight_sum,
            dropouts_recovered=aggregate.dropouts_recovered,
        )
        if aggregate.cost is not None:
            metrics["cost"] = aggregate.cost.as_dict()
        metrics.update(aggregate.figures)
        if task is Task.REGRESSION:  # no classes: nothing is right or wrong, only off by
            metrics.update(accuracy=None, device_accuracy=None)
        if labels and len(aggregate.class_samples) == len(labels):
            metrics["per_class"] = per_class(
                labels, aggregate.class_samples, aggregate.class_correct
            )
    metrics.update(task_figures(task, metrics["mean_loss"]))
    return metrics


def task_figures(task: Task, loss: float | None) -> dict[str, Any]:
    """The task's own name for its evaluation loss, next to `loss`/`mean_loss`: a regressor's
    mean absolute error (`mae`, in the target's units), an autoencoder's mean squared
    reconstruction error (`reconstruction_error`). A classifier's is its cross-entropy."""
    if task is Task.REGRESSION:
        return {"mae": loss}
    if task is Task.ANOMALY:
        return {"reconstruction_error": loss}
    return {}


def per_class(
    labels: tuple[str, ...], rows: tuple[int, ...], hits: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Per class: its label, held-out rows with it, hits, and recall (None without rows)."""
    return [
        {
            "label": label,
            "samples": n,
            "correct": c,
            "recall": round(c / n, 6) if n else None,
        }
        for label, n, c in zip(labels, rows, hits, strict=True)
    ]


def finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None

"""Local training on a device: one round's work with a verified release.

What it owns: `local_round`, what a device does in a round (split, evaluate, train, evaluate,
return the update), the same on a gateway and in the simulators. The trainer itself
(`LiteRTTrainer`: a model's signatures in a LiteRT interpreter) lives in `shared.training`,
shared with `fleetlearn model pretrain`; it is re-exported here for device code.

Rules it keeps: no TensorFlow, no global RNG (shuffling takes a `numpy.random.Generator`), no
clock. Training is CPU-bound: asyncio callers run it in a worker thread.
"""

from __future__ import annotations

import math

import numpy as np

from fleetlearn.device.participant import LocalResult
from fleetlearn.shared import dataset, tflite
from fleetlearn.shared.rounds import TrainingPlan
from fleetlearn.shared.secagg.config import MAX_LOSS
from fleetlearn.shared.training import (
    MAX_LEARNING_RATE,
    MAX_PROX_MU,
    REQUIRED_SIGNATURES,
    LiteRTTrainer,
    TrainerError,
    TrainResult,
)

__all__ = [
    "MAX_LEARNING_RATE",
    "MAX_PROX_MU",
    "REQUIRED_SIGNATURES",
    "LiteRTTrainer",
    "TrainResult",
    "TrainerError",
    "local_round",
]


# ------------------------------------------------------------------------- one round's work


def local_round(
    trainer: LiteRTTrainer,
    x: np.ndarray,
    y: np.ndarray | None,
    plan: TrainingPlan,
    *,
    rng: np.random.Generator,
    personal: dict[str, np.ndarray],
) -> LocalResult:
    """What a device does in a round, the same on a gateway and in the simulators.

    1. Split its examples into a training and a held-out part (`dataset.evaluation_rows`:
       a row's side depends on its features only, so it is the same in every round and for
       any window of the data); each is cut to the plan's `max_samples` most recent rows.
       An autoencoder trains on the normal training rows only (label 0; all of them when
       the device has no labels).
    2. Evaluate the release as it is on the held-out rows (the global model's figures; an
       autoencoder's threshold is first calibrated on the normal training rows).
    3. Drop from `personal` the weights this plan no longer names personal. Start from the
       release with this device's own `personal` weights put back (the plan's personal
       layers; the first time, the release's own values), train with the plan's
       rate, steps or epochs and FedProx mu.
    4. Store the trained personal weights in `personal` (only when finite: a diverged round
       keeps the previous ones), leave the trainer on the device's model (release plus
       personal layers), evaluate that model on the held-out rows (what the device runs: the
       per-device accuracy a personalized fleet reports; without personal layers it is the
       release; an autoencoder recalibrates its threshold for it), and return the update:
       trained minus release, zero on personal weights, which never leave the device.
    """
    held = dataset.evaluation_rows(x, plan.eval_fraction)
    keep = plan.max_samples
    xt, xe = x[~held][-keep:], x[held][-keep:]
    yt, ye = (None, None) if y is None else (y[~held][-keep:], y[held][-keep:])
    anomaly = trainer.task is tflite.Task.ANOMALY
    if anomaly and yt is not None:
        xt, yt = xt[yt == 0], None  # an autoencoder learns what normal looks like
    names = [spec.name for spec in trainer.layout if spec.name in plan.personal]
    for stale in [n for n in personal if n not in names]:
        del personal[stale]  # no longer personal in this plan: the release's values rule
    start = tflite.unflatten(trainer.initial, trainer.layout)
    kept = {n: personal[n] for n in names if n in personal and personal[n].shape == start[n].shape}
    trainer.set_flat_weights(trainer.initial)  # the release as it is: a round may repeat
    before = trainer.evaluate(xe, ye, threshold=trainer.calibrate(xt) if anomaly else None)
    if kept:
        trainer.set_weights({**start, **kept})
    trainer.train(
        xt,
        yt,
        epochs=plan.epochs,
        steps=plan.steps,
        learning_rate=plan.learning_rate,
        prox_mu=plan.prox_mu,
        rng=rng,
    )
    trained = trainer.get_weights()
    update = tflite.flatten(trained, trainer.layout).astype(np.float64) - trainer.initial
    if all(np.all(np.isfinite(trained[n])) for n in names):
        for name in names:
            personal[name] = trained[name]
    update[tflite.mask_of(trainer.layout, names)] = 0.0
    own = {n: personal[n] for n in names if n in personal and personal[n].shape == start[n].shape}
    trainer.set_weights({**start, **own})
    after = trainer.evaluate(xe, ye, threshold=trainer.calibrate(xt) if anomaly else None)
    return LocalResult(
        update=update.astype(np.float32),
        weight=float(xt.shape[0]),
        # A release whose outputs are not finite on these rows gets the worst loss reported,
        # never a perfect one (no rows: 0, and it counts for nothing).
        loss=(before.loss if math.isfinite(before.loss) else MAX_LOSS) if before.samples else 0.0,
        correct=before.correct,
        samples=before.samples,
        local_correct=after.correct,
        class_samples=before.class_samples,
        class_correct=before.class_correct,
    )

"""Cold start: train a fleet model centrally on proxy data before the fleet federates it.

What it owns: `pretrain`, which trains a built model (`fleetlearn model build`) on a proxy
dataset (public data, a lab test rig, last year's plant data) with the same LiteRT steps the
devices run (`shared.training.LiteRTTrainer`), and writes the weights into the model as its
new version 1: same id, layout, labels and task, so the aggregator starts from it
(`model.initial`) like from any built model. No TensorFlow: it runs wherever the aggregator
runs.

Rules: the proxy data are untrusted input like any file (`shared.dataset` reads them, the
trainer checks them against the model); rows are split as devices split theirs
(`dataset.evaluation_rows`), so the figures printed before and after are on rows never trained
on. An autoencoder trains on the normal rows only (label 0, or every row without labels). A
run that diverges (weights not finite) is refused, never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fleetlearn.shared import dataset, tflite
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.evaluation import Evaluation, y_problem
from fleetlearn.shared.training import MAX_LEARNING_RATE, LiteRTTrainer, TrainerError

MAX_EPOCHS = 10_000


def check_settings(*, epochs: int, learning_rate: float, seed: int, eval_fraction: float) -> None:
    """Every flag of a pretraining run, before any file is read (ConfigError naming it)."""
    if not 1 <= epochs <= MAX_EPOCHS:
        raise ConfigError("--epochs", f"{epochs} is outside 1..{MAX_EPOCHS}")
    if not (math.isfinite(learning_rate) and 0.0 < learning_rate <= MAX_LEARNING_RATE):
        raise ConfigError("--learning-rate", f"{learning_rate} is outside (0, {MAX_LEARNING_RATE}]")
    if not 0 <= seed < 2**63:
        raise ConfigError("--seed", f"{seed} is outside 0..2^63-1")
    if not (math.isfinite(eval_fraction) and 0.0 <= eval_fraction < 1.0):
        raise ConfigError("--eval-fraction", f"{eval_fraction} is outside [0, 1)")


@dataclass(frozen=True, slots=True)
class Pretrained:
    model: bytes  # the model with the trained weights, version 1, manifest re-embedded
    manifest: tflite.ModelManifest
    steps: int
    trained_rows: int
    held_out: int
    before: Evaluation  # on the held-out rows: the model as built
    after: Evaluation  # the same rows: the pretrained model


def pretrain(
    model: bytes,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    epochs: int,
    learning_rate: float,
    seed: int = 0,
    eval_fraction: float = 0.2,
) -> Pretrained:
    """Train `model` on (x, y) for `epochs` passes at `learning_rate` (shuffled by `seed`),
    holding out `eval_fraction` of the rows to judge it before and after."""
    check_settings(
        epochs=epochs, learning_rate=learning_rate, seed=seed, eval_fraction=eval_fraction
    )
    manifest = tflite.read_manifest(model)
    if manifest is None:
        raise ConfigError("--model", "has no manifest; build it with `fleetlearn model build`")
    problem = y_problem(manifest.task, y)
    if problem:
        raise ConfigError("--data", f"{problem} (model {manifest.model_id!r})")
    trainer = LiteRTTrainer(model, manifest)
    held = dataset.evaluation_rows(x, eval_fraction)
    xt, xe = x[~held], x[held]
    yt, ye = (None, None) if y is None else (y[~held], y[held])
    anomaly = manifest.task is tflite.Task.ANOMALY
    if anomaly and yt is not None:
        xt, yt = xt[yt == 0], None
    if xt.shape[0] == 0:
        raise TrainerError("no rows left to train on (all held out, or none normal)")

    def judge() -> Evaluation:
        return trainer.evaluate(xe, ye, threshold=trainer.calibrate(xt) if anomaly else None)

    before = judge()
    result = trainer.train(
        xt, yt, epochs=epochs, learning_rate=learning_rate, rng=np.random.default_rng(seed)
    )
    weights = trainer.get_weights()
    if not all(np.all(np.isfinite(w)) for w in weights.values()) or not math.isfinite(result.loss):
        raise TrainerError(
            "training diverged (weights or loss not finite); try a lower --learning-rate"
        )
    after = judge()
    patched = tflite.patch_weights(model, weights)
    data, written = tflite.embed_manifest(patched, model_id=manifest.model_id, version=1)
    return Pretrained(
        model=data,
        manifest=written,
        steps=result.steps,
        trained_rows=int(xt.shape[0]),
        held_out=int(xe.shape[0]),
        before=before,
        after=after,
    )

"""Small Keras models, one per supported layer type, for the parity tests and the bench
(`bench/keras_parity.py`). Needs keras (TensorFlow) only when a case is built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def seq(k: Any, shape: tuple[int, ...], *layers: Any) -> Any:
    inputs = k.Input(shape)
    h = inputs
    for layer in layers:
        h = layer(h)
    return k.Model(inputs, k.layers.Dense(3, name="head")(h))


# Layer type -> a model around it (input shape, layers before the 3-class head).
CASES: dict[str, Callable[[Any], Any]] = {
    "Dense relu": lambda k: seq(k, (6,), k.layers.Dense(5, activation="relu")),
    "Dense tanh": lambda k: seq(k, (6,), k.layers.Dense(5, activation="tanh")),
    "Dense sigmoid": lambda k: seq(k, (6,), k.layers.Dense(5, activation="sigmoid")),
    "Dense on a sequence": lambda k: seq(
        k, (8, 2), k.layers.Dense(4, activation="relu"), k.layers.Flatten()
    ),
    "Conv1D valid": lambda k: seq(k, (12, 2), k.layers.Conv1D(4, 3), k.layers.Flatten()),
    "Conv1D same relu": lambda k: seq(
        k, (12, 2), k.layers.Conv1D(4, 4, padding="same", activation="relu"), k.layers.Flatten()
    ),
    "Conv1D causal": lambda k: seq(
        k, (12, 2), k.layers.Conv1D(4, 3, padding="causal"), k.layers.Flatten()
    ),
    "MaxPooling1D": lambda k: seq(
        k, (12, 2), k.layers.Conv1D(4, 3), k.layers.MaxPooling1D(2), k.layers.Flatten()
    ),
    "AveragePooling1D": lambda k: seq(
        k, (13, 2), k.layers.Conv1D(4, 3), k.layers.AveragePooling1D(3), k.layers.Flatten()
    ),
    "GlobalAveragePooling1D": lambda k: seq(
        k, (12, 2), k.layers.Conv1D(4, 3), k.layers.GlobalAveragePooling1D()
    ),
    "GlobalMaxPooling1D": lambda k: seq(
        k, (12, 2), k.layers.Conv1D(4, 3), k.layers.GlobalMaxPooling1D()
    ),
    "Reshape": lambda k: seq(
        k, (24,), k.layers.Reshape((12, 2)), k.layers.Conv1D(4, 3), k.layers.Flatten()
    ),
    "LayerNormalization": lambda k: seq(k, (6,), k.layers.Dense(5), k.layers.LayerNormalization()),
    "BatchNormalization": lambda k: seq(k, (6,), k.layers.Dense(5), k.layers.BatchNormalization()),
    "Activation, ReLU": lambda k: seq(
        k, (6,), k.layers.Dense(5), k.layers.Activation("tanh"), k.layers.Dense(4), k.layers.ReLU()
    ),
    "Dropout": lambda k: seq(k, (6,), k.layers.Dense(5), k.layers.Dropout(0.3)),
    "final softmax": lambda k: k.Sequential(
        [k.Input((6,)), k.layers.Dense(5, activation="relu"), k.layers.Dense(3, "softmax")]
    ),
}


def randomized(model: Any, seed: int = 0) -> Any:
    """Random, non-constant weights (positive variances for BatchNormalization)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = layer.get_weights()
        if not values:
            continue
        new = [rng.normal(0.0, 0.4, v.shape).astype(np.float32) for v in values]
        if type(layer).__name__ == "BatchNormalization":
            new[-1] = np.abs(new[-1]) + 0.5
        layer.set_weights(new)
    return model

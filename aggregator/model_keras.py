"""Bring your own Keras model: translate it, layer by layer, into a builtin-ops on-device model.

What it owns: the table of Keras layers a device can train (`SUPPORTED_LAYERS`), their
translation into TensorFlow ops whose gradients are builtin TFLite ops, and `build_keras_model`,
which wraps the translation in the same four signatures as the MLP (`model_build.
assemble_module`) and embeds the version-1 manifest.

Why translate rather than call the Keras model: the gradients of several Keras layers need
Flex ops that devices do not have (measured with TF 2.21: Conv1D's Conv2DBackpropFilter,
MaxPooling1D's MaxPoolGrad, AveragePooling1D's AvgPoolGrad, tf.nn.relu's ReluGrad). Each
layer here is written with ops whose gradients are builtin: a 1-D convolution as slices,
concatenation and one matrix product (im2col); pooling as a reshape and a reduction; ReLU,
tanh and sigmoid with their gradients written out. The translation reads the layer's
configuration and weights, so the result computes what the Keras model computes (parity is
tested per layer in tests/test_model_keras.py).

Rules:
- A single-path model (each layer feeds the next), one input, one output. What the output is
  depends on the task (`tflite.Task`): a classifier's class logits (a final softmax is
  dropped: the loss takes logits), a regressor's one value per row, an autoencoder's
  reconstruction of its input (as many values as the input). Devices feed flat rows, so the
  on-device model's input is the Keras input flattened, reshaped back inside.
- Anything else is refused at build time by `KerasModelError`, naming the layer and what about
  it is not supported. No layer is silently skipped or approximated.
- BatchNormalization trains its scale and offset; its moving mean and variance are frozen at
  the values the Keras model has (from pre-training): batch statistics would differ on every
  device and moving averages do not average meaningfully across devices.
- Every weight starts from a distinct value (a constant weight, such as zeros or ones, gets a
  tiny seeded perturbation): the converter would otherwise merge identical buffers, and a
  merged buffer cannot be patched.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator import model_build as mb
from fleetlearn.shared import tflite
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.ids import id_problem

# Keras layer class -> what the on-device model does for it (docs/models.md has the table
# with each layer's parity figure).
SUPPORTED_LAYERS = {
    "InputLayer": "nothing (the input)",
    "Dense": "matrix product and bias on the last axis, then its activation",
    "Conv1D": "im2col (slices + concatenation) and one matrix product; padding valid, same "
    "or causal; strides and dilation 1",
    "MaxPooling1D": "reshape and max over each window; pool_size = strides, padding valid",
    "AveragePooling1D": "reshape and mean over each window; pool_size = strides, padding valid",
    "GlobalAveragePooling1D": "mean over time",
    "GlobalMaxPooling1D": "max over time",
    "Flatten": "reshape",
    "Reshape": "reshape",
    "Dropout": "inverted dropout while training (random mask), identity in inference",
    "LayerNormalization": "normalization over the last axis, with its scale and offset",
    "BatchNormalization": "frozen moving statistics from the Keras model; scale and offset train",
    "Activation": "its activation",
    "ReLU": "ReLU (plain: no max_value, slope or threshold)",
}
ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")
_PERTURB = 1e-3
# Largest difference accepted between the built model and Keras (logits; weights after one
# step). Measured differences are about 1e-7 (docs/models.md).
PARITY_TOLERANCE = 1e-4
_MAX_PARAMETERS = 50_000_000


class KerasModelError(mb.ModelBuildError):
    """The Keras model cannot become an on-device model; the message names the layer."""


@dataclass
class _Layer:
    """One translated layer: its weights (layout names, arrays) and its forward pass."""

    name: str
    kind: str
    weights: list[tuple[str, np.ndarray]] = field(default_factory=list)
    trainable: list[bool] = field(default_factory=list)
    # forward(tf, h, weights in this layer's order, training) -> h
    forward: Callable[[Any, Any, list[Any], bool], Any] | None = None
    keras_shapes: list[tuple[int, ...]] = field(default_factory=list)  # as Keras holds them


@dataclass(frozen=True)
class KerasTranslation:
    """A Keras model as the on-device model sees it."""

    model_id: str
    input_shape: tuple[int, ...]  # without the batch axis
    classes: int  # a classifier's outputs; 0 for the other tasks
    layers: tuple[_Layer, ...]
    layout: tuple[tflite.WeightSpec, ...]
    start: Mapping[str, np.ndarray]
    constants: Mapping[str, np.ndarray]  # frozen values (BatchNormalization statistics)
    task: tflite.Task = tflite.Task.CLASSIFICATION

    @property
    def input_width(self) -> int:
        return math.prod(self.input_shape)


# ---------------------------------------------------------------------------- translation


def load_keras(path: Path) -> Any:
    """A saved Keras model (.keras or .h5), or a ConfigError naming `--keras`."""
    mb.import_tensorflow()
    import keras

    if not path.is_file():
        raise ConfigError("--keras", f"{path} does not exist or is not a file")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file; report any as ours
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError("--keras", f"{path} is not a loadable Keras model: {first}") from None


def translate(
    model: Any,
    *,
    model_id: str | None = None,
    seed: int = 0,
    task: tflite.Task = tflite.Task.CLASSIFICATION,
) -> KerasTranslation:
    """Check and translate `model` for `task`; every refusal is a KerasModelError naming the
    layer (or the output, when it does not fit the task)."""
    layers = _chain(model)
    input_shape = _input_shape(model)
    name = model_id or _identifier(getattr(model, "name", "") or "keras_model").replace("_", "-")
    problem = id_problem(name)
    if problem:
        raise ConfigError("--id", problem)
    rng = np.random.default_rng(seed)
    out: list[_Layer] = []
    names: set[str] = set()
    for index, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind not in SUPPORTED_LAYERS:
            raise KerasModelError(
                f"layer {layer.name!r} ({kind}) is not supported on devices; supported: "
                + ", ".join(sorted(SUPPORTED_LAYERS))
            )
        # Only a classifier's last layer may end in softmax (dropped: the loss takes logits).
        last = index == len(layers) - 1 and task is tflite.Task.CLASSIFICATION
        translated = _TRANSLATE[kind](layer, last)
        translated.keras_shapes = [tuple(np.shape(v)) for v in layer.get_weights()]
        for weight_name, _ in translated.weights:
            if weight_name in names:
                raise KerasModelError(f"layer {layer.name!r}: weight name {weight_name} repeats")
            names.add(weight_name)
        out.append(translated)
    output = tuple(model.outputs[0].shape)
    _check_output(output, input_shape, task)
    layout: list[tflite.WeightSpec] = []
    start: dict[str, np.ndarray] = {}
    constants: dict[str, np.ndarray] = {}
    for layer in out:
        for (weight_name, value), trainable in zip(layer.weights, layer.trainable, strict=True):
            if trainable:
                layout.append(tflite.WeightSpec(name=weight_name, shape=tuple(value.shape)))
                start[weight_name] = _distinct(value, rng)
            else:
                constants[weight_name] = value
    if not layout:
        raise KerasModelError("the model has no trainable weights")
    if tflite.layout_size(layout) > _MAX_PARAMETERS:
        raise KerasModelError(
            f"{tflite.layout_size(layout):,} trainable parameters; at most {_MAX_PARAMETERS:,}"
        )
    return KerasTranslation(
        model_id=name,
        input_shape=input_shape,
        classes=int(output[-1] or 0) if task is tflite.Task.CLASSIFICATION else 0,
        layers=tuple(out),
        layout=tuple(layout),
        start=start,
        constants=constants,
        task=task,
    )


def _check_output(
    output: tuple[int | None, ...], input_shape: tuple[int, ...], task: tflite.Task
) -> None:
    shown = tuple(output)
    if task is tflite.Task.CLASSIFICATION:
        if len(output) != 2 or output[-1] is None or output[-1] < 2:
            raise KerasModelError(
                f"the model's output has shape {shown}; a classifier ends in (None, classes) "
                "with at least 2 classes"
            )
    elif task is tflite.Task.REGRESSION:
        if len(output) != 2 or output[-1] != 1:
            raise KerasModelError(
                f"the model's output has shape {shown}; a regressor ends in (None, 1): one "
                "target per row"
            )
    else:
        size = math.prod(d or 0 for d in output[1:])
        if size != math.prod(input_shape):
            raise KerasModelError(
                f"the model's output has shape {shown}; an autoencoder reconstructs its input, "
                f"{math.prod(input_shape)} values per row (input shape {input_shape})"
            )


def _chain(model: Any) -> list[Any]:
    """The model's layers in order, when each one feeds the next; else KerasModelError."""
    if len(getattr(model, "inputs", None) or []) != 1 or len(model.outputs) != 1:
        raise KerasModelError("the model must have exactly one input and one output")
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if type(model).__name__ == "Sequential":
        return layers
    previous = model.inputs[0]
    for layer in layers:
        try:
            inbound = layer.input
        except (AttributeError, ValueError):
            inbound = None
        if inbound is not previous:
            raise KerasModelError(
                f"layer {layer.name!r} does not take the previous layer's output alone; only "
                "single-path models (each layer feeding the next) are supported"
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise KerasModelError("the model's output is not its last layer's output")
    return layers


def _input_shape(model: Any) -> tuple[int, ...]:
    shape = tuple(model.inputs[0].shape)[1:]
    if not shape or any(d is None for d in shape):
        raise KerasModelError(
            f"the model's input shape {tuple(model.inputs[0].shape)} must be fixed apart from "
            "the batch axis (e.g. keras.Input((64, 3)))"
        )
    return tuple(int(d) for d in shape)


def _identifier(text: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_]", "_", text).strip("_") or "layer"
    return clean if clean[0].isalpha() else f"l_{clean}"


def _distinct(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`value`, perturbed by at most 1e-3 x (its scale or 1) when every entry is equal."""
    array = np.asarray(value, dtype=np.float32)
    if array.size and np.all(array == array.flat[0]):
        scale = max(abs(float(array.flat[0])), 1.0) * _PERTURB
        array = array + rng.uniform(-scale, scale, size=array.shape).astype(np.float32)
    return array


def _activation_name(layer: Any, last: bool) -> str:
    import keras

    raw = keras.activations.serialize(layer.activation)
    name = raw if isinstance(raw, str) else str(raw.get("config", raw.get("class_name", "")))
    name = {"relu": "relu", "linear": "linear"}.get(name, name)
    if name == "softmax" and last:
        return "linear"  # the loss and infer apply softmax to the logits
    if name not in ACTIVATIONS:
        raise KerasModelError(
            f"layer {layer.name!r}: activation {name!r} is not supported (supported: "
            f"{', '.join(ACTIVATIONS)}; softmax on the last layer only)"
        )
    return name


def _weights(layer: Any, short: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The layer's weights in Keras order, named `<layer>_<short>` for the layout."""
    values = [np.asarray(v, dtype=np.float32) for v in layer.get_weights()]
    if len(values) != len(short):
        raise KerasModelError(
            f"layer {layer.name!r}: expected weights {list(short)}, found {len(values)}"
        )
    base = _identifier(layer.name)
    return [(f"{base}_{s}", v) for s, v in zip(short, values, strict=True)]


def _refuse(layer: Any, what: str) -> KerasModelError:
    return KerasModelError(f"layer {layer.name!r} ({type(layer).__name__}): {what}")


# ------------------------------------------------------------------------- per layer type


def _activate(tf: Any, h: Any, name: str) -> Any:
    if name == "linear":
        return h
    return _builtin_activations(tf)[name](h)


_ACTIVATION_CACHE: dict[int, dict[str, Any]] = {}


def _builtin_activations(tf: Any) -> dict[str, Any]:
    """ReLU, tanh and sigmoid with gradients written in builtin ops (their own gradient ops,
    ReluGrad, TanhGrad and SigmoidGrad, are not builtin TFLite ops)."""
    cached = _ACTIVATION_CACHE.get(id(tf))
    if cached is not None:
        return cached

    @tf.custom_gradient
    def tanh(x: Any) -> Any:
        y = tf.math.tanh(x)
        return y, lambda dy: dy * (1.0 - y * y)

    @tf.custom_gradient
    def sigmoid(x: Any) -> Any:
        y = tf.math.sigmoid(x)
        return y, lambda dy: dy * y * (1.0 - y)

    table = {"relu": mb.relu_with_builtin_gradient(tf), "tanh": tanh, "sigmoid": sigmoid}
    _ACTIVATION_CACHE[id(tf)] = table
    return table


def _dense(layer: Any, last: bool) -> _Layer:
    activation = _activation_name(layer, last)
    use_bias = bool(layer.use_bias)
    weights = _weights(layer, ("kernel", "bias") if use_bias else ("kernel",))

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        shape = h.shape
        if len(shape) > 2:
            flat = tf.reshape(h, [-1, int(shape[-1])])
            out = tf.matmul(flat, w[0])
            out = tf.reshape(out, [-1, *[int(d) for d in shape[1:-1]], int(w[0].shape[-1])])
        else:
            out = tf.matmul(h, w[0])
        if use_bias:
            out = out + w[1]
        return _activate(tf, out, activation)

    return _Layer(layer.name, "Dense", weights, [True] * len(weights), forward)


def _conv1d(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    if tuple(cfg.get("strides", (1,))) != (1,) or tuple(cfg.get("dilation_rate", (1,))) != (1,):
        raise _refuse(layer, "strides and dilation_rate other than 1 are not supported")
    if cfg.get("groups", 1) != 1:
        raise _refuse(layer, "grouped convolution is not supported")
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise _refuse(layer, "only data_format channels_last is supported")
    padding = cfg.get("padding", "valid")
    if padding not in ("valid", "same", "causal"):
        raise _refuse(layer, f"padding {padding!r} is not supported")
    activation = _activation_name(layer, last)
    use_bias = bool(layer.use_bias)
    weights = _weights(layer, ("kernel", "bias") if use_bias else ("kernel",))
    size, channels, filters = weights[0][1].shape
    # The im2col product takes the kernel as [size * channels, filters]: row i * C + c.
    weights[0] = (weights[0][0], weights[0][1].reshape(size * channels, filters))
    left = {"valid": 0, "same": (size - 1) // 2, "causal": size - 1}[padding]
    right = {"valid": 0, "same": size - 1 - (size - 1) // 2, "causal": 0}[padding]

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        if left or right:
            h = tf.pad(h, [[0, 0], [left, right], [0, 0]])
        steps = int(h.shape[1]) - size + 1
        if steps < 1:
            raise KerasModelError(f"layer {layer.name!r}: input shorter than its kernel")
        columns = tf.concat(
            [tf.slice(h, [0, i, 0], [-1, steps, channels]) for i in range(size)], axis=2
        )
        out = tf.matmul(tf.reshape(columns, [-1, size * channels]), w[0])
        out = tf.reshape(out, [-1, steps, filters])
        if use_bias:
            out = out + w[1]
        return _activate(tf, out, activation)

    return _Layer(layer.name, "Conv1D", weights, [True] * len(weights), forward)


def _pooling(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    pool = _first(cfg.get("pool_size", 2))
    strides = cfg.get("strides")
    strides = pool if strides is None else _first(strides)
    if strides != pool or cfg.get("padding", "valid") != "valid":
        raise _refuse(layer, "only pool_size equal to strides with padding valid is supported")
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise _refuse(layer, "only data_format channels_last is supported")
    kind = type(layer).__name__

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        steps, channels = int(h.shape[1]) // pool, int(h.shape[2])
        if steps < 1:
            raise KerasModelError(f"layer {layer.name!r}: input shorter than its pool")
        h = tf.slice(h, [0, 0, 0], [-1, steps * pool, channels])
        windows = tf.reshape(h, [-1, steps, pool, channels])
        if kind == "MaxPooling1D":
            return tf.reduce_max(windows, axis=2)
        return tf.reduce_mean(windows, axis=2)

    return _Layer(layer.name, kind, forward=forward)


def _first(value: Any) -> int:
    """A Keras 1-D size given as an int or a one-element tuple."""
    return int(value) if isinstance(value, int) else int(next(iter(value)))


def _global_pooling(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    if cfg.get("data_format", "channels_last") != "channels_last" or cfg.get("keepdims"):
        raise _refuse(layer, "only data_format channels_last without keepdims is supported")
    kind = type(layer).__name__

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        if kind == "GlobalMaxPooling1D":
            return tf.reduce_max(h, axis=1)
        return tf.reduce_mean(h, axis=1)

    return _Layer(layer.name, kind, forward=forward)


def _flatten(layer: Any, last: bool) -> _Layer:
    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        return tf.reshape(h, [-1, math.prod(int(d) for d in h.shape[1:])])

    return _Layer(layer.name, "Flatten", forward=forward)


def _reshape(layer: Any, last: bool) -> _Layer:
    target = [int(d) for d in layer.get_config()["target_shape"]]
    if any(d < 1 for d in target):
        raise _refuse(layer, "target_shape must be fixed (no -1)")

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        return tf.reshape(h, [-1, *target])

    return _Layer(layer.name, "Reshape", forward=forward)


def _dropout(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    rate = float(cfg.get("rate", 0.0))
    if cfg.get("noise_shape") is not None:
        raise _refuse(layer, "noise_shape is not supported")
    if not 0.0 <= rate < 1.0:
        raise _refuse(layer, f"rate {rate} is outside [0, 1)")

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        if not training or rate == 0.0:
            return h
        keep = tf.cast(tf.random.uniform(tf.shape(h)) >= rate, tf.float32)
        return h * keep / (1.0 - rate)

    return _Layer(layer.name, "Dropout", forward=forward)


def _layer_norm(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    axis = cfg.get("axis", -1)
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    rank = len(layer.input.shape) if hasattr(layer, "input") else None
    if axes not in ([-1], [rank - 1] if rank else [-1]):
        raise _refuse(layer, "only normalization over the last axis is supported")
    if cfg.get("rms_scaling"):
        raise _refuse(layer, "rms_scaling is not supported")
    center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
    epsilon = float(cfg.get("epsilon", 1e-3))
    short = [s for s, on in (("gamma", scale), ("beta", center)) if on]
    weights = _weights(layer, short)

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        mean = tf.reduce_mean(h, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
        out = (h - mean) * tf.math.rsqrt(variance + epsilon)
        if scale:
            out = out * w[0]
        if center:
            out = out + w[-1]
        return out

    return _Layer(layer.name, "LayerNormalization", weights, [True] * len(weights), forward)


def _batch_norm(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    if cfg.get("axis", -1) not in (-1, len(layer.input.shape) - 1):
        raise _refuse(layer, "only normalization of the last axis is supported")
    center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
    epsilon = float(cfg.get("epsilon", 1e-3))
    short = [s for s, on in (("gamma", scale), ("beta", center)) if on]
    weights = _weights(layer, (*short, "moving_mean", "moving_variance"))
    trainable = [True] * len(short) + [False, False]

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        mean, variance = w[-2], w[-1]
        out = (h - mean) * tf.math.rsqrt(variance + epsilon)
        if scale:
            out = out * w[0]
        if center:
            out = out + w[len(short) - 1]
        return out

    return _Layer(layer.name, "BatchNormalization", weights, trainable, forward)


def _activation_layer(layer: Any, last: bool) -> _Layer:
    activation = _activation_name(layer, last)

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        return _activate(tf, h, activation)

    return _Layer(layer.name, "Activation", forward=forward)


def _relu_layer(layer: Any, last: bool) -> _Layer:
    cfg = layer.get_config()
    if cfg.get("max_value") is not None or cfg.get("negative_slope", 0.0) or cfg.get("threshold"):
        raise _refuse(layer, "only plain ReLU (no max_value, negative_slope or threshold)")

    def forward(tf: Any, h: Any, w: list[Any], training: bool) -> Any:
        return _activate(tf, h, "relu")

    return _Layer(layer.name, "ReLU", forward=forward)


_TRANSLATE: dict[str, Callable[[Any, bool], _Layer]] = {
    "Dense": _dense,
    "Conv1D": _conv1d,
    "MaxPooling1D": _pooling,
    "AveragePooling1D": _pooling,
    "GlobalAveragePooling1D": _global_pooling,
    "GlobalMaxPooling1D": _global_pooling,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dropout": _dropout,
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "Activation": _activation_layer,
    "ReLU": _relu_layer,
}


# ---------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class Parity:
    """How far the on-device model is from Keras, from the same weights and inputs."""

    infer: float  # max |logits difference| over the rows
    scale: float  # max |logit| of Keras's (the infer difference is judged against it)
    step: float | None  # max |weight difference| after one SGD step (None: not compared)
    loss: float | None  # |loss difference| of that step


def keras_with(model: Any, translation: KerasTranslation, weights: Mapping[str, np.ndarray]) -> Any:
    """A clone of `model` holding `weights` (layout names, on-device shapes) and the frozen
    constants: the Keras model the on-device model starts as."""
    import keras

    clone = keras.models.clone_model(model)
    for layer in translation.layers:
        if not layer.weights:
            continue
        values = [
            np.asarray(weights[name] if name in weights else translation.constants[name]).reshape(
                shape
            )
            for (name, _), shape in zip(layer.weights, layer.keras_shapes, strict=True)
        ]
        clone.get_layer(layer.name).set_weights(values)
    return clone


def _logits(model: Any, x: np.ndarray, shape: tuple[int, ...], training: bool = False) -> Any:
    """The Keras model's output before a final softmax (a classifier's logits; the other
    tasks refuse softmax on the last layer, so theirs is the output)."""
    import keras

    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    if activation is not None and keras.activations.serialize(activation) == "softmax":
        saved = last.activation
        last.activation = keras.activations.linear
        try:
            return _call(model, x.reshape(-1, *shape), training)
        finally:
            last.activation = saved
    return _call(model, x.reshape(-1, *shape), training)


def _call(model: Any, x: np.ndarray, training: bool) -> Any:
    # Keras warns when a one-input model built from [Input] gets a bare tensor (and a clone,
    # built from a bare Input, when it gets a list); either way the result is the same.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The structure of `inputs`")
        return model(x, training=training)


def measure_parity(
    model: Any,
    translation: KerasTranslation,
    data: bytes,
    manifest: tflite.ModelManifest,
    *,
    rows: int = 16,
    learning_rate: float = 0.05,
    step: bool = True,
    seed: int = 0,
    loss: str | None = None,
) -> Parity:
    """Run the built model (LiteRT) and Keras (TensorFlow, eager) from the same weights on the
    same random rows: the output (logits, prediction or reconstruction), and one SGD step on
    the task's loss, Keras's own loss class for regression and reconstruction (Keras with
    training=False: frozen BatchNormalization statistics, no dropout; so no step for a model
    with dropout)."""
    tf = mb.import_tensorflow()
    import keras

    from fleetlearn.shared.tflite.runtime import new_interpreter

    task = translation.task
    loss_name = mb.check_loss(task, loss)
    interpreter = new_interpreter(data)
    get_weights = interpreter.get_signature_runner("get_weights")
    start = {name: np.array(value) for name, value in get_weights().items()}
    reference = keras_with(model, translation, start)
    rng = np.random.default_rng(seed)
    width = translation.input_width
    x = rng.normal(size=(rows, width)).astype(np.float32)
    y: np.ndarray = (
        rng.integers(0, translation.classes, size=rows).astype(np.int32)
        if task is tflite.Task.CLASSIFICATION
        else (rng.normal(size=rows) * 2.0).astype(np.float32)  # both sides of Huber's delta
    )

    def keras_output(inputs: np.ndarray) -> Any:
        out = _logits(reference, inputs, translation.input_shape)
        return tf.reshape(out, [inputs.shape[0], -1])

    output_name = {
        tflite.Task.CLASSIFICATION: "logits",
        tflite.Task.REGRESSION: "prediction",
        tflite.Task.ANOMALY: "reconstruction",
    }[task]
    infer = interpreter.get_signature_runner("infer")
    ours = np.asarray(infer(x=x)[output_name]).reshape(rows, -1)
    theirs = np.asarray(keras_output(x))
    infer_diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    if not step or any(layer.kind == "Dropout" for layer in translation.layers):
        return Parity(infer=infer_diff, scale=scale, step=None, loss=None)
    train_inputs = {t.name: t for t in tflite.describe_model(data).signature("train").inputs}
    size = int(train_inputs["x"].shape[0])
    n = min(rows, size)
    feed: dict[str, Any] = {
        "x": np.zeros((size, width), np.float32),
        "sample_weight": np.zeros(size, np.float32),
        "learning_rate": np.float32(learning_rate),
        "prox_mu": np.float32(0.0),
    }
    feed["x"][:n] = x[:n]
    feed["sample_weight"][:n] = 1.0
    if "y" in train_inputs:
        feed["y"] = np.zeros(size, y.dtype)
        feed["y"][:n] = y[:n]
    train = interpreter.get_signature_runner("train")
    loss_ours = float(train(**feed)["loss"])
    variables = reference.trainable_variables
    with tf.GradientTape() as tape:
        out = keras_output(x[:n])
        if task is tflite.Task.CLASSIFICATION:
            log_probs = out - tf.reduce_logsumexp(out, axis=1, keepdims=True)
            loss_value = -tf.reduce_mean(
                tf.reduce_sum(tf.one_hot(y[:n], translation.classes) * log_probs, 1)
            )
        elif task is tflite.Task.ANOMALY:
            loss_value = keras.losses.MeanSquaredError()(x[:n], out)
        elif loss_name == "huber":
            loss_value = keras.losses.Huber(delta=1.0)(y[:n, None], out)
        else:
            loss_value = keras.losses.MeanSquaredError()(y[:n, None], out)
    grads = tape.gradient(loss_value, variables)
    after = {name: np.array(value) for name, value in get_weights().items()}
    diff = 0.0
    for spec, variable, grad in zip(translation.layout, variables, grads, strict=True):
        expected = (variable.numpy() - learning_rate * grad.numpy()).reshape(spec.shape)
        diff = max(diff, float(np.abs(after[spec.name] - expected).max()))
    return Parity(infer=infer_diff, scale=scale, step=diff, loss=abs(float(loss_value) - loss_ours))


# ------------------------------------------------------------------------------ building


def forward_fn(translation: KerasTranslation) -> Callable[[Any, list[Any], bool], Any]:
    """forward(x [n, width], trainable variables in layout order, training) -> logits."""
    tf = mb.import_tensorflow()
    index = {spec.name: i for i, spec in enumerate(translation.layout)}
    frozen = {name: tf.constant(value) for name, value in translation.constants.items()}

    def forward(x: Any, variables: list[Any], training: bool) -> Any:
        h = tf.reshape(x, [-1, *translation.input_shape])
        for layer in translation.layers:
            assert layer.forward is not None
            ws = [
                variables[index[name]] if name in index else frozen[name]
                for name, _ in layer.weights
            ]
            h = layer.forward(tf, h, ws, training)
        return h

    return forward


def build_keras_module(
    translation: KerasTranslation,
    *,
    batch: int = 32,
    optimizer: str = "sgd",
    weights: Mapping[str, np.ndarray] | None = None,
    loss: str | None = None,
) -> Any:
    """The tf.Module (train, infer, get_weights, set_weights) of a translated Keras model."""
    if not 1 <= batch <= 4096:
        raise ConfigError("--batch", f"{batch} is outside 1..4096")
    if optimizer not in mb.OPTIMIZERS:
        raise ConfigError("--optimizer", f"{optimizer!r} is not one of {mb.OPTIMIZERS}")
    return mb.assemble_module(
        name="fleetlearn_keras",
        layout=translation.layout,
        start=dict(translation.start if weights is None else weights),
        forward=forward_fn(translation),
        input_width=translation.input_width,
        classes=translation.classes,
        batch=batch,
        optimizer=optimizer,
        task=translation.task,
        loss=loss,
    )


def build_keras_model(
    model: Any,
    *,
    model_id: str | None = None,
    labels: Sequence[str] | None = None,
    batch: int = 32,
    optimizer: str = "sgd",
    task: tflite.Task = tflite.Task.CLASSIFICATION,
    loss: str | None = None,
) -> tuple[bytes, tflite.ModelManifest, Parity]:
    """A Keras model (a keras.Model, or the path of a saved one) for `task` as a builtin-ops
    .tflite with the four signatures and its version-1 manifest, checked against Keras: the
    built model's output and one training step on the task's loss (`loss`: the task's
    default when None) must match Keras's from the same weights (`measure_parity`), or it
    is refused. Returns (tflite bytes, manifest, parity).

    Labels: a classifier's class names (default class_0..); an anomaly model's are always
    (normal, anomaly), the two kinds of row its per-class detection counts; a regressor has
    none."""
    loss = mb.check_loss(task, loss)
    if isinstance(model, str | Path):
        model = load_keras(Path(model))
    translation = translate(model, model_id=model_id, task=task)
    names = _labels(translation, labels)
    module = build_keras_module(translation, batch=batch, optimizer=optimizer, loss=loss)
    data = mb.convert_module(module)
    try:
        data, manifest = tflite.embed_manifest(
            data,
            model_id=translation.model_id,
            version=1,
            layout=translation.layout,
            labels=names,
            task=task,
        )
    except tflite.SharedBufferError as exc:
        raise mb.ModelBuildError(f"converted model cannot be patched: {exc}") from exc
    except tflite.ModelError as exc:
        raise mb.ModelBuildError(f"manifest: {exc}") from exc
    parity = measure_parity(model, translation, data, manifest, step=optimizer == "sgd", loss=loss)
    if (
        parity.infer > PARITY_TOLERANCE * max(1.0, parity.scale)
        or (parity.step or 0.0) > PARITY_TOLERANCE
    ):
        raise KerasModelError(
            f"the built model does not compute what the Keras model computes (output differs "
            f"by {parity.infer:.2e}, weights after one step by {parity.step}); please report it"
        )
    return data, manifest, parity


ANOMALY_LABELS = ("normal", "anomaly")


def _labels(translation: KerasTranslation, labels: Sequence[str] | None) -> tuple[str, ...]:
    task = translation.task
    if task is not tflite.Task.CLASSIFICATION:
        if labels:
            raise ConfigError("--labels", f"a {task.value} model has no class names to set")
        return ANOMALY_LABELS if task is tflite.Task.ANOMALY else ()
    names = tuple(labels) if labels else tuple(f"class_{i}" for i in range(translation.classes))
    if len(names) != translation.classes:
        raise ConfigError(
            "--labels", f"{len(names)} names for a model with {translation.classes} classes"
        )
    return names

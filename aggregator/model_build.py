"""Build the fleet's model with TensorFlow: spec file -> tf.Module -> builtin-only .tflite.

What it owns: the model spec (a TOML file, `ModelSpec`), the MLP classifier as a tf.Module
with the four signatures devices and the aggregator rely on, its conversion, and the version-1
manifest embedded in the result.

Rules it keeps (ARCHITECTURE §6, each measured with TF 2.21):
- TensorFlow is imported inside functions only: the aggregator runs without it, and without
  it `fleetlearn model build` fails with one line naming `pip install 'fleetlearn[build]'`.
- Builtin ops only (no Flex), resource variables. tf.nn.relu's gradient (ReluGrad) and the
  fused softmax-cross-entropy op both need Flex, so ReLU has a custom gradient and the loss is
  written out as log-softmax.
- The training batch is fixed (static shapes keep shape arithmetic out of the gradient graph);
  a partial last batch is padded and masked by a per-sample weight, and the loss is the
  weighted mean, so padding changes nothing.
- Every weight starts from a distinct value (biases get tiny random values, not zeros): the
  converter merges identical constants, and a merged initial value cannot be patched.

Signatures: `train(x[B,F], y[B] int32, sample_weight[B], learning_rate[], prox_mu[]) -> loss`
(one optimizer step, loss before it), `infer(x[N,F]) -> logits, probabilities`,
`get_weights() -> {name: array}`, `set_weights(**{name: array}) -> applied`. Weight names are the
manifest layout's names.

- The learning rate is an input, so each round's announcement sets it (a schedule needs no
  rebuild); the spec's `train.learning_rate` is only the default for central training.
- FedProx (Li et al. 2020): the step minimises loss + prox_mu/2 * ||w - anchor||^2, where the
  anchor is what `set_weights` last set (the trainer sets the release's weights before local
  training). prox_mu = 0 is plain SGD/Adam. The anchors start at zero and are never patched.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.shared import settings, tflite
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.ids import id_problem

DEFAULT_SPEC_PATH = Path(__file__).with_name("models") / "pdm_default.toml"
DEFAULT_MODEL_PATH = Path(__file__).with_name("models") / "pdm_default.tflite"

OPTIMIZERS = ("sgd", "adam")
# Adam's constants (Keras defaults); only the learning rate is part of the spec.
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPSILON = 1e-7
_BIAS_INIT_SCALE = 1e-3

_MAX_WIDTH = 1 << 16  # per layer; keeps a typo from asking TF for a terabyte
_MAX_LAYERS = 16
_MAX_BATCH = 4096


class ModelBuildError(tflite.ModelError):
    """The model cannot be built here (TensorFlow missing, conversion refused, ...)."""


# ------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """An MLP classifier and how devices train it. Validated on construction."""

    model_id: str
    input_width: int
    hidden: tuple[int, ...]
    labels: tuple[str, ...]  # one name per class
    train_batch: int
    optimizer: str
    learning_rate: float
    seed: int

    def __post_init__(self) -> None:
        problem = id_problem(self.model_id)
        if problem:
            raise ConfigError("model.id", problem)
        _check_width("model.input_width", self.input_width)
        if len(self.hidden) > _MAX_LAYERS:
            raise ConfigError("model.hidden", f"{len(self.hidden)} layers; at most {_MAX_LAYERS}")
        for i, width in enumerate(self.hidden):
            _check_width(f"model.hidden[{i}]", width)
        if len(self.labels) < 2:
            raise ConfigError("model.classes", "a classifier needs at least 2 classes")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("model.classes", "class names repeat")
        for label in self.labels:
            if not 0 < len(label) <= 64 or not label.isprintable():
                raise ConfigError("model.classes", f"{label!r} is not a usable class name")
        if not 1 <= self.train_batch <= _MAX_BATCH:
            raise ConfigError("train.batch", f"{self.train_batch} is outside 1..{_MAX_BATCH}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("train.optimizer", f"{self.optimizer!r} is not one of {OPTIMIZERS}")
        if not (math.isfinite(self.learning_rate) and 0.0 < self.learning_rate <= 10.0):
            raise ConfigError("train.learning_rate", f"{self.learning_rate} is outside (0, 10]")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("model.seed", f"{self.seed} is outside 0..2^63-1")

    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def layer_widths(self) -> tuple[int, ...]:
        return (self.input_width, *self.hidden, self.classes)

    def layout(self) -> tuple[tflite.WeightSpec, ...]:
        """The weight layout, layer by layer: kernel then bias."""
        specs = []
        for i, (fan_in, fan_out) in enumerate(pairwise(self.layer_widths)):
            specs.append(tflite.WeightSpec(name=f"dense_{i}_kernel", shape=(fan_in, fan_out)))
            specs.append(tflite.WeightSpec(name=f"dense_{i}_bias", shape=(fan_out,)))
        return tuple(specs)

    @property
    def parameter_count(self) -> int:
        return tflite.layout_size(self.layout())


def _check_width(key: str, value: int) -> None:
    if not 1 <= value <= _MAX_WIDTH:
        raise ConfigError(key, f"{value} is outside 1..{_MAX_WIDTH}")


# key -> (section, name, accepted types). Anything else in the file is a typo and refused.
_SPEC_KEYS: dict[str, tuple[type, ...]] = {
    "model.id": (str,),
    "model.input_width": (int,),
    "model.hidden": (list,),
    "model.classes": (int, list),
    "model.seed": (int,),
    "train.batch": (int,),
    "train.optimizer": (str,),
    "train.learning_rate": (float, int),
}


def parse_spec(document: Mapping[str, Any]) -> ModelSpec:
    """Turn a parsed TOML document into a ModelSpec; every problem is a ConfigError(key, ...)."""
    values: dict[str, Any] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "expected a [section] table")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in _SPEC_KEYS:
                raise ConfigError(key, f"unknown setting (known: {', '.join(_SPEC_KEYS)})")
            # bool is an int in Python, and never what a width or a seed means.
            if isinstance(value, bool) or not isinstance(value, _SPEC_KEYS[key]):
                wanted = " or ".join(t.__name__ for t in _SPEC_KEYS[key])
                raise ConfigError(key, f"expected {wanted}, got {type(value).__name__}")
            values[key] = value
    for key in _SPEC_KEYS:
        if key not in values:
            raise ConfigError(key, "missing")

    hidden = values["model.hidden"]
    for i, width in enumerate(hidden):
        if isinstance(width, bool) or not isinstance(width, int):
            raise ConfigError(f"model.hidden[{i}]", f"expected int, got {type(width).__name__}")
    classes = values["model.classes"]
    if isinstance(classes, int):
        if not 2 <= classes <= _MAX_WIDTH:
            raise ConfigError("model.classes", f"{classes} is outside 2..{_MAX_WIDTH}")
        labels = tuple(f"class_{i}" for i in range(classes))
    else:
        if not all(isinstance(c, str) for c in classes):
            raise ConfigError("model.classes", "expected a count or a list of class names")
        labels = tuple(classes)
    return ModelSpec(
        model_id=values["model.id"],
        input_width=values["model.input_width"],
        hidden=tuple(hidden),
        labels=labels,
        train_batch=values["train.batch"],
        optimizer=values["train.optimizer"].lower(),
        learning_rate=float(values["train.learning_rate"]),
        seed=values["model.seed"],
    )


def load_spec(path: Path | None = None) -> ModelSpec:
    """Read a spec file (default: the predictive-maintenance spec shipped with fleetlearn)."""
    path = DEFAULT_SPEC_PATH if path is None else path
    text = settings.read_text(path, "--spec")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--spec", f"{path} is not valid TOML: {exc}") from None
    return parse_spec(document)


# ------------------------------------------------------------------------------------ TensorFlow


def import_tensorflow() -> Any:
    """TensorFlow, or one clear line saying how to get it."""
    # TF's C++ info logs (CPU features) bury the CLI's output; warnings still show. oneDNN
    # only reorders float sums here (a small graph, traced once) and announces itself on
    # stderr, so it is off unless the caller asked for it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf  # heavy and optional: only builds need it
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "tensorflow":
            raise
        raise ModelBuildError(
            "building a model needs TensorFlow: pip install 'fleetlearn[build]'"
        ) from None
    return tf


def initial_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Deterministic starting weights from `spec.seed`: He-normal kernels, tiny random biases."""
    rng = np.random.default_rng(spec.seed)
    weights: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(pairwise(spec.layer_widths)):
        weights[f"dense_{i}_kernel"] = rng.normal(
            0.0, math.sqrt(2.0 / fan_in), size=(fan_in, fan_out)
        ).astype(np.float32)
        # Zeros would be identical across equally wide layers (and equal to Adam's zero slots),
        # and the converter would merge them into one unpatchable buffer.
        weights[f"dense_{i}_bias"] = rng.uniform(
            -_BIAS_INIT_SCALE, _BIAS_INIT_SCALE, size=fan_out
        ).astype(np.float32)
    return weights


def relu_with_builtin_gradient(tf: Any) -> Any:
    """ReLU whose gradient is builtin ops (tf.nn.relu's, ReluGrad, needs Flex)."""

    @tf.custom_gradient
    def relu(x: Any) -> Any:
        def grad(dy: Any) -> Any:
            return dy * tf.cast(x > 0.0, tf.float32)

        return tf.maximum(x, 0.0), grad

    return relu


def build_module(spec: ModelSpec, weights: Mapping[str, np.ndarray] | None = None) -> Any:
    """The tf.Module with its four tf.functions; `weights` default to `initial_weights(spec)`."""
    tf = import_tensorflow()
    layout = spec.layout()
    start = dict(initial_weights(spec) if weights is None else weights)
    n_layers = len(spec.layer_widths) - 1
    relu = relu_with_builtin_gradient(tf)

    def forward(x: Any, variables: list[Any], training: bool) -> Any:
        h = x
        for i in range(n_layers):
            h = tf.matmul(h, variables[2 * i]) + variables[2 * i + 1]
            if i < n_layers - 1:
                h = relu(h)
        return h

    module = assemble_module(
        name="fleetlearn_mlp",
        layout=layout,
        start=start,
        forward=forward,
        input_width=spec.input_width,
        classes=spec.classes,
        batch=spec.train_batch,
        optimizer=spec.optimizer,
    )
    module.spec = spec
    return module


# Each task's losses (the first is the default); docs/models.md says what each one is.
LOSSES: dict[tflite.Task, tuple[str, ...]] = {
    tflite.Task.CLASSIFICATION: ("crossentropy",),
    tflite.Task.REGRESSION: ("mse", "huber"),
    tflite.Task.ANOMALY: ("mse",),
}
_HUBER_DELTA = 1.0


def check_loss(task: tflite.Task, loss: str | None) -> str:
    """`loss`, or the task's default, checked against what the task trains with."""
    if loss is None:
        return LOSSES[task][0]
    if loss not in LOSSES[task]:
        raise ConfigError(
            "--loss", f"{loss!r} does not train a {task.value} model; use one of {LOSSES[task]}"
        )
    return loss


def assemble_module(
    *,
    name: str,
    layout: tuple[tflite.WeightSpec, ...],
    start: Mapping[str, np.ndarray],
    forward: Any,
    input_width: int,
    classes: int,
    batch: int,
    optimizer: str,
    task: tflite.Task = tflite.Task.CLASSIFICATION,
    loss: str | None = None,
) -> Any:
    """A model's tf.Module with the four signatures, around `forward(x, variables, training)
    -> output` (x [n, input_width]; `variables` in `layout` order): the weighted train step of
    the task's loss with FedProx and SGD or Adam, infer, get_weights, set_weights.

    What `forward` returns and what the signatures take, by task:
    classification  logits [n, classes]; train(x, y int32, ...); infer -> logits, probabilities
    regression      [n, 1]; train(x, y float32, ...); infer -> prediction [n]
    anomaly         input_width values per row (any shape); train(x, ...) without y;
                    infer -> reconstruction [n, input_width], score [n] (mean squared error)
    """
    tf = import_tensorflow()
    loss_name = check_loss(task, loss)
    module = tf.Module(name=name)
    variables = [
        tf.Variable(np.asarray(start[w.name], dtype=np.float32), name=w.name, trainable=True)
        for w in layout
    ]
    module.weights_list = variables

    def logits_of(x: Any, training: bool = False) -> Any:
        return forward(x, variables, training)

    def prediction_of(x: Any, training: bool = False) -> Any:
        return tf.reshape(forward(x, variables, training), [-1])

    def reconstruction_of(x: Any, training: bool = False) -> Any:
        return tf.reshape(forward(x, variables, training), [-1, input_width])

    def anomaly_score(x: Any, reconstruction: Any) -> Any:
        return tf.reduce_mean(tf.square(reconstruction - x), axis=1)

    def per_sample_loss(x: Any, y: Any) -> Any:
        if task is tflite.Task.CLASSIFICATION:
            logits = logits_of(x, training=True)
            log_probs = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
            return -tf.reduce_sum(tf.one_hot(y, classes) * log_probs, axis=1)
        if task is tflite.Task.ANOMALY:
            return anomaly_score(x, reconstruction_of(x, training=True))
        error = prediction_of(x, training=True) - y
        if loss_name == "mse":
            return tf.square(error)
        # Huber written with min and abs (builtin gradients): quadratic within delta, linear out.
        small = tf.minimum(tf.abs(error), _HUBER_DELTA)
        return 0.5 * tf.square(small) + _HUBER_DELTA * (tf.abs(error) - small)

    def weighted_loss(x: Any, y: Any, sample_weight: Any) -> Any:
        per_sample = per_sample_loss(x, y)
        # Weighted mean over the real samples; the floor keeps an all-padding batch finite.
        total = tf.maximum(tf.reduce_sum(sample_weight), 1e-12)
        return tf.reduce_sum(per_sample * sample_weight) / total

    if optimizer == "adam":
        slots_m = [
            tf.Variable(tf.zeros_like(v), name=f"adam_m_{w.name}", trainable=False)
            for v, w in zip(variables, layout, strict=True)
        ]
        slots_v = [
            tf.Variable(tf.zeros_like(v), name=f"adam_v_{w.name}", trainable=False)
            for v, w in zip(variables, layout, strict=True)
        ]
        step = tf.Variable(0.0, name="adam_step", trainable=False)
        module.optimizer_state = [*slots_m, *slots_v, step]
    # FedProx anchors: set with the weights by set_weights (zeros until then; never patched).
    anchors = [
        tf.Variable(tf.zeros_like(v), name=f"anchor_{w.name}", trainable=False)
        for v, w in zip(variables, layout, strict=True)
    ]
    module.anchors = anchors

    def apply(grads: list[Any], lr: Any) -> None:
        if optimizer == "sgd":
            for v, g in zip(variables, grads, strict=True):
                v.assign_sub(lr * g)
            return
        t = step + 1.0
        step.assign(t)
        lr_t = lr * tf.sqrt(1.0 - tf.pow(_ADAM_BETA2, t)) / (1.0 - tf.pow(_ADAM_BETA1, t))
        for v, g, m, s in zip(variables, grads, slots_m, slots_v, strict=True):
            m.assign(_ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * g)
            s.assign(_ADAM_BETA2 * s + (1.0 - _ADAM_BETA2) * g * g)
            v.assign_sub(lr_t * m / (tf.sqrt(s) + _ADAM_EPSILON))

    def one_step(x: Any, y: Any, sample_weight: Any, learning_rate: Any, prox_mu: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = weighted_loss(x, y, sample_weight)
        grads = tape.gradient(loss, variables)
        # The proximal term's gradient, written out (no second tape): mu * (w - anchor).
        grads = [g + prox_mu * (v - a) for g, v, a in zip(grads, variables, anchors, strict=True)]
        apply(grads, learning_rate)
        return {"loss": loss}

    x_spec = tf.TensorSpec([batch, input_width], tf.float32, name="x")
    rest = [
        tf.TensorSpec([batch], tf.float32, name="sample_weight"),
        tf.TensorSpec([], tf.float32, name="learning_rate"),
        tf.TensorSpec([], tf.float32, name="prox_mu"),
    ]
    if task is tflite.Task.ANOMALY:

        @tf.function(input_signature=[x_spec, *rest])
        def train(x: Any, sample_weight: Any, learning_rate: Any, prox_mu: Any) -> Any:
            return one_step(x, None, sample_weight, learning_rate, prox_mu)

    else:
        y_type = tf.int32 if task is tflite.Task.CLASSIFICATION else tf.float32

        @tf.function(input_signature=[x_spec, tf.TensorSpec([batch], y_type, name="y"), *rest])
        def train(x: Any, y: Any, sample_weight: Any, learning_rate: Any, prox_mu: Any) -> Any:
            return one_step(x, y, sample_weight, learning_rate, prox_mu)

    @tf.function(input_signature=[tf.TensorSpec([None, input_width], tf.float32, name="x")])
    def infer(x: Any) -> Any:
        if task is tflite.Task.REGRESSION:
            return {"prediction": prediction_of(x)}
        if task is tflite.Task.ANOMALY:
            reconstruction = reconstruction_of(x)
            return {"reconstruction": reconstruction, "score": anomaly_score(x, reconstruction)}
        logits = logits_of(x)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    @tf.function(input_signature=[])
    def get_weights() -> Any:
        return {w.name: v.read_value() for v, w in zip(variables, layout, strict=True)}

    # Positional parameters named after the weights: the TFLite signature keeps these names.
    def set_weights(*values: Any) -> Any:
        for v, a, value in zip(variables, anchors, values, strict=True):
            v.assign(value)
            a.assign(value)
        return {"applied": tf.constant(len(values), tf.int32)}

    module.train = train
    module.infer = infer
    module.get_weights = get_weights
    module.set_weights = tf.function(
        set_weights,
        input_signature=[tf.TensorSpec(w.shape, tf.float32, name=w.name) for w in layout],
    )
    return module


def convert_module(module: Any) -> bytes:
    """Convert with builtin ops and resource variables; refuse anything that needs Flex."""
    tf = import_tensorflow()
    functions = [
        module.train.get_concrete_function(),
        module.infer.get_concrete_function(),
        module.get_weights.get_concrete_function(),
        module.set_weights.get_concrete_function(),
    ]
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    try:
        data: bytes = converter.convert()
    except Exception as exc:  # the converter raises a zoo of types; report any as ours
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelBuildError(f"TFLite conversion failed: {first}") from exc
    custom = tflite.describe_model(data).custom_ops
    if custom:
        raise ModelBuildError(f"converter emitted non-builtin ops {custom}; devices lack them")
    return data


def build_model(spec: ModelSpec) -> tuple[bytes, tflite.ModelManifest]:
    """Build, convert, check and embed the version-1 manifest. Returns (tflite bytes, manifest)."""
    data = convert_module(build_module(spec))
    try:
        return tflite.embed_manifest(
            data, model_id=spec.model_id, version=1, layout=spec.layout(), labels=spec.labels
        )
    except tflite.SharedBufferError as exc:
        raise ModelBuildError(f"converted model cannot be patched: {exc}") from exc


def build_to_file(spec: ModelSpec, out: Path) -> tflite.ModelManifest:
    """`build_model`, then write the file atomically (a half-written model never appears)."""
    data, manifest = build_model(spec)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("--out", f"cannot write {out}: {exc.strerror or exc}") from None
    return manifest

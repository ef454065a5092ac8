"""Bring your own Keras model (issue 16): every supported layer against Keras, refusals that
name the layer, the CLI, and a translated Conv1D model trained by a secure simulated fleet.

Each parity case builds a small model around one layer type with random weights (no constant
weight, so nothing is perturbed), converts it, and compares the LiteRT model with Keras from
the same weights: logits on random rows and the weights after one SGD step (Keras in eager
TensorFlow with its own gradients). All of these need TensorFlow (slow).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlearn import cli as fleetlearn
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.device.trainer import LiteRTTrainer
from fleetlearn.shared import settings, tflite
from fleetlearn.shared.errors import ConfigError
from tests.keras_cases import CASES, randomized, seq

pytestmark = pytest.mark.slow


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytest.importorskip("tensorflow")
    import keras

    return keras


def _mk() -> Any:
    from fleetlearn.aggregator import model_keras

    return model_keras


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_supported_layer_matches_keras(case: str) -> None:
    keras, mk = _keras(), _mk()
    model = randomized(CASES[case](keras))
    translation = mk.translate(model)
    assert translation.start.keys() == {s.name for s in translation.layout}
    data, manifest, parity = mk.build_keras_model(model, batch=8)
    info = tflite.describe_model(data)
    assert info.custom_ops == ()
    assert all(code.builtin != tflite.OP_CUSTOM for code in info.op_codes)
    # The build's own check, measured again here on other rows.
    again = mk.measure_parity(model, translation, data, manifest, rows=24, seed=5)
    assert again.infer < 1e-5, again
    if case == "Dropout":
        assert again.step is None  # random in training: compared in inference only
    else:
        assert again.step is not None
        assert again.step < 1e-5, again
        assert again.loss is not None
        assert again.loss < 1e-5, again
    assert parity.infer < 1e-5
    # Keras's own weights, unperturbed: the on-device model starts from them.
    keras_first = np.asarray(model.trainable_variables[0].numpy())
    start = tflite.read_weights(data)[translation.layout[0].name]
    np.testing.assert_array_equal(start, keras_first.reshape(start.shape))


def test_dropout_is_active_while_training_only() -> None:
    keras, mk = _keras(), _mk()
    model = randomized(
        seq(keras, (6,), keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.5))
    )
    data, manifest, _ = mk.build_keras_model(model, batch=8)
    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    y = np.zeros(8, np.int32)
    first, second = LiteRTTrainer(data, manifest), LiteRTTrainer(data, manifest)
    np.testing.assert_array_equal(first.logits(x), first.logits(x))  # inference: no mask
    first.train_step(x, y, learning_rate=0.1)
    second.train_step(x, y, learning_rate=0.1)
    # Two steps from the same weights on the same rows differ only by their dropout masks.
    assert np.abs(first.flat_weights() - second.flat_weights()).max() > 0


def test_constant_weights_are_made_distinct_so_the_model_patches() -> None:
    """Keras starts biases at zero and normalization scales at one; identical buffers would be
    merged by the converter. The build perturbs them by at most 1e-3 and the result patches."""
    keras, mk = _keras(), _mk()
    model = seq(keras, (6,), keras.layers.Dense(5), keras.layers.LayerNormalization())
    data, manifest, _ = mk.build_keras_model(model, batch=8)
    weights = tflite.read_weights(data)
    assert len({weights[s.name].tobytes() for s in manifest.layout}) == len(manifest.layout)
    bias = weights["dense_bias" if "dense_bias" in weights else manifest.layout[1].name]
    assert 0 < np.abs(bias).max() <= 1e-3
    vector = np.arange(manifest.parameter_count, dtype=np.float32) * 1e-3
    patched = tflite.patch_flat(data, vector, manifest.layout)
    trainer = LiteRTTrainer(*tflite.embed_manifest(patched, model_id=manifest.model_id, version=2))
    np.testing.assert_array_equal(trainer.flat_weights(), vector)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda k: seq(k, (8, 8, 1), k.layers.Conv2D(2, 3), k.layers.Flatten()), "conv2d"),
        (lambda k: seq(k, (8, 2), k.layers.LSTM(4)), "lstm"),
        (
            lambda k: seq(k, (12, 2), k.layers.Conv1D(4, 3, strides=2), k.layers.Flatten()),
            "strides",
        ),
        (lambda k: seq(k, (6,), k.layers.Dense(5, activation="elu")), "elu"),
        (
            lambda k: seq(k, (12, 2), k.layers.MaxPooling1D(3, strides=2), k.layers.Flatten()),
            "pool_size equal to strides",
        ),
    ],
)
def test_an_unsupported_layer_is_refused_naming_it(build: Callable[[Any], Any], named: str) -> None:
    keras, mk = _keras(), _mk()
    with pytest.raises(mk.KerasModelError, match=named):
        mk.translate(build(keras))


def test_a_model_with_branches_is_refused() -> None:
    keras, mk = _keras(), _mk()
    inputs = keras.Input((6,))
    a = keras.layers.Dense(4, name="left")(inputs)
    b = keras.layers.Dense(4, name="right")(inputs)
    out = keras.layers.Dense(3)(keras.layers.Concatenate(name="join")([a, b]))
    with pytest.raises(mk.KerasModelError, match=r"single-path|not supported"):
        mk.translate(keras.Model(inputs, out))


def test_cli_builds_a_saved_keras_model_and_names_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keras = _keras()
    model = randomized(CASES["MaxPooling1D"](keras))
    saved = tmp_path / "net.keras"
    model.save(saved)
    out = tmp_path / "net.tflite"
    argv = ["model", "build", "--keras", str(saved), "--out", str(out)]
    code = fleetlearn.main([*argv, "--id", "vib-cnn", "--labels", "ok,wear,fault", "--batch", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "vib-cnn v1" in printed
    assert "classification; against Keras: output within" in printed
    manifest = tflite.read_manifest(out.read_bytes())
    assert manifest is not None
    assert manifest.labels == ("ok", "wear", "fault")
    trainer = LiteRTTrainer(out.read_bytes(), manifest)
    assert (trainer.batch_size, trainer.input_width, trainer.classes) == (4, 24, 3)
    assert fleetlearn.main([*argv, "--labels", "a,b"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert fleetlearn.main(["model", "build", "--out", str(out), "--batch", "8"]) == 2
    assert "--batch" in capsys.readouterr().err
    garbage = tmp_path / "bad.keras"
    garbage.write_bytes(b"not a zip")
    assert fleetlearn.main(["model", "build", "--keras", str(garbage), "--out", str(out)]) == 2
    assert "--keras" in capsys.readouterr().err


def _waves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw 2-channel windows of 32 samples: class 0 a slow wave, class 1 a fast one, noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    t = np.arange(32, dtype=np.float32)
    freq = np.where(y == 0, 1.5, 6.0)[:, None] / 32.0
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    base = np.sin(2 * np.pi * freq * t + phase)
    x = np.stack([base, 0.5 * base], axis=2) + rng.normal(0, 0.3, (n, 32, 2))
    return x.reshape(n, 64).astype(np.float32), y


def test_a_conv1d_model_on_raw_windows_trains_in_secure_rounds() -> None:
    """The translated model goes through the real engine, SecAgg+ and LiteRT trainers of the
    in-memory fleet; the global model learns to tell the two waves apart."""
    keras, mk = _keras(), _mk()
    from fleetlearn.firmware_sim.inmemory import InMemoryFleet
    from fleetlearn.firmware_sim.scenario import Scenario

    inputs = keras.Input((32, 2))
    h = keras.layers.Conv1D(6, 5, activation="relu")(inputs)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h), name="waves")
    data, _, _ = mk.build_keras_model(model, labels=["slow", "fast"], batch=16)
    agg = settings.load(AggregatorSettings, sets={"training.steps": "10"})
    base = agg.engine_config()
    config = dataclasses.replace(base, mode="secure", cohort=8, over_select=1.0, min_cohort=6)
    parts = [_waves(40, seed) for seed in range(8)]
    fleet = InMemoryFleet(8, config, Scenario(), optimizer=agg.optimizer_config(), model=data,
                          seed=3, data=parts)  # fmt: skip
    x_test, y_test = _waves(200, seed=99)
    before = fleet.evaluate(x_test, y_test)
    states = [fleet.run_round()["state"] for _ in range(6)]
    assert states == ["closed"] * 6
    assert fleet.version == 7
    after = fleet.evaluate(x_test, y_test)
    assert after > max(0.9, before), (before, after)
    summary = fleet.history[-1]
    assert [c["label"] for c in summary["per_class"]] == ["slow", "fast"]


def test_keras_build_without_litert_or_tensorflow_errors_are_config_errors(tmp_path: Path) -> None:
    _keras()
    mk = _mk()
    with pytest.raises(ConfigError) as caught:
        mk.load_keras(tmp_path / "missing.keras")
    assert caught.value.key == "--keras"

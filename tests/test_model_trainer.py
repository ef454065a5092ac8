"""The LiteRT trainer on the shipped model: training, padding, evaluation, weights, releases.

No TensorFlow: the reference for one training step is plain numpy (tests/model_fixtures.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fleetlearn.shared.tflite.runtime as runtime
from fleetlearn.device.trainer import LiteRTTrainer, TrainerError
from fleetlearn.shared import tflite
from fleetlearn.shared.release import SignatureError, make_release, release_weights
from tests.model_fixtures import blobs, reference_sgd_step, shipped_model, signing_key

KEY = signing_key(1)
LR = 0.05  # the shipped spec's learning rate


def _trainer(version: int = 1, seed: int | None = None) -> LiteRTTrainer:
    data = shipped_model()
    if seed is None and version == 1:
        release = make_release(data, tflite.read_manifest(data), KEY)  # type: ignore[arg-type]
    else:
        manifest = tflite.read_manifest(data)
        assert manifest is not None
        rng = np.random.default_rng(seed)
        vector = rng.normal(0, 0.3, size=manifest.parameter_count).astype(np.float32)
        release = release_weights(data, vector, version=version, signing_key=KEY)
    return LiteRTTrainer.from_release(release, KEY.verify_key, min_version=1)


def test_loads_a_verified_release_at_its_weights() -> None:
    trainer = _trainer(version=3, seed=5)
    assert trainer.version == 3
    assert (trainer.batch_size, trainer.input_width, trainer.classes) == (32, 16, 4)
    model_weights = tflite.read_weights(shipped_model())
    assert not np.array_equal(trainer.flat_weights(), tflite.flatten(model_weights, trainer.layout))
    assert np.array_equal(trainer.flat_weights(), trainer.initial)
    assert not trainer.update().any()


def test_refuses_a_release_it_cannot_verify() -> None:
    data = shipped_model()
    forged = make_release(data, tflite.read_manifest(data), signing_key(9))  # type: ignore[arg-type]
    with pytest.raises(SignatureError):
        LiteRTTrainer.from_release(forged, KEY.verify_key, min_version=1)


def test_one_step_matches_plain_sgd_on_the_real_samples_of_a_partial_batch() -> None:
    """20 real samples in a batch of 32: padding with weight 0 must not change the step."""
    trainer = _trainer()
    x, y = blobs(20, seed=1)
    before = trainer.get_weights()
    loss = trainer.train_step(x, y, learning_rate=LR)
    expected, expected_loss = reference_sgd_step(before, x, y, LR)
    after = trainer.get_weights()
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(after[name], value, atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(after["dense_0_kernel"] - before["dense_0_kernel"]).max() > 1e-4  # it moved


def test_training_learns_and_reports_the_update() -> None:
    trainer = _trainer()
    x, y = blobs(600, seed=2)
    x_test, y_test = blobs(400, seed=3)
    before = trainer.evaluate(x_test, y_test)
    result = trainer.train(x, y, epochs=3, learning_rate=LR, rng=np.random.default_rng(0))
    after = trainer.evaluate(x_test, y_test)
    assert result.steps == 3 * 19  # 600 = 18 full batches + a partial one, per epoch
    assert result.samples == 1800
    assert after.loss < before.loss / 2
    assert after.accuracy > 0.9
    update = trainer.update()
    assert update.dtype == np.float32
    assert update.shape == (trainer.manifest.parameter_count,)
    np.testing.assert_array_equal(update, trainer.flat_weights() - trainer.initial)
    assert np.abs(update).max() > 0.01


def test_training_is_deterministic_for_a_seeded_shuffle() -> None:
    x, y = blobs(100, seed=4)
    a, b = _trainer(), _trainer()
    a.train(x, y, epochs=2, learning_rate=LR, rng=np.random.default_rng(11))
    b.train(x, y, epochs=2, learning_rate=LR, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(a.update(), b.update())


def test_evaluate_agrees_with_predict() -> None:
    trainer = _trainer(version=2, seed=6)
    x, y = blobs(1500, seed=5)  # more than one inference chunk
    evaluation = trainer.evaluate(x, y)
    p = trainer.predict(x).astype(np.float64)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert evaluation.samples == 1500
    assert evaluation.accuracy == pytest.approx(float((p.argmax(axis=1) == y).mean()))
    assert evaluation.loss == pytest.approx(float(-np.log(p[np.arange(1500), y]).mean()), rel=1e-4)


def test_weights_can_be_set_and_read_back() -> None:
    trainer = _trainer()
    vector = np.linspace(-1, 1, trainer.manifest.parameter_count, dtype=np.float32)
    trainer.set_flat_weights(vector)
    np.testing.assert_array_equal(trainer.flat_weights(), vector)
    np.testing.assert_array_equal(trainer.update(), vector - trainer.initial)
    with pytest.raises(TrainerError, match="layout names"):
        trainer.set_weights({"dense_0_bias": np.zeros(32, np.float32)})


def test_each_release_gets_its_own_interpreter() -> None:
    old, new = _trainer(version=2, seed=1), _trainer(version=3, seed=2)
    assert not np.array_equal(old.flat_weights(), new.flat_weights())
    np.testing.assert_array_equal(new.flat_weights(), new.initial)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((4, 15), np.float32), np.zeros(4, np.int32), "features must be"),
        (np.zeros((4, 16), np.float32), np.zeros(3, np.int32), "labels must be 4"),
        (np.zeros((4, 16), np.float32), np.full(4, 4, np.int32), r"0\.\.3"),
        (np.full((4, 16), np.nan, np.float32), np.zeros(4, np.int32), "NaN"),
        (np.zeros((4, 16), np.float32), np.zeros(4, np.float32), "integers"),
        (np.zeros((0, 16), np.float32), np.zeros(0, np.int32), "no training samples"),
    ],
)
def test_bad_data_is_refused(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        _trainer().train(x, y, learning_rate=LR)


def test_the_round_sets_the_learning_rate() -> None:
    """The same model at two rates: each step is plain SGD at the rate given (no rebuild)."""
    x, y = blobs(20, seed=1)
    for rate in (0.01, 0.3):
        trainer = _trainer()
        before = trainer.get_weights()
        trainer.train_step(x, y, learning_rate=rate)
        expected, _ = reference_sgd_step(before, x, y, rate)
        for name, value in expected.items():
            np.testing.assert_allclose(trainer.get_weights()[name], value, atol=1e-5, rtol=0)
    with pytest.raises(TrainerError, match="takes its learning rate from the round"):
        _trainer().train(x, y)
    with pytest.raises(TrainerError, match="learning_rate must be"):
        _trainer().train(x, y, learning_rate=0.0)


def test_fedprox_pulls_towards_the_weights_training_started_from() -> None:
    """Two steps with mu = 2: the second has a proximal gradient mu * (w - w_start), exactly
    as the numpy reference computes it; and a larger mu keeps the update smaller."""
    x, y = blobs(40, seed=8)
    mu = 2.0
    trainer = _trainer(version=2, seed=3)
    start = trainer.get_weights()
    trainer.set_weights(start)  # the anchor is what set_weights last set
    expected = start
    for batch in (slice(0, 20), slice(20, 40)):
        trainer.train_step(x[batch], y[batch], learning_rate=LR, prox_mu=mu)
        expected, _ = reference_sgd_step(expected, x[batch], y[batch], LR, prox_mu=mu, anchor=start)
    for name, value in expected.items():
        np.testing.assert_allclose(trainer.get_weights()[name], value, atol=1e-5, rtol=0)
    norms = []
    for prox_mu in (0.0, 1.0, 10.0):
        t = _trainer(version=2, seed=3)
        t.train(x, y, steps=30, learning_rate=LR, prox_mu=prox_mu, rng=np.random.default_rng(0))
        norms.append(float(np.linalg.norm(t.update())))
    assert norms[0] > norms[1] > norms[2] > 0


def test_steps_count_optimizer_steps_whatever_the_data_size() -> None:
    x, y = blobs(20, seed=9)  # less than one batch
    trainer = _trainer()
    result = trainer.train(x, y, steps=7, learning_rate=LR, rng=np.random.default_rng(0))
    assert (result.steps, result.samples) == (7, 140)
    big_x, big_y = blobs(200, seed=9)  # 7 batches a pass: 10 steps = one pass and 3 batches
    result = _trainer().train(big_x, big_y, steps=10, learning_rate=LR)
    assert (result.steps, result.samples) == (10, 200 + 3 * 32)


def test_a_model_from_before_the_rate_was_an_input_still_trains() -> None:
    """Releases in the field keep working: their rate is built in, FedProx is refused."""
    data = (Path(__file__).parent / "data" / "pdm_before_rate_input.tflite").read_bytes()
    manifest = tflite.read_manifest(data)
    assert manifest is not None
    trainer = LiteRTTrainer(data, manifest)
    assert not trainer.takes_learning_rate
    x, y = blobs(20, seed=1)
    before = trainer.get_weights()
    trainer.train_step(x, y, learning_rate=0.9)  # ignored: the model's own 0.05 applies
    expected, _ = reference_sgd_step(before, x, y, LR)
    for name, value in expected.items():
        np.testing.assert_allclose(trainer.get_weights()[name], value, atol=1e-5, rtol=0)
    with pytest.raises(TrainerError, match="predates FedProx"):
        trainer.train(x, y, prox_mu=0.1)


def test_a_step_takes_at_most_one_batch() -> None:
    x, y = blobs(33, seed=6)
    with pytest.raises(TrainerError, match=r"1\.\.32"):
        _trainer().train_step(x, y)


def test_runtime_falls_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_found", None)
    monkeypatch.setattr(
        runtime,
        "RUNTIMES",
        (
            ("fleetlearn_no_such_runtime", "Interpreter"),
            ("ai_edge_litert.interpreter", "Interpreter"),
        ),
    )
    name, cls = runtime.interpreter_class()
    assert name == "ai_edge_litert.interpreter"
    assert cls.__name__ == "Interpreter"
    monkeypatch.setattr(runtime, "_found", None)
    monkeypatch.setattr(runtime, "RUNTIMES", (("fleetlearn_no_such_runtime", "Interpreter"),))
    with pytest.raises(runtime.RuntimeMissingError, match=r"fleetlearn\[device\]"):
        runtime.interpreter_class()

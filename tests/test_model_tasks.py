"""Tasks beyond classification (issue 16): a regressor of remaining useful life and an
autoencoder for anomaly detection, each built from Keras, trained by LiteRT, released, and
federated in secure rounds; their evaluation figures on `metrics`.

The builds need TensorFlow (slow); the scoring functions are pure and tested first.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from fleetlearn import cli as fleetlearn
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.device.trainer import LiteRTTrainer, TrainerError, local_round
from fleetlearn.firmware_sim import data as simdata
from fleetlearn.shared import evaluation, settings, tflite, wire
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.release import release_weights, verify_release
from fleetlearn.shared.rounds import TrainingPlan

# ------------------------------------------------------------------------------ scoring


def test_regression_is_scored_by_mean_absolute_error() -> None:
    result = evaluation.score_regression(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 1.0]))
    assert result.loss == pytest.approx((0.5 + 0.0 + 3.0) / 3)
    assert math.isnan(result.accuracy)
    assert result.samples == 3
    assert result.correct == 0
    assert evaluation.score_regression(np.zeros(0), np.zeros(0)).samples == 0


def test_anomaly_threshold_is_the_quantile_of_normal_scores() -> None:
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100
    assert evaluation.anomaly_threshold(scores, 0.99) == pytest.approx(np.quantile(scores, 0.99))
    assert evaluation.anomaly_threshold(np.array([np.nan, 2.0]), 0.5) == 2.0
    assert evaluation.anomaly_threshold(np.zeros(0)) == math.inf


def test_anomaly_scoring_counts_rows_on_the_right_side_per_kind() -> None:
    scores = np.array([0.1, 0.2, 0.9, 0.3, 1.5, 0.05])
    y = np.array([0, 0, 0, 1, 1, 2])  # any non-zero label is a fault
    result = evaluation.score_anomaly(scores, y, threshold=0.5)
    # normal rows: 0.1, 0.2 right (below), 0.9 a false alarm; faults: 1.5 caught, 0.3 and
    # 0.05 missed.
    assert result.class_samples == (3, 3)
    assert result.class_correct == (2, 1)
    assert result.accuracy == pytest.approx(3 / 6)
    assert result.loss == pytest.approx(scores.mean())
    unlabelled = evaluation.score_anomaly(scores, None, threshold=0.5)
    assert unlabelled.class_samples == (6, 0)
    assert unlabelled.class_correct == (4, 0)


# ------------------------------------------------------------------------------ the data


def test_run_to_failure_targets_fall_to_zero_and_are_capped() -> None:
    machine = simdata.device_machine(4, 0, 0, "pump")
    x, rul = machine.run_to_failure(300)
    assert x.shape == (300, simdata.N_FEATURES)
    assert rul.dtype == np.float32
    assert rul[-1] == 0.0
    assert rul.max() == pytest.approx(simdata.RUL_CAP / simdata.RUL_UNIT)
    assert np.all(np.diff(rul) <= 0)
    # Wear shows: the last cycles' kurtosis (bearing impacts) exceeds the healthy start's.
    assert x[-20:, 3].mean() > x[:50, 3].mean() + 1.0


def test_healthy_only_machines_and_raw_windows() -> None:
    _, labels = simdata.device_machine(4, 1, 0, "fan", healthy_only=True).windows(300)
    assert set(labels.tolist()) == {0}
    raw, labels = simdata.device_machine(4, 2, 0, "fan").raw_windows(64)
    assert raw.shape == (64, simdata.WINDOW)
    assert raw.dtype == np.float32
    assert len(set(labels.tolist())) > 1


# ------------------------------------------------------------------------- building (TF)


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytest.importorskip("tensorflow")
    import keras

    return keras


def _regressor(keras: Any) -> Any:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((simdata.N_FEATURES,)),
            keras.layers.Dense(24, activation="relu"),
            keras.layers.Dense(1),
        ],
        name="rul",
    )


def _autoencoder(keras: Any) -> Any:
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((simdata.N_FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(simdata.N_FEATURES),
        ],
        name="normal-ae",
    )


@pytest.fixture(scope="module")
def regressor() -> tuple[bytes, tflite.ModelManifest]:
    from fleetlearn.aggregator import model_keras

    data, manifest, parity = model_keras.build_keras_model(
        _regressor(_keras()), task=tflite.Task.REGRESSION, loss="huber", batch=16
    )
    assert parity.step is not None
    assert parity.step < 1e-5
    return data, manifest


@pytest.fixture(scope="module")
def autoencoder() -> tuple[bytes, tflite.ModelManifest]:
    from fleetlearn.aggregator import model_keras

    data, manifest, parity = model_keras.build_keras_model(
        _autoencoder(_keras()), task=tflite.Task.ANOMALY, batch=16
    )
    assert parity.step is not None
    assert parity.step < 1e-5
    return data, manifest


@pytest.mark.slow
def test_regressor_builds_trains_and_releases(regressor: tuple[bytes, Any]) -> None:
    data, manifest = regressor
    assert manifest.task is tflite.Task.REGRESSION
    assert manifest.labels == ()
    info = tflite.describe_model(data)
    assert info.custom_ops == ()
    assert {t.name: t.dtype for t in info.signature("train").inputs}["y"] == "float32"
    x, rul = simdata.device_machine(5, 0, 0, "pump").run_to_failure(400)
    trainer = LiteRTTrainer(data, manifest)
    before = trainer.evaluate(x, rul).loss
    result = trainer.train(x, rul, epochs=20, learning_rate=0.05, rng=np.random.default_rng(0))
    assert result.steps == 20 * math.ceil(400 / 16)
    after = trainer.evaluate(x, rul).loss
    assert after < 0.6 * before, (before, after)  # mean absolute error, in RUL_UNIT
    # Released: the trained weights travel in a signed release and come back out.
    key = SigningKey.generate()
    release = release_weights(data, trainer.get_weights(), version=2, signing_key=key)
    assert release.manifest.task is tflite.Task.REGRESSION  # carried from the version before
    verified, vman = verify_release(release, key.verify_key, min_version=1)
    again = LiteRTTrainer(verified, vman)
    np.testing.assert_array_equal(again.flat_weights(), trainer.flat_weights())
    assert again.evaluate(x, rul).loss == pytest.approx(after, rel=1e-5)


@pytest.mark.slow
def test_autoencoder_learns_normal_data_and_flags_faults(autoencoder: tuple[bytes, Any]) -> None:
    data, manifest = autoencoder
    assert manifest.task is tflite.Task.ANOMALY
    assert manifest.labels == ("normal", "anomaly")
    assert "y" not in {t.name for t in tflite.describe_model(data).signature("train").inputs}
    x, _ = simdata.device_machine(6, 0, 0, "fan", healthy_only=True).windows(600)
    trainer = LiteRTTrainer(data, manifest)
    with pytest.raises(TrainerError, match="threshold"):
        trainer.evaluate(x, None)
    start = trainer.anomaly_scores(x).mean()
    trainer.train(x, None, epochs=30, learning_rate=0.1, rng=np.random.default_rng(0))
    assert trainer.anomaly_scores(x).mean() < 0.5 * start
    threshold = trainer.calibrate(x)
    normal = trainer.evaluate(x, None, threshold=threshold)
    assert normal.class_correct[0] / normal.class_samples[0] == pytest.approx(0.99, abs=0.01)
    # The same machine with faults: faulty windows score higher than its normal ones.
    xf, yf = simdata.Machine(simdata.MACHINE_TYPES["fan"], simdata.FLEET_MIX, seed=6).windows(600)
    scores = trainer.anomaly_scores(xf)
    assert np.median(scores[yf != 0]) > np.median(scores[yf == 0])
    judged = trainer.evaluate(xf, yf, threshold=threshold)
    assert judged.class_correct[1] > 0.3 * judged.class_samples[1]


@pytest.mark.slow
def test_local_round_for_each_task(
    regressor: tuple[bytes, Any], autoencoder: tuple[bytes, Any]
) -> None:
    plan = TrainingPlan(learning_rate=0.05, steps=10, eval_fraction=0.3)
    x, rul = simdata.device_machine(7, 0, 0, "pump").run_to_failure(200)
    trainer = LiteRTTrainer(*regressor)
    result = local_round(trainer, x, rul, plan, rng=np.random.default_rng(0), personal={})
    assert result.samples > 0
    assert result.correct == result.local_correct == 0  # nothing is right or wrong, only off
    assert result.loss > 0  # the release's mean absolute error on the held-out rows
    assert np.any(result.update != 0)
    # An autoencoder trains on the normal rows only; labelled faults are judged, per kind.
    xa, ya = simdata.Machine(simdata.MACHINE_TYPES["fan"], simdata.FLEET_MIX, seed=8).windows(300)
    trainer = LiteRTTrainer(*autoencoder)
    result = local_round(trainer, xa, ya, plan, rng=np.random.default_rng(0), personal={})
    assert len(result.class_samples) == 2
    assert sum(result.class_samples) == result.samples
    assert result.class_samples[1] > 0
    assert result.weight == float(np.sum(ya[~_held(xa, plan)] == 0))  # trained on normal rows
    unlabelled = local_round(trainer, xa, None, plan, rng=np.random.default_rng(0), personal={})
    assert unlabelled.class_samples[1] == 0


def _held(x: np.ndarray, plan: TrainingPlan) -> np.ndarray:
    from fleetlearn.shared import dataset

    return dataset.evaluation_rows(x, plan.eval_fraction)


@pytest.mark.slow
def test_trainer_refuses_what_a_task_cannot_use(
    regressor: tuple[bytes, Any], autoencoder: tuple[bytes, Any]
) -> None:
    reg = LiteRTTrainer(*regressor)
    x = np.zeros((4, simdata.N_FEATURES), np.float32)
    with pytest.raises(TrainerError, match="needs y"):
        reg.train(x, None, learning_rate=0.1)
    with pytest.raises(TrainerError, match="NaN"):
        reg.train(x, np.array([0.0, np.nan, 1.0, 2.0]), learning_rate=0.1)
    with pytest.raises(TrainerError, match="float32"):
        reg.train(x, np.array([0.0, 1e39, 1.0, 2.0]), learning_rate=0.1)
    with pytest.raises(TrainerError, match="not a classification model"):
        reg.logits(x)
    ae = LiteRTTrainer(*autoencoder)
    with pytest.raises(TrainerError, match="not a regression model"):
        ae.predict_values(x)
    # A manifest that calls an autoencoder a regressor does not load.
    wrong = dataclasses.replace(autoencoder[1], task=tflite.Task.REGRESSION, labels=())
    with pytest.raises(TrainerError, match="train signature"):
        LiteRTTrainer(autoencoder[0], wrong)


@pytest.mark.slow
def test_outputs_that_do_not_fit_the_task_and_wrong_losses_are_refused() -> None:
    keras = _keras()
    from fleetlearn.aggregator import model_keras

    with pytest.raises(model_keras.KerasModelError, match=r"regressor ends in \(None, 1\)"):
        model_keras.translate(_autoencoder(keras), task=tflite.Task.REGRESSION)
    with pytest.raises(model_keras.KerasModelError, match="reconstructs its input"):
        model_keras.translate(_regressor(keras), task=tflite.Task.ANOMALY)
    with pytest.raises(ConfigError) as caught:
        model_keras.build_keras_model(_regressor(keras), task=tflite.Task.REGRESSION, loss="ce")
    assert caught.value.key == "--loss"
    with pytest.raises(ConfigError) as caught:
        model_keras.build_keras_model(_regressor(keras), task=tflite.Task.REGRESSION, labels=["a"])
    assert caught.value.key == "--labels"
    softmax_tail = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="softmax")]
    )
    with pytest.raises(model_keras.KerasModelError, match="softmax"):
        model_keras.translate(softmax_tail, task=tflite.Task.ANOMALY)


@pytest.mark.slow
def test_cli_builds_each_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keras = _keras()
    saved = tmp_path / "rul.keras"
    _regressor(keras).save(saved)
    out = tmp_path / "rul.tflite"
    argv = ["model", "build", "--keras", str(saved), "--out", str(out), "--batch", "8"]
    assert fleetlearn.main([*argv, "--task", "regression", "--loss", "mse"]) == 0
    assert "regression; against Keras" in capsys.readouterr().out
    manifest = tflite.read_manifest(out.read_bytes())
    assert manifest is not None
    assert manifest.task is tflite.Task.REGRESSION
    assert fleetlearn.main(["model", "inspect", str(out)]) == 0
    assert "v1, regression," in capsys.readouterr().out
    assert fleetlearn.main([*argv, "--task", "regression", "--loss", "crossentropy"]) == 2
    assert "--loss" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse refuses a task it does not know
        fleetlearn.main([*argv, "--task", "forecast"])
    assert exited.value.code == 2
    assert "--task" in capsys.readouterr().err
    assert fleetlearn.main(["model", "build", "--out", str(out), "--task", "anomaly"]) == 2
    assert "--task" in capsys.readouterr().err


def test_a_classifier_manifest_encodes_as_before_tasks_existed() -> None:
    # Old devices refuse unknown fields: a classifier's manifest must not carry `task`.
    spec = tflite.WeightSpec(name="w", shape=(2,))
    plain = tflite.ModelManifest(
        model_id="m", version=1, layout=(spec,), content_hash=tflite.ZERO_HASH
    )
    assert "task" not in wire.to_map(tflite.EmbeddedManifest(manifest=plain))["manifest"]
    ae = dataclasses.replace(plain, task=tflite.Task.ANOMALY)
    encoded = wire.encode(tflite.EmbeddedManifest(manifest=ae))
    assert wire.decode(encoded, tflite.EmbeddedManifest).manifest.task is tflite.Task.ANOMALY


def _secure_fleet(model: bytes, parts: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    from fleetlearn.firmware_sim.inmemory import InMemoryFleet
    from fleetlearn.firmware_sim.scenario import Scenario

    agg = settings.load(AggregatorSettings, sets={"training.steps": "10"})
    config = dataclasses.replace(
        agg.engine_config(), mode="secure", cohort=len(parts), over_select=1.0, min_cohort=4
    )
    return InMemoryFleet(len(parts), config, Scenario(), optimizer=agg.optimizer_config(),
                         model=model, seed=5, data=parts)  # fmt: skip


@pytest.mark.slow
def test_secure_rounds_of_a_regressor_report_mean_absolute_error(
    regressor: tuple[bytes, Any],
) -> None:
    parts = [simdata.device_machine(9, i, 0, "pump").run_to_failure(160) for i in range(6)]
    fleet = _secure_fleet(regressor[0], parts)
    history = [fleet.run_round() for _ in range(5)]
    assert [m["state"] for m in history] == ["closed"] * 5
    first, last = history[0], history[-1]
    assert last["task"] == "regression"
    assert last["accuracy"] is None
    assert last["mae"] == last["mean_loss"]
    assert last["samples"] > 0
    assert "per_class" not in last
    assert last["mae"] < first["mae"], (first["mae"], last["mae"])


@pytest.mark.slow
def test_secure_rounds_of_an_autoencoder_report_detection_per_kind(
    autoencoder: tuple[bytes, Any],
) -> None:
    healthy = [
        simdata.device_machine(10, i, 0, "fan", healthy_only=True).windows(150) for i in range(5)
    ]
    faulty = simdata.device_machine(10, 5, 0, "fan").windows(150)  # one device with labels
    fleet = _secure_fleet(autoencoder[0], [*healthy, faulty])
    history = [fleet.run_round() for _ in range(5)]
    assert [m["state"] for m in history] == ["closed"] * 5
    first, last = history[0], history[-1]
    assert last["task"] == "anomaly"
    assert last["reconstruction_error"] < first["reconstruction_error"]
    normal, anomaly = last["per_class"]
    assert (normal["label"], anomaly["label"]) == ("normal", "anomaly")
    assert anomaly["samples"] == int(np.sum(faulty[1][_held(faulty[0], _plan(fleet))] != 0))
    assert normal["recall"] > 0.9  # each device's threshold passes its own normal rows


def _plan(fleet: Any) -> TrainingPlan:
    return fleet.engine.config.plan_for(fleet.version)


@pytest.mark.slow
def test_a_gateway_without_labels_trains_an_autoencoder_and_reports_anomaly_scores(
    tmp_path: Path, autoencoder: tuple[bytes, Any], regressor: tuple[bytes, Any]
) -> None:
    from fleetlearn.device.agent import ArrayData, DeviceAgent
    from fleetlearn.transport.memory import MemoryBroker
    from tests.test_rounds_inmemory import make_fleet

    normal, _ = simdata.device_machine(11, 0, 0, "fan", healthy_only=True).windows(400)
    agent = DeviceAgent(
        participant=make_fleet(3).devices["d00"],
        connector=MemoryBroker().connector,
        password="unused",
        data=ArrayData(normal, None),
        state_dir=tmp_path,
    )
    assert not agent._can_train()  # no model yet: an unlabelled device only runs releases
    agent.trainer = agent._new_trainer(*autoencoder)
    assert agent._can_train()  # unlabelled rows are what an autoencoder learns from
    plan = TrainingPlan(learning_rate=0.1, steps=5, eval_fraction=0.2)
    result = agent._train_sync(agent.trainer, plan)
    assert result.samples > 0
    assert result.class_samples[1] == 0
    # Health: the newest windows (the last ones faulty) scored against the threshold
    # calibrated on this device's own rows.
    faults, labels = simdata.Machine(simdata.MACHINE_TYPES["fan"], np.array([0, 0, 1, 0]),
                                     seed=11).windows(5)  # fmt: skip
    assert set(labels.tolist()) == {2}
    report = agent._task_health(agent.trainer, np.concatenate([normal[-20:], faults]), None)
    assert report["threshold"] == pytest.approx(agent.trainer.calibrate(normal), rel=1e-6)
    assert report["latest"]["anomaly"] is (report["latest"]["score"] > report["threshold"])
    assert report["max_score"] >= report["latest"]["score"]
    assert 0.0 <= report["anomalous_share"] <= 1.0
    # A regressor's health is its prediction; it needs targets to train.
    agent.trainer = agent._new_trainer(*regressor)
    assert not agent._can_train()
    report = agent._task_health(agent.trainer, normal[-8:], None)
    assert set(report) == {"latest", "mean_prediction"}


@pytest.mark.slow
def test_the_aggregator_judges_its_test_set_as_the_task_says(
    regressor: tuple[bytes, Any], autoencoder: tuple[bytes, Any]
) -> None:
    from fleetlearn.aggregator.service import _evaluate_on

    x, rul = simdata.device_machine(12, 0, 0, "pump").run_to_failure(120)
    figures = _evaluate_on(regressor[0], x, rul)
    trainer = LiteRTTrainer(*regressor)
    expected = float(np.abs(trainer.predict_values(x) - rul).mean())
    assert figures["mae"] == pytest.approx(expected, rel=1e-5)
    assert figures["loss"] == figures["mae"]
    assert figures["accuracy"] is None
    xa, ya = simdata.Machine(simdata.MACHINE_TYPES["fan"], simdata.FLEET_MIX, seed=12).windows(200)
    figures = _evaluate_on(autoencoder[0], xa, ya)
    assert figures["reconstruction_error"] == pytest.approx(
        float(LiteRTTrainer(*autoencoder).anomaly_scores(xa).mean()), rel=1e-5
    )
    assert [c["label"] for c in figures["per_class"]] == ["normal", "anomaly"]
    assert figures["per_class"][1]["samples"] == int(np.sum(ya != 0))


@pytest.mark.slow
def test_pretraining_an_autoencoder_needs_no_labels(autoencoder: tuple[bytes, Any]) -> None:
    from fleetlearn.aggregator.pretrain import pretrain

    x, _ = simdata.device_machine(13, 0, 0, "fan", healthy_only=True).windows(500)
    result = pretrain(autoencoder[0], x, None, epochs=10, learning_rate=0.1)
    assert result.manifest.task is tflite.Task.ANOMALY
    assert result.manifest.labels == ("normal", "anomaly")
    assert result.after.loss < 0.7 * result.before.loss  # reconstruction error, held out
    assert result.trained_rows + result.held_out == 500

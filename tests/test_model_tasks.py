"""Tasks beyond classification (issue 16): a regressor of remaining useful life and an
autoencoder for anomaly detection, each built from Keras, trained by LiteRT, released, and
federated in secure rounds; their evaluation figures on `metrics`.

The builds need TensorFlow (slow); the scoring functions are pure and tested first.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from fleetlearn.shared import dataset, evaluation, settings, tflite, wire
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
    # A diverged model's NaN scores are alarms: never a perfect specificity.
    diverged = evaluation.score_anomaly(np.array([np.nan, 0.1]), None, threshold=0.5)
    assert diverged.class_correct == (1, 0)


def test_y_that_does_not_fit_the_task_is_named_before_it_is_used() -> None:
    ints, floats = np.array([0, 1]), np.array([0.5, 1.0])
    assert evaluation.y_problem(tflite.Task.CLASSIFICATION, ints) == ""
    assert "integer class labels" in evaluation.y_problem(tflite.Task.CLASSIFICATION, floats)
    assert "labelled rows" in evaluation.y_problem(tflite.Task.CLASSIFICATION, None)
    assert evaluation.y_problem(tflite.Task.REGRESSION, floats) == ""
    assert evaluation.y_problem(tflite.Task.REGRESSION, ints) == ""  # e.g. cycles as integers
    assert evaluation.y_problem(tflite.Task.ANOMALY, None) == ""
    assert "row kinds" in evaluation.y_problem(tflite.Task.ANOMALY, floats)


def test_float_targets_for_a_classifier_cost_the_figure_not_the_aggregator() -> None:
    from fleetlearn.aggregator.service import _evaluate_on
    from tests.model_fixtures import shipped_model

    x = np.zeros((4, simdata.N_FEATURES), np.float32)
    with pytest.raises(ValueError, match="integer class labels"):
        evaluation.evaluate_model(shipped_model(), x, np.array([0.0, 1.0, 2.0, 3.5]))
    figures = _evaluate_on(shipped_model(), x, np.array([0.0, 1.0, 2.0, 3.5]))
    assert "integer class labels" in figures["error"]


def test_release_signatures_of_classifiers_cover_what_they_did_before_tasks() -> None:
    from fleetlearn.shared.release import _release_header

    spec = tflite.WeightSpec(name="w", shape=(2,))
    plain = tflite.ModelManifest(
        model_id="m", version=3, layout=(spec,), content_hash=bytes(range(32)), labels=("a", "b")
    )
    header = _release_header(plain, 100, b"zst")
    regressor = dataclasses.replace(plain, labels=(), task=tflite.Task.REGRESSION)
    with_task = _release_header(regressor, 100, b"zst")
    assert with_task.endswith(b"regression")
    assert with_task != _release_header(dataclasses.replace(regressor, task=tflite.Task.ANOMALY),
                                        100, b"zst")  # fmt: skip
    # The bytes a classifier's release signs, as computed before tasks existed (3e21639).
    golden = "fb3ba55eb42b01a8d6c5892832948951d8a86dc43528cdfae723f6d9610e11c6"
    assert hashlib.sha256(header).hexdigest() == golden


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
    assert unlabelled.class_samples[0] == unlabelled.samples  # every row counts as normal


def _held(x: np.ndarray, plan: TrainingPlan) -> np.ndarray:
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
    announced: list[Any] = []
    start_round = fleet.engine.start_round

    def tap(**kwargs: Any) -> Any:
        published = start_round(**kwargs)
        announced.append(fleet.engine.announce)
        return published

    fleet.engine.start_round = tap  # type: ignore[method-assign]  # to read the SecAgg config
    history = [fleet.run_round() for _ in range(5)]
    assert [m["state"] for m in history] == ["closed"] * 5
    first, last = history[0], history[-1]
    assert last["task"] == "regression"
    assert last["accuracy"] is None
    assert "per_class" not in last
    # The secure sum of the devices' mean absolute errors, weighted by their held-out rows,
    # is what each device computed (the simulator sees every device; the aggregator only sums).
    results = list(fleet.round_results.values())
    assert last["samples"] == sum(r.samples for r in results) > 0
    expected = sum(r.loss * r.samples for r in results) / last["samples"]
    # Each device's loss sum travels stochastically rounded to a grid over [0, max_loss x
    # max_samples]: off by less than one step per device.
    cfg = announced[-1].secagg
    step = cfg.max_loss * cfg.max_samples / (2**cfg.float_extra_bits - 1)
    assert abs(last["mae"] - expected) <= len(results) * step / last["samples"]
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
    from tests.model_fixtures import shipped_model
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
    # Health: recent windows scored against the threshold calibrated on this device's own
    # training rows (not the held-out ones). Trained a while longer, the autoencoder flags
    # far more windows of an unbalanced machine than of this one.
    agent.trainer.train(normal, None, epochs=20, learning_rate=0.1, rng=np.random.default_rng(1))
    faults, labels = simdata.Machine(simdata.MACHINE_TYPES["fan"], np.array([0, 0, 1, 0]),
                                     seed=11).windows(200)  # fmt: skip
    assert set(labels.tolist()) == {2}
    fresh, _ = simdata.device_machine(11, 0, 0, "fan", healthy_only=True).windows(600)
    healthy = agent._task_health(agent.trainer, fresh[400:], None)  # the same machine, later
    faulty = agent._task_health(agent.trainer, faults, None)
    train_rows = ~dataset.evaluation_rows(normal, plan.eval_fraction)
    threshold = agent.trainer.calibrate(normal[train_rows])
    assert healthy["threshold"] == faulty["threshold"] == pytest.approx(threshold, rel=1e-5)
    assert faulty["latest"]["anomaly"] is (faulty["latest"]["score"] > faulty["threshold"])
    assert healthy["anomalous_share"] < 0.1
    assert faulty["anomalous_share"] > healthy["anomalous_share"] + 0.3, (healthy, faulty)
    # Whether the data fit the task decides eligibility: float targets train a regressor,
    # not an autoencoder (which needs integer row kinds) and not a classifier.
    unlabelled, targets = agent.data, ArrayData(normal, np.linspace(0, 1, len(normal)))
    agent.data = targets
    assert not agent._can_train()
    agent.trainer = agent._new_trainer(*regressor)
    assert agent._can_train()
    agent.data = unlabelled
    assert not agent._can_train()
    agent.trainer = agent._new_trainer(shipped_model(), tflite.read_manifest(shipped_model()))
    agent.data = targets
    assert not agent._can_train()
    agent.data = ArrayData(normal, np.arange(len(normal)) % 4)  # the 4 classes it has
    assert agent._can_train()
    agent.data = ArrayData(normal, np.arange(len(normal)) % 8)  # labels beyond its classes
    assert not agent._can_train()
    # A regressor's health is its prediction.
    agent.trainer = agent._new_trainer(*regressor)
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


@pytest.mark.slow
async def test_healthy_only_gateways_federate_an_autoencoder_over_mosquitto(
    tmp_path: Path, autoencoder: tuple[bytes, Any]
) -> None:
    """The whole path over a real broker: gateways without labels (healthy machines) are
    eligible for an autoencoder, train it in secure rounds, and publish anomaly health."""
    import json
    import subprocess

    from fleetlearn.broker import provision as prov
    from fleetlearn.device.agent import ArrayData
    from fleetlearn.shared import topics
    from tests.conftest import require_mosquitto
    from tests.fleet_harness import fleet

    require_mosquitto()
    model = tmp_path / "ae.tflite"
    model.write_bytes(autoencoder[0])

    def healthy(index: int) -> ArrayData:
        x, _ = simdata.device_machine(14, index, 0, "fan", healthy_only=True).windows(200)
        return ArrayData(x, None)  # no labels at all

    async with fleet(tmp_path, 4) as h:
        h.data_for = healthy
        h.start_devices()
        _, summaries = await h.run_aggregator(
            timeout=150, **{"rounds.count": "2", "model.initial": str(model)}
        )
        assert [s.state for s in summaries] == ["closed", "closed"]
        for summary in summaries:
            m = summary.metrics
            assert m["task"] == "anomaly"
            assert m["survivors"] >= 3  # secure rounds close without a straggler too
            assert m["reconstruction_error"] > 0
            assert m["per_class"][1]["samples"] == 0  # healthy-only: no faulty rows to judge
        password = prov.dashboard_password(h.fleet_dir)
        device = h.devices[0]
        out = subprocess.run(
            ["mosquitto_sub", "-h", h.broker.host, "-p", str(h.broker.port), "-u", "dashboard",
             "-P", password, "-t", topics.health(h.fleet, device), "-C", "1", "-W", "10"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        health = json.loads(out.stdout)
        assert health["device_id"] == device
        assert health["model_version"] >= 2
        assert isinstance(health["threshold"], float)
        assert set(health["latest"]) == {"score", "anomaly"}
        assert health["anomalous_share"] < 0.2  # its own healthy machine, now and then noisy

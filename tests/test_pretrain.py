"""Cold start (issue 16): `fleetlearn model pretrain` trains a built model on proxy data with
LiteRT alone, and the fleet federates from it: its round 0 is already better than chance on
the devices' held-out rows."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetlearn import cli as fleetlearn
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.pretrain import pretrain
from fleetlearn.firmware_sim import data as simdata
from fleetlearn.firmware_sim.inmemory import InMemoryFleet
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import settings, tflite
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.training import LiteRTTrainer, TrainerError
from tests.model_fixtures import shipped_model

TYPES = tuple(simdata.MACHINE_TYPES)


def proxy(path: Path, *, seed: int = 77, machines: int = 12, rows: int = 150) -> Path:
    """Proxy data: machines of another fleet (another seed) than the one that federates."""
    parts = [
        simdata.device_machine(seed, i, i % 5, TYPES[i % 3]).windows(rows) for i in range(machines)
    ]
    np.savez(path, x=np.concatenate([p[0] for p in parts]), y=np.concatenate([p[1] for p in parts]))
    return path


def test_pretrain_writes_version_1_with_trained_weights_and_no_tensorflow(tmp_path: Path) -> None:
    data = proxy(tmp_path / "proxy.npz")
    out = tmp_path / "pre.tflite"
    model = tmp_path / "built.tflite"
    model.write_bytes(shipped_model())
    # A fresh interpreter proves the command needs no TensorFlow (it is installed here).
    script = (
        "import sys; from fleetlearn import cli; "
        f"code = cli.main(['model', 'pretrain', '--model', {str(model)!r}, '--data', "
        f"{str(data)!r}, '--epochs', '3', '--out', {str(out)!r}]); "
        "assert 'tensorflow' not in sys.modules, 'pretrain imported TensorFlow'; "
        "sys.exit(code)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "pdm-default v1 (classification) pretrained on" in run.stdout
    base = tflite.read_manifest(shipped_model())
    written = tflite.read_manifest(out.read_bytes())
    assert base is not None
    assert written is not None
    assert written.version == 1
    assert (written.model_id, written.layout, written.labels, written.task) == (
        base.model_id,
        base.layout,
        base.labels,
        base.task,
    )
    assert tflite.content_hash(out.read_bytes()) == written.content_hash
    before = LiteRTTrainer(shipped_model(), base).flat_weights()
    after = LiteRTTrainer(out.read_bytes(), written).flat_weights()
    assert np.all(np.isfinite(after))
    assert not np.allclose(before, after)


def test_pretrained_round_0_beats_chance_on_the_fleets_held_out_rows(tmp_path: Path) -> None:
    xp = np.load(proxy(tmp_path / "proxy.npz"))
    result = pretrain(shipped_model(), xp["x"], xp["y"], epochs=5, learning_rate=0.05, seed=0)
    assert result.after.accuracy > result.before.accuracy + 0.3

    def round_one(model: bytes) -> float:
        agg = settings.load(AggregatorSettings)
        config = dataclasses.replace(
            agg.engine_config(), mode="secure", cohort=10, over_select=1.0, min_cohort=5
        )
        fleet = InMemoryFleet(10, config, Scenario(), optimizer=agg.optimizer_config(),
                              model=model, seed=1)  # fmt: skip
        metrics = fleet.run_round()
        assert metrics["state"] == "closed"
        assert metrics["model_version"] == 1
        return float(metrics["accuracy"])  # the release as it was, on held-out rows

    cold, warm = round_one(shipped_model()), round_one(result.model)
    # Four classes, about 55% healthy: round 0 of the pretrained model beats both chance and
    # always answering "healthy"; the model as built does not.
    assert warm > 0.7, (cold, warm)
    assert warm > cold + 0.3, (cold, warm)


def test_pretrain_refuses_what_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "built.tflite"
    model.write_bytes(shipped_model())
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((50, 3)), y=np.zeros(50, np.int64))
    argv = ["model", "pretrain", "--model", str(model), "--out", str(tmp_path / "o.tflite")]
    assert fleetlearn.main([*argv, "--data", str(wide), "--epochs", "1"]) == 2
    assert "features must be [n, 16]" in capsys.readouterr().err
    data = proxy(tmp_path / "proxy.npz", machines=2, rows=20)
    assert fleetlearn.main([*argv, "--data", str(data), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert fleetlearn.main([*argv, "--data", str(data), "--epochs", "1", "--learning-rate",
                            "nan"]) == 2  # fmt: skip
    assert "--learning-rate" in capsys.readouterr().err
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(b"not a model")
    assert fleetlearn.main(["model", "pretrain", "--model", str(bare), "--data", str(data),
                            "--epochs", "1", "--out", str(tmp_path / "o.tflite")]) == 2  # fmt: skip
    assert not (tmp_path / "o.tflite").exists()
    with pytest.raises(ConfigError) as caught:
        pretrain(shipped_model(), np.zeros((4, 16)), np.zeros(4, np.int64), epochs=1,
                 learning_rate=0.1, eval_fraction=1.0)  # fmt: skip
    assert caught.value.key == "--eval-fraction"
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((10, 16)), y=np.linspace(0, 1, 10))
    assert fleetlearn.main([*argv, "--data", str(floats), "--epochs", "1"]) == 2
    assert "needs integer class labels" in capsys.readouterr().err
    out_dir = tmp_path / "not-yet"
    flags = ["--data", str(data), "--epochs", "1", "--seed", "-1"]
    code = fleetlearn.main(
        ["model", "pretrain", "--model", str(model), *flags, "--out", str(out_dir / "o.tflite")]
    )
    assert code == 2
    assert "--seed" in capsys.readouterr().err
    assert not out_dir.exists()  # flags are checked before anything is created or read
    with pytest.raises(TrainerError, match="labels must lie"):
        pretrain(shipped_model(), np.zeros((40, 16)), np.full(40, 9), epochs=1, learning_rate=0.1)

"""Aggregator building blocks: aggregation rules, server optimizers, settings, the store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.cli import load_settings
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.store import Store, StoreError
from fleetlearn.cli import build_parser
from fleetlearn.shared import settings
from fleetlearn.shared.errors import ConfigError

# ------------------------------------------------------------------------------------ rules


def test_weighted_mean() -> None:
    got = rules.aggregate([np.array([1.0, 0.0]), np.array([3.0, 4.0])], [1.0, 3.0])
    assert np.allclose(got, [2.5, 3.0])


def test_median_and_trimmed_mean_ignore_outliers() -> None:
    honest = [np.full(4, v) for v in (0.9, 1.0, 1.1, 1.0, 0.95)]
    poisoned = [*honest, np.full(4, 1e6), np.full(4, -1e6)]
    w = [1.0] * len(poisoned)
    assert np.allclose(rules.aggregate(poisoned, w, rule="median"), 1.0)
    assert np.allclose(rules.aggregate(poisoned, w, rule="trimmed", trim=0.2), 0.99, atol=0.02)
    skewed = [*honest, np.full(4, 1e6)]
    assert rules.aggregate(skewed, [1.0] * 6, rule="mean")[0] > 1e5


def test_norm_clipping_bounds_each_update() -> None:
    big = np.full(4, 100.0)
    clipped = rules.clip_to_norm(big, 2.0)
    assert np.isclose(np.linalg.norm(clipped), 2.0)
    assert np.allclose(rules.clip_to_norm(np.array([0.1, 0.1]), 2.0), [0.1, 0.1])
    got = rules.aggregate([big, np.zeros(4)], [1.0, 1.0], clip_norm=2.0)
    assert np.isclose(np.linalg.norm(got), 1.0)


def test_rules_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="no updates"):
        rules.aggregate([], [])
    with pytest.raises(ValueError, match="positive sum"):
        rules.aggregate([np.ones(2)], [0.0])
    with pytest.raises(ValueError, match="trim"):
        rules.aggregate([np.ones(2)], [1.0], rule="trimmed", trim=0.6)


def test_fedavg_fedavgm_fedadam_steps() -> None:
    w = np.zeros(3, dtype=np.float32)
    update = np.array([1.0, -2.0, 0.5])
    avg = rules.ServerOptimizer(rules.OptimizerConfig(name="fedavg", lr=0.5))
    assert np.allclose(avg.step(w, update), [0.5, -1.0, 0.25])
    mom = rules.ServerOptimizer(rules.OptimizerConfig(name="fedavgm", lr=1.0, momentum=0.5))
    first = mom.step(w, update)
    second = mom.step(first, update)
    assert np.allclose(second - first, 1.5 * update)  # m = 0.5 * m + u
    adam = rules.ServerOptimizer(rules.OptimizerConfig(name="fedadam", lr=0.1))
    stepped = adam.step(w, update)
    assert np.all(np.sign(stepped) == np.sign(update))
    assert np.all(np.abs(stepped) <= 0.1 / (1 - 0.99) ** 0.5 + 1e-6)
    assert set(adam.state) == {"m", "v"}
    with pytest.raises(ValueError, match="NaN"):
        avg.step(w, np.array([np.nan, 0, 0]))
    with pytest.raises(ConfigError, match=r"server\.lr"):
        rules.OptimizerConfig(lr=0)


# --------------------------------------------------------------------------------- settings


def test_settings_layers_and_errors(tmp_path: Path) -> None:
    toml = '[rounds]\ncohort = 30\nmode = "plain"\n[broker]\nurl = "mqtt://a:1"\n'
    env = {"FLEETLEARN_ROUNDS_COHORT": "40", "FLEETLEARN_SERVER_LR": "0.5", "UNRELATED": "x"}
    s = settings.load(AggregatorSettings, toml_text=toml, env=env, sets={"rounds.cohort": "50"})
    assert s.rounds.cohort == 50  # --set beats env beats file
    assert s.rounds.mode == "plain"
    assert s.server.lr == 0.5
    assert s.broker.url == "mqtt://a:1"
    again = settings.load(AggregatorSettings, toml_text=settings.to_toml(s))
    assert again == s
    cases = {
        ("[rounds]\ncohort = 'x'\n", None): "rounds.cohort",
        ("[rounds]\nmode = 'turbo'\n", None): "rounds.mode",
        ("[nope]\n", None): "nope",
        ("[rounds]\nnope = 1\n", None): "rounds.nope",
        ("rounds = 3\n", None): "rounds",
        ("[fleet]\nid = 'a/b'\n", None): "fleet.id",
        ("[rounds]\nbattery_floor = 2.0\n", None): "rounds.battery_floor",
        ("[", None): "config",
    }
    for (text, _), key in cases.items():
        with pytest.raises(ConfigError) as info:
            settings.load(AggregatorSettings, toml_text=text)
        assert info.value.key == key, (text, info.value)
    with pytest.raises(ConfigError) as info:
        settings.load(AggregatorSettings, env={"FLEETLEARN_TRAINING_EPOCHS": "many"})
    assert info.value.key == "training.epochs"


def test_cross_field_rules_name_the_key() -> None:
    for sets, key in [
        ({"compression.sparsity": "top_k"}, "compression.sparsity"),
        # top-k is biased: without error feedback small coordinates would never be sent.
        ({"rounds.mode": "plain", "compression.sparsity": "top_k"}, "training.error_feedback"),
        ({"rounds.mode": "secure", "aggregation.rule": "median"}, "aggregation.rule"),
        # [stages] values are durations: a hard limit below its own soft limit is the error.
        ({"stages.share": "40", "stages.share_hard": "30"}, "stages.share_hard"),
        ({"stages.quorum": "0"}, "stages.quorum"),
        ({"rounds.stall_cooldown": "-1"}, "rounds.stall_cooldown"),
        ({"compression.density": "0"}, "compression.density"),
        ({"rounds.min_cohort": "2"}, "rounds.min_cohort"),
    ]:
        with pytest.raises(ConfigError) as info:
            settings.load(AggregatorSettings, sets=sets).engine_config()
        assert info.value.key == key, (sets, info.value)


def test_aggregator_cli_flags_override(tmp_path: Path) -> None:
    conf = tmp_path / "agg.toml"
    conf.write_text("[rounds]\ncohort = 7\n")
    args = build_parser().parse_args(
        ["aggregator", "--config", str(conf), "--mode", "plain", "--set", "aggregation.rule=median"]
    )
    s = load_settings(args, {"FLEETLEARN_ROUNDS_COUNT": "3"})
    assert (s.rounds.cohort, s.rounds.mode, s.rounds.count, s.aggregation.rule) == (
        7,
        "plain",
        3,
        "median",
    )
    bad = build_parser().parse_args(["aggregator", "--set", "rounds.cohort"])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_settings(bad, {})


# ------------------------------------------------------------------------------------ store


def test_store_versions_rounds_and_state(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.latest_release() is None
    store.save_release(1, None, "aa", b"release-1", b"model-1", 1.0)
    with pytest.raises(StoreError, match="does not follow"):
        store.save_release(3, 1, "cc", b"r3", b"m3", 2.0)
    store.begin_round(1, "secure", 1, ["d1", "d2"], 2.0, announce=b"ann")
    assert store.interrupted_rounds() == [1]
    store.save_release(2, 1, "bb", b"release-2", b"model-2", 3.0)
    store.finish_round(1, status="done", metrics={"accuracy": 0.5}, new_version=2, now=4.0)
    with pytest.raises(StoreError, match="not running"):
        store.finish_round(1, status="done", now=5.0)
    store.save_arrays("optimizer", {"m": np.arange(3.0)})
    store.close()

    reopened = Store(tmp_path)
    latest = reopened.latest_release()
    assert latest is not None
    assert (latest.version, latest.payload) == (2, b"release-2")
    assert reopened.model_bytes(2) == b"model-2"
    assert reopened.next_round_id() == 2
    assert reopened.announce_of(1) == b"ann"
    (row,) = reopened.rounds()
    assert (row.status, row.new_version, row.metrics["accuracy"]) == ("done", 2, 0.5)
    assert np.array_equal(reopened.load_arrays("optimizer")["m"], np.arange(3.0))
    reopened.close()


def test_store_refuses_corrupt_state(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_release(1, None, "aa", b"r", b"m", 1.0)
    (tmp_path / "releases" / "v1.release").unlink()
    with pytest.raises(StoreError, match="unreadable"):
        store.latest_release()
    db = sqlite3.connect(tmp_path / "fleetlearn.sqlite3")
    db.execute("INSERT INTO kv (key, value) VALUES ('optimizer', x'00ff')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="corrupt"):
        store.load_arrays("optimizer")
    store.close()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "fleetlearn.sqlite3").write_text("not a database")
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "x")


def test_store_database_never_appears_without_its_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone polling the state directory while the aggregator starts (a dashboard, an
    operator, a test waiting for a round) sees no database or a complete one; a half-made one
    raised `no such table: rounds` (issue 13, item 9). Checked before every statement the
    store runs while it opens the database, so no timing is involved."""
    path = tmp_path / "state" / "fleetlearn.sqlite3"
    real_connect = sqlite3.connect
    looks: list[bool] = []

    def reader(_statement: str) -> None:
        if not path.exists():
            return
        db = real_connect(path)
        try:
            found = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'rounds'"
            ).fetchone()[0]
        finally:
            db.close()
        looks.append(bool(found))

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(reader)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)
    store = Store(tmp_path / "state")
    store.begin_round(1, "secure", 1, ["d1"], 1.0)
    store.close()
    assert looks, "the reader never found the database"
    assert all(looks), f"{looks.count(False)} looks found the database without its tables"
    monkeypatch.undo()
    again = Store(tmp_path / "state")  # an existing database opens as before
    assert again.interrupted_rounds() == [1]
    again.close()


def test_expected_dropout_sizes_the_neighbour_graph() -> None:
    import os

    from nacl.signing import SigningKey

    from fleetlearn.aggregator.engine import EngineConfig, RoundEngine
    from fleetlearn.shared import wire
    from fleetlearn.shared.secagg.config import default_neighbours, suggest_neighbours

    ids = [f"d{i:03d}" for i in range(60)]
    keys = {d: bytes(SigningKey.generate().verify_key) for d in ids}
    for dropout, expected in ((0.0, default_neighbours(60)), (0.1, suggest_neighbours(60, 0.1)[0])):
        config = EngineConfig(cohort=60, over_select=1.0, expected_dropout=dropout)
        engine = RoundEngine(fleet="f", config=config, verify_keys=keys, random=os.urandom)
        for d in ids:
            engine.observe_status(
                d,
                wire.encode(
                    wire.DeviceStatus(
                        device_id=d, online=True, model_version=1, ticket=os.urandom(16)
                    )
                ),
                0.0,
            )
        engine.start_round(round_id=1, model_version=1, dim=1000, now=0.0)
        assert engine.announce is not None
        assert engine.announce.secagg is not None
        assert engine.announce.secagg.neighbours == expected
    assert suggest_neighbours(60, 0.1)[0] > default_neighbours(60)
    with pytest.raises(ConfigError) as info:
        settings.load(AggregatorSettings, sets={"secagg.expected_dropout": "1.5"}).engine_config()
    assert info.value.key == "secagg.expected_dropout"


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"training.lr_decay": "0.1"}, "training.lr_decay"),
        ({"rounds.min_cohort": "2"}, "rounds.min_cohort"),
        ({"rounds.cohort": "5", "rounds.min_cohort": "6"}, "rounds.cohort"),
        ({"secagg.expected_dropout": "1.0"}, "secagg.expected_dropout"),
        ({"rounds.over_select": "0.5"}, "rounds.over_select"),
        ({"stages.quorum": "2"}, "stages.quorum"),
        ({"compression.sparsity": "top_k"}, "compression.sparsity"),
        ({"compression.sparsity": "top_k", "rounds.mode": "plain"}, "training.error_feedback"),
        ({"aggregation.rule": "median"}, "aggregation.rule"),
    ],
)
def test_engine_setting_errors_name_their_key(sets: dict[str, str], key: str) -> None:
    """The engine names the setting at fault as a field of its error, never only in text."""
    from fleetlearn.aggregator.engine_config import EngineError
    from fleetlearn.shared import settings
    from fleetlearn.shared.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        settings.load(AggregatorSettings, sets=sets).engine_config()
    assert caught.value.key == key
    assert not str(caught.value).startswith(f"{key}: {key}")
    engine_found = isinstance(caught.value.__context__, EngineError)
    # Ranges the settings layer checks itself never reach the engine; the rest are the
    # engine's own refusals, named by its error's key.
    assert engine_found == (key not in SETTINGS_CHECKED), caught.value.__context__


# Refused by the settings layer before the engine sees them (its own range checks).
SETTINGS_CHECKED = {"training.lr_decay", "rounds.over_select"}


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("lr_decay", 0.1, "training.lr_decay"),
        ("over_select", 0.5, "rounds.over_select"),
        ("stall_cooldown", -1.0, "rounds.stall_cooldown"),
        ("quorum", 0.0, "stages.quorum"),
    ],
)
def test_the_engine_names_the_key_of_each_value_it_refuses(
    field: str, value: float, key: str
) -> None:
    import dataclasses

    from fleetlearn.aggregator.engine_config import EngineError
    from fleetlearn.shared import settings

    good = settings.load(AggregatorSettings).engine_config()
    with pytest.raises(EngineError) as caught:
        dataclasses.replace(good, **{field: value})
    assert caught.value.key == key

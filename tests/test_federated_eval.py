"""Federated evaluation: devices judge the round's model on rows they never train on, and in
secure mode the aggregator learns the fleet's sums only.

The engine-level test drives real participants and the real engine (tests/test_rounds_inmemory
wiring); the LiteRT-level tests use the shipped model through `device.trainer.local_round`, the
function every device and simulator runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlearn.device.agent import ArrayData
from fleetlearn.device.trainer import LiteRTTrainer, local_round
from fleetlearn.shared import compression, dataset, evaluation, rounds, tflite, topics, wire
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg import packing
from tests.fleet_harness import machine_csv, memory_fleet
from tests.model_fixtures import blobs, shipped_model
from tests.test_rounds_inmemory import FLEET, make_fleet, run_round

EVAL_KEYS = {
    "loss",
    "mean_loss",
    "accuracy",
    "correct",
    "samples",
    "local_correct",
    "class_samples",
    "class_correct",
    "per_class",
    "recall",
}
LABELS = ("healthy", "bearing_wear", "imbalance")


def _figures(index: int) -> tuple[float, int, int, int]:
    """Device i's (loss, correct, samples, local_correct): different for every device."""
    samples = 20 + 3 * index
    return 0.2 + 0.1 * index, 2 + index, samples, min(samples, 9 + 2 * index)


def _class_counts(index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Device i's per-class rows and hits, consistent with `_figures(i)`: rows sum to its
    samples, hits to its correct count."""
    _, correct, samples, _ = _figures(index)
    rows = (samples - 7 - index, 7, index)
    hits = (correct - min(correct, 3), min(correct, 3), 0)
    return rows, hits


def _expected_per_class(n: int) -> list[dict[str, Any]]:
    rows = [sum(_class_counts(i)[0][c] for i in range(n)) for c in range(len(LABELS))]
    hits = [sum(_class_counts(i)[1][c] for i in range(n)) for c in range(len(LABELS))]
    return [
        {"label": lab, "samples": r, "correct": h, "recall": round(h / r, 6) if r else None}
        for lab, r, h in zip(LABELS, rows, hits, strict=True)
    ]


def _mentions_a_device(value: Any, devices: set[str]) -> bool:
    text = json.dumps(value, default=str)
    return any(d in text for d in devices)


def _per_device_eval(value: Any, devices: set[str]) -> list[Any]:
    """Every dict (at any depth) that names a device and carries an evaluation figure."""
    found = []
    if isinstance(value, dict):
        if EVAL_KEYS & set(value) and _mentions_a_device(value, devices):
            found.append(value)
        for v in value.values():
            found += _per_device_eval(v, devices)
    elif isinstance(value, list | tuple):
        for v in value:
            found += _per_device_eval(v, devices)
    return found


def test_secure_round_reveals_evaluation_only_as_sums() -> None:
    """Acceptance 2: each device's held-out loss and hit counts travel only inside its masked
    vector; the aggregator's metrics are the exact fleet sums; nothing it publishes, and
    nothing it keeps in its outcome and events, holds one device's figures."""
    fleet = make_fleet(8)
    figures = {d: _figures(i) for i, d in enumerate(sorted(fleet.devices))}
    fleet.evaluation = figures.__getitem__
    per_class = {d: _class_counts(i) for i, d in enumerate(sorted(fleet.devices))}
    fleet.class_counts = per_class.__getitem__
    fleet.labels = LABELS
    published: list[tuple[str, bytes]] = []
    deliver = fleet.publish

    def recording(pubs: list[Any]) -> None:
        published.extend((p.topic, p.payload) for p in pubs)
        deliver(pubs)

    fleet.publish = recording  # type: ignore[method-assign]
    run_round(fleet)
    outcome = fleet.engine.take_outcome()
    assert outcome is not None
    assert outcome.state is rounds.RoundState.CLOSED, outcome.reason
    assert len(outcome.survivors) == 8

    # The sums, exactly (integers travel exactly; the loss sum on a fine grid).
    samples = sum(f[2] for f in figures.values())
    assert outcome.metrics["samples"] == samples
    assert outcome.metrics["accuracy"] == pytest.approx(
        sum(f[1] for f in figures.values()) / samples, abs=1e-12
    )
    assert outcome.metrics["device_accuracy"] == pytest.approx(
        sum(f[3] for f in figures.values()) / samples, abs=1e-12
    )
    # The loss sum rides on a grid of max_loss * max_samples / (2^bits - 1) per device.
    cfg = wire.decode(fleet.retained[topics.round_announce(FLEET)], rounds.RoundAnnounce).secagg
    assert cfg is not None
    step = cfg.max_loss * cfg.max_samples / ((1 << cfg.float_extra_bits) - 1)
    loss = sum(f[0] * f[2] for f in figures.values()) / samples
    assert outcome.metrics["mean_loss"] == pytest.approx(loss, abs=8 * step / samples)
    # Per class: the exact sums of the rows and hits, with the model's labels.
    assert cfg.classes == len(LABELS)
    assert outcome.metrics["per_class"] == _expected_per_class(8)

    # Uplink: only the secure stages' messages; the figures are in no field, and the masked
    # vector's evaluation words are not the device's own figures (they are masked).
    devices = set(fleet.devices)
    secure_kinds = {sm.Advertise, sm.Shares, sm.MaskedInput, sm.Unmask}
    masked = 0
    for dev, _kind, payload in fleet.sent:
        message = wire.decode(payload)
        assert type(message) in secure_kinds, type(message)
        names = set(getattr(message, "__dataclass_fields__", {}))
        assert not names & EVAL_KEYS, names
        if isinstance(message, sm.MaskedInput):
            masked += 1
            words = packing.unpack(message.masked, cfg.field_bits, cfg.coordinates)
            _, correct, count, local = figures[dev]
            rows, hits = per_class[dev]
            tail = [int(w) for w in words[cfg.dimension + 2 :]]
            cost_words = 4 * cfg.cost_limbs
            assert len(tail) == 3 + cost_words + 2 * len(LABELS)  # counts, cost, per class
            assert tail[:3] != [correct, count, local]  # equal by chance: 2^-57
            assert tail[3 + cost_words :] != [*rows, *hits]
    assert masked == 8

    # Downlink and the aggregator's own record: no dict names a device next to a figure.
    for topic, payload in published:
        try:
            value = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            message = wire.decode(payload)
            names = set(getattr(message, "__dataclass_fields__", {}))
            assert not names & EVAL_KEYS, (topic, names)
            continue
        assert not _per_device_eval(value, devices), topic
    assert not _per_device_eval(outcome.metrics, devices)
    assert not _per_device_eval(list(fleet.engine.events), devices)


def test_plain_round_reports_the_same_figures_per_device() -> None:
    """Plain mode (no secrecy claimed) sums the same figures from each PlainUpdate."""
    fleet = make_fleet(5, mode="plain")
    figures = {d: _figures(i) for i, d in enumerate(sorted(fleet.devices))}
    fleet.evaluation = figures.__getitem__
    per_class = {d: _class_counts(i) for i, d in enumerate(sorted(fleet.devices))}
    fleet.class_counts = per_class.__getitem__
    fleet.labels = LABELS
    run_round(fleet)
    out = fleet.engine.take_outcome()
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    samples = sum(f[2] for f in figures.values())
    assert out.metrics["samples"] == samples
    assert out.metrics["accuracy"] == pytest.approx(sum(f[1] for f in figures.values()) / samples)
    assert out.metrics["device_accuracy"] == pytest.approx(
        sum(f[3] for f in figures.values()) / samples
    )
    assert out.metrics["per_class"] == _expected_per_class(5)


def _release_trainer() -> LiteRTTrainer:
    data = shipped_model()
    manifest = tflite.read_manifest(data)
    assert manifest is not None
    return LiteRTTrainer(data, manifest)


def test_evaluation_counts_rows_and_hits_per_class() -> None:
    logits = np.array([[3, 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3], [0, 3, 0]], np.float32)
    y = np.array([0, 1, 1, 1, 0])
    result = evaluation.score(logits, y)
    assert result.class_samples == (2, 3, 0)
    assert result.class_correct == (1, 1, 0)
    assert result.correct == sum(result.class_correct)
    assert evaluation.score(np.zeros((0, 3), np.float32), y[:0]).class_samples == (0, 0, 0)


def test_a_model_with_more_classes_than_a_masked_vector_carries_reports_totals_only() -> None:
    """Over MAX_CLASSES classes the round still runs; per-class counts are left out."""
    from fleetlearn.shared.secagg.config import MAX_CLASSES

    fleet = make_fleet(5)
    fleet.labels = tuple(f"c{i}" for i in range(MAX_CLASSES + 1))
    run_round(fleet)
    out = fleet.engine.take_outcome()
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert "per_class" not in out.metrics
    assert out.metrics["samples"] > 0


def test_per_class_counts_that_do_not_fit_are_refused_and_counted() -> None:
    """Plain mode: an update whose per-class counts are for another number of classes is
    refused (counted as bad_payload) and the round closes without it; counts that contradict
    their totals do not even decode."""
    fleet = make_fleet(5, mode="plain")
    names = sorted(fleet.devices)
    figures = {d: _figures(i) for i, d in enumerate(names)}
    fleet.evaluation = figures.__getitem__
    per_class = {d: _class_counts(i) for i, d in enumerate(names)}
    odd = names[0]
    rows, hits = per_class[odd]
    per_class[odd] = ((rows[0] + rows[1], rows[2]), (hits[0] + hits[1], hits[2]))  # 2 classes
    fleet.class_counts = per_class.__getitem__
    fleet.labels = LABELS
    run_round(fleet)
    out = fleet.engine.take_outcome()
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert odd not in out.survivors
    assert len(out.survivors) == 4
    assert out.metrics["rejected_by_reason"] == {"bad_payload": 1}
    expected = [sum(per_class[d][0][c] for d in names[1:]) for c in range(len(LABELS))]
    assert [c["samples"] for c in out.metrics["per_class"]] == expected

    update = rounds.PlainUpdate(
        round_id=1,
        sender="d00",
        update=compression.DenseUpdate(values=np.zeros(3, np.float32)),
        weight=10.0,
        loss=0.5,
        correct=5,
        samples=10,
    )
    for bad in (
        {"class_samples": (6, 4), "class_correct": (7, 0)},  # more hits than rows
        {"class_samples": (6, 6), "class_correct": (1, 1)},  # more rows than samples
        {"class_samples": (6, 4), "class_correct": (1,)},  # lengths differ
        {"class_samples": (6, 4), "class_correct": (4, 4)},  # more hits than correct
    ):
        with pytest.raises(wire.WireError):
            dataclasses.replace(update, **bad)


def test_a_device_never_trains_on_its_held_out_rows() -> None:
    """The held-out rows are the same every round, about eval_fraction of them, and nothing
    about them reaches the update: wrong labels on exactly those rows leave the update (same
    shuffle) bit for bit the same."""
    x, y = blobs(400, seed=12)
    held = dataset.evaluation_rows(x, 0.25)
    assert np.array_equal(held, dataset.evaluation_rows(x.copy(), 0.25))
    assert 70 <= held.sum() <= 130
    assert not dataset.evaluation_rows(x[:1], 0.4).any()  # nothing left to train on
    poisoned = y.copy()
    poisoned[held] = (y[held] + 1) % 4  # wrong labels on held-out rows only
    plan = rounds.TrainingPlan(epochs=5, eval_fraction=0.25, learning_rate=0.05)
    clean = local_round(_release_trainer(), x, y, plan, rng=np.random.default_rng(0), personal={})
    dirty = local_round(
        _release_trainer(), x, poisoned, plan, rng=np.random.default_rng(0), personal={}
    )
    np.testing.assert_array_equal(clean.update, dirty.update)
    assert clean.samples == dirty.samples == int(held.sum())
    assert clean.weight == 400 - held.sum()
    # Without personal layers the device runs the release, so its own figure is the release's.
    assert clean.local_correct == clean.correct
    assert dirty.local_correct == dirty.correct


def test_personal_layers_never_leave_the_device_and_are_kept_across_rounds() -> None:
    plan = rounds.TrainingPlan(
        epochs=2,
        eval_fraction=0.2,
        learning_rate=0.05,
        personal=("dense_2_kernel", "dense_2_bias"),
    )
    x, y = blobs(300, seed=13)
    personal: dict[str, np.ndarray] = {}
    trainer = _release_trainer()
    mask = tflite.mask_of(trainer.layout, plan.personal)
    first = local_round(trainer, x, y, plan, rng=np.random.default_rng(1), personal=personal)
    assert set(personal) == set(plan.personal)
    assert not first.update[mask].any()  # zero where the personal layers are
    assert first.update[~mask].any()
    # The trainer stays on the device's own model: release plus its personal layers.
    weights = trainer.get_weights()
    assert all(np.array_equal(weights[n], personal[n]) for n in plan.personal)
    # A new release (here: the same one again) gets the device's personal layers back.
    kept = {n: v.copy() for n, v in personal.items()}
    second_trainer = _release_trainer()
    local_round(second_trainer, x, y, plan, rng=np.random.default_rng(2), personal=personal)
    assert not all(np.array_equal(kept[n], personal[n]) for n in plan.personal)  # trained on
    start = second_trainer.get_weights()
    assert all(np.array_equal(start[n], personal[n]) for n in plan.personal)


def test_training_starts_from_the_devices_own_layers_and_forgets_those_no_longer_personal() -> None:
    """With a rate too small to move anything, the trained personal layers are the ones the
    device kept (far from the release's), so training started from them; a layer the plan no
    longer names personal is dropped and training starts from the release's value of it."""
    trainer = _release_trainer()
    release = tflite.unflatten(trainer.initial, trainer.layout)
    own = {n: release[n] + 0.5 for n in ("dense_2_kernel", "dense_2_bias", "dense_1_bias")}
    personal = {n: v.copy() for n, v in own.items()}
    plan = rounds.TrainingPlan(
        steps=1, eval_fraction=0.2, learning_rate=1e-9, personal=("dense_2_kernel", "dense_2_bias")
    )
    x, y = blobs(100, seed=14)
    result = local_round(trainer, x, y, plan, rng=np.random.default_rng(5), personal=personal)
    assert set(personal) == {"dense_2_kernel", "dense_2_bias"}  # dense_1_bias: stale, dropped
    for name in plan.personal:
        np.testing.assert_allclose(personal[name], own[name], atol=1e-5)
    stale = tflite.mask_of(trainer.layout, ("dense_1_bias",))
    assert np.abs(result.update[stale]).max() < 1e-5  # trained from the release's value
    assert trainer.get_weights()["dense_1_bias"] == pytest.approx(release["dense_1_bias"])


async def test_an_agent_puts_its_stored_personal_layers_into_every_release_it_loads(
    tmp_path: Path,
) -> None:
    """`personal.npz` in the state directory goes into each new interpreter; when a plan has
    no personal layers any more, the file is removed so a restart cannot bring them back."""
    from fleetlearn.device.agent import DeviceAgent
    from fleetlearn.transport.memory import MemoryBroker

    model = shipped_model()
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    release = tflite.unflatten(_release_trainer().initial, manifest.layout)
    own = {"dense_2_bias": release["dense_2_bias"] + 0.25}
    np.savez(tmp_path / "personal.npz", **own)
    x, y = blobs(60, seed=15)
    agent = DeviceAgent(
        participant=make_fleet(3).devices["d00"],
        connector=MemoryBroker().connector,
        password="unused",
        data=ArrayData(x, y),
        state_dir=tmp_path,
    )
    loaded = agent._new_trainer(model, manifest).get_weights()
    np.testing.assert_array_equal(loaded["dense_2_bias"], own["dense_2_bias"])
    np.testing.assert_array_equal(loaded["dense_2_kernel"], release["dense_2_kernel"])
    trainer = agent._new_trainer(model, manifest)
    agent._train_sync(trainer, rounds.TrainingPlan(steps=2, eval_fraction=0.2))
    agent._save_personal()
    assert not (tmp_path / "personal.npz").exists()
    fresh = agent._new_trainer(model, manifest).get_weights()
    np.testing.assert_array_equal(fresh["dense_2_bias"], release["dense_2_bias"])


# ------------------------------------------------------------ through the aggregator service


async def test_aggregator_judges_each_release_on_its_own_test_set_and_keeps_personal_layers(
    tmp_path: Path,
) -> None:
    """`eval.data`: every applied round's summary carries the new release's figures on the
    aggregator's test set, equal to evaluating that release directly; `training.personal`:
    the personal layers of every release stay as first released, while devices train them;
    `training.lr_decay`: each round's announcement carries the scheduled local rate."""
    test_csv = tmp_path / "test.csv"
    rows = machine_csv(test_csv, seed=5, per_machine=40)
    held = dataset.load(test_csv)
    assert held.y is not None
    personal = "dense_2_kernel,dense_2_bias"
    async with memory_fleet(tmp_path, 4) as h:
        h.start_devices()
        service, summaries = await h.run_aggregator(
            timeout=120,
            **{
                "rounds.count": "2",
                "eval.data": str(test_csv),
                "training.personal": personal,
                "training.eval_fraction": "0.25",
                "training.learning_rate": "0.1",
                "training.lr_decay": "0.5",
            },
        )
        agents = dict(h.agents)
    assert [s.state for s in summaries] == ["closed", "closed"]
    first = service.store.model_bytes(1)
    for summary in summaries:
        figures = summary.metrics["server_eval"]
        assert figures["model_version"] == summary.new_version
        model = service.store.model_bytes(figures["model_version"])
        direct = evaluation.evaluate_model(model, held.x, held.y)
        assert figures["samples"] == rows
        assert figures["accuracy"] == pytest.approx(direct.accuracy, abs=1e-6)
        assert figures["loss"] == pytest.approx(direct.loss, abs=1e-5)
        labels = tflite.read_manifest(model).labels  # type: ignore[union-attr]
        assert [c["samples"] for c in figures["per_class"]] == list(direct.class_samples)
        assert [c["correct"] for c in figures["per_class"]] == list(direct.class_correct)
        assert [c["label"] for c in figures["per_class"]] == list(labels)
        # Federated evaluation ran too, on the devices' held-out quarter, also per class.
        assert summary.metrics["samples"] > 0
        assert summary.metrics["device_accuracy"] is not None
        fed = summary.metrics["per_class"]
        assert [c["label"] for c in fed] == list(labels)
        assert sum(c["samples"] for c in fed) == summary.metrics["samples"]
        hits = sum(c["correct"] for c in fed)
        assert hits == round(summary.metrics["accuracy"] * summary.metrics["samples"])
        names = personal.split(",")
        before, after = tflite.read_weights(first, names), tflite.read_weights(model, names)
        assert all(np.array_equal(before[n], after[n]) for n in names)
    # Devices trained their own personal layers, and they differ from the released ones.
    for agent in agents.values():
        assert set(agent._personal) == set(personal.split(","))
        assert not np.array_equal(agent._personal["dense_2_bias"], before["dense_2_bias"])
    rates = [s.metrics["learning_rate"] for s in summaries]
    assert rates == pytest.approx([0.1, 0.05])


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"eval.data": "missing.csv"}, "eval.data"),
        ({"training.personal": "dense_9_kernel"}, "training.personal"),
        ({"training.lr_decay": "2"}, "training.lr_decay"),
        ({"training.eval_fraction": "0.9"}, "training.eval_fraction"),
        ({"training.prox_mu": "-1"}, "training.prox_mu"),
    ],
)
async def test_bad_evaluation_and_training_settings_name_their_key(
    tmp_path: Path, sets: dict[str, str], key: str
) -> None:
    async def start() -> None:
        await asyncio.wait_for(h.aggregator(**sets).run(), 30)

    async with memory_fleet(tmp_path, 3) as h:
        with pytest.raises(ConfigError) as caught:
            await start()
    assert caught.value.key == key


async def test_an_unlabelled_device_runs_inference_only_and_is_never_selected(
    tmp_path: Path,
) -> None:
    """A device whose data has no labels says `inference_only` in its status, is left out of
    every cohort, and still loads each release and publishes its predictions."""
    async with memory_fleet(tmp_path, 5) as h:
        *trainers, reader = h.devices
        for i, dev in enumerate(trainers):
            h.start_device(dev, i)
        agent = h.make_agent(reader, 4)
        assert isinstance(agent.data, ArrayData)
        agent.data = ArrayData(agent.data.x, None)  # the same rows, without labels
        h.agents[reader] = agent
        h.tasks[reader] = asyncio.create_task(agent.run())
        service, summaries = await h.run_aggregator(
            timeout=120, **{"rounds.count": "2", "rounds.cohort": "4"}
        )
        assert [s.state for s in summaries] == ["closed", "closed"]
        assert all(reader not in s.survivors for s in summaries)
        assert all(s.metrics["cohort"] == 4 for s in summaries)
        status = service.engine._devices.status(reader)
        assert status is not None
        assert status.eligibility is wire.Eligibility.INFERENCE_ONLY
        # It loaded the releases (v1 and at least v2) and never trained.
        assert agent.stats.releases_loaded >= 2
        assert agent.stats.rounds_trained == 0


def test_held_out_rows_stay_held_out_whatever_window_of_the_data_a_device_reads() -> None:
    """A row's side depends on its features only: another max_samples, another eval_fraction
    upwards, appended rows or dropped old rows never move a held-out row into training. With
    wrong labels on the rows held out of the whole data, every window trains bit for bit as
    with the right labels."""
    x, y = blobs(600, seed=31)
    held = dataset.evaluation_rows(x, 0.2)
    for start, stop in ((0, 600), (250, 600), (0, 333), (101, 480)):
        assert np.array_equal(dataset.evaluation_rows(x[start:stop], 0.2), held[start:stop])
    assert not (held & ~dataset.evaluation_rows(x, 0.3)).any()  # a larger share only adds
    repeated = np.concatenate([x, x[:50]])
    assert np.array_equal(dataset.evaluation_rows(repeated, 0.2)[600:], held[:50])
    poisoned = y.copy()
    poisoned[held] = (y[held] + 1) % 4
    for max_samples in (120, 300, 600):
        plan = rounds.TrainingPlan(
            steps=8, eval_fraction=0.2, learning_rate=0.05, max_samples=max_samples
        )
        window = slice(-(max_samples + 40), None)
        clean = local_round(
            _release_trainer(),
            x[window],
            y[window],
            plan,
            rng=np.random.default_rng(1),
            personal={},
        )
        dirty = local_round(
            _release_trainer(),
            x[window],
            poisoned[window],
            plan,
            rng=np.random.default_rng(1),
            personal={},
        )
        np.testing.assert_array_equal(clean.update, dirty.update)
        assert clean.samples == min(int(held[window].sum()), max_samples)


def test_own_model_figures_are_of_the_model_the_device_runs_and_divergence_keeps_old_layers() -> (
    None
):
    """`local_correct` judges what the device runs after the round (release plus its personal
    layers); a round whose training diverged does not overwrite the personal layers."""
    plan = rounds.TrainingPlan(
        steps=10, eval_fraction=0.25, learning_rate=0.05, personal=("dense_2_bias",)
    )
    x, y = blobs(200, seed=21)
    personal: dict[str, np.ndarray] = {}
    trainer = _release_trainer()
    result = local_round(trainer, x, y, plan, rng=np.random.default_rng(3), personal=personal)
    held = dataset.evaluation_rows(x, 0.25)
    assert result.local_correct == trainer.evaluate(x[held], y[held]).correct
    kept = personal["dense_2_bias"].copy()
    huge = np.full_like(x, 1e30)
    wild = rounds.TrainingPlan(
        steps=10, eval_fraction=0.25, learning_rate=10.0, personal=("dense_2_bias",)
    )
    diverged = local_round(
        _release_trainer(), huge, y, wild, rng=np.random.default_rng(4), personal=personal
    )
    assert not np.all(np.isfinite(diverged.update))  # the participant will not send it
    np.testing.assert_array_equal(personal["dense_2_bias"], kept)


async def test_a_test_set_of_another_width_stops_the_aggregator_at_start(tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")

    async def start() -> None:
        await asyncio.wait_for(h.aggregator(**{"eval.data": str(narrow)}).run(), 30)

    async with memory_fleet(tmp_path, 3) as h:
        with pytest.raises(ConfigError, match="3 features") as caught:
            await start()
    assert caught.value.key == "eval.data"


def test_a_device_reports_per_class_counts_only_when_they_fit_its_totals() -> None:
    from fleetlearn.device.participant import LocalResult, _class_counts

    def result(rows: tuple[object, ...], hits: tuple[object, ...]) -> LocalResult:
        return LocalResult(update=np.zeros(2, np.float32), weight=1.0, loss=0.1, correct=5,
                           samples=10, class_samples=rows, class_correct=hits)  # type: ignore[arg-type]  # fmt: skip

    kept = _class_counts(result((np.int64(6), 4), (np.int32(3), 2)), 10)
    assert kept == {"class_samples": (6, 4), "class_correct": (3, 2)}
    assert all(type(v) is int for v in (*kept["class_samples"], *kept["class_correct"]))
    empty = {"class_samples": (), "class_correct": ()}
    assert _class_counts(result((6, 4), (3, 3)), 10) == empty  # more hits than `correct`
    assert _class_counts(result((6, 5), (3, 2)), 10) == empty  # more rows than `samples`
    assert _class_counts(result((6, 4), (7, 0)), 10) == empty  # a class with more hits than rows
    assert _class_counts(result((6.0, 4), (3, 2)), 10) == empty  # not integers
    assert _class_counts(result((True, 4), (0, 2)), 10) == empty

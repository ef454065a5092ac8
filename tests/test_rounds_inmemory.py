"""Round engine + device participants wired through an in-memory broker (no MQTT, no LiteRT).

Checks the glue between aggregator.engine, device.participant, shared.secagg and
shared.compression: topics, payloads, deadlines, stragglers, error feedback, and that the
engine's mean equals the weighted mean of the survivors' inputs within the quantization bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from fleetlearn.aggregator.engine import EngineConfig, Publish, RoundEngine
from fleetlearn.device.agent import ArrayData, DeviceAgent
from fleetlearn.device.participant import (
    LocalResult,
    Note,
    NoteKind,
    Participant,
    PublishStatus,
    Send,
    Train,
)
from fleetlearn.shared import cost as cost_fields
from fleetlearn.shared import rounds, tflite, topics, wire
from fleetlearn.shared.release import ModelRelease, make_release, release_weights
from fleetlearn.shared.secagg import keys as sk
from fleetlearn.shared.secagg import messages as sm
from fleetlearn.shared.secagg.config import PrivacyFloor
from fleetlearn.transport.memory import MemoryBroker

ROOT = Path(__file__).resolve().parent.parent
MODEL = (ROOT / "aggregator" / "models" / "pdm_default.tflite").read_bytes()
FLEET = "plant-9"


@dataclass
class Fleet:
    engine: RoundEngine
    devices: dict[str, Participant]
    agg_key: SigningKey
    dim: int
    now: float = 0.0
    retained: dict[str, bytes] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)
    drop_kinds: dict[str, set[topics.Kind]] = field(
        default_factory=dict
    )  # device -> kinds it won't send
    pending: list[tuple[str, int, LocalResult]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(5))
    # As the service does: take each message with defer_close, then close a completed stage
    # with tick(). `closes` counts those closes.
    defer_close: bool = False
    closes: int = 0
    # Device clocks are not the aggregator's: device -> offset of its clock from `now`.
    skew: dict[str, float] = field(default_factory=dict)

    def device_now(self, dev: str) -> float:
        return self.now + self.skew.get(dev, 0.0)

    identities: dict[str, SigningKey] = field(default_factory=dict)
    sent: list[tuple[str, topics.Kind, bytes]] = field(default_factory=list)  # every Send
    # What a device's message becomes on the way (a faulty or malicious device).
    uplink: Callable[[str, topics.Topic, bytes], bytes] | None = None
    quiet_status: set[str] = field(default_factory=set)  # statuses that never reach the engine
    # What each device's local training reports (default: the same figures for everyone).
    evaluation: Callable[[str], tuple[float, int, int, int]] | None = None
    # Per class (rows with each label, global hits among them), with `labels` as the
    # model's class names passed to start_round by `run_round`.
    class_counts: Callable[[str], tuple[tuple[int, ...], tuple[int, ...]]] | None = None
    labels: tuple[str, ...] = ()
    cpu_s: float = 0.0  # CPU seconds every local training reports

    def publish(self, pubs: list[Publish]) -> None:
        for p in pubs:
            assert isinstance(p.payload, bytes)
            if p.retain:
                self.retained[p.topic] = p.payload
            t = topics.parse(p.topic)
            for dev, part in self.devices.items():
                if dev in self.offline:
                    continue
                if t.kind is topics.Kind.MODEL:
                    self.run_actions(dev, part.on_model(p.payload, self.device_now(dev)))
                elif t.kind is topics.Kind.ROUND:
                    self.run_actions(dev, part.on_round(p.payload, self.device_now(dev)))
                elif t.kind is topics.Kind.SURVIVORS or (
                    t.kind is topics.Kind.INBOX and t.device_id == dev
                ):
                    self.run_actions(dev, part.on_message(t, p.payload, self.device_now(dev)))

    def run_actions(self, dev: str, actions: list) -> None:  # type: ignore[type-arg]
        part = self.devices[dev]
        for a in actions:
            if isinstance(a, Send):
                t = topics.parse(a.topic)
                if t.kind in self.drop_kinds.get(dev, set()):
                    self.offline.add(dev)  # disconnects instead of sending
                    continue
                payload = self.uplink(dev, t, a.payload) if self.uplink else a.payload
                self.sent.append((dev, t.kind, payload))
                self.publish(self.receive(t, payload))
            elif isinstance(a, Train):
                dim = part.feedback.dim if part.feedback else self.dim
                update = self.rng.normal(0, 0.05, dim).astype(np.float32)
                weight = float(self.rng.integers(50, 300))
                loss, correct, samples, local = (
                    self.evaluation(dev) if self.evaluation else (0.7, 30, 40, 0)
                )
                rows, hits = self.class_counts(dev) if self.class_counts else ((), ())
                result = LocalResult(
                    update, weight, loss, correct, samples, local, rows, hits, self.cpu_s
                )
                self.pending.append((dev, a.round_id, result))
            elif isinstance(a, PublishStatus):
                self.status(dev)
            elif isinstance(a, Note):
                self.notes.setdefault(dev, []).append(a.text)

    def status(self, dev: str) -> None:
        """The device's retained status as the agent publishes it (with its graph ticket)."""
        if dev in self.quiet_status:
            return
        part = self.devices[dev]
        status = wire.DeviceStatus(
            device_id=dev, online=True, model_version=part.model_version, ticket=part.ticket
        )
        self.engine.observe_status(dev, wire.encode(status), self.now)

    def receive(self, topic: topics.Topic, payload: bytes) -> list[Publish]:
        if not self.defer_close:
            return self.engine.receive(topic, payload, self.now)
        pubs = self.engine.receive(topic, payload, self.now, defer_close=True)
        if self.engine.close_due:
            assert not pubs  # the stage's messages come from the close, not the message
            self.closes += 1
            pubs = self.engine.tick(self.now)
            assert not self.engine.close_due
        return pubs

    def finish_training(self) -> None:
        pending, self.pending = self.pending, []
        for dev, r, result in pending:
            if dev not in self.offline:
                self.run_actions(dev, self.devices[dev].trained(r, result, self.device_now(dev)))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.publish(self.engine.tick(self.now))
        for dev, part in self.devices.items():
            if dev not in self.offline:
                self.run_actions(dev, part.tick(self.device_now(dev)))


def make_fleet(
    n: int,
    mode: str = "secure",
    defer_close: bool = False,
    floor: PrivacyFloor | None = None,
    **cfg: object,
) -> Fleet:
    agg = SigningKey.generate()
    ids = [f"d{i:02d}" for i in range(n)]
    keys = {d: SigningKey.generate() for d in ids}
    registry = {d: bytes(k.verify_key) for d, k in keys.items()}
    config = EngineConfig(**{"mode": mode, "cohort": n, "over_select": 1.0, **cfg})  # type: ignore[arg-type]
    counter = itertools.count()
    engine = RoundEngine(fleet=FLEET, config=config, verify_keys=registry, random=os.urandom)
    devices = {
        d: Participant(
            fleet=FLEET,
            device_id=d,
            identity=keys[d],
            aggregator_key=agg.verify_key,
            registry=registry,
            random=lambda k, c=counter: os.urandom(k),
            floor=floor,
        )
        for d in ids
    }
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    fleet = Fleet(
        engine,
        devices,
        agg,
        tflite.layout_size(manifest.layout),
        defer_close=defer_close,
        identities=keys,
    )
    release = make_release(MODEL, manifest, agg)
    fleet.publish([Publish(topics.model(FLEET), wire.encode(release), retain=True)])
    for d in ids:
        fleet.status(d)
    return fleet


def run_round(fleet: Fleet, round_id: int = 1) -> None:
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    fleet.publish(
        fleet.engine.start_round(
            round_id=round_id,
            model_version=manifest.version,
            dim=fleet.dim,
            now=fleet.now,
            labels=fleet.labels,
        )
    )
    for _ in range(400):
        if fleet.engine.outcome is not None and fleet.engine.outcome.round_id == round_id:
            return
        fleet.finish_training()
        fleet.advance(0.5)
    raise AssertionError("round did not finish")


@pytest.mark.parametrize("defer_close", [False, True], ids=["close-on-receive", "deferred"])
def test_secure_round_matches_plain_weighted_mean(defer_close: bool) -> None:
    fleet = make_fleet(8, defer_close=defer_close)
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert len(out.survivors) == 8
    inputs = {d: p.inputs[1] for d, p in fleet.devices.items()}
    idx = inputs["d00"][0]
    total_w = sum(i[2] for i in inputs.values())
    mean = sum(i[2] * i[1] for i in inputs.values()) / total_w
    assert out.mean_update is not None
    got = out.mean_update[idx]
    assert np.max(np.abs(got - mean)) <= out.error_bound
    assert out.error_bound < 1e-2
    # outside the shared coordinates nothing moves
    mask = np.ones(fleet.dim, bool)
    mask[idx] = False
    assert not np.any(out.mean_update[mask])
    assert out.metrics["samples"] == 8 * 40
    assert out.metrics["accuracy"] == pytest.approx(0.75)
    # Every stage closed because everyone answered, never at a deadline.
    assert fleet.closes == (4 if defer_close else 0)
    assert out.metrics["duration_s"] < fleet.engine.config.times.advertise


def test_rand_k_without_error_feedback_is_scaled_to_be_unbiased() -> None:
    """EF off: the applied mean is d/k times the survivors' weighted mean on the k shared
    coordinates (its expectation is the full mean), so server.lr keeps its meaning."""
    fleet = make_fleet(6, training=rounds.TrainingPlan(error_feedback=False), density=0.1)
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    inputs = {d: p.inputs[1] for d, p in fleet.devices.items()}
    idx = inputs["d00"][0]
    total_w = sum(i[2] for i in inputs.values())
    mean = sum(i[2] * i[1] for i in inputs.values()) / total_w
    scale = fleet.dim / len(idx)
    assert scale > 9
    assert out.mean_update is not None
    np.testing.assert_allclose(out.mean_update[idx], scale * mean, atol=out.error_bound, rtol=0)
    assert out.error_bound < 10 * 1e-2


@pytest.mark.parametrize("defer_close", [False, True], ids=["close-on-receive", "deferred"])
def test_secure_round_survives_dropouts_after_masking_and_before_advertise(
    defer_close: bool,
) -> None:
    fleet = make_fleet(12, defer_close=defer_close)
    fleet.drop_kinds = {
        "d01": {topics.Kind.UNMASK},  # masked input sent, then gone
        "d02": {topics.Kind.UNMASK},
        "d03": {topics.Kind.ADVERTISE},  # never advertises
    }
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert set(out.survivors) == {f"d{i:02d}" for i in range(12)} - {"d03"}
    assert out.metrics["stages"]["advertise"]["dropped"] == 1
    closed = {
        e["stage"]: set(e["dropped"]) for e in fleet.engine.events if e["event"] == "stage_closed"
    }
    assert closed["advertise"] == {"d03"}
    # UNMASK closes as soon as every secret has t shares: the two leavers are not awaited.
    unmask = out.metrics["stages"]["unmask"]
    assert unmask["arrived"] + unmask["not_needed"] + unmask["dropped"] == 11
    assert unmask["not_needed"] + unmask["dropped"] >= 2
    assert out.metrics["dropouts_recovered"] == unmask["dropped"]


@pytest.mark.parametrize("defer_close", [False, True], ids=["close-on-receive", "deferred"])
def test_unmask_answers_after_an_early_close_are_not_needed_not_late(defer_close: bool) -> None:
    fleet = make_fleet(20, defer_close=defer_close)
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    unmask = out.metrics["stages"]["unmask"]
    assert unmask["not_needed"] > 0  # every secret had t shares before all 20 answered
    # Those answers still arrive, after the round closed: counted, with no `late` event each.
    assert fleet.engine.not_needed_after_close[out.round_id] == unmask["not_needed"]
    assert not [e for e in fleet.engine.events if e["event"] == "late"]
    assert fleet.engine.late_total == 0


def test_plain_round_closes_when_everyone_sent_also_when_deferred() -> None:
    results = []
    for defer_close in (False, True):
        fleet = make_fleet(5, mode="plain", sparsity="top_k", density=0.2, defer_close=defer_close)
        run_round(fleet)
        out = fleet.engine.outcome
        assert out is not None
        assert out.state is rounds.RoundState.CLOSED, out.reason
        assert out.metrics["duration_s"] < fleet.engine.config.times.collect
        assert fleet.closes == (1 if defer_close else 0)
        results.append(out)
    # Every device's update is in, either way.
    assert set(results[0].survivors) == set(results[1].survivors)
    assert results[0].metrics["samples"] == results[1].metrics["samples"]


@pytest.mark.parametrize("mode", ["plain", "secure"])
def test_cost_reports_are_summed_on_metrics(mode: str) -> None:
    """Each update carries what its device spent since its previous one: the training's CPU
    time, and the payload bytes it received and sent up to then. The round's `cost` is their
    sum over the survivors; secure rounds see only the sum (within the rounding)."""
    fleet = make_fleet(5, mode=mode)
    fleet.cpu_s = 1.25
    release = fleet.retained[topics.model(FLEET)]
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    first = out.metrics["cost"]
    assert first["devices"] == len(out.survivors) == 5
    # Secure rounds carry each report in whole milliseconds, bytes and millijoules: exact sums.
    tolerance = 0
    assert first["cpu_s"] == pytest.approx(5 * 1.25)
    # Everyone downloaded the release and the announcement before answering.
    assert first["bytes_down"] >= 5 * len(release) - tolerance
    sent_before_update = sum(
        len(p) for _, kind, p in fleet.sent if kind in (topics.Kind.ADVERTISE, topics.Kind.SHARES)
    )
    assert first["bytes_up"] == pytest.approx(sent_before_update, abs=tolerance + 1)
    if mode == "plain":
        assert first["bytes_up"] == 0  # nothing is sent before a plain update
    joules = cost_fields.EnergyModel().joules(
        first["cpu_s"], first["bytes_up"], first["bytes_down"]
    )
    assert first["energy_j"] == pytest.approx(joules, abs=5 * 0.0005 + 0.001)
    # The next report starts where this one stopped: round 1's last messages are in it.
    last_of_round_1 = sum(
        len(p)
        for _, kind, p in fleet.sent
        if kind in (topics.Kind.UPDATE, topics.Kind.MASKED, topics.Kind.UNMASK)
    )
    fleet.sent.clear()
    run_round(fleet, 2)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    before_update = sum(
        len(p) for _, kind, p in fleet.sent if kind in (topics.Kind.ADVERTISE, topics.Kind.SHARES)
    )
    assert out.metrics["cost"]["bytes_up"] == pytest.approx(
        last_of_round_1 + before_update, abs=tolerance + 1
    )


def test_private_rounds_ask_for_no_cost_reports() -> None:
    """With a privacy mechanism the announcement does not ask for cost reports (exact sums
    outside the noise), so updates carry none and the summary has no `cost`."""
    fleet = make_fleet(5, mode="plain", privacy="central")
    fleet.cpu_s = 1.0
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert "cost" not in out.metrics
    updates = [wire.decode(p) for _, kind, p in fleet.sent if kind is topics.Kind.UPDATE]
    assert updates
    assert all(u.cost is None for u in updates)


def test_a_report_that_reached_no_aggregate_goes_into_the_next_one() -> None:
    """A device whose update is left out of the sum (here: its masked input is lost on the
    way) gives its report back to its tally; its next report carries both rounds' CPU."""
    fleet = make_fleet(5)
    fleet.cpu_s = 2.0
    lost = "d00"

    def lose_masked_once(dev: str, topic: topics.Topic, payload: bytes) -> bytes:
        if dev == lost and topic.kind is topics.Kind.MASKED and topic.round_id == 1:
            return b"garbage"  # refused by the aggregator: d00 is not a survivor
        return payload

    fleet.uplink = lose_masked_once
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert lost not in out.survivors
    assert out.metrics["cost"]["cpu_s"] == pytest.approx(2.0 * len(out.survivors))
    run_round(fleet, 2)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert lost in out.survivors
    # Everyone's report holds this round's 2 s; d00's also round 1's.
    assert out.metrics["cost"]["cpu_s"] == pytest.approx(2.0 * len(out.survivors) + 2.0)


def test_plain_round_with_late_device() -> None:
    fleet = make_fleet(6, mode="plain", rule="median", sparsity="top_k", density=0.2)
    late = "d05"
    fleet.offline.add(late)
    run_round(fleet)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED
    assert late not in out.survivors
    assert out.metrics["stages"]["collect"]["dropped"] == 1
    # the late device wakes up and answers: counted late, no effect
    fleet.offline.discard(late)
    part = fleet.devices[late]
    part._round = None  # it never saw the announcement
    ann = wire.decode(fleet.retained[topics.round_announce(FLEET)], rounds.RoundAnnounce)
    assert ann.state is rounds.RoundState.OPEN  # service closes it after publishing
    before = fleet.engine.late_total
    upd = rounds.PlainUpdate(
        round_id=1,
        sender=late,
        update=fleet.devices["d00"]
        .feedback.compress(  # type: ignore[union-attr]
            np.ones(fleet.dim, np.float32),
            ann.compression,
            rng=np.random.default_rng(1),
            seed=ann.seed,
        )
        .message,
        weight=10.0,
        loss=0.1,
        correct=1,
        samples=1,
    )
    fleet.engine.receive(
        topics.parse(topics.per_device(FLEET, 1, topics.Kind.UPDATE, late)),
        wire.encode(upd),
        fleet.now,
    )
    assert fleet.engine.late_total == before + 1
    assert fleet.engine.late_after_close[1] == 1
    assert "late_after_close" not in out.metrics


def test_garbage_is_counted_and_round_goes_on() -> None:
    fleet = make_fleet(5)
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    fleet.publish(
        fleet.engine.start_round(round_id=1, model_version=manifest.version, dim=fleet.dim, now=0.0)
    )
    t = topics.parse(topics.per_device(FLEET, 1, topics.Kind.ADVERTISE, "d00"))
    for junk in (
        b"",
        b"\x00" * 50,
        os.urandom(300),
        wire.encode(wire.DeviceStatus(device_id="d00", online=True)),
    ):
        assert fleet.engine.receive(t, junk, 0.1) == []
    spoof = topics.parse(topics.per_device(FLEET, 1, topics.Kind.ADVERTISE, "stranger"))
    fleet.engine.receive(spoof, b"x", 0.1)
    for _ in range(100):
        if fleet.engine.outcome:
            break
        fleet.finish_training()
        fleet.advance(0.5)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert out.metrics["rejected_by_reason"]["bad_payload"] == 4
    assert out.metrics["rejected_by_reason"]["not_in_cohort"] == 1


def test_tampered_release_keeps_previous_model() -> None:
    fleet = make_fleet(3)
    part = fleet.devices["d00"]
    assert part.model_version == 1
    manifest = tflite.read_manifest(MODEL)
    assert manifest is not None
    good = release_weights(
        MODEL, np.zeros(fleet.dim, np.float32), version=2, signing_key=fleet.agg_key
    )
    raw = bytearray(wire.encode(good))
    tampered = ModelRelease(
        manifest=good.manifest,
        model_size=good.model_size,
        model_zst=good.model_zst,
        signature=bytes(64),
    )
    actions = part.on_model(wire.encode(tampered), 0.0)
    assert part.model_version == 1
    assert isinstance(actions[0], Note)
    assert "refused" in actions[0].text
    assert actions[0].kind is NoteKind.RELEASE_REFUSED
    forged = release_weights(
        MODEL, np.zeros(fleet.dim, np.float32), version=2, signing_key=SigningKey.generate()
    )
    part.on_model(wire.encode(forged), 0.0)
    assert part.model_version == 1
    part.on_model(bytes(raw), 0.0)
    assert part.model_version == 2


async def test_the_agent_acts_on_a_notes_kind_never_on_its_words() -> None:
    """A refused release goes in the device's retained status; other notes only in its log,
    whatever words they use."""
    fleet = make_fleet(3)
    agent = DeviceAgent(
        participant=fleet.devices["d00"],
        connector=MemoryBroker().connector,
        password="unused",
        data=ArrayData(np.zeros((4, 3), np.float32), np.zeros(4, np.int32)),
    )
    shown: list[str] = []

    async def publish_status() -> None:
        shown.append(agent._note)

    agent.publish_status = publish_status  # type: ignore[method-assign]
    await agent._carry_out([Note(NoteKind.ROUND_LEFT, "round 3: release v2 not loaded in time")])
    assert agent.stats.releases_refused == 0
    assert shown == []
    await agent._carry_out([Note(NoteKind.RELEASE_REFUSED, "v7: signature does not verify")])
    assert agent.stats.releases_refused == 1
    assert shown == ["v7: signature does not verify"]
    assert agent.stats.notes == 2


# ------------------------------------------------------- graph tickets and the device floor


def _adverts(fleet: Fleet, round_id: int) -> dict[str, sm.Advertise]:
    out = {}
    for dev, kind, payload in fleet.sent:
        if kind is topics.Kind.ADVERTISE:
            message = wire.decode(payload, sm.Advertise)
            if message.round_id == round_id:
                out[dev] = message
    return out


def test_tickets_rotate_after_each_advert_and_the_next_round_uses_the_new_ones() -> None:
    fleet = make_fleet(6)
    first = {d: p.ticket for d, p in fleet.devices.items()}
    run_round(fleet, 1)
    assert fleet.engine.outcome is not None
    assert fleet.engine.outcome.state is rounds.RoundState.CLOSED, fleet.engine.outcome.reason
    announced = wire.decode(fleet.retained[topics.round_announce(FLEET)], rounds.RoundAnnounce)
    assert announced.ticket_map() == first
    second = {d: p.ticket for d, p in fleet.devices.items()}
    for dev, advert in _adverts(fleet, 1).items():
        assert sk.ticket_of(dev, advert.draw) == first[dev]  # the advert opened the ticket
        assert second[dev] != first[dev]  # and the device moved on to a fresh draw
    run_round(fleet, 2)
    assert fleet.engine.outcome.state is rounds.RoundState.CLOSED, fleet.engine.outcome.reason
    announced = wire.decode(fleet.retained[topics.round_announce(FLEET)], rounds.RoundAnnounce)
    assert announced.ticket_map() == second
    assert {sk.ticket_of(d, a.draw) for d, a in _adverts(fleet, 2).items()} == set(second.values())


def test_a_stale_ticket_keeps_the_device_out_and_it_says_why() -> None:
    fleet = make_fleet(6)
    fleet.quiet_status.add("d02")  # its new status never reaches the aggregator
    run_round(fleet, 1)
    run_round(fleet, 2)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert "d02" not in out.survivors
    assert "d02" not in _adverts(fleet, 2)
    assert any("not its current one" in n for n in fleet.notes["d02"])


def test_an_advert_whose_draw_does_not_open_its_ticket_is_refused_and_counted() -> None:
    fleet = make_fleet(6)
    cheat = "d04"

    def uplink(dev: str, topic: topics.Topic, payload: bytes) -> bytes:
        if dev != cheat or topic.kind is not topics.Kind.ADVERTISE:
            return payload
        advert = wire.decode(payload, sm.Advertise)
        draw = bytes(16)  # not the draw its ticket commits to; properly signed
        transcript = sk.advert_transcript(
            round_id=advert.round_id,
            round_seed=wire.decode(
                fleet.retained[topics.round_announce(FLEET)], rounds.RoundAnnounce
            ).seed,
            device_id=dev,
            share_key=advert.share_key,
            mask_key=advert.mask_key,
            seed_commitment=advert.seed_commitment,
            draw=draw,
        )
        signature = sk.sign(fleet.identities[dev], transcript)
        return wire.encode(dataclasses.replace(advert, draw=draw, signature=signature))

    fleet.uplink = uplink
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert cheat not in out.survivors
    assert len(out.survivors) == 5
    assert fleet.engine.rejected_total["protocol"] == 1
    rejected = [e for e in fleet.engine.events if e.get("reason") == "protocol"]
    assert any("announced ticket" in str(e) for e in rejected), rejected


def test_a_device_floor_above_the_cohort_keeps_it_out() -> None:
    fleet = make_fleet(6)
    small = fleet.devices["d01"]
    small.floor = PrivacyFloor(min_cohort=10)
    ticket = small.ticket
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert "d01" not in out.survivors
    assert "d01" not in _adverts(fleet, 1)
    assert small.ticket == ticket  # nothing was revealed, so nothing rotates
    assert any("below this device's floor of 10" in n for n in fleet.notes["d01"])


def test_secure_rounds_select_only_devices_with_a_ticket() -> None:
    fleet = make_fleet(6)
    bare = wire.DeviceStatus(
        device_id="d03", online=True, model_version=fleet.devices["d03"].model_version
    )
    fleet.engine.observe_status("d03", wire.encode(bare), fleet.now)  # e.g. an older device
    assert "d03" not in fleet.engine.select(fleet.devices["d00"].model_version)
    run_round(fleet, 1)
    out = fleet.engine.outcome
    assert out is not None
    assert out.state is rounds.RoundState.CLOSED, out.reason
    assert "d03" not in out.survivors
    plain = make_fleet(6, mode="plain", sparsity="top_k", density=0.2)
    plain.engine.observe_status("d03", wire.encode(bare), plain.now)
    assert "d03" in plain.engine.select(plain.devices["d00"].model_version)

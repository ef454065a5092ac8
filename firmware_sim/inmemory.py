"""Rounds without a broker: the real engine, participants and LiteRT trainers, routed in memory.

For experiments and benchmarks that are about learning rather than transport (how fast does
secure FedAvg with rand-k and dropouts converge?). Messages take the same wire encoding and
topics as over MQTT; time is simulated, so deadlines pass instantly when nothing is pending.
Dropouts come from a `Scenario` exactly as in the MQTT simulator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine import EngineConfig, Publish, RoundEngine
from fleetlearn.aggregator.service import default_model
from fleetlearn.device.participant import (
    LoadModel,
    LocalResult,
    Participant,
    PublishStatus,
    Send,
    Train,
)
from fleetlearn.device.trainer import LiteRTTrainer, local_round
from fleetlearn.firmware_sim.data import device_machine
from fleetlearn.firmware_sim.scenario import STAGE_KINDS, STAGE_ORDER, Scenario
from fleetlearn.shared import tflite, topics, wire
from fleetlearn.shared.release import ModelRelease, make_release, release_weights, verify_release
from fleetlearn.shared.rounds import DEFAULT_LEARNING_RATE, RoundState

FLEET = "memory"


@dataclass
class _Device:
    index: int
    participant: Participant
    x: np.ndarray
    y: np.ndarray
    trainer: LiteRTTrainer | None = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    personal: dict[str, np.ndarray] = field(default_factory=dict)


class InMemoryFleet:
    def __init__(
        self,
        devices: int,
        config: EngineConfig,
        scenario: Scenario | None = None,
        *,
        optimizer: rules.OptimizerConfig | None = None,
        model: bytes | None = None,
        seed: int | None = None,
        data: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """`seed` makes a run reproducible: selection, round seeds, secret keys and stochastic
        rounding then come from one seeded generator instead of os.urandom. Simulation only:
        keys derived that way are not secret. `data`: each device's (x, y), one per device,
        instead of the scenario's synthetic machines (then `devices` must be len(data))."""
        if data is not None and len(data) != devices:
            raise ValueError(f"{len(data)} data sets for {devices} devices")
        random: Callable[[int], bytes] = os.urandom
        if seed is not None:
            stream = np.random.default_rng(seed)
            random = stream.bytes
        self.scenario = scenario or Scenario()
        self.config = config
        self.aggregator_key = SigningKey.generate()
        ids = [f"dev-{i:04d}" for i in range(devices)]
        identities = {d: SigningKey.generate() for d in ids}
        registry = {d: bytes(k.verify_key) for d, k in identities.items()}
        self.engine = RoundEngine(fleet=FLEET, config=config, verify_keys=registry, random=random)
        self.optimizer = rules.ServerOptimizer(optimizer or rules.OptimizerConfig())
        self.devices: dict[str, _Device] = {}
        s = self.scenario
        for i, dev in enumerate(ids):
            if data is not None:
                x, y = data[i]
            else:
                site, _ = s.site_of(i)
                x, y = device_machine(s.seed, i, site, s.machine_of(i), s.non_iid).windows(
                    s.samples
                )
            participant = Participant(
                fleet=FLEET,
                device_id=dev,
                identity=identities[dev],
                aggregator_key=self.aggregator_key.verify_key,
                registry=registry,
                random=random,
                floor=s.floor,
            )
            self.devices[dev] = _Device(i, participant, x, y, rng=np.random.default_rng(i))
        self.model = model or default_model()
        manifest = tflite.read_manifest(self.model)
        assert manifest is not None
        self.manifest = manifest
        self.version = manifest.version
        self.now = 0.0
        self._silent: dict[str, int] = {}  # device -> stage index it vanished at, this round
        self._round = 0
        self._pending: list[tuple[str, Train]] = []
        # What each device computed in the last round (a simulator sees every device; the
        # aggregator never does): for per-device figures such as the unweighted mean accuracy.
        self.round_results: dict[str, LocalResult] = {}
        self.history: list[dict[str, Any]] = []
        self.survivors: tuple[str, ...] = ()  # whose updates the last round aggregated
        self._release(make_release(self.model, manifest, self.aggregator_key))

    # -------------------------------------------------------------------------- routing

    def _release(self, release: ModelRelease) -> None:
        payload = wire.encode(release)
        for device in self.devices.values():
            for action in device.participant.on_model(payload, self.now):
                if isinstance(action, LoadModel):
                    device.trainer = LiteRTTrainer(action.model, action.manifest)
        for dev in self.devices:
            self._publish_status(dev)

    def _publish_status(self, dev: str) -> None:
        participant = self.devices[dev].participant
        status = wire.DeviceStatus(
            device_id=dev,
            online=True,
            model_version=participant.model_version,
            ticket=participant.ticket,
        )
        self.engine.observe_status(dev, wire.encode(status), self.now)

    def _deliver(self, pubs: list[Publish]) -> None:
        for pub in pubs:
            assert isinstance(pub.payload, bytes)
            t = topics.parse(pub.topic)
            for dev, d in self.devices.items():
                if dev in self._silent:
                    continue
                if t.kind is topics.Kind.ROUND:
                    self._act(dev, d.participant.on_round(pub.payload, self.now))
                elif t.kind is topics.Kind.SURVIVORS or (
                    t.kind is topics.Kind.INBOX and t.device_id == dev
                ):
                    self._act(dev, d.participant.on_message(t, pub.payload, self.now))

    def _act(self, dev: str, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                t = topics.parse(action.topic)
                stage = next(s for s, kinds in STAGE_KINDS.items() if t.kind in kinds)
                drop = self.scenario.drop_stage(self.devices[dev].index, self._round)
                if drop is not None and STAGE_ORDER.index(stage) >= STAGE_ORDER.index(drop):
                    self._silent[dev] = STAGE_ORDER.index(drop)
                    continue
                self._deliver(self.engine.receive(t, action.payload, self.now))
            elif isinstance(action, Train):
                self._pending.append((dev, action))
            elif isinstance(action, PublishStatus):
                self._publish_status(dev)

    def _train_pending(self) -> None:
        pending, self._pending = self._pending, []
        for dev, action in pending:
            d = self.devices[dev]
            if dev in self._silent or d.trainer is None:
                continue
            result = local_round(
                d.trainer, d.x, d.y, action.announce.training, rng=d.rng, personal=d.personal
            )
            self.round_results[dev] = result
            self._act(dev, d.participant.trained(action.round_id, result, self.now))

    # ---------------------------------------------------------------------------- rounds

    def run_round(self, max_seconds: float = 600.0) -> dict[str, Any]:
        self._round += 1
        self._silent = {}
        self.round_results = {}
        started = self.now
        self._deliver(
            self.engine.start_round(
                round_id=self._round,
                model_version=self.version,
                dim=self.manifest.parameter_count,
                now=self.now,
                labels=self.manifest.labels,
                task=self.manifest.task,
            )
        )
        while self.engine.outcome is None or self.engine.outcome.round_id != self._round:
            self._train_pending()
            deadline = self.engine.next_deadline
            if deadline is None or self.now - started > max_seconds:
                break
            self.now = max(self.now + 0.01, deadline)
            self._deliver(self.engine.tick(self.now))
        outcome = self.engine.take_outcome()  # as the service does: the engine keeps no update
        assert outcome is not None
        self.survivors = outcome.survivors
        self.engine.drain_events()  # nobody publishes them here
        metrics = dict(outcome.metrics)
        if outcome.state is RoundState.CLOSED and outcome.mean_update is not None:
            weights = tflite.flatten(tflite.read_weights(self.model), self.manifest.layout)
            new = self.optimizer.step(weights, outcome.mean_update).astype(np.float32)
            self.version += 1
            release = release_weights(
                self.model, new, version=self.version, signing_key=self.aggregator_key
            )
            self.model, self.manifest = verify_release(
                release, self.aggregator_key.verify_key, min_version=self.version
            )
            self._release(release)
        self.history.append(metrics)
        self.now += 1.0
        return metrics

    def per_device_accuracy(self) -> tuple[float, float] | None:
        """Unweighted means over the last round's survivors (the devices whose figures the
        aggregator summed) that held out rows: of the release's accuracy and of their own
        model's (release plus personal layers), on each device's held-out rows. None when no
        survivor held out a row."""
        held = [
            r
            for dev, r in self.round_results.items()
            if r.samples > 0 and dev in set(self.survivors)
        ]
        if not held:
            return None
        return (
            float(np.mean([r.correct / r.samples for r in held])),
            float(np.mean([r.local_correct / r.samples for r in held])),
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> float:
        return LiteRTTrainer(self.model, self.manifest).evaluate(x, y).accuracy


def central_accuracy(
    scenario: Scenario,
    devices: int,
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int = 10,
    samples: int | None = None,
) -> float:
    """Train the default model on all devices' data pooled (what federated learning avoids)."""
    xs, ys = [], []
    for i in range(devices):
        site, _ = scenario.site_of(i)
        x, y = device_machine(
            scenario.seed, i, site, scenario.machine_of(i), scenario.non_iid
        ).windows(samples or scenario.samples)
        xs.append(x)
        ys.append(y)
    model = default_model()
    manifest = tflite.read_manifest(model)
    assert manifest is not None
    trainer = LiteRTTrainer(model, manifest)
    trainer.train(
        np.concatenate(xs),
        np.concatenate(ys),
        epochs=epochs,
        learning_rate=DEFAULT_LEARNING_RATE,
        rng=np.random.default_rng(0),
    )
    return trainer.evaluate(*test).accuracy


def held_out_set(
    scenario: Scenario, count: int = 40, windows: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows from machines that are in no device's data."""
    xs, ys = [], []
    for j in range(count):
        i = 1_000_000 + j
        site, _ = scenario.site_of(i)
        x, y = device_machine(
            scenario.seed, i, site, scenario.machine_of(i), scenario.non_iid
        ).windows(windows)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)

"""Rounds without a broker: the real engine, participants and LiteRT trainers, routed in memory.

For experiments and benchmarks that are about learning rather than transport (how fast does
secure FedAvg with rand-k and dropouts converge?). Messages take the same wire encoding and
topics as over MQTT. Time is simulated: a clock that jumps to the next event, a stage
deadline or a device finishing its local round, so deadlines pass instantly when nothing is
pending and a fleet's wall time can be measured without waiting for it.

The `Scenario` drives it as it drives the MQTT simulator:
- dropouts per stage, as there;
- compute: a device invited to train trains at once on the release it has (for real, with
  LiteRT), and its result is handed back `compute_seconds` of simulated time later;
- flaky links (`network.loss`): a lost round message never reaches the engine;
- shifts: an offline device misses announcements, is not selected (its status says offline),
  and what it finished sends once its shift starts again.
Rounds run synchronously (`run_round`) or asynchronously (`run_async`, FedBuff) as the
engine's config says. Devices share one LiteRT interpreter per release: local training always
starts from the release's weights, and the devices train one after another.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine import EngineConfig, NotEnoughDevicesError, Publish, RoundEngine
from fleetlearn.aggregator.service import default_model
from fleetlearn.device.participant import (
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
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    personal: dict[str, np.ndarray] = field(default_factory=dict)
    online: bool = True  # as its last status said
    sent: int = 0  # round messages sent (which of them a flaky link loses)


@dataclass(order=True)
class _Finish:
    """A local round that finishes at `at` (simulated seconds)."""

    at: float
    order: int  # ties: in the order the rounds started
    device: str = field(compare=False)
    round_id: int = field(compare=False)
    result: LocalResult = field(compare=False)


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
                energy=s.energy,
            )
            self.devices[dev] = _Device(i, participant, x, y, rng=np.random.default_rng(i))
        self.model = model or default_model()
        manifest = tflite.read_manifest(self.model)
        assert manifest is not None
        self.manifest = manifest
        self.version = manifest.version
        self.trainer: LiteRTTrainer | None = None  # the current release's, shared
        self.now = 0.0
        self._silent: dict[str, int] = {}  # device -> stage index it vanished at, this round
        self._round = 0
        self._finishing: list[_Finish] = []  # local rounds in progress, soonest first
        self._started = 0
        self._held: list[tuple[str, Send]] = []  # sends of offline devices, until they are back
        # What each device computed in its latest local round (a simulator sees every device;
        # the aggregator never does): for per-device figures such as the unweighted mean
        # accuracy.
        self.round_results: dict[str, LocalResult] = {}
        self.history: list[dict[str, Any]] = []
        self.survivors: tuple[str, ...] = ()  # whose updates the last round aggregated
        self.lost = 0  # round messages a flaky link lost
        self._release(make_release(self.model, manifest, self.aggregator_key))

    # -------------------------------------------------------------------------- routing

    def _release(self, release: ModelRelease) -> None:
        payload = wire.encode(release)
        for device in self.devices.values():
            device.participant.on_model(payload, self.now)
        self.trainer = LiteRTTrainer(self.model, self.manifest)
        for dev in self.devices:
            self._publish_status(dev)

    def _publish_status(self, dev: str) -> None:
        d = self.devices[dev]
        d.online = self.scenario.online_at(d.index, self.now)
        participant = d.participant
        status = wire.DeviceStatus(
            device_id=dev,
            online=d.online,
            eligibility=wire.Eligibility.ELIGIBLE if d.online else wire.Eligibility.OFFLINE,
            model_version=participant.model_version,
            ticket=participant.ticket,
            ready_version=participant.ready_version,
        )
        self.engine.observe_status(dev, wire.encode(status), self.now)

    def _shifts(self) -> None:
        """Devices whose shift began or ended since their last status say so; what they
        finished while offline goes out now."""
        for dev, d in self.devices.items():
            if self.scenario.online_at(d.index, self.now) != d.online:
                self._publish_status(dev)
        held, self._held = self._held, []
        for dev, send in held:
            self._send(dev, send)

    def _deliver(self, pubs: list[Publish]) -> None:
        for pub in pubs:
            assert isinstance(pub.payload, bytes)
            t = topics.parse(pub.topic)
            for dev, d in self.devices.items():
                if dev in self._silent or not d.online:
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
                self._send(dev, action)
            elif isinstance(action, Train):
                self._train(dev, action)
            elif isinstance(action, PublishStatus):
                self._publish_status(dev)

    def _send(self, dev: str, action: Send) -> None:
        d = self.devices[dev]
        if not self.scenario.online_at(d.index, self.now):
            self._held.append((dev, action))
            return
        t = topics.parse(action.topic)
        stage = next(s for s, kinds in STAGE_KINDS.items() if t.kind in kinds)
        drop = self.scenario.drop_stage(d.index, t.round_id or 0)
        if drop is not None and STAGE_ORDER.index(stage) >= STAGE_ORDER.index(drop):
            self._silent[dev] = STAGE_ORDER.index(drop)
            return
        d.sent += 1
        if self.scenario.link_loses(d.index, d.sent):
            self.lost += 1
            return
        self._deliver(self.engine.receive(t, action.payload, self.now))

    def _train(self, dev: str, action: Train) -> None:
        """Train now, on the release the device has; hand the result back when the device's
        compute time has passed."""
        d = self.devices[dev]
        if dev in self._silent or self.trainer is None:
            return
        if action.announce.model_version != self.trainer.version:
            # An announcement of an older release: nothing to train it with.
            d.participant.untrained(action.round_id)
            return
        started = time.thread_time()
        result = local_round(
            self.trainer, d.x, d.y, action.announce.training, rng=d.rng, personal=d.personal
        )
        # The cost report counts the training's CPU time and the simulated compute time.
        compute = self.scenario.compute_seconds(d.index)
        result = dataclasses.replace(result, cpu_s=time.thread_time() - started + compute)
        self.round_results[dev] = result
        self._started += 1
        at = self.now + compute
        heapq.heappush(self._finishing, _Finish(at, self._started, dev, action.round_id, result))

    def _step(self, deadline: float | None, limit: float) -> bool:
        """Move the clock to the next event before `limit`, a local round finishing or the
        engine's deadline, and handle it. False: nothing happens before `limit`."""
        finish = self._finishing[0].at if self._finishing else None
        shift = self._next_shift()
        events = [t for t in (finish, deadline, shift) if t is not None]
        if not events or min(events) > limit:
            return False
        if finish is not None and finish <= min(events):
            done = heapq.heappop(self._finishing)
            self.now = max(self.now, done.at)
            if done.device not in self._silent:
                participant = self.devices[done.device].participant
                self._act(done.device, participant.trained(done.round_id, done.result, self.now))
            return True
        if shift is not None and shift <= min(events):
            self.now = max(self.now, shift)
            self._shifts()
            return True
        assert deadline is not None
        self.now = max(self.now + 0.01, deadline)
        self._deliver(self.engine.tick(self.now))
        return True

    def _next_shift(self) -> float | None:
        """When the next device's shift begins or ends (None: no shifts)."""
        s = self.scenario
        if s.day <= 0 or s.online >= 1.0:
            return None
        soonest = None
        for d in self.devices.values():
            turn = s.next_offline if d.online else s.next_online
            t = turn(d.index, self.now)
            if t is not None and t > self.now and (soonest is None or t < soonest):
                soonest = t
        return soonest

    # ---------------------------------------------------------------------------- rounds

    def _start(self) -> None:
        self._round += 1
        self._silent = {}
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

    def _conclude(self) -> dict[str, Any]:
        """Apply the round's outcome (a new release if it closed) and record its summary."""
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
        metrics["sim_time"] = round(self.now, 3)
        self.history.append(metrics)
        return metrics

    def run_round(self, max_seconds: float = 600.0) -> dict[str, Any]:
        """One synchronous round: announce, let devices train and answer, close, release."""
        self.round_results = {}
        self._finishing = []  # a synchronous round's late finishers have nowhere to go
        started = self.now
        self._start()
        while self.engine.outcome is None or self.engine.outcome.round_id != self._round:
            deadline = self.engine.next_deadline
            if not self._step(deadline, started + max_seconds) and deadline is None:
                break
            if self.now - started > max_seconds:
                break
        metrics = self._conclude()
        self.now += 1.0
        return metrics

    def run_async(
        self,
        releases: int,
        *,
        max_seconds: float = 86_400.0,
        on_release: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Asynchronous rounds (the engine's mode must be `async`) until `releases` more
        releases came out, `max_seconds` of simulated time passed, or `on_release` (called
        with each closed round's summary) returns True. Returns the summaries, aborted
        rounds included."""
        if not self.config.asynchronous:
            raise ValueError(f"run_async needs an asynchronous engine, not {self.config.mode!r}")
        limit = self.now + max_seconds
        out: list[dict[str, Any]] = []
        released = 0
        while released < releases:
            outcome = self.engine.outcome
            if outcome is not None and outcome.round_id == self._round:
                metrics = self._conclude()
                out.append(metrics)
                if metrics["state"] == RoundState.CLOSED.value:
                    released += 1
                    if on_release is not None and on_release(metrics):
                        break
                continue
            if not self.engine.running and not self._begin():
                # Secure: no group holds updates yet. The call went out; devices train, or
                # their invitations lapse (the next call stalls them and invites others).
                if not self._step(self.engine.next_lapse, limit):
                    break
                continue
            if not self._step(self.engine.next_deadline, limit):
                break
        return out

    def _begin(self) -> bool:
        """Start the next asynchronous round; in secure mode only once a group is due (until
        then announce the invitations). False: no round started."""
        if not self.engine.group_due(self.version, self.now):
            self._deliver(self.engine.invite(self._round + 1, self.version, self.now))
            return False
        try:
            self._start()
        except NotEnoughDevicesError:
            self._round -= 1
            return False
        return True

    @property
    def trainings(self) -> int:
        """Local rounds the devices trained so far (their results sent or not)."""
        return self._started

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

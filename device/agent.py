"""The device agent: what runs on a gateway (`fleetlearn device`) or per simulated sensor.

It connects one MQTT link with the device's credentials and a retained last will of "offline",
subscribes to the model, the round announcement and its own round topics, and carries out what
the sans-IO `Participant` asks: publish, load a verified release into a fresh LiteRT interpreter,
train on local data. Training and inference run in a thread pool, never on the event loop.

Round messages are answered without waiting for unrelated work. Releases have their own lane
(`_releases`): verifying one, building its interpreter and inferring on it can take seconds on
a busy machine, and an announcement queued behind that used to miss ADVERTISE. Round crypto
(masking, sealing and opening shares) runs on `round_executor`, apart from training, model
loading and inference on `executor`, so it never queues behind other devices' heavy jobs when
many simulated devices share the pools.

After every new model it publishes its inference on recent local data as JSON on
`fl/{fleet}/dev/{id}/health`, and its status (model version, eligibility, why a release was
refused, its graph ticket) retained on `fl/{fleet}/dev/{id}/status`, again whenever the
participant asks (`PublishStatus`: a new ticket after each advert). In `state_dir` it keeps:
- `personal.npz`, the weights of its personal layers (the round plan's `personal` names),
  which never leave the device and are put back into every new release it loads;
- `residual.bin`, the error-feedback residual, saved after each round, so a restart does not
  lose what was not yet transmitted;
- `release.bin`, the last release it loaded (signed, as received), and `release.json`, its
  version: after a restart the device verifies and loads that release again before it
  connects, and refuses anything older (a retained or replayed older release cannot roll it
  back). An unreadable file is reported and ignored, except that the version floor it recorded
  is kept if it can be read.

Every message is handled on its own: a failure while handling one (a bug, since bad payloads
are refused by the participant) is logged with its topic and counted in `stats.handler_errors`,
and the agent goes on.

Hooks for the simulator (`firmware_sim`): `condition` (eligibility, battery), `before_send`
(dropouts and latency per stage), `slowdown` (compute speed), `tamper` (poisoned updates).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import secrets
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fleetlearn.device.participant import (
    Action,
    LoadModel,
    LocalResult,
    Note,
    NoteKind,
    Participant,
    PublishStatus,
    Send,
    Train,
)
from fleetlearn.device.trainer import LiteRTTrainer, TrainerError, local_round
from fleetlearn.shared import compression, dataset, evaluation, tflite, topics, wire
from fleetlearn.shared.dataset import DataError
from fleetlearn.shared.errors import FleetlearnError
from fleetlearn.shared.rounds import TrainingPlan
from fleetlearn.transport import (
    JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
    BrokerAddress,
    Connector,
    Endpoint,
    Incoming,
    LastWill,
    MqttVersion,
    Transport,
)

log = logging.getLogger("fleetlearn.device")
SDK_VERSION = "fleetlearn-0.1"


class LocalData(Protocol):
    """Where a device's examples come from. Labels may be missing: then the device runs each
    release but trains only an autoencoder (which learns from the rows alone)."""

    @property
    def labelled(self) -> bool: ...

    def training_set(self, max_samples: int) -> tuple[np.ndarray, np.ndarray | None]: ...

    def recent(self, count: int) -> tuple[np.ndarray, np.ndarray | None]: ...

    def __len__(self) -> int: ...


class ArrayData:
    """Examples held in memory: the newest rows are the most recent. `y` None: unlabelled
    (an inference-only device)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self.x, self.y = x, y

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        label: str = dataset.DEFAULT_LABEL_COLUMN,
        require_labels: bool = True,
    ) -> ArrayData:
        """A data file in the documented format (`shared.dataset`: .npz or .csv, docs/data.md).
        A device that trains needs labels: without `require_labels=False` a file without
        them is refused here."""
        data = dataset.load(path, label=label)
        if data.y is None and require_labels:
            raise DataError(
                f"{path}: has no labels ('y' in an .npz, a {label!r} column in a .csv); "
                "a device that trains needs them"
            )
        return cls(data.x, data.y)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def training_set(self, max_samples: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The newest rows, with their labels when there are any (the trainer refuses
        unlabelled rows for any task but anomaly detection)."""
        return self.x[-max_samples:], None if self.y is None else self.y[-max_samples:]

    def recent(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.x[-count:], None if self.y is None else self.y[-count:]

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True, slots=True)
class Condition:
    eligibility: wire.Eligibility = wire.Eligibility.ELIGIBLE
    charging: bool = False
    battery: float = 1.0


@dataclass(slots=True)
class AgentStats:
    rounds_announced: int = 0
    rounds_trained: int = 0
    releases_loaded: int = 0
    releases_refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    notes: int = 0
    handler_errors: int = 0


class DeviceAgent:
    def __init__(
        self,
        *,
        participant: Participant,
        address: BrokerAddress | None = None,
        password: str,
        data: LocalData,
        protocol: MqttVersion = "auto",
        state_dir: Path | None = None,
        labels: tuple[str, ...] = (),
        condition: Callable[[], Condition] | None = None,
        before_send: Callable[[topics.Kind, int], Awaitable[bool]] | None = None,
        slowdown: float = 0.0,
        tamper: Callable[[np.ndarray], np.ndarray] | None = None,
        executor: concurrent.futures.Executor | None = None,
        round_executor: concurrent.futures.Executor | None = None,
        train_seed: int | None = None,
        ca_file: str | None = None,
        health_window: int = 64,
        connector: Connector | None = None,
    ) -> None:
        """The network is `connector` when given (e.g. `transport.memory`), else an MQTT link
        to `address` (with `ca_file` for mqtts://)."""
        if connector is None:
            if address is None:
                raise ValueError("DeviceAgent needs a broker address or a connector")
            from fleetlearn.transport import mqtt

            connector = mqtt.connector(address, ca_file=ca_file)
        self.participant = participant
        self.device_id = participant.device_id
        self.fleet = participant.fleet
        self.data = data
        self._labels = labels
        self._condition = condition or Condition
        self._before_send = before_send
        self._slowdown = slowdown
        self._tamper = tamper  # simulates a faulty or malicious device (robustness tests)
        self._executor = executor  # training, interpreters, inference: long jobs
        self._round_executor = round_executor  # the participant's offloaded calls: short
        self._state_dir = state_dir
        self._rng = np.random.default_rng(
            train_seed if train_seed is not None else secrets.randbits(64)
        )
        self._health_window = health_window
        self._calibration_rows = 1024  # newest training rows an autoencoder calibrates on
        # The rows a round holds out: the last plan's; until one came, the aggregator's default.
        self._eval_fraction = 0.2
        self.trainer: LiteRTTrainer | None = None
        self._trainer_lock = asyncio.Lock()
        # The participant is not thread-safe: every call to it holds this lock, and the heavy
        # ones (masking, error feedback) run in the round executor while holding it.
        self._participant_lock = asyncio.Lock()
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self._release_queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self._trainer_loaded = asyncio.Event()  # set whenever a new interpreter is in place
        self._note = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = AgentStats()
        self._load_residual()
        # Weights of the round's personal layers (TrainingPlan.personal): never sent.
        self._personal: dict[str, np.ndarray] = self._load_personal()
        self._saved_release = self._load_release_floor()
        offline = wire.DeviceStatus(
            device_id=self.device_id, online=False, eligibility=wire.Eligibility.OFFLINE
        )
        self.link: Transport = connector(
            Endpoint(
                client_id=self.device_id,
                username=self.device_id,
                password=password,
                subscriptions=tuple(topics.device_filters(self.fleet, self.device_id)),
                will=LastWill(topics.status(self.fleet, self.device_id), wire.encode(offline)),
                protocol=protocol,
                on_message=self._queue.put_nowait,
                on_connect=self.publish_status,
            )
        )

    # ---------------------------------------------------------------------------- running

    async def run(self) -> None:
        """Until cancelled, or until the broker refuses the credentials (LinkAuthError)."""
        await self._restore_release()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name=f"{self.device_id}-link")
                tg.create_task(self._intake(), name=f"{self.device_id}-intake")
                tg.create_task(self._releases(), name=f"{self.device_id}-releases")
                tg.create_task(self._ticker(), name=f"{self.device_id}-tick")
        except* FleetlearnError as group:
            raise group.exceptions[0] from None

    async def stop(self) -> None:
        """Publish 'offline' and disconnect cleanly."""
        offline = wire.DeviceStatus(
            device_id=self.device_id,
            online=False,
            eligibility=wire.Eligibility.OFFLINE,
            model_version=self.participant.model_version,
        )
        with contextlib.suppress(FleetlearnError):
            await self.link.publish(
                topics.status(self.fleet, self.device_id), wire.encode(offline), retain=True, wait=2
            )
        await self.link.close()
        for task in list(self._tasks):
            task.cancel()

    async def _call(
        self, fn: Callable[..., list[Action]], *args: Any, offload: bool = False
    ) -> list[Action]:
        async with self._participant_lock:
            if not offload:
                return fn(*args)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._round_executor, fn, *args)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._carry_out(await self._call(self.participant.tick, time.monotonic()))

    async def _intake(self) -> None:
        while True:
            msg = await self._queue.get()
            self.stats.bytes_down += len(msg.payload)
            try:
                await self._handle(msg)
            except Exception:
                self.stats.handler_errors += 1
                log.exception(
                    "%s: dropped a message on %s: handling it failed", self.device_id, msg.topic
                )

    async def _handle(self, msg: Incoming) -> None:
        try:
            topic = topics.parse(msg.topic)
        except topics.TopicError:
            return
        now = time.monotonic()
        if topic.kind is topics.Kind.MODEL:
            self._release_queue.put_nowait(msg)
            return
        if topic.kind is topics.Kind.ROUND:
            actions = await self._call(self.participant.on_round, msg.payload, now)
            if any(isinstance(a, Train) for a in actions):
                self.stats.rounds_announced += 1
        elif topic.kind in (topics.Kind.INBOX, topics.Kind.SURVIVORS):
            had_round = self.participant.round is not None
            actions = await self._call(
                self.participant.on_message, topic, msg.payload, now, offload=True
            )
            if had_round and self.participant.round is None:
                self._save_residual()
        else:
            return
        await self._carry_out(actions)

    async def _releases(self) -> None:
        """Model releases in arrival order, apart from the round messages (see the module
        docstring): verify (off the loop), then load, publish status and health."""
        while True:
            msg = await self._release_queue.get()
            try:
                actions = await self._call(
                    self.participant.on_model, msg.payload, time.monotonic(), offload=True
                )
                await self._carry_out(actions)
            except Exception:
                self.stats.handler_errors += 1
                log.exception(
                    "%s: dropped a message on %s: handling it failed", self.device_id, msg.topic
                )

    async def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action)
            elif isinstance(action, LoadModel):
                await self._load(action)
            elif isinstance(action, Train):
                task = asyncio.create_task(self._train(action), name=f"{self.device_id}-train")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(action, PublishStatus):
                await self.publish_status()
            elif isinstance(action, Note):
                self.stats.notes += 1
                log.info("%s: %s", self.device_id, action.text)
                if action.kind is NoteKind.RELEASE_REFUSED:
                    self.stats.releases_refused += 1
                    self._note = action.text[:500]
                    await self.publish_status()

    async def _send(self, action: Send) -> None:
        kind = topics.parse(action.topic).kind
        round_id = topics.parse(action.topic).round_id or 0
        if self._before_send is not None and not await self._before_send(kind, round_id):
            return
        self.stats.bytes_up += len(action.payload)
        with contextlib.suppress(FleetlearnError):
            await self.link.publish(
                action.topic,
                action.payload,
                retain=action.retain,
                expiry=action.expiry,
                content_type=MSGPACK_CONTENT_TYPE if action.retain else None,
            )

    # ------------------------------------------------------------------------------ model

    async def _load(self, action: LoadModel, *, announce: bool = True) -> None:
        """Load a verified release into a fresh interpreter; `announce`: then publish status
        and health (not when restoring the saved release before connecting)."""
        loop = asyncio.get_running_loop()
        try:
            trainer = await loop.run_in_executor(
                self._executor, self._new_trainer, action.model, action.manifest
            )
        except (TrainerError, FleetlearnError) as exc:
            self._note = f"release v{action.manifest.version} verified but not loadable: {exc}"
            self.stats.releases_refused += 1
            if announce:
                await self.publish_status()
            return
        async with self._trainer_lock:
            self.trainer = trainer
        self._trainer_loaded.set()
        self.stats.releases_loaded += 1
        if action.release and announce:
            await loop.run_in_executor(self._executor, self._save_release, action)
        self._note = ""
        if announce:
            await self.publish_status()
            await self.publish_health()

    async def publish_status(self) -> None:
        c = self._condition()
        status = wire.DeviceStatus(
            device_id=self.device_id,
            online=True,
            # Without labels it cannot train (but an autoencoder): never selected, still runs
            # every release.
            eligibility=c.eligibility if self._can_train() else wire.Eligibility.INFERENCE_ONLY,
            charging=c.charging,
            battery=min(1.0, max(0.0, c.battery)),
            model_version=self.participant.model_version,
            sdk_version=SDK_VERSION,
            samples=len(self.data),
            note=self._note,
            ticket=self.participant.ticket,
            ready_version=self.participant.ready_version,
        )
        with contextlib.suppress(FleetlearnError):
            await self.link.publish(
                topics.status(self.fleet, self.device_id), wire.encode(status), retain=True
            )

    def _can_train(self) -> bool:
        """Whether this device's data can train the loaded model: class labels for a
        classifier, targets for a regressor, integer row kinds or nothing for an autoencoder
        (before any model is loaded: whether it has labels)."""
        trainer = self.trainer
        if trainer is None:
            return self.data.labelled
        _, y = self.data.recent(len(self.data))
        if evaluation.y_problem(trainer.task, y):
            return False
        # A classifier's labels must be its classes (a device with label 7 for a 4-class
        # model would be selected and then fail every round).
        return not (
            trainer.task is tflite.Task.CLASSIFICATION
            and y is not None
            and y.size > 0
            and (int(y.min()) < 0 or int(y.max()) >= trainer.classes)
        )

    async def publish_health(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        x, y = self.data.recent(self._health_window)
        if x.shape[0] == 0:
            return
        loop = asyncio.get_running_loop()
        base: dict[str, Any] = {
            "device_id": self.device_id,
            "fleet": self.fleet,
            "model_version": trainer.version,
            "ts": round(time.time(), 3),
            "windows": int(x.shape[0]),
        }
        if trainer.task is not tflite.Task.CLASSIFICATION:
            async with self._trainer_lock:
                figures = await loop.run_in_executor(
                    self._executor, self._task_health, trainer, x, y
                )
            await self._publish_health({**base, **figures})
            return
        async with self._trainer_lock:
            probs = await loop.run_in_executor(self._executor, trainer.predict, x)
        labels = (
            self._labels or trainer.manifest.labels or tuple(str(i) for i in range(probs.shape[1]))
        )
        predicted = probs.argmax(axis=1)
        counts = np.bincount(predicted, minlength=len(labels))
        report: dict[str, Any] = {
            **base,
            "latest": {
                "label": labels[int(predicted[-1])],
                "confidence": round(float(probs[-1].max()), 4),
            },
            "predicted_share": {
                labels[i]: round(float(counts[i]) / x.shape[0], 4) for i in range(len(labels))
            },
            "accuracy": None if y is None else round(float((predicted == y).mean()), 4),
        }
        await self._publish_health(report)

    def _task_health(
        self, trainer: LiteRTTrainer, x: np.ndarray, y: np.ndarray | None
    ) -> dict[str, Any]:
        """Health figures of a regressor (its latest and mean prediction) or an autoencoder
        (anomaly scores against the threshold calibrated on this device's own normal rows:
        the newest training rows, labelled 0 or unlabelled)."""
        if trainer.task is tflite.Task.REGRESSION:
            predicted = trainer.predict_values(x)
            return {
                "latest": {"prediction": round(float(predicted[-1]), 6)},
                "mean_prediction": round(float(predicted.mean()), 6),
            }
        xt, yt = self.data.training_set(self._calibration_rows)
        # The rows local training calibrates on: not held out (under the last plan's split).
        train = ~dataset.evaluation_rows(xt, self._eval_fraction)
        xt, yt = xt[train], None if yt is None else yt[train]
        normal = xt if yt is None else xt[yt == 0]
        threshold = trainer.calibrate(normal)
        scores = trainer.anomaly_scores(x)
        flagged = scores > threshold
        return {
            "latest": {
                "score": round(float(scores[-1]), 6),
                "anomaly": bool(flagged[-1]),
            },
            "threshold": round(threshold, 6) if math.isfinite(threshold) else None,
            "anomalous_share": round(float(flagged.mean()), 4),
            "max_score": round(float(scores.max()), 6),
        }

    async def _publish_health(self, report: dict[str, Any]) -> None:
        with contextlib.suppress(FleetlearnError):
            await self.link.publish(
                topics.health(self.fleet, self.device_id),
                json.dumps(report, separators=(",", ":")).encode(),
                retain=True,
                content_type=JSON_CONTENT_TYPE,
            )

    # --------------------------------------------------------------------------- training

    async def _trainer_for(self, version: int, within: float) -> LiteRTTrainer | None:
        """The interpreter of `version`, waiting up to `within` s while the release lane is
        still loading it (the participant accepts a release before its interpreter exists;
        an asynchronous invitation may come before its release was even verified)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within
        while True:
            trainer = self.trainer
            if trainer is not None and trainer.version == version:
                return trainer
            remaining = give_up - loop.time()
            if self.participant.model_version > version or remaining <= 0:
                return None
            self._trainer_loaded.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._trainer_loaded.wait()

    async def _train(self, action: Train) -> None:
        plan = action.announce.training
        loop = asyncio.get_running_loop()
        version = action.announce.model_version
        if await self._trainer_for(version, action.announce.times.collect_hard) is None:
            why = f"round {action.round_id}: model v{version} not loaded"
            await self._call(self.participant.untrained, action.round_id)
            await self._carry_out([Note(NoteKind.ROUND_LEFT, why)])
            return
        async with self._trainer_lock:
            trainer = self.trainer
            if trainer is None or trainer.version != version:
                # Replaced by a newer one meanwhile: this round is stale.
                await self._call(self.participant.untrained, action.round_id)
                return
            try:
                result = await loop.run_in_executor(self._executor, self._train_sync, trainer, plan)
            except (TrainerError, FleetlearnError) as exc:
                why = f"round {action.round_id}: training failed: {exc}"
                await self._call(self.participant.untrained, action.round_id)
                await self._carry_out([Note(NoteKind.ROUND_LEFT, why)])
                return
        if self._slowdown > 0:
            await asyncio.sleep(self._slowdown)
        self.stats.rounds_trained += 1
        actions = await self._call(
            self.participant.trained, action.round_id, result, time.monotonic(), offload=True
        )
        self._save_residual()
        self._save_personal()
        await self._carry_out(actions)

    def _train_sync(self, trainer: LiteRTTrainer, plan: TrainingPlan) -> LocalResult:
        self._eval_fraction = plan.eval_fraction
        # The CPU time of this thread: the device's cost report (shared.cost). LiteRT runs the
        # interpreter on the calling thread, so this is the training's own, whatever else the
        # process (a simulator's other devices) is doing.
        started = time.thread_time()
        x, y = self.data.training_set(self._data_limit(plan))
        result = local_round(trainer, x, y, plan, rng=self._rng, personal=self._personal)
        result = dataclasses.replace(result, cpu_s=time.thread_time() - started)
        if self._tamper is not None:
            tampered = self._tamper(result.update).astype(np.float32)
            result = dataclasses.replace(result, update=tampered)
        return result

    @staticmethod
    def _data_limit(plan: TrainingPlan) -> int:
        """Rows to read: enough that about `max_samples` remain for training after the
        hold-out (which rows are held out does not depend on this window)."""
        return math.ceil(plan.max_samples / (1.0 - plan.eval_fraction)) + 1

    # ------------------------------------------------------------------- release floor

    def _release_paths(self) -> tuple[Path, Path] | None:
        if self._state_dir is None:
            return None
        return self._state_dir / "release.bin", self._state_dir / "release.json"

    def _load_release_floor(self) -> bytes | None:
        """Set the participant's version floor from `release.json`; return the saved
        release (verified later, by the participant, like any other)."""
        paths = self._release_paths()
        if paths is None:
            return None
        release_path, floor_path = paths
        if floor_path.exists():
            try:
                floor = json.loads(floor_path.read_text(encoding="utf-8"))["version"]
                if type(floor) is not int or floor < 1:
                    raise ValueError(f"version {floor!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s: ignoring unreadable %s (%s)", self.device_id, floor_path, exc)
            else:
                self.participant.min_version = max(self.participant.min_version, floor)
        try:
            return release_path.read_bytes() if release_path.exists() else None
        except OSError as exc:
            log.warning("%s: ignoring unreadable %s (%s)", self.device_id, release_path, exc)
            return None

    async def _restore_release(self) -> None:
        """Load the release this device ran before a restart, verified like a new one."""
        saved, self._saved_release = self._saved_release, None
        if saved is None:
            return
        actions = await self._call(self.participant.on_model, saved, time.monotonic(), offload=True)
        for action in actions:
            if isinstance(action, LoadModel):
                await self._load(action, announce=False)
            elif isinstance(action, Note):
                log.warning("%s: saved release not restored: %s", self.device_id, action.text)

    def _save_release(self, action: LoadModel) -> None:
        paths = self._release_paths()
        if paths is None:
            return
        release_path, floor_path = paths
        release_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(release_path, action.release)
        floor = json.dumps(
            {"version": action.manifest.version, "model_id": action.manifest.model_id}
        )
        _atomic_write(floor_path, floor.encode())

    def _new_trainer(self, model: bytes, manifest: tflite.ModelManifest) -> LiteRTTrainer:
        """An interpreter for a release, carrying this device's personal layers (if any)."""
        trainer = LiteRTTrainer(model, manifest)
        # A snapshot: a round's local training (another thread) may drop names meanwhile.
        stored = dict(self._personal)
        personal = {
            spec.name: stored[spec.name]
            for spec in trainer.layout
            if spec.name in stored and stored[spec.name].shape == spec.shape
        }
        if personal:
            trainer.set_weights({**trainer.get_weights(), **personal})
        return trainer

    # ------------------------------------------------------------------ personal layers

    def _personal_path(self) -> Path | None:
        return None if self._state_dir is None else self._state_dir / "personal.npz"

    def _load_personal(self) -> dict[str, np.ndarray]:
        path = self._personal_path()
        if path is None or not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: np.asarray(archive[name], dtype=np.float32) for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("%s: ignoring unreadable %s (%s)", self.device_id, path, exc)
            return {}

    def _save_personal(self) -> None:
        path = self._personal_path()
        if path is None:
            return
        if not self._personal:  # the plan has no personal layers (any more)
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **self._personal)
        _atomic_write(path, buffer.getvalue())

    # --------------------------------------------------------------------- error feedback

    def _residual_path(self) -> Path | None:
        return None if self._state_dir is None else self._state_dir / "residual.bin"

    def _load_residual(self) -> None:
        path = self._residual_path()
        if path is None or not path.exists():
            return
        try:
            self.participant.feedback = compression.ErrorFeedback.load(path.read_bytes())
        except (OSError, wire.WireError) as exc:
            log.warning("%s: ignoring unreadable residual %s (%s)", self.device_id, path, exc)

    def _save_residual(self) -> None:
        path = self._residual_path()
        feedback = self.participant.feedback
        if path is None or feedback is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, feedback.save())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename, fsync-ed: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

"""The aggregator service: the round engine over MQTT, with persistence and releases.

Tasks in one TaskGroup:
- `link`: the publishing connection, and `ingest` the receiving one (`transport.Transport`s;
  by default MQTT `Link`s: reconnect with jittered backoff, MQTT 5 properties when the broker
  has them).
- `intake`: drains incoming messages into the engine, in arrival order.
- `deadlines`: ticks the engine when a stage deadline passes.
- `rounds`: waits for enough eligible devices, starts a round, waits for its outcome, then
  applies the update with the server optimizer, patches the model (no TensorFlow), signs and
  publishes the release (retained), then the round summary on `metrics` (retained). An
  aborted round is retried at once with a fresh cohort (the engine leaves out the devices
  that stalled); `rounds.count` counts closed rounds, and `rounds.max_aborts` aborted rounds
  in a row end the service with `RoundsAbortedError`.
- With a privacy budget (docs/privacy.md) a round that would take the run past it is not
  started: the retained `round` and `metrics` topics and `events` say why, and the service
  stops (`budget_spent` holds the reason). Every charge is in the store with its round, so a
  restarted service continues from what was spent.

The engine is used by one thing at a time, under `_engine_lock`. Each arriving message is
taken on the event loop (decode, checks, a signature, adding a masked vector: well under a
millisecond); the long steps (starting a round, closing a stage: rosters and share inboxes for
the whole cohort, unmasking, the aggregation rule) run on a single worker thread
(`_engine_call`), so they never block the loop. Handing every message to the worker instead
cost a thread switch per batch and GIL contention with the MQTT client, a sixth of the
aggregator's CPU at 1000 devices.

Crash safety (see aggregator.store): a restarted service marks the interrupted round aborted,
announces that, republishes the latest release, and continues with the next round id. A round
is closed only once its release, its metrics and the optimizer state are committed together;
`round_closed`/`round_aborted` go on `events`, and the round summary on `metrics`, only after
that commit, and every (re)connect republishes the release and the last finished round as
stored, so what dashboards and devices read never contradicts the state directory.

Hostile or broken input never stops the service: the engine refuses bad messages (counted)
and contains its own failures (aggregator.engine): a bug met while checking a message costs
that message (`internal_error`), a bug while the round handles it or closes a stage ends that
round in the engine's ERROR phase, aborted with the error as its reason, and the next round
starts as after any abort. The service logs each such exception with its traceback. A failure
around the engine (parsing a topic) costs that message only. Publishing while the broker is
away is retried by the link and otherwise given up per message (retained state is republished
on reconnect). SIGINT/SIGTERM (`stop()`) end the service cleanly in every state, also while
it waits for a broker it cannot reach.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fleetlearn.aggregator import privacy, report, rules
from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.engine import (
    BudgetSpentError,
    EngineError,
    NotEnoughDevicesError,
    Publish,
    RoundEngine,
    RoundOutcome,
)
from fleetlearn.aggregator.modes import SLACK
from fleetlearn.aggregator.store import Store
from fleetlearn.shared import dataset, evaluation, tflite, topics, wire
from fleetlearn.shared.dataset import DataError
from fleetlearn.shared.errors import ConfigError, FleetlearnError
from fleetlearn.shared.fleetdir import AggregatorCredentials, FleetRegistry
from fleetlearn.shared.release import (
    ModelRelease,
    make_release,
    release_weights,
    verify_release,
)
from fleetlearn.shared.rounds import RoundAnnounce, RoundState
from fleetlearn.shared.tflite.runtime import RuntimeMissingError, interpreter_class
from fleetlearn.transport import (
    JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
    BrokerAddress,
    Connector,
    Endpoint,
    Incoming,
    LinkError,
    Transport,
)

log = logging.getLogger("fleetlearn.aggregator")
PUBLISH_WINDOW = 20
INTAKE_BATCH = 64  # messages taken on the loop between two looks at the network
T = TypeVar("T")


class RoundsAbortedError(FleetlearnError):
    """`rounds.max_aborts` rounds in a row aborted: the fleet cannot close rounds now."""


def default_model() -> bytes:
    return (resources.files("fleetlearn.aggregator") / "models" / "pdm_default.tflite").read_bytes()


@dataclass(slots=True)
class RoundSummary:
    round_id: int
    state: str
    new_version: int | None
    metrics: dict[str, Any]
    survivors: tuple[str, ...] = ()


class AggregatorService:
    def __init__(
        self,
        settings: AggregatorSettings,
        credentials: AggregatorCredentials,
        registry: FleetRegistry,
        *,
        on_round: Callable[[RoundSummary], None] | None = None,
        connector: Connector | None = None,
    ) -> None:
        """`connector` opens the two connections; by default MQTT links to `broker.url`
        (tests pass `transport.memory.MemoryBroker.connector` to run without a broker)."""
        if registry.fleet != settings.fleet.id:
            raise ConfigError(
                "fleet.id",
                f"{settings.fleet.id!r} but {settings.fleet.dir} holds {registry.fleet!r}",
            )
        self.settings = settings
        self._creds = credentials
        self._registry = registry
        self._on_round = on_round
        self.fleet = settings.fleet.id
        self.engine = RoundEngine(
            fleet=self.fleet,
            config=settings.engine_config(),
            verify_keys={d: bytes(k) for d, k in registry.device_keys.items()},
            random=os.urandom,
        )
        self._eval_set = load_eval_set(settings.eval.data, settings.eval.label)
        self.store = Store(settings.state.dir)
        self.optimizer = rules.ServerOptimizer(settings.optimizer_config())
        self.optimizer.state = self.store.load_arrays("optimizer")
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._engine_lock = asyncio.Lock()
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self._outcome = asyncio.Event()
        self._stop = asyncio.Event()
        if connector is None:
            from fleetlearn.transport import mqtt

            address = BrokerAddress.parse(settings.broker.url, key="broker.url")
            connector = mqtt.connector(address, ca_file=settings.broker.ca_file or None)
        # Two connections. `link` publishes (models, rounds, inboxes, metrics, events) and
        # uses MQTT 5 when the broker has it: message expiry and content types. `ingest`
        # subscribes to everything devices send and speaks MQTT 3.1.1 unless 5 is forced:
        # paho decodes MQTT 5 properties in pure Python, copying the payload several times,
        # which at 1000 devices was a third of the aggregator's CPU; received messages need
        # no properties. Ingest keeps a persistent session, so messages sent while it
        # reconnects wait at the broker.
        # Each connection is its own broker identity: brokers bind client ids to usernames,
        # so two connections under one username would replace each other.
        self.link: Transport = connector(
            Endpoint(
                client_id=credentials.username,
                username=credentials.username,
                password=credentials.password,
                protocol=settings.broker.protocol,
                persistent=False,
                on_connect=self._on_connect,
            )
        )
        self.ingest: Transport = connector(
            Endpoint(
                client_id=credentials.ingest_username,
                username=credentials.ingest_username,
                password=credentials.ingest_password,
                subscriptions=tuple(topics.aggregator_filters(self.fleet)),
                protocol="5" if settings.broker.protocol == "5" else "3.1.1",
                on_message=self._queue.put_nowait,
            )
        )
        # The latest round summaries (what run() returns); older ones are in the store.
        self.summaries: collections.deque[RoundSummary] = collections.deque(maxlen=1000)
        self._gave_up: str | None = None  # why the rounds loop stopped early (max_aborts)
        self.budget_spent: str | None = None  # why no more rounds run (the privacy budget)
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=2000)
        # Asynchronous rounds: updates that arrived between two rounds wait for the next one
        # (see _park), each at most the size of an honest update of the model.
        self._asynchronous = settings.rounds.mode in ("async", "async-secure")
        self._calls = settings.rounds.mode == "async-secure"  # invitations between rounds
        self._parking = settings.rounds.mode == "async"
        self._parked: dict[str, Incoming] = {}  # device -> its update
        self._update_limit = 0  # bytes: set when a round starts (the model's dimension)

    # ------------------------------------------------------------------------------- setup

    def _bootstrap(self) -> None:
        """Make sure there is a version-1 release; close rounds a crash left open."""
        now = time.time()
        if self.store.latest_release() is None:
            path = self.settings.model.initial
            try:
                model = Path(path).read_bytes() if path else default_model()
            except OSError as exc:
                raise ConfigError("model.initial", f"cannot read {path}: {exc.strerror}") from None
            manifest = tflite.read_manifest(model)
            if manifest is None:
                raise ConfigError("model.initial", f"{path or 'default model'} has no manifest")
            if manifest.version != 1:
                model, manifest = tflite.embed_manifest(
                    model, model_id=manifest.model_id, version=1
                )
            release = make_release(model, manifest, self._creds.identity)
            self.store.save_release(
                1, None, manifest.content_hash.hex(), wire.encode(release), model, now
            )
            log.info(
                "initial release v1 of %s (%d parameters)",
                manifest.model_id,
                manifest.parameter_count,
            )
        latest = self.store.latest_release()
        assert latest is not None
        manifest = wire.decode(latest.payload, ModelRelease).manifest
        names = {spec.name for spec in manifest.layout}
        unknown = [n for n in self.settings.training.personal_names if n not in names]
        if unknown:
            raise ConfigError(
                "training.personal",
                f"{unknown} are not weights of model {manifest.model_id!r} "
                f"(its weights: {', '.join(sorted(names))})",
            )
        if self._eval_set is not None:
            width = tflite.describe_model(self.store.model_bytes(latest.version))
            inputs = {t.name: t for t in width.signature("infer").inputs}
            wanted = inputs["x"].shape[-1] if "x" in inputs else None
            got = self._eval_set[0].shape[1]
            if wanted is not None and wanted != got:
                raise ConfigError(
                    "eval.data", f"has {got} features; model {manifest.model_id!r} takes {wanted}"
                )
            problem = evaluation.y_problem(manifest.task, self._eval_set[1])
            if problem:
                raise ConfigError("eval.data", f"{problem} (model {manifest.model_id!r})")
        self._interrupted = self.store.interrupted_rounds()
        for round_id in self._interrupted:
            self.store.finish_round(
                round_id,
                status="aborted",
                reason="aggregator restarted during the round",
                now=now,
                # Whether its noisy sum was computed is unknown: it keeps its planned charge.
                charge=self.store.planned_charge(round_id),
            )
            log.warning("round %d was interrupted by a restart; recorded as aborted", round_id)
        if self.settings.engine_config().privacy != "none":
            privacy.require_accountant()
        self.engine.ledger = privacy.Ledger(self.store.charges())
        if self.engine.ledger:
            last = self.engine.ledger.charges[-1]
            figures = self.engine.privacy_figures(last, last)
            log.warning(
                "privacy: %d rounds charged so far, epsilon %.3g at delta %g",
                len(self.engine.ledger),
                figures["epsilon"],
                figures["delta"],
            )

    async def _on_connect(self) -> None:
        """Make the retained topics show the persisted state: the latest release, and the last
        finished round (closed or aborted) on `round` and `metrics`, unless a round is
        running (its own announcement is then the newest)."""
        latest = await asyncio.to_thread(self.store.latest_release)
        assert latest is not None
        await self.link.publish(topics.model(self.fleet), latest.payload, retain=True)
        log.warning(
            "connected to %s (MQTT %s); release v%d published",
            self.link.peer,
            self.link.version,
            latest.version,
        )
        if self.engine.running:
            return
        try:
            await self._republish_finished()
        finally:
            # After the finished round went out again: the next call must follow it.
            self.engine.repeat_call()

    async def _republish_finished(self) -> None:
        finished = await asyncio.to_thread(self.store.last_finished_round)
        if finished is None:
            return
        row, raw = finished
        try:
            announce = wire.decode(raw, RoundAnnounce)
        except wire.WireError:
            log.warning("round %d has no readable announcement to republish", row.round_id)
            return
        state = RoundState.CLOSED if row.status == "done" else RoundState.ABORTED
        closed = announce.closed(state, row.reason)
        await self.link.publish(topics.round_announce(self.fleet), wire.encode(closed), retain=True)
        metrics = dict(row.metrics) or {
            "fleet": self.fleet,
            "round": row.round_id,
            "mode": row.mode,
            "state": "closed" if state is RoundState.CLOSED else "aborted",
            "reason": row.reason,
            "model_version": row.model_version,
            "new_version": row.new_version,
            "cohort": len(row.cohort),
            "ts": round(row.ended_at or time.time(), 3),
        }
        await self._send_json(topics.metrics(self.fleet), metrics, retain=True)

    # --------------------------------------------------------------------------------- run

    async def run(self) -> list[RoundSummary]:
        await asyncio.to_thread(self._bootstrap)
        try:
            async with asyncio.TaskGroup() as tg:
                loops = [
                    tg.create_task(self.link.run(), name="link"),
                    tg.create_task(self.ingest.run(), name="ingest"),
                    tg.create_task(self._intake(), name="intake"),
                    tg.create_task(self._deadlines(), name="deadlines"),
                ]
                self._events_for_interrupted()
                await self._rounds()
                self._stop.set()
                await self._flush_events()
                await self.ingest.close()
                await self.link.close()
                for task in loops:
                    task.cancel()
        except* LinkError as group:
            raise group.exceptions[0] from None
        finally:
            self._worker.shutdown(wait=True)
            self.store.close()
        if self._gave_up is not None:
            raise RoundsAbortedError(self._gave_up)
        return list(self.summaries)

    def stop(self) -> None:
        """End the service cleanly from any state (signal handlers call this): a running round
        is aborted and recorded, waits for the broker or for devices end at once."""
        self._stop.set()
        self._outcome.set()

    async def _until_stopped(self, waiter: Coroutine[Any, Any, Any]) -> bool:
        """Await `waiter` unless stop() comes first; True when `waiter` finished."""
        task = asyncio.ensure_future(waiter)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stopper):
                if not pending.done():
                    pending.cancel()
        return task.done() and not task.cancelled()

    async def _engine_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: fn(*args, **kwargs))

    async def _publish(self, pubs: list[Publish]) -> None:
        """Send one engine step's messages in order, PUBLISH_WINDOW acknowledgements awaited
        together: a stage close addresses every device's inbox, and awaiting each PUBACK in
        turn would cost one broker round trip per device."""
        sends = []
        for p in pubs:
            if isinstance(p.payload, dict):
                data = json.dumps(p.payload, separators=(",", ":"), allow_nan=False).encode()
                send = self.link.publish(
                    p.topic, data, retain=p.retain, qos=p.qos, content_type=JSON_CONTENT_TYPE
                )
            else:
                send = self.link.publish(
                    p.topic,
                    p.payload,
                    retain=p.retain,
                    qos=p.qos,
                    expiry=p.expiry,
                    content_type=MSGPACK_CONTENT_TYPE if p.retain else None,
                )
            # A message the link could not deliver (broker away longer than the link waits)
            # is lost like a device's radio message: the round's deadlines deal with it, and
            # retained state is republished on reconnect. It must not stop the service.
            sends.append(_best_effort(send, p.topic))
        await _in_order(sends)
        await self._flush_events()

    async def _send_json(self, topic: str, obj: dict[str, Any], *, retain: bool) -> None:
        await self._publish([Publish(topic, _json_safe(obj), retain=retain)])

    async def _flush_events(self) -> None:
        async with self._engine_lock:  # not while a worker call may be adding events
            events = self.engine.drain_events()
            errors = self.engine.drain_errors()
        for exc in errors:  # each cost a message or ended a round; the engine went on
            log.error("round engine: %s: %s", type(exc).__name__, exc, exc_info=exc)
        sends = []
        for event in events:
            self.recent_events.append(event)
            event["fleet"] = self.fleet
            event["ts"] = round(time.time(), 3)
            data = json.dumps(event, separators=(",", ":"), default=str).encode()
            sends.append(
                _best_effort(
                    self.link.publish(
                        topics.events(self.fleet),
                        data,
                        qos=0,
                        content_type=JSON_CONTENT_TYPE,
                        wait=5,
                    ),
                    None,
                )
            )
        await _in_order(sends)

    def _events_for_interrupted(self) -> None:
        """Rounds a crash interrupted were recorded aborted by `_bootstrap`; say so on
        `events` (the round and metrics topics are brought up to date by `_on_connect`)."""
        for round_id in self._interrupted:
            self.engine.events.append(
                {
                    "event": "round_aborted",
                    "round": round_id,
                    "reason": "aggregator restarted during the round",
                    "survivors": 0,
                }
            )

    async def _intake(self) -> None:
        """Feed arrivals to the engine in arrival order. Each message is taken on the loop;
        a message that completes a stage is followed, before the next one is taken, by the
        stage's close on the worker thread."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < INTAKE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._feed(batch)

    async def _feed(self, messages: list[Incoming]) -> None:
        """Messages into the engine in order, under its lock; an update that arrives between
        two asynchronous rounds is parked for the next (see _park)."""
        pubs: list[Publish] = []
        async with self._engine_lock:
            now = time.monotonic()
            for msg in messages:
                if self._park(msg):
                    continue
                pubs += self._take(msg, now)
                if self.engine.close_due:
                    pubs += await self._tick()
                    now = time.monotonic()
        await self._publish(pubs)
        if self.engine.outcome is not None:
            self._outcome.set()

    def _park(self, msg: Incoming) -> bool:
        """Plain asynchronous rounds: an update that arrives between two rounds (the release
        being built) waits for the next round, which takes updates on their inviting rounds'
        topics, instead of counting as late. Only one per device with an open invitation,
        and no larger than an honest update (module doc: one device cannot fill memory);
        anything else goes to the engine at once, which refuses or counts it."""
        if not self._parking or self.engine.running or len(msg.payload) > self._update_limit:
            return False
        try:
            topic = topics.parse(msg.topic)
        except topics.TopicError:
            return False
        device = topic.device_id
        if topic.kind is not topics.Kind.UPDATE or device is None or device in self._parked:
            return False
        if device not in self.engine.training():
            return False
        self._parked[device] = msg
        return True

    async def _unpark(self) -> None:
        """Feed the parked updates to the round that just started."""
        if not self._parked:
            return
        parked, self._parked = list(self._parked.values()), {}
        await self._feed(parked)  # if the round closes meanwhile, the next one takes the rest

    def _take(self, msg: Incoming, now: float) -> list[Publish]:
        """One message into the engine. The engine refuses bad input and contains its own
        failures (module doc); this guard is for a failure around it (topic parsing, a
        replaced engine method): that message is dropped, logged with its topic and
        counted, and the service goes on."""
        try:
            topic = topics.parse(msg.topic)
        except topics.TopicError:
            return []
        try:
            if topic.kind is topics.Kind.STATUS and topic.device_id is not None:
                self.engine.observe_status(topic.device_id, msg.payload, now)
                return []
            return self.engine.receive(topic, msg.payload, now, defer_close=True)
        except Exception as exc:
            log.exception("dropped a message on %s: handling it failed", msg.topic)
            self.engine.reject(
                "internal_error", topic.device_id or "?", f"{type(exc).__name__}: {exc}"
            )
            return []

    async def _tick(self) -> list[Publish]:
        """Close due stages on the worker. The engine ends a round whose close fails in
        its ERROR phase itself; this guard is for a failure of the call around it."""
        try:
            return await self._engine_call(self.engine.tick, time.monotonic())
        except Exception as exc:
            log.exception("closing a stage failed; aborting the round")
            return self.engine.abort(
                f"internal error while closing a stage: {type(exc).__name__}", time.monotonic()
            )

    async def _deadlines(self) -> None:
        while True:
            deadline = self.engine.next_deadline
            if deadline is not None and time.monotonic() >= deadline:
                async with self._engine_lock:
                    pubs = await self._tick()
                await self._publish(pubs)
                if self.engine.outcome is not None:
                    self._outcome.set()
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------------------ rounds

    async def _call_until_group(self, version: int) -> bool:
        """Secure asynchronous rounds: announce the invitations to train (a call, whenever
        they change) until enough devices hold a trained update to sum as a group. False:
        stopping."""
        waiting_since = warned = time.monotonic()
        wait = self.settings.rounds.wait_for_devices
        while not self._stop.is_set():
            next_id = await asyncio.to_thread(self.store.next_round_id)
            async with self._engine_lock:
                now = time.monotonic()
                pubs = await self._engine_call(self.engine.invite, next_id, version, now)
                due = self.engine.group_due(version, now)
            await self._publish(pubs)
            if due:
                return True
            if now - warned >= wait:
                warned = now
                log.warning(
                    "no secure group of fedbuff.buffer = %d devices holding an update after "
                    "%.0f s (%d training, %d online)",
                    self.settings.fedbuff.buffer,
                    now - waiting_since,
                    len(self.engine.training()),
                    len(self.engine.online()),
                )
            await self._pause(0.2)
        return False

    async def _wait_for_devices(self, version: int) -> bool:
        """Wait for a full selection on the current model; after `wait_for_devices` seconds,
        settle for `min_cohort` eligible devices. Stalled devices (which will not load the
        release while they hang) are not waited for."""
        cfg = self.settings.rounds
        start = time.monotonic()
        while not self._stop.is_set():
            stalled = self.engine.stalled(time.monotonic())
            wanted = math.ceil(cfg.cohort * cfg.over_select)
            if self._asynchronous:
                # Devices still training count; new invitees need not run the latest release
                # yet (they load it before they train).
                wanted = self.settings.fedbuff.buffer
            target = min(wanted, len(self._registry.device_keys) - len(stalled))
            ready = [
                d
                for d in self.engine.eligible(None if self._asynchronous else version)
                if d not in stalled
            ]
            if self._asynchronous:
                ready += self.engine.training()
            if len(ready) >= max(target, cfg.min_cohort):
                return True
            if time.monotonic() - start >= cfg.wait_for_devices:
                return len(self.engine.eligible()) >= cfg.min_cohort
            await asyncio.sleep(0.2)
        return False

    async def _rounds(self) -> None:
        cfg = self.settings.rounds
        done = 0  # rounds closed
        aborted = 0  # rounds aborted since the last one that closed
        while not self._stop.is_set() and (cfg.count == 0 or done < cfg.count):
            latest = await asyncio.to_thread(self.store.latest_release)
            assert latest is not None
            if not await self._until_stopped(self._connected()):
                break
            next_id = await asyncio.to_thread(self.store.next_round_id)
            async with self._engine_lock:
                spent = await self._engine_call(self.engine.budget_spent, next_id)
            if spent is not None:
                await self._refuse(next_id, latest.version, spent)
                break
            if self._calls:
                if not await self._call_until_group(latest.version):
                    break
            elif not await self._wait_for_devices(latest.version):
                if self._stop.is_set():
                    break
                log.warning(
                    "too few eligible devices after %.0f s; waiting again", cfg.wait_for_devices
                )
                continue
            round_id = await asyncio.to_thread(self.store.next_round_id)
            model = await asyncio.to_thread(self.store.model_bytes, latest.version)
            manifest = tflite.read_manifest(model)
            assert manifest is not None
            now = time.monotonic()
            self._outcome.clear()
            try:
                async with self._engine_lock:
                    pubs = await self._engine_call(
                        self.engine.start_round,
                        round_id=round_id,
                        model_version=latest.version,
                        dim=manifest.parameter_count,
                        now=now,
                        labels=manifest.labels,
                        task=manifest.task,
                        waiting=frozenset(self._parked),
                    )
                    self._update_limit = 8 * manifest.parameter_count + SLACK
            except NotEnoughDevicesError as exc:
                log.warning("cannot start round %d: %s", round_id, exc)
                await self._pause(1.0)
                continue
            except BudgetSpentError as exc:
                await self._refuse(round_id, latest.version, exc)
                break
            except EngineError as exc:
                # What the fleet's statuses made of this round cannot run (e.g. a member
                # without a graph ticket); nothing was announced. The next try selects anew.
                log.error("cannot start round %d: %s", round_id, exc)
                await self._pause(5.0)
                continue
            announce = self.engine.announce
            assert announce is not None
            await asyncio.to_thread(
                self.store.begin_round,
                round_id,
                announce.mode.value,
                latest.version,
                list(announce.cohort),
                time.time(),
                announce=wire.encode(announce),
                charge=self.engine.planned_charge,
            )
            log.info(
                "round %d started: %d devices, model v%d",
                round_id,
                len(announce.cohort),
                latest.version,
            )
            await self._publish(pubs)
            await self._unpark()
            # The event can also be set by a late message processed while the previous
            # round's outcome was still the engine's latest: wait for *this* round's.
            while not self._stop.is_set():
                await self._outcome.wait()
                self._outcome.clear()
                current = self.engine.outcome
                if current is not None and current.round_id == round_id:
                    break
            # Taken, not read: the engine keeps no full-size update once it is ours.
            async with self._engine_lock:
                outcome = self.engine.take_outcome()
                if outcome is None or outcome.round_id != round_id:  # stopping
                    pubs = await self._engine_call(
                        self.engine.abort, "aggregator stopped", time.monotonic()
                    )
                    outcome = self.engine.take_outcome()
                else:
                    pubs = []
            await self._publish(pubs)
            assert outcome is not None
            summary = await self._conclude(outcome, announce, model)
            self.summaries.append(summary)
            if self._on_round is not None:
                self._on_round(summary)
            if self._stop.is_set():
                break
            if outcome.state is RoundState.CLOSED:
                done, aborted = done + 1, 0
                # Devices load the release. Asynchronous rounds do not wait: devices go on
                # training, and a new invitee waits for the release itself.
                await self._pause(cfg.interval + (0.0 if self._asynchronous else cfg.settle))
                continue
            aborted += 1
            if cfg.max_aborts and aborted >= cfg.max_aborts:
                self._gave_up = (
                    f"{aborted} rounds in a row aborted (rounds.max_aborts); the last, round "
                    f"{outcome.round_id}: {outcome.reason}"
                )
                log.error("stopping: %s", self._gave_up)
                break
            # Nothing new to load: retry at once, with a cohort that leaves out the stalled.
            log.warning("round %d aborted; retrying with a fresh cohort", outcome.round_id)
            await self._pause(cfg.interval)

    async def _refuse(self, round_id: int, version: int, exc: BudgetSpentError) -> None:
        """The budget stops the rounds: say so on `round`, `metrics` and `events`."""
        self.budget_spent = exc.reason
        log.error("not starting round %d: %s", round_id, exc.reason)
        await self._publish(self.engine.refusal(round_id, version, exc.reason))
        metrics = {
            "fleet": self.fleet,
            "round": round_id,
            "mode": self.engine.config.mode,
            "state": "refused",
            "reason": exc.reason,
            "model_version": version,
            "new_version": None,
            "cohort": 0,
            "privacy": exc.figures,
            "ts": round(time.time(), 3),
        }
        await self._send_json(topics.metrics(self.fleet), metrics, retain=True)

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless stop() comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connected(self) -> None:
        await self.link.connected.wait()
        await self.ingest.connected.wait()

    async def _conclude(self, outcome: RoundOutcome, announce: Any, model: bytes) -> RoundSummary:
        """Persist the round's end, then tell everyone, in that order (module doc)."""
        metrics = dict(outcome.metrics)
        metrics["fleet"] = self.fleet
        metrics["rejected_total"] = dict(self.engine.rejected_total)
        new_version: int | None = None
        payload = b""
        if outcome.state is RoundState.CLOSED and outcome.mean_update is not None:
            try:
                new_version, payload = await asyncio.to_thread(self._apply, outcome, model, metrics)
            except (FleetlearnError, ValueError) as exc:
                # Never publish a model we could not build cleanly; the round counts as aborted.
                reason = f"update not applied: {exc}"
                log.error("round %d: %s", outcome.round_id, reason)
                outcome.state, outcome.reason = RoundState.ABORTED, reason
                metrics.update(state="aborted", reason=reason, new_version=None)
        elif outcome.state is RoundState.CLOSED:
            outcome.state, outcome.reason = RoundState.ABORTED, "round closed without an update"
            metrics.update(state="aborted", reason=outcome.reason)
        if new_version is None:
            metrics["new_version"] = None
            metrics["ts"] = round(time.time(), 3)
            await asyncio.to_thread(
                self.store.finish_round,
                outcome.round_id,
                status="aborted",
                reason=outcome.reason,
                metrics=_json_safe(metrics),
                now=time.time(),
                charge=outcome.charge,
            )
        else:
            await self._publish_release(payload)
        self.engine.events.append(
            {
                "event": f"round_{outcome.state.value}",
                "round": outcome.round_id,
                "reason": outcome.reason,
                "survivors": len(outcome.survivors),
                "new_version": new_version,
            }
        )
        await self._publish([self.engine.closing_announce(outcome, announce)])
        await self._send_json(topics.metrics(self.fleet), metrics, retain=True)
        log.info(
            "round %d %s: %d survivors%s",
            outcome.round_id,
            outcome.state.value,
            len(outcome.survivors),
            f", model v{new_version}" if new_version else f" ({outcome.reason})",
        )
        return RoundSummary(
            outcome.round_id, outcome.state.value, new_version, metrics, outcome.survivors
        )

    async def _publish_release(self, payload: bytes) -> None:
        """The new release, retained (already committed: a reconnect republishes it too)."""
        await self._publish([Publish(topics.model(self.fleet), payload, retain=True)])

    def _evaluate(self, model: bytes) -> dict[str, Any]:
        assert self._eval_set is not None
        result = _evaluate_on(model, *self._eval_set)
        if "error" in result:
            log.warning("eval.data: %s", result["error"])
        return result

    def _apply(
        self, outcome: RoundOutcome, model: bytes, metrics: dict[str, Any]
    ) -> tuple[int, bytes]:
        """Optimizer step, patch, sign, then commit release + round + optimizer state in one
        transaction (aggregator.store). Runs in a worker thread. Fills in `metrics`."""
        manifest = tflite.read_manifest(model)
        assert manifest is not None
        assert outcome.mean_update is not None
        weights = tflite.flatten(tflite.read_weights(model), manifest.layout)
        state_before = {k: v.copy() for k, v in self.optimizer.state.items()}
        mean = personal_zeroed(
            outcome.mean_update, manifest.layout, self.settings.training.personal_names
        )
        new = self.optimizer.step(weights, mean)
        personal = self.settings.training.personal_names
        if personal:
            # Server momentum or Adam state from earlier rounds must not move them either.
            keep = tflite.mask_of(manifest.layout, personal)
            new[keep] = weights[keep]
        try:
            if not np.all(np.isfinite(new.astype(np.float32))):  # as released: float32
                raise ValueError("new weights hold NaN or infinity (or overflow float32)")
            version = self.store.latest_version() + 1
            release = release_weights(
                model, new.astype(np.float32), version=version, signing_key=self._creds.identity
            )
            payload = wire.encode(release)
            new_model, _ = verify_release(
                release, self._creds.identity.verify_key, min_version=version
            )
            metrics["update_norm"] = float(np.linalg.norm(mean))
            metrics["new_version"] = version
            if self._eval_set is not None:
                metrics["server_eval"] = {"model_version": version, **self._evaluate(new_model)}
            metrics["ts"] = round(time.time(), 3)
            self.store.close_round(
                outcome.round_id,
                version=version,
                sha256=release.manifest.content_hash.hex(),
                payload=payload,
                model=new_model,
                arrays={"optimizer": self.optimizer.state},
                metrics=_json_safe(metrics),
                now=time.time(),
                charge=outcome.charge,
            )
        except BaseException:
            self.optimizer.state = state_before  # nothing of this round was committed
            raise
        return version, payload


def _evaluate_on(model: bytes, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    try:
        result = evaluation.evaluate_model(model, x, y)
        manifest = tflite.read_manifest(model)
        labels = manifest.labels if manifest is not None else ()
        out: dict[str, Any] = dict(result.as_dict())
        task = manifest.task if manifest is not None else tflite.Task.CLASSIFICATION
        out.update(report.task_figures(task, out["loss"]))
        if labels and len(labels) == len(result.class_samples):
            out["per_class"] = report.per_class(labels, result.class_samples, result.class_correct)
        return out
    except (ValueError, RuntimeError, FleetlearnError) as exc:
        # RuntimeError: the interpreter refuses data of another width.
        # A test set that does not fit the model costs the figure, never the round.
        return {"error": str(exc)[:300]}


def load_eval_set(path: str, label: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The aggregator's own test set (`eval.data`), checked before anything starts."""
    if not path:
        return None
    try:
        data = dataset.load(Path(path), label=label)
    except DataError as exc:
        raise ConfigError("eval.data", str(exc)) from None
    if data.y is None or len(data) == 0:
        raise ConfigError("eval.data", f"{path}: evaluation needs labelled rows")
    try:
        interpreter_class()
    except RuntimeMissingError as exc:
        raise ConfigError("eval.data", str(exc)) from None
    return data.x, data.y


def personal_zeroed(
    mean: np.ndarray, layout: tuple[tflite.WeightSpec, ...], personal: tuple[str, ...]
) -> np.ndarray:
    """The mean update with the personal layers' coordinates set to 0: devices send zeros
    there, and whatever arrives, those weights stay as released (devices keep their own)."""
    if not personal:
        return mean
    out = np.array(mean, dtype=np.float64)
    out[tflite.mask_of(layout, personal)] = 0.0
    return out


async def _best_effort(send: Coroutine[Any, Any, None], topic: str | None) -> None:
    """One publish that cannot be delivered does not hold back the others or stop the service
    (the link already waited for the broker). Lost events are not worth a log line each."""
    try:
        await send
    except LinkError as exc:
        if topic is not None:
            log.warning("could not publish on %s: %s", topic, exc)


async def _in_order(sends: list[Coroutine[Any, Any, None]]) -> None:
    """Run publishes concurrently, PUBLISH_WINDOW at a time (paho keeps at most 20 QoS 1
    messages in flight anyway). Tasks start in creation order and each hands its message to
    the MQTT client before its first suspension (Link.publish only suspends while
    disconnected or awaiting the acknowledgement), so the broker receives them in order."""
    try:
        for start in range(0, len(sends), PUBLISH_WINDOW):
            window = sends[start : start + PUBLISH_WINDOW]
            if len(window) == 1:
                await window[0]
            else:
                await asyncio.gather(*window)
    finally:
        for coro in sends:  # after a failure: the rest were never started
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

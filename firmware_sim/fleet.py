"""The fleet simulator: N simulated devices, each its own MQTT connection, over P processes.

The parent (`Simulator`) starts P worker processes; each runs its share of the devices as
`device.agent.DeviceAgent`s in one event loop, with two small thread pools shared by its
devices: one for training, interpreters and inference, one for round crypto, so that masking
and share handling never wait behind a hundred devices loading a release. Connections are
paced (mosquitto's listen backlog is 100; a thousand simultaneous CONNECTs would be refused),
and every worker reports a snapshot of its devices once a second over a queue. `stop()` (or
Ctrl-C in the CLI) makes every device publish "offline" and disconnect cleanly.

Each device's data, site, machine type, speed, eligibility and failures come from the
scenario (firmware_sim.scenario) and its index, so the same device behaves the same whichever
process runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.firmware_sim.scenario import STAGE_KINDS, STAGE_ORDER, Scenario
from fleetlearn.shared import topics

log = logging.getLogger("fleetlearn.sim")

CONNECTS_PER_SECOND = 40  # per worker process; keeps the broker's accept queue short


def device_data_file(directory: Path, device: str) -> Path:
    """`{directory}/{device}.npz`, else `.csv` (what `fleetlearn partition` writes)."""
    npz = directory / f"{device}.npz"
    csv = directory / f"{device}.csv"
    return csv if csv.exists() and not npz.exists() else npz


@dataclass(frozen=True, slots=True)
class SimSpec:
    """What every worker needs to build its devices (picklable)."""

    broker: str
    fleet: str
    fleet_dir: str
    devices: tuple[str, ...]
    scenario: Scenario
    protocol: str = "auto"
    state_dir: str | None = None
    connect_rate: float = CONNECTS_PER_SECOND
    # A directory of per-device files (`fleetlearn partition`): device `dev` trains on
    # `{data_dir}/{dev}.npz` (or .csv) instead of generated machine data.
    data_dir: str | None = None


@dataclass(slots=True)
class WorkerStats:
    proc: int
    devices: int = 0
    started: int = 0
    connected: int = 0
    models: dict[int, int] = field(default_factory=dict)  # model version -> devices
    rounds_trained: int = 0
    releases_refused: int = 0
    dropped_by_scenario: int = 0
    disconnects_by_scenario: int = 0
    lost_by_scenario: int = 0  # round messages a flaky link lost (network.loss)
    shifts_ended: int = 0  # times a device went offline at the end of its shift
    bytes_up: int = 0
    bytes_down: int = 0
    done: bool = False
    error: str = ""


# ------------------------------------------------------------------------------- the worker


def _worker(spec: SimSpec, proc: int, share: list[tuple[int, str]], out: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(_worker_main(spec, proc, share, out, stop))
    except Exception as exc:
        out.put(asdict(WorkerStats(proc=proc, done=True, error=f"{type(exc).__name__}: {exc}")))


async def _worker_main(
    spec: SimSpec, proc: int, share: list[tuple[int, str]], out: Any, stop: Any
) -> None:
    from fleetlearn.broker import provision as prov
    from fleetlearn.device.agent import ArrayData, Condition, DeviceAgent
    from fleetlearn.device.participant import Participant
    from fleetlearn.firmware_sim.data import CLASSES, device_machine
    from fleetlearn.shared import wire
    from fleetlearn.transport import BrokerAddress

    scenario = spec.scenario
    address = BrokerAddress.parse(spec.broker)
    registry = prov.load_registry(spec.fleet_dir)
    keys = {d: bytes(k) for d, k in registry.device_keys.items()}
    executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"sim{proc}")
    round_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sim{proc}-r")
    stats = WorkerStats(proc=proc, devices=len(share))
    agents: dict[str, DeviceAgent] = {}
    tasks: list[asyncio.Task[None]] = []

    def make(index: int, dev: str) -> DeviceAgent:
        creds = prov.load_device(Path(spec.fleet_dir) / "devices" / dev)
        site_index, _ = scenario.site_of(index)
        machine = device_machine(
            scenario.seed, index, site_index, scenario.machine_of(index), scenario.non_iid
        )
        labels: tuple[str, ...] = ()  # from the model's manifest
        if spec.data_dir is not None:
            data = ArrayData.load(device_data_file(Path(spec.data_dir), dev))
        else:
            x, y = machine.windows(scenario.samples)
            data, labels = ArrayData(x, y), CLASSES
        busy = scenario.is_busy(index)
        condition = Condition(
            eligibility=wire.Eligibility.BUSY if busy else wire.Eligibility.ELIGIBLE,
            charging=scenario.is_charging(index),
            battery=scenario.battery(index),
        )
        sends = 0
        silenced: dict[int, int] = {}  # round -> index of the stage it vanished at

        async def before_send(kind: topics.Kind, round_id: int) -> bool:
            nonlocal sends
            sends += 1
            delay = scenario.delay(index, sends)
            if delay > 0:
                await asyncio.sleep(delay)
            if kind in (topics.Kind.STATUS, topics.Kind.HEALTH):
                return True
            stage = next((s for s, kinds in STAGE_KINDS.items() if kind in kinds), None)
            if stage is None:
                return True
            drop = scenario.drop_stage(index, round_id)
            if drop is not None and STAGE_ORDER.index(stage) >= STAGE_ORDER.index(drop):
                if round_id not in silenced:
                    silenced[round_id] = STAGE_ORDER.index(drop)
                    stats.dropped_by_scenario += 1
                return False
            if stage == "collect" and scenario.disconnects(index, round_id):
                stats.disconnects_by_scenario += 1
                agents[dev].link.drop(scenario.reconnect_after)
                return False
            if scenario.link_loses(index, sends):
                stats.lost_by_scenario += 1
                return False
            return True

        participant = Participant(
            fleet=spec.fleet,
            device_id=dev,
            identity=creds.identity,
            aggregator_key=creds.aggregator_key,
            registry=keys,
            random=os.urandom,
            floor=scenario.floor,
            energy=scenario.energy,
        )
        return DeviceAgent(
            participant=participant,
            address=address,
            password=creds.password,
            data=data,
            protocol=spec.protocol,  # type: ignore[arg-type]
            state_dir=Path(spec.state_dir) / dev if spec.state_dir else None,
            labels=labels,
            condition=lambda: condition,
            before_send=before_send,
            slowdown=scenario.compute_seconds(index),
            executor=executor,
            round_executor=round_executor,
            train_seed=scenario.seed * 100_003 + index,
        )

    async def report() -> None:
        while True:
            stats.connected = sum(1 for a in agents.values() if a.link.connected.is_set())
            versions: dict[int, int] = {}
            for a in agents.values():
                v = a.participant.model_version
                versions[v] = versions.get(v, 0) + 1
            stats.models = versions
            stats.rounds_trained = sum(a.stats.rounds_trained for a in agents.values())
            stats.releases_refused = sum(a.stats.releases_refused for a in agents.values())
            stats.bytes_up = sum(a.stats.bytes_up for a in agents.values())
            stats.bytes_down = sum(a.stats.bytes_down for a in agents.values())
            stats.started = len(agents)
            out.put(asdict(stats))
            await asyncio.sleep(1.0)

    async def shift(index: int, dev: str) -> None:
        """The device's shifts (scenario `[shifts]`, days counted from the worker's start):
        offline outside its shift, as if its gateway were switched off (the last will says
        so), back online when the next one begins."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            t = loop.time() - began
            back = scenario.next_online(index, t)
            if back > t:
                stats.shifts_ended += 1
                agents[dev].link.drop(back - t)
                await asyncio.sleep(back - t)
                continue
            off = scenario.next_offline(index, t)
            if off is None:
                return
            await asyncio.sleep(max(0.05, off - t))

    reporter = asyncio.create_task(report())
    gap = 1.0 / max(1.0, spec.connect_rate)
    for index, dev in share:
        if stop.is_set():
            break
        agent = await asyncio.get_running_loop().run_in_executor(executor, make, index, dev)
        agents[dev] = agent
        tasks.append(asyncio.create_task(agent.run(), name=f"agent-{dev}"))
        if scenario.day > 0 and scenario.online < 1.0:
            tasks.append(asyncio.create_task(shift(index, dev), name=f"shift-{dev}"))
        await asyncio.sleep(gap)
    while not stop.is_set():
        await asyncio.sleep(0.2)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    stats.done = True
    stats.connected = 0
    out.put(asdict(stats))
    executor.shutdown(wait=False, cancel_futures=True)
    round_executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------- the parent


class Simulator:
    """Runs a simulated fleet in worker processes. Use as a context manager or start()/stop()."""

    def __init__(self, spec: SimSpec, procs: int = 1) -> None:
        if procs < 1:
            raise ValueError("procs must be >= 1")
        self.spec = spec
        self.procs = min(procs, max(1, len(spec.devices)))
        ctx = mp.get_context("spawn")  # the parent may already run threads and an event loop
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self._ctx = ctx
        self._workers: list[Any] = []
        self.stats: dict[int, dict[str, Any]] = {}

    def start(self) -> Simulator:
        indexed = list(enumerate(self.spec.devices))
        for p in range(self.procs):
            share = indexed[p :: self.procs]
            worker = self._ctx.Process(
                target=_worker,
                args=(self.spec, p, share, self._queue, self._stop),
                name=f"fleetlearn-sim-{p}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)
        return self

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (tests stop and continue them to simulate hung devices)."""
        return [w.pid for w in self._workers if w.pid is not None]

    def poll(self) -> dict[str, Any]:
        """Drain worker reports; return fleet-wide totals."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self.stats[item["proc"]] = item
        errors = [s["error"] for s in self.stats.values() if s.get("error")]
        if errors:
            raise RuntimeError(f"simulator worker failed: {errors[0]}")
        models: dict[int, int] = {}
        for s in self.stats.values():
            for version, count in s["models"].items():
                models[int(version)] = models.get(int(version), 0) + count
        keys = (
            "devices", "started", "connected", "rounds_trained", "releases_refused",
            "dropped_by_scenario", "disconnects_by_scenario", "lost_by_scenario",
            "shifts_ended", "bytes_up", "bytes_down",
        )  # fmt: skip
        total: dict[str, Any] = {k: sum(s[k] for s in self.stats.values()) for k in keys}
        total["devices"] = len(self.spec.devices)
        total["models"] = dict(sorted(models.items()))
        total["alive"] = sum(1 for w in self._workers if w.is_alive())
        return total

    def wait_connected(self, count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            total = self.poll()
            if total["connected"] >= count:
                return total
            time.sleep(0.2)
        total = self.poll()
        raise TimeoutError(
            f"{total['connected']} of {count} devices connected after {timeout:.0f} s"
        )

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
        with contextlib.suppress(RuntimeError):
            return self.poll()
        return {}

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

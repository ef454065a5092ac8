"""Run an aggregator service and N device agents in one event loop, over a broker or in memory.

Used by the integration tests: devices get synthetic predictive-maintenance data from
firmware_sim.data, their own provisioned credentials, and optional hooks that script dropouts.
`fleet()` starts a real broker; `memory_fleet()` routes through `transport.memory` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetlearn.aggregator.config import AggregatorSettings
from fleetlearn.aggregator.service import AggregatorService, RoundSummary
from fleetlearn.broker import provision as prov
from fleetlearn.broker.acl import Access, Acl
from fleetlearn.broker.runner import BrokerProcess
from fleetlearn.device.agent import ArrayData, DeviceAgent
from fleetlearn.device.participant import Participant
from fleetlearn.firmware_sim.data import CLASSES, MACHINE_TYPES, device_machine
from fleetlearn.shared import settings, topics
from fleetlearn.transport import BrokerAddress, Connector
from fleetlearn.transport.memory import MemoryBroker

# A provisioned device no agent runs: tests read and probe the broker with its credentials.
# Brokers bind client ids to usernames, so a second connection with a running device's
# credentials would replace that device's own.
OBSERVER = "observer"
# Stage durations (soft, then hard limit), each from the previous stage's close.
FAST_STAGES = {
    "stages.advertise": "4",
    "stages.share": "4",
    "stages.collect": "12",
    "stages.unmask": "6",
    "stages.advertise_hard": "8",
    "stages.share_hard": "8",
    "stages.collect_hard": "24",
    "stages.unmask_hard": "12",
}


def machine_csv(path: Path, *, seed: int, per_machine: int) -> int:
    """A user's dataset as a CSV (16 feature columns f0..f15 and `label`): `per_machine`
    windows from one machine of each type. Returns the number of rows."""
    rows = [",".join([*(f"f{i}" for i in range(16)), "label"])]
    for m, kind in enumerate(MACHINE_TYPES):
        x, y = device_machine(seed, m, 0, kind).windows(per_machine)
        rows += [
            ",".join([*(f"{v:.5g}" for v in xi), str(int(yi))]) for xi, yi in zip(x, y, strict=True)
        ]
    path.write_text("\n".join(rows) + "\n")
    return len(rows) - 1


def device_data(index: int, samples: int = 300) -> ArrayData:
    kinds = list(MACHINE_TYPES)
    machine = device_machine(11, index, index % 4, kinds[index % len(kinds)])
    x, y = machine.windows(samples)
    return ArrayData(x, y)


@dataclass
class Harness:
    broker: BrokerProcess | None  # None: in memory, through `connector`
    fleet_dir: Path
    fleet: str
    devices: list[str]
    state_dir: Path
    agents: dict[str, DeviceAgent] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    hooks: dict[str, Callable[[topics.Kind, int], Awaitable[bool]]] = field(default_factory=dict)
    tamper: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    samples: int = 300
    connector: Connector | None = None
    # Each device's data by its index (default: `device_data`, a machine with faults).
    data_for: Callable[[int], ArrayData] | None = None

    def observer(self) -> prov.DeviceCredentials:
        return prov.load_device(self.fleet_dir / "devices" / OBSERVER)

    def settings(self, **overrides: str) -> AggregatorSettings:
        sets = {
            "broker.url": self.broker.url if self.broker else "mqtt://127.0.0.1:1",
            "fleet.id": self.fleet,
            "fleet.dir": str(self.fleet_dir),
            "state.dir": str(self.state_dir),
            "rounds.cohort": str(len(self.devices)),
            "rounds.over_select": "1.0",
            "rounds.wait_for_devices": "20",
            "rounds.settle": "1.0",
            "training.max_samples": "256",
            **FAST_STAGES,
            **overrides,
        }
        return settings.load(AggregatorSettings, sets=sets)

    def aggregator(self, **overrides: str) -> AggregatorService:
        s = self.settings(**overrides)
        return AggregatorService(
            s,
            prov.load_aggregator(self.fleet_dir),
            prov.load_registry(self.fleet_dir),
            connector=self.connector,
        )

    def make_agent(self, dev: str, index: int) -> DeviceAgent:
        creds = prov.load_device(self.fleet_dir / "devices" / dev)
        registry = prov.load_registry(self.fleet_dir)
        participant = Participant(
            fleet=self.fleet,
            device_id=dev,
            identity=creds.identity,
            aggregator_key=creds.aggregator_key,
            registry={d: bytes(k) for d, k in registry.device_keys.items()},
            random=os.urandom,
        )
        hook = self.hooks.get(dev)
        return DeviceAgent(
            participant=participant,
            address=BrokerAddress.parse(self.broker.url) if self.broker else None,
            connector=self.connector,
            password=creds.password,
            data=self.data_for(index) if self.data_for else device_data(index, self.samples),
            protocol="3.1.1" if self.broker and self.broker.kind == "embedded" else "5",
            state_dir=self.state_dir / "devices" / dev,
            labels=CLASSES,
            before_send=hook,
            tamper=self.tamper.get(dev),
            train_seed=index,
        )

    def script_dropouts(self, round_id: int, *, silent: str, leavers: set[str]) -> None:
        """In round `round_id`, `silent` never advertises and each of `leavers` stops (its
        agent and connection) instead of answering the unmask request, after it sent its
        masked input."""

        def make_hook(dev: str) -> Callable[[topics.Kind, int], Awaitable[bool]]:
            async def hook(kind: topics.Kind, round_: int) -> bool:
                if round_ != round_id:
                    return True
                if dev == silent and kind is topics.Kind.ADVERTISE:
                    return False
                if dev in leavers and kind is topics.Kind.UNMASK:
                    loop = asyncio.get_running_loop()
                    loop.call_soon(asyncio.ensure_future, self.stop_device(dev))
                    return False
                return True

            return hook

        for dev in [*leavers, silent]:
            self.hooks[dev] = make_hook(dev)

    def start_devices(self) -> None:
        for i, dev in enumerate(self.devices):
            self.start_device(dev, i)

    def start_device(self, dev: str, index: int | None = None) -> None:
        index = self.devices.index(dev) if index is None else index
        agent = self.make_agent(dev, index)
        self.agents[dev] = agent
        self.tasks[dev] = asyncio.create_task(agent.run(), name=f"agent-{dev}")

    async def stop_device(self, dev: str) -> None:
        agent = self.agents.get(dev)
        task = self.tasks.pop(dev, None)
        if agent is not None:
            await agent.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def stop_all(self) -> None:
        for dev in list(self.tasks):
            await self.stop_device(dev)

    async def run_aggregator(
        self, timeout: float, **overrides: str
    ) -> tuple[AggregatorService, list[RoundSummary]]:
        service = self.aggregator(**overrides)
        async with asyncio.timeout(timeout):
            summaries = await service.run()
        return service, summaries


@contextlib.asynccontextmanager
async def fleet(tmp: Path, n: int, *, persistence: bool = False, mode: str = "mosquitto"):  # type: ignore[no-untyped-def]
    """A provisioned fleet of `n` devices and its own broker; devices are started by the test."""
    from fleetlearn.broker.runner import BrokerSettings

    fleet_dir = tmp / "fleet"
    devices = prov.device_ids(n)
    prov.provision(fleet_dir, "plant-7", [*devices, OBSERVER])
    broker = BrokerProcess(
        # No state_dir: the runner's own, which mosquitto's user can reach when run by root.
        BrokerSettings(port=0, fleet_dir=fleet_dir, persistence=persistence),
        mode,  # type: ignore[arg-type]
    )
    broker.start()
    h = Harness(broker, fleet_dir, "plant-7", devices, tmp / "state")
    try:
        yield h
    finally:
        await h.stop_all()
        broker.close()


@contextlib.asynccontextmanager
async def memory_fleet(tmp: Path, n: int):  # type: ignore[no-untyped-def]
    """A provisioned fleet of `n` devices on a `MemoryBroker` that checks the fleet's
    passwords and enforces its ACL; devices are started by the test."""
    fleet_dir = tmp / "fleet"
    devices = prov.device_ids(n)
    prov.provision(fleet_dir, "plant-7", [*devices, OBSERVER])
    hashes = prov._read_passwd(fleet_dir / "passwd")

    def authenticate(username: str | None, password: str | None) -> bool:
        hashed = hashes.get(username or "")
        return hashed is not None and password is not None and prov.check_password(password, hashed)

    acl = Acl.load(fleet_dir / "acl")  # the fleet's real ACL, as mosquitto enforces it

    def authorize(username: str | None, topic: str, action: str) -> bool:
        want = Access.READ if action == "read" else Access.WRITE
        return acl.allowed(username, username, topic, want)

    broker = MemoryBroker(authenticate=authenticate, authorize=authorize)
    h = Harness(None, fleet_dir, "plant-7", devices, tmp / "state", connector=broker.connector)
    try:
        yield h
    finally:
        await h.stop_all()

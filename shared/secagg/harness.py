"""In-memory SecAgg+ round: one aggregator, N devices, a dict of queues as the network.

What it owns: driving `SecAggServer` and `SecAggClient`s through a whole round with dropouts
scripted at every point, through the real wire encoding (`wire.encode`/`wire.decode` with
`expect` and `context`), while counting bytes per device and stage. Tests and
`bench/secagg_bench.py` use it; it is also the reference for what the MQTT adapters do.

Rules: like the machines, it reads no clock and draws no global randomness. Protocol time is
simulated (messages go out "at" the current stage time; when the network is quiet, time jumps
to the aggregator's deadline and everyone ticks). Wall-clock measurement is optional: pass a
`timer` (e.g. time.perf_counter) to get per-device and per-stage work times.
"""

from __future__ import annotations

import enum
import functools
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import nacl.signing
import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.secagg import keys
from fleetlearn.shared.secagg.client import ClientState, SecAggClient
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig, Stage, StageDeadlines
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.errors import ProtocolError, RemoteProtocolError
from fleetlearn.shared.secagg.keys import RandomSource
from fleetlearn.shared.secagg.messages import (
    TO_AGGREGATOR,
    TO_DEVICE,
    Advertise,
    MaskedInput,
    Shares,
    Unmask,
)
from fleetlearn.shared.secagg.server import Outbound, SecAggServer, ServerState

AGGREGATOR = "aggregator"


class DropPoint(enum.Enum):
    """Where a scripted device falls silent."""

    BEFORE_ADVERTISE = "before_advertise"  # never starts
    AFTER_ADVERTISE = "after_advertise"  # advert sent, then gone
    AFTER_SHARE = "after_share"  # sealed shares sent, then gone (its masks must be removed)
    AFTER_MASKED = "after_masked"  # masked input sent, never answers the unmask request
    DURING_UNMASK = "during_unmask"  # answers the unmask request only after the deadline


_SILENT_AFTER: dict[DropPoint | None, type[wire.Message]] = {
    DropPoint.AFTER_ADVERTISE: Advertise,
    DropPoint.AFTER_SHARE: Shares,
    DropPoint.AFTER_MASKED: MaskedInput,
}


@dataclass(frozen=True, slots=True)
class DeviceInput:
    vector: np.ndarray
    weight: float
    metrics: TrainingMetrics = field(default_factory=TrainingMetrics)


Tamper = Callable[[str, wire.Message], Sequence[wire.Message | bytes]]
"""Hook on a message to or from one device: what goes on the network instead (tests use it
to inject garbage, duplicates, replays and forgeries)."""


@dataclass
class RoundStats:
    """What a run measured. Times are in the units of the injected timer (seconds)."""

    uplink_bytes: dict[Stage, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    downlink_bytes: dict[Stage, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    broadcast_bytes: dict[Stage, int] = field(default_factory=dict)
    device_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    server_seconds: dict[Stage, float] = field(default_factory=lambda: defaultdict(float))
    codec_seconds: float = 0.0


@dataclass
class RoundRun:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    expected: np.ndarray  # sum of the contributions the aggregator accepted, mod 2^b
    expected_float: dict[str, DeviceInput]  # inputs of devices whose masked input was accepted
    rejected: list[tuple[str, Exception]]  # (who sent it, what the receiver raised)
    stats: RoundStats
    # Each accepted device's unmasked contribution in Z_2^b, with keep_contributions only.
    contributions: dict[str, np.ndarray] = field(default_factory=dict)


class InMemoryRound:
    """Build with the cohort's inputs and drop script, then `run()` once."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        round_id: int,
        round_seed: bytes,
        identities: Mapping[str, nacl.signing.SigningKey],
        inputs: Callable[[str], DeviceInput],
        random_for: Callable[[str], RandomSource],
        drops: Mapping[str, DropPoint] | None = None,
        uplink: Tamper | None = None,
        downlink: Tamper | None = None,
        lazy_inputs: bool = False,
        timer: Callable[[], float] | None = None,
        stage_seconds: float = 10.0,
        draws: Mapping[str, bytes] | None = None,
        floor: PrivacyFloor | None = None,
        keep_contributions: bool = False,
    ) -> None:
        """`draws`: each device's graph draw (its announced ticket is derived from it); by
        default drawn from the device's own random source. `floor`: every device's
        `PrivacyFloor`; by default `PrivacyFloor.minimal()`, so that only the protocol's own
        rules decide (tests of the floor pass one). `keep_contributions`: keep each accepted
        device's unmasked contribution for the run's `contributions` (tests that check the
        sum against its parts; memory grows with the cohort)."""
        self.config = config
        self.deadlines = StageDeadlines.evenly(0.0, stage_seconds)
        verify_keys = {d: bytes(k.verify_key) for d, k in identities.items()}
        sources = {d: random_for(d) for d in sorted(identities)}
        self.draws = {
            d: draws[d] if draws is not None else keys.new_draw(sources[d]) for d in sources
        }
        self.tickets = {d: keys.ticket_of(d, draw) for d, draw in self.draws.items()}
        self.server = SecAggServer(
            config=config,
            round_id=round_id,
            round_seed=round_seed,
            verify_keys=verify_keys,
            tickets=self.tickets,
            deadlines=self.deadlines,
        )
        self.clients = {
            d: SecAggClient(
                config=config,
                round_id=round_id,
                device_id=d,
                signing_key=key,
                verify_keys=verify_keys,
                round_seed=round_seed,
                tickets=self.tickets,
                draw=self.draws[d],
                floor=floor or PrivacyFloor.minimal(),
                random=sources[d],
                deadlines=self.deadlines,
            )
            for d, key in sorted(identities.items())
        }
        self._inputs = inputs
        self._drops = dict(drops or {})
        self._uplink = uplink
        self._downlink = downlink
        self._lazy = lazy_inputs
        self._timer = timer
        self._now = 0.0
        # Two queues: what devices send is handled before the next device is served, as an
        # aggregator keeping up with its inbox would; it also bounds memory (a masked vector is
        # summed and dropped before the next device computes its own).
        self._uplink_queue: deque[tuple[str, bytes]] = deque()  # (from device, frame)
        self._downlink_queue: deque[tuple[str, bytes]] = deque()  # (to device, frame)
        self._late: list[tuple[str, bytes]] = []
        self._contributions: dict[str, np.ndarray] = {}
        self._given: dict[str, DeviceInput] = {}
        self._accepted: dict[str, DeviceInput] = {}
        self._keep = keep_contributions
        self._kept: dict[str, np.ndarray] = {}
        self._expected = np.zeros(config.coordinates, dtype=f"<u{config.word_bits // 8}")
        self._rejected: list[tuple[str, Exception]] = []
        self.stats = RoundStats()
        self._silent: set[str] = set()

    # ------------------------------------------------------------------------- plumbing

    def _clock(self) -> float:
        return self._timer() if self._timer is not None else 0.0

    def _device_call(self, device: str, call: Callable[[], list[wire.Message]]) -> None:
        began = self._clock()
        try:
            replies = call()
        except ProtocolError as exc:
            self._rejected.append((AGGREGATOR, exc))
            replies = []
        self.stats.device_seconds[device] += self._clock() - began
        contribution = self.clients[device].contribution
        if contribution is not None and device not in self._contributions:
            self._contributions[device] = contribution
        for reply in replies:
            self._send_from_device(device, reply)
        # Lazy inputs arrive once the device has dealt its shares (training ran meanwhile), so
        # the harness can still see each contribution before it is masked.
        if (
            self._lazy
            and device not in self._given
            and self.clients[device].state
            in (
                ClientState.SHARE,
                ClientState.NEED_INPUT,
            )
        ):
            self._give_input(device)

    def _give_input(self, device: str) -> None:
        given = self._inputs(device)
        self._given[device] = given
        self._device_call(
            device,
            lambda: self.clients[device].set_input(
                given.vector, weight=given.weight, metrics=given.metrics
            ),
        )

    def _send_from_device(self, device: str, message: wire.Message) -> None:
        drop = self._drops.get(device)
        if device in self._silent:
            return
        outgoing: Sequence[wire.Message | bytes] = (
            self._uplink(device, message) if self._uplink else [message]
        )
        for item in outgoing:
            began = self._clock()
            frame = wire.encode(item) if isinstance(item, wire.Message) else item
            self.stats.codec_seconds += self._clock() - began
            stage = getattr(message, "STAGE", None)
            if isinstance(stage, Stage):
                per = self.stats.uplink_bytes[stage]
                per[device] = per.get(device, 0) + len(frame)
            if isinstance(message, Unmask) and drop is DropPoint.DURING_UNMASK:
                self._late.append((device, frame))
            else:
                self._uplink_queue.append((device, frame))
        # Falling silent right after the message that marks the drop point.
        if _SILENT_AFTER.get(drop) is type(message):
            self._silent.add(device)

    def _send_from_server(self, outbound: list[Outbound]) -> None:
        for out in outbound:
            began = self._clock()
            frame = wire.encode(out.message)
            self.stats.codec_seconds += self._clock() - began
            stage = getattr(out.message, "STAGE", None)
            targets = self.server.cohort if out.to is None else out.to
            if isinstance(stage, Stage):
                if out.to is None:
                    self.stats.broadcast_bytes[stage] = len(frame)
                per = self.stats.downlink_bytes[stage]
                for device in targets:
                    per[device] = per.get(device, 0) + len(frame)
            for device in targets:
                if self._downlink is None:
                    self._downlink_queue.append((device, frame))
                    continue
                for item in self._downlink(device, out.message):
                    encoded = wire.encode(item) if isinstance(item, wire.Message) else item
                    self._downlink_queue.append((device, encoded))

    def _deliver_to_server(self, device: str, frame: bytes) -> None:
        stage = self.server.stage
        began = self._clock()
        try:
            message = wire.decode(frame, expect=TO_AGGREGATOR, context={"sender": device})
        except wire.WireError as exc:
            self._rejected.append((device, exc))
            return
        decoded = self._clock()
        self.stats.codec_seconds += decoded - began
        try:
            outbound = self.server.receive(message, self._now)
        except RemoteProtocolError as exc:
            self._rejected.append((device, exc))
            outbound = []
        else:
            if isinstance(message, MaskedInput):
                self._account(device)
        if stage is not None:
            self.stats.server_seconds[stage] += self._clock() - decoded
        self._send_from_server(outbound)

    def _account(self, device: str) -> None:
        if device in self._accepted:
            return
        contribution = self._contributions.pop(device, None)
        if contribution is None:
            return
        np.add(self._expected, contribution, out=self._expected)
        self._accepted[device] = self._given[device]
        if self._keep:
            self._kept[device] = contribution

    def _deliver_to_device(self, device: str, frame: bytes) -> None:
        if device in self._silent or self._drops.get(device) is DropPoint.BEFORE_ADVERTISE:
            return
        began = self._clock()
        try:
            message = wire.decode(frame, expect=TO_DEVICE)
        except wire.WireError as exc:
            self._rejected.append((AGGREGATOR, exc))
            return
        self.stats.codec_seconds += self._clock() - began
        client = self.clients[device]
        self._device_call(device, lambda: client.receive(message, self._now))

    def _pump(self) -> None:
        while self._uplink_queue or self._downlink_queue:
            if self._uplink_queue:
                self._deliver_to_server(*self._uplink_queue.popleft())
            else:
                self._deliver_to_device(*self._downlink_queue.popleft())

    def _tick_all(self) -> None:
        stage = self.server.stage
        began = self._clock()
        outbound = self.server.tick(self._now)
        if stage is not None:
            self.stats.server_seconds[stage] += self._clock() - began
        self._send_from_server(outbound)
        for device, client in self.clients.items():
            if device not in self._silent:
                self._device_call(device, functools.partial(client.tick, self._now))

    # ------------------------------------------------------------------------------ run

    def run(self) -> RoundRun:
        for device in self.clients:
            if self._drops.get(device) is DropPoint.BEFORE_ADVERTISE:
                continue
            if not self._lazy:
                self._give_input(device)
            self._device_call(device, functools.partial(self.clients[device].start, self._now))
        while True:
            self._pump()
            if self.server.state not in (
                ServerState.ADVERTISE,
                ServerState.SHARE,
                ServerState.COLLECT,
                ServerState.UNMASK,
            ):
                break
            deadline = self.server.deadline
            if deadline is None:
                break
            self._now = max(self._now, deadline)
            self._tick_all()
        # Unmask answers that were held back arrive now, after the aggregator finished.
        self._now += 1.0
        for device, frame in self._late:
            self._uplink_queue.append((device, frame))
        self._pump()
        mask = self._expected.dtype.type(self.config.field_mask)
        return RoundRun(
            server=self.server,
            clients=self.clients,
            expected=self._expected & mask,
            expected_float=dict(self._accepted),
            rejected=self._rejected,
            stats=self.stats,
            contributions=dict(self._kept),
        )

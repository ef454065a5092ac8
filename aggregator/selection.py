"""What the aggregator knows of its devices between rounds, and how it picks a cohort, sans-IO.

What it owns: each provisioned device's latest retained status, whether it *stalled* (did not
answer a stage before it closed), and when it last showed life; the choice of a round's cohort.

Rules:
- Only provisioned devices count; the engine refuses statuses of any other id before they
  get here.
- Selection prefers eligible devices (online, not busy, battery above the floor or charging)
  that run the current model, charging ones first, in a random order drawn from the injected
  source, and over-selects by `over_select` so that dropouts still leave the target cohort.
  The round's mode may refuse a device (secure rounds need a graph ticket in its status).
- A stalled device is left out of selection (taken only to reach `min_cohort`) until it shows
  life again (an online status or any message under its id) or `stall_cooldown` passed.
  Life is ordered by arrival, not by time (several messages arrive at one instant): a device
  that showed life while a stage was open is not stalled by that stage's close (a device that
  left a round by its own choice says so with a status).
- With differential privacy on, the cohort is a Poisson sample instead (what the accounting
  assumes, docs/privacy.md): each candidate (eligible, admitted, not stalled) is taken on its
  own with probability q = min(1, wanted / candidates), drawn from the injected source, and
  that q is the round's sampling rate. Nothing is added to reach `min_cohort`: a sample
  that falls short is refused (NotEnoughDevicesError) and the next round draws afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fleetlearn.aggregator.engine_config import EngineConfig, NotEnoughDevicesError
from fleetlearn.shared import wire


@dataclass(frozen=True, slots=True)
class Selection:
    cohort: tuple[str, ...]
    sampling_rate: float  # each candidate's chance of being in it (1.0 unless Poisson)
    candidates: int  # how many it was drawn from (with rate 1: its own size)


@dataclass(slots=True)
class _Device:
    status: wire.DeviceStatus
    seen: float


class Devices:
    """The fleet as the engine sees it: statuses, stalls, signs of life, and selection."""

    def __init__(
        self,
        config: EngineConfig,
        verify_keys: Mapping[str, bytes],
        random: Callable[[int], bytes],
    ) -> None:
        self.config = config
        self._known = frozenset(verify_keys)
        self._random = random
        self._devices: dict[str, _Device] = {}
        self._stalled: dict[str, float] = {}  # device -> when it last missed a stage
        self._arrivals = 0  # signs of life so far, from any device
        self._alive_mark: dict[str, int] = {}  # device -> `_arrivals` at its last sign of life
        # Secure asynchronous rounds: device -> (the version of the update it holds, since
        # when its status says so).
        self._ready: dict[str, tuple[int, float]] = {}

    def known(self, device: str) -> bool:
        return device in self._known

    @property
    def mark(self) -> int:
        """The count of signs of life so far: taken when a stage opens (see `stall`)."""
        return self._arrivals

    def observe(self, device: str, status: wire.DeviceStatus, now: float) -> None:
        """A (decoded) retained status or last will of a provisioned device."""
        self._devices[device] = _Device(status, now)
        held = self._ready.get(device)
        if status.ready_version <= 0:
            self._ready.pop(device, None)
        elif held is None or held[0] != status.ready_version:
            # A status republished for another reason (a new ticket, a release loaded)
            # keeps the update's place in line.
            self._ready[device] = (status.ready_version, now)
        if status.online:
            self._stalled.pop(device, None)  # it is back: its connection works again
            self._alive(device)

    def heard_from(self, device: str) -> None:
        """Any message under `device`'s id: only the device itself may publish there (broker
        ACL), so whatever it sent, even late or garbled, shows it runs and reaches the broker."""
        self._stalled.pop(device, None)
        if device in self._known:
            self._alive(device)

    def _alive(self, device: str) -> None:
        self._arrivals += 1
        self._alive_mark[device] = self._arrivals

    def stall(self, devices: list[str], opened_mark: int, now: float) -> None:
        """`devices` did not answer a stage that opened at `opened_mark` before it closed."""
        for device in devices:
            if self._alive_mark.get(device, 0) <= opened_mark:
                self._stalled[device] = now

    def stalled(self, now: float) -> frozenset[str]:
        """Devices that missed a stage recently and showed no life since."""
        cooldown = self.config.stall_cooldown
        return frozenset(d for d, at in self._stalled.items() if now - at < cooldown)

    def ready_since(self, device: str) -> float:
        """Secure asynchronous rounds: when the device's status first said it holds the
        update it holds now (inf: it holds none)."""
        return self._ready.get(device, (0, math.inf))[1]

    def holding(self) -> list[tuple[wire.DeviceStatus, float]]:
        """Online devices whose status says they hold a trained update (secure asynchronous
        rounds), with `ready_since`."""
        return [
            (info.status, self._ready[d][1])
            for d, info in self._devices.items()
            if info.status.online and d in self._ready
        ]

    def status(self, device: str) -> wire.DeviceStatus | None:
        info = self._devices.get(device)
        return None if info is None else info.status

    def online(self) -> list[str]:
        return sorted(d for d, info in self._devices.items() if info.status.online)

    def eligible(self, model_version: int | None = None) -> list[str]:
        c = self.config
        out = []
        for dev, info in self._devices.items():
            s = info.status
            if not s.online or s.eligibility is not wire.Eligibility.ELIGIBLE:
                continue
            if s.battery < c.battery_floor and not s.charging:
                continue
            if model_version is not None and s.model_version != model_version:
                continue
            out.append(dev)
        return sorted(out)

    def select(
        self,
        model_version: int,
        now: float | None,
        admits: Callable[[wire.DeviceStatus], bool],
        *,
        want: int | None = None,
        least: int | None = None,
    ) -> Selection:
        """The cohort (see the module rules); `admits` is the round mode's own condition.
        `want` and `least` replace the config's target (cohort * over_select) and floor
        (min_cohort) when given (asynchronous rounds fill their free training slots)."""
        c = self.config
        stalled = self.stalled(now) if now is not None else frozenset()

        def candidate(device: str) -> bool:
            return device not in stalled and admits(self._devices[device].status)

        preferred = [d for d in self.eligible(model_version) if candidate(d)]
        taken = set(preferred)
        fallback = [d for d in self.eligible() if d not in taken and candidate(d)]

        # Random order within each preference class, drawn from the injected source.
        def shuffled(items: list[str]) -> list[str]:
            keys = {d: self._random(8) for d in items}
            charging = {d for d in items if self._devices[d].status.charging}
            return sorted(items, key=lambda d: (d not in charging, keys[d]))

        floor = c.min_cohort if least is None else least
        if want is None:
            want = max(c.min_cohort, math.ceil(c.cohort * c.over_select))
        if c.privacy != "none":
            return self._poisson(preferred + fallback, want)
        ordered = shuffled(preferred) + shuffled(fallback)
        chosen = ordered[:want]
        if len(chosen) < floor:
            # Better a round with devices that stalled before than no round at all.
            last_resort = [
                d for d in self.eligible() if d in stalled and admits(self._devices[d].status)
            ]
            chosen += shuffled(last_resort)[: floor - len(chosen)]
        if len(chosen) < floor:
            raise NotEnoughDevicesError(
                f"only {len(chosen)} eligible devices (of {len(self.online())} online); "
                f"a round needs at least {floor}"
            )
        return Selection(tuple(sorted(chosen)), 1.0, len(chosen))

    def _poisson(self, candidates: list[str], want: int) -> Selection:
        min_cohort = self.config.min_cohort
        if len(candidates) < min_cohort:
            raise NotEnoughDevicesError(
                f"only {len(candidates)} eligible devices (of {len(self.online())} online); "
                f"a round needs at least {min_cohort}"
            )
        rate = min(1.0, want / len(candidates))
        # 53 random bits per device: u uniform on [0, 1) in steps of 2^-53.
        chosen = [
            d
            for d in candidates
            if rate >= 1.0 or (int.from_bytes(self._random(8), "big") >> 11) * 2.0**-53 < rate
        ]
        if len(chosen) < min_cohort:
            raise NotEnoughDevicesError(
                f"the Poisson sample (rate {rate:.3g} of {len(candidates)} devices) took "
                f"{len(chosen)}; a round needs at least {min_cohort}: the next round samples "
                "again"
            )
        return Selection(tuple(sorted(chosen)), rate, len(candidates))

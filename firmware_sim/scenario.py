"""Fleet scenarios: how simulated devices differ, and how they fail.

A scenario is a TOML file (every key optional; defaults are a calm fleet):

    [fleet]
    seed = 7                  # everything below is reproducible from it
    samples = 300             # local windows per device
    non_iid = 2.0             # Dirichlet concentration of a site's fault mix (lower: more skewed)

    [[sites]]                 # fleet composition; shares are normalised
    name = "north"
    share = 0.5
    machines = { pump = 0.6, fan = 0.4 }

    [compute]
    slow_fraction = 0.0       # share of devices that train slowly
    slow_delay = 0.0          # seconds a slow device needs on top of its training
    train_seconds = 0.0       # seconds a local round takes a device of median speed, on top
                              #   of the real training time (the in-memory simulator counts
                              #   only this: its clock is simulated)
    speed = "fixed"           # how devices' times spread around it: fixed, lognormal or pareto
    speed_sigma = 1.0         # lognormal: sigma of log(time); pareto: the tail index alpha
                              #   (lower: heavier tail)

    [network]
    latency = 0.0             # seconds before each publish
    jitter = 0.0              # plus uniform 0..jitter seconds
    loss = 0.0                # chance that a round message a device sends is lost (flaky link)

    [shifts]                  # devices online by time of day (none: always online)
    day = 0.0                 # seconds of one simulated day (0: no shifts)
    online = 1.0              # share of the day each device is online, from a start time
                              #   drawn per device (its shift)

    [dropout]                 # per round and device: chance to vanish before sending that stage
    advertise = 0.0           #   (and everything after it in the round)
    share = 0.0
    collect = 0.0             # plain rounds: the update
    unmask = 0.0              # after the masked input: the costly case for SecAgg

    [churn]
    disconnect = 0.0          # per round and device: chance to drop the connection after training
    reconnect_after = 5.0     # seconds offline before reconnecting

    [eligibility]
    busy = 0.0                # share of devices whose machine needs the CPU (not eligible)
    charging = 1.0            # share on mains power / charging
    battery_min = 0.2         # battery of the others: uniform in [battery_min, battery_max]
    battery_max = 1.0

    [privacy]                 # every device's own floor (shared.secagg.config.PrivacyFloor)
    min_cohort = 3            # refuse secure rounds with a smaller cohort
    min_survivors = 3         # refuse to go on / unmask for fewer
    min_advertised_fraction = 0.8   # refuse to deal shares when fewer of the cohort advertised
    min_noise = 0.0           # refuse rounds with less differential-privacy noise (checkable)

    [cost]                    # every device's energy model (shared.cost.EnergyModel)
    joules_per_cpu_second = 2.0
    microjoules_per_byte_up = 1.0
    microjoules_per_byte_down = 0.5

Every problem raises `ConfigError` naming the key (e.g. `dropout.unmask`). Draws per device and
per round come from hashes of the seed, so a device's fate does not depend on process layout.
Both simulators honour every section, in synchronous and asynchronous rounds (docs/simulation.md
says how each one does).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.firmware_sim.data import MACHINE_TYPES
from fleetlearn.shared import cost, protocol, settings
from fleetlearn.shared.cost import EnergyModel
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.secagg.config import STAGES, PrivacyFloor
from fleetlearn.shared.secagg.errors import SecAggConfigError
from fleetlearn.shared.topics import Kind

# Dropout keys are the protocol's stage names, in its order; a stage's dropout silences the
# device topics that answer it (shared.protocol).
STAGE_ORDER: tuple[str, ...] = tuple(stage.value for stage in STAGES)
STAGE_KINDS: dict[str, tuple[Kind, ...]] = {s.value: protocol.uplink_kinds(s) for s in STAGES}
SPEEDS = ("fixed", "lognormal", "pareto")


@dataclass(frozen=True, slots=True)
class Site:
    name: str
    share: float
    machines: dict[str, float]


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int = 7
    samples: int = 300
    non_iid: float = 2.0
    sites: tuple[Site, ...] = (
        Site("north", 0.5, {"pump": 0.5, "fan": 0.3, "compressor": 0.2}),
        Site("south", 0.3, {"pump": 0.2, "fan": 0.6, "compressor": 0.2}),
        Site("east", 0.2, {"compressor": 0.7, "pump": 0.3}),
    )
    slow_fraction: float = 0.0
    slow_delay: float = 0.0
    train_seconds: float = 0.0
    speed: str = "fixed"
    speed_sigma: float = 1.0
    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    day: float = 0.0
    online: float = 1.0
    dropout: dict[str, float] = field(
        default_factory=lambda: {"advertise": 0.0, "share": 0.0, "collect": 0.0, "unmask": 0.0}
    )
    disconnect: float = 0.0
    reconnect_after: float = 5.0
    busy: float = 0.0
    charging: float = 1.0
    battery_min: float = 0.2
    battery_max: float = 1.0
    floor: PrivacyFloor = field(default_factory=PrivacyFloor)
    energy: EnergyModel = field(default_factory=EnergyModel)

    # ------------------------------------------------------------------- per-device draws

    def uniform(self, *parts: object) -> float:
        """A reproducible draw in [0, 1) from the seed and `parts` (device, round, purpose)."""
        digest = hashlib.sha256(repr((self.seed, *parts)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def site_of(self, index: int) -> tuple[int, Site]:
        total = sum(s.share for s in self.sites)
        u = self.uniform("site", index) * total
        for i, site in enumerate(self.sites):
            if u < site.share:
                return i, site
            u -= site.share
        return len(self.sites) - 1, self.sites[-1]

    def machine_of(self, index: int) -> str:
        _, site = self.site_of(index)
        total = sum(site.machines.values())
        u = self.uniform("machine", index) * total
        for name, weight in site.machines.items():
            if u < weight:
                return name
            u -= weight
        return next(iter(site.machines))

    def is_slow(self, index: int) -> bool:
        return self.uniform("slow", index) < self.slow_fraction

    def speed_factor(self, index: int) -> float:
        """How many times the median device's `train_seconds` this device needs (its
        hardware and load: fixed per device, heavy-tailed across the fleet)."""
        if self.speed == "fixed":
            return 1.0
        u = min(max(self.uniform("speed", index), 1e-12), 1.0 - 1e-12)
        if self.speed == "lognormal":
            return math.exp(self.speed_sigma * statistics.NormalDist().inv_cdf(u))
        # Pareto with its median at 1: P(T > t) = (t / m)^-alpha from the scale m on.
        alpha = self.speed_sigma
        scale = 2.0 ** (-1.0 / alpha)
        return float(scale * (1.0 - u) ** (-1.0 / alpha))

    def compute_seconds(self, index: int) -> float:
        """Seconds this device needs for a local round on top of the training itself."""
        extra = self.slow_delay if self.is_slow(index) else 0.0
        return self.train_seconds * self.speed_factor(index) + extra

    def shift_start(self, index: int) -> float:
        """When this device's shift starts within each day (seconds)."""
        return self.uniform("shift", index) * self.day

    def _into_shift(self, index: int, t: float) -> float:
        """Seconds since the device's latest shift began, in [0, day). A time a rounding
        error short of the next start counts as that start."""
        into = (t - self.shift_start(index)) % self.day
        return 0.0 if self.day - into < 1e-9 * max(1.0, self.day) else into

    def online_at(self, index: int, t: float) -> bool:
        """Whether the device is online at time `t` (seconds from the start of day one)."""
        if self.day <= 0 or self.online >= 1.0:
            return True
        return self._into_shift(index, t) < self.online * self.day

    def next_online(self, index: int, t: float) -> float:
        """The first time from `t` on at which the device is online."""
        if self.online_at(index, t):
            return t
        return t + (self.day - self._into_shift(index, t))

    def next_offline(self, index: int, t: float) -> float | None:
        """When the device, online at `t`, goes offline next (None: never)."""
        if self.day <= 0 or self.online >= 1.0:
            return None
        return t + max(0.0, self.online * self.day - self._into_shift(index, t))

    def link_loses(self, index: int, count: int) -> bool:
        """Whether the device's `count`-th round message is lost on its flaky link."""
        return self.loss > 0 and self.uniform("loss", index, count) < self.loss

    def is_busy(self, index: int) -> bool:
        return self.uniform("busy", index) < self.busy

    def is_charging(self, index: int) -> bool:
        return self.uniform("charging", index) < self.charging

    def battery(self, index: int) -> float:
        if self.is_charging(index):
            return 1.0
        return self.battery_min + (self.battery_max - self.battery_min) * self.uniform(
            "battery", index
        )

    def drop_stage(self, index: int, round_id: int) -> str | None:
        """The first stage at which this device vanishes in this round, or None."""
        for stage in STAGE_ORDER:
            if self.uniform("drop", stage, index, round_id) < self.dropout.get(stage, 0.0):
                return stage
        return None

    def disconnects(self, index: int, round_id: int) -> bool:
        return self.uniform("disconnect", index, round_id) < self.disconnect

    def delay(self, index: int, count: int) -> float:
        return self.latency + self.jitter * self.uniform("jitter", index, count)

    # -------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: Path | str) -> Scenario:
        text = settings.read_text(Path(path), "--scenario")
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "scenario") -> Scenario:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, f"is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        known = {
            "fleet",
            "sites",
            "compute",
            "network",
            "dropout",
            "churn",
            "eligibility",
            "privacy",
            "shifts",
            "cost",
        }
        for key in data:
            if key not in known:
                raise ConfigError(key, f"unknown section (known: {', '.join(sorted(known))})")
        fleet = _table(data, "fleet", {"seed", "samples", "non_iid"})
        compute = _table(
            data,
            "compute",
            {"slow_fraction", "slow_delay", "train_seconds", "speed", "speed_sigma"},
        )
        network = _table(data, "network", {"latency", "jitter", "loss"})
        shifts = _table(data, "shifts", {"day", "online"})
        speed = compute.get("speed", "fixed")
        if speed not in SPEEDS:
            raise ConfigError("compute.speed", f"must be one of {', '.join(SPEEDS)}, got {speed!r}")
        dropout = _table(data, "dropout", set(STAGE_ORDER))
        churn = _table(data, "churn", {"disconnect", "reconnect_after"})
        elig = _table(data, "eligibility", {"busy", "charging", "battery_min", "battery_max"})
        privacy = _table(
            data,
            "privacy",
            {"min_cohort", "min_survivors", "min_advertised_fraction", "min_noise"},
        )
        energy = _table(
            data,
            "cost",
            {"joules_per_cpu_second", "microjoules_per_byte_up", "microjoules_per_byte_down"},
        )
        default = cls()
        sites = default.sites
        if "sites" in data:
            sites = _sites(data["sites"])
        scenario = cls(
            seed=_int(fleet, "fleet.seed", default.seed, 0, 2**63 - 1),
            samples=_int(fleet, "fleet.samples", default.samples, 10, 1_000_000),
            non_iid=_num(fleet, "fleet.non_iid", default.non_iid, 0.01, 1000.0),
            sites=sites,
            slow_fraction=_num(compute, "compute.slow_fraction", 0.0, 0.0, 1.0),
            slow_delay=_num(compute, "compute.slow_delay", 0.0, 0.0, 3600.0),
            train_seconds=_num(compute, "compute.train_seconds", 0.0, 0.0, 86_400.0),
            speed=speed,
            speed_sigma=_num(compute, "compute.speed_sigma", 1.0, 0.05, 5.0),
            latency=_num(network, "network.latency", 0.0, 0.0, 60.0),
            jitter=_num(network, "network.jitter", 0.0, 0.0, 60.0),
            loss=_num(network, "network.loss", 0.0, 0.0, 0.9),
            day=_num(shifts, "shifts.day", 0.0, 0.0, 864_000.0),
            online=_num(shifts, "shifts.online", 1.0, 0.01, 1.0),
            dropout={s: _num(dropout, f"dropout.{s}", 0.0, 0.0, 1.0) for s in STAGE_ORDER},
            disconnect=_num(churn, "churn.disconnect", 0.0, 0.0, 1.0),
            reconnect_after=_num(churn, "churn.reconnect_after", 5.0, 0.0, 3600.0),
            busy=_num(elig, "eligibility.busy", 0.0, 0.0, 1.0),
            charging=_num(elig, "eligibility.charging", 1.0, 0.0, 1.0),
            battery_min=_num(elig, "eligibility.battery_min", 0.2, 0.0, 1.0),
            battery_max=_num(elig, "eligibility.battery_max", 1.0, 0.0, 1.0),
            floor=_floor(privacy, default.floor),
            energy=EnergyModel(
                **{
                    key: _num(energy, f"cost.{key}", getattr(default.energy, key), 0.0, limit)
                    for key, limit in (
                        ("joules_per_cpu_second", cost.MAX_JOULES_PER_CPU_SECOND),
                        ("microjoules_per_byte_up", cost.MAX_MICROJOULES_PER_BYTE),
                        ("microjoules_per_byte_down", cost.MAX_MICROJOULES_PER_BYTE),
                    )
                }
            ),
        )
        if scenario.battery_min > scenario.battery_max:
            raise ConfigError("eligibility.battery_min", "must not exceed eligibility.battery_max")
        return scenario


def _floor(table: dict[str, Any], default: PrivacyFloor) -> PrivacyFloor:
    try:
        return PrivacyFloor(
            min_cohort=_int(table, "privacy.min_cohort", default.min_cohort, 3, 65_536),
            min_survivors=_int(table, "privacy.min_survivors", default.min_survivors, 2, 65_536),
            min_advertised_fraction=_num(
                table,
                "privacy.min_advertised_fraction",
                default.min_advertised_fraction,
                0.0,
                1.0,
            ),
            min_noise=_num(table, "privacy.min_noise", default.min_noise, 0.0, 1000.0),
        )
    except SecAggConfigError as exc:  # the ranges above match; kept for a one-line message
        raise ConfigError(exc.key.replace("floor.", "privacy."), exc.problem) from None


def _table(data: dict[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(name, "must be a table")
    for key in table:
        if key not in keys:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(keys))})")
    return table


def _num(table: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = table.get(key.rsplit(".", maxsplit=1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > hi:  # also ints too large for a float
        raise ConfigError(key, f"must be in {lo:g}..{hi:g}, got {value:.3g}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be in {lo:g}..{hi:g}, got {value}")
    return float(value)


def _int(table: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = table.get(key.rsplit(".", maxsplit=1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be in {lo}..{hi}, got {value}")
    return value


def _sites(raw: object) -> tuple[Site, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sites", "must be a non-empty array of tables ([[sites]])")
    sites = []
    for i, entry in enumerate(raw):
        key = f"sites[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a table")
        for k in entry:
            if k not in ("name", "share", "machines"):
                raise ConfigError(f"{key}.{k}", "unknown key (known: machines, name, share)")
        name = entry.get("name", f"site-{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name", "must be a non-empty string")
        share = _num(entry, f"{key}.share", 1.0, 0.0, 1e6)
        machines = entry.get("machines", {"pump": 1.0})
        if not isinstance(machines, dict) or not machines:
            raise ConfigError(f"{key}.machines", "must be a table of machine type = weight")
        for mtype in machines:
            if mtype not in MACHINE_TYPES:
                raise ConfigError(
                    f"{key}.machines.{mtype}",
                    f"unknown machine type (known: {', '.join(sorted(MACHINE_TYPES))})",
                )
            _num(machines, f"{key}.machines.{mtype}", 1.0, 0.0, 1e6)
        if sum(machines.values()) <= 0:
            raise ConfigError(f"{key}.machines", "weights must not all be zero")
        sites.append(Site(name, share, {k: float(v) for k, v in machines.items()}))
    if sum(s.share for s in sites) <= 0:
        raise ConfigError("sites", "shares must not all be zero")
    return tuple(sites)

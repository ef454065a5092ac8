"""What taking part costs a device, and the fleet's sums of it.

What it owns: `Cost` (one device's report: training CPU seconds, payload bytes up and down,
and an energy estimate), `EnergyModel` (the per-CPU-second and per-byte figures the estimate
uses, configured per device), `CostMeter` (a device's running tally between two reports) and
`CostTotals` (the sums an aggregator publishes on `metrics`).

Rules:
- A device reports what it spent since its previous report, with each update it sends when
  the round asks for it (`TrainingPlan.cost_report`): the CPU time of its training, the
  payload bytes of the model releases and round messages it received, and of the round
  messages it sent, up to the moment the update is built. What it sends after that (the
  update itself, the unmask answers) goes into its next report, and a report whose update
  reached no aggregate (the round aborted, the device was not a survivor) is given back to
  the tally, so nothing is counted twice. Not counted: what a device spends after its last
  report, what rides in updates the aggregator refuses (an asynchronous update that is too
  stale), and status and health messages.
- Every figure is finite, >= 0 and at most its `MAX_*` bound; the meter clamps each report to
  them, so an honest device's update is never refused for a long round, and no device, faulty
  or hostile, moves a fleet sum by more than one bound's worth.
- Secure rounds carry the report inside the masked vector (shared.secagg.contribution) as exact
  integers (milliseconds, bytes, millijoules), so the aggregator learns only the sums, exactly;
  plain rounds carry it in the `PlainUpdate`.
- Energy is an estimate: cpu_s * joules_per_cpu_second + bytes * joules per byte, from the
  device's own figures. The defaults are placeholders of the right order for a gateway with a
  cellular modem; measure yours (docs/dashboard.md, "Per-device cost").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fleetlearn.shared import wire
from fleetlearn.shared.errors import ConfigError

# Bounds of one report (a device's spending since its previous one). In its integer units
# (milliseconds, bytes, millijoules: `integer_units`) each is below 2^32, the width secure
# rounds carry it with (shared.secagg.config.COST_BITS).
MAX_CPU_S = 86_400.0  # a day of CPU time
MAX_BYTES = float(1 << 30)  # 1 GiB each way
MAX_ENERGY_J = 1_000_000.0  # 1 MJ, about 0.28 kWh
UNITS = (1000.0, 1.0, 1.0, 1000.0)  # per second, byte, byte, joule: ms, B, B, mJ

# Defaults of the energy model: one busy core of an ARM gateway, and a cellular link.
DEFAULT_JOULES_PER_CPU_SECOND = 2.0
DEFAULT_MICROJOULES_PER_BYTE_UP = 1.0
DEFAULT_MICROJOULES_PER_BYTE_DOWN = 0.5
MAX_JOULES_PER_CPU_SECOND = 1_000.0
MAX_MICROJOULES_PER_BYTE = 1_000_000.0

FIELDS = ("cpu_s", "bytes_up", "bytes_down", "energy_j")
BOUNDS = {"cpu_s": MAX_CPU_S, "bytes_up": MAX_BYTES, "bytes_down": MAX_BYTES,
          "energy_j": MAX_ENERGY_J}  # fmt: skip


@wire.record
class Cost(wire.Record):
    """One device's report: what it spent since its previous report."""

    cpu_s: float = 0.0  # CPU seconds of its local training
    bytes_up: float = 0.0  # payload bytes it sent (round messages)
    bytes_down: float = 0.0  # payload bytes it received (releases, round messages)
    energy_j: float = 0.0  # estimate, from its EnergyModel

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            wire.require(
                isinstance(value, float | int)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and 0.0 <= value <= BOUNDS[name],
                f"Cost.{name}",
                f"must be a number in [0, {BOUNDS[name]:g}]",
            )

    def values(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in FIELDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyModel:
    """A device's figures for the energy estimate (its own hardware's, where measured)."""

    joules_per_cpu_second: float = DEFAULT_JOULES_PER_CPU_SECOND
    microjoules_per_byte_up: float = DEFAULT_MICROJOULES_PER_BYTE_UP
    microjoules_per_byte_down: float = DEFAULT_MICROJOULES_PER_BYTE_DOWN

    def __post_init__(self) -> None:
        limits = {
            "joules_per_cpu_second": MAX_JOULES_PER_CPU_SECOND,
            "microjoules_per_byte_up": MAX_MICROJOULES_PER_BYTE,
            "microjoules_per_byte_down": MAX_MICROJOULES_PER_BYTE,
        }
        for name, limit in limits.items():
            value = getattr(self, name)
            if (
                not isinstance(value, float | int)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or not 0.0 <= value <= limit
            ):
                raise ConfigError(f"cost.{name}", f"must be a number in [0, {limit:g}]")

    def joules(self, cpu_s: float, bytes_up: float, bytes_down: float) -> float:
        return (
            cpu_s * self.joules_per_cpu_second
            + 1e-6 * (bytes_up * self.microjoules_per_byte_up)
            + 1e-6 * (bytes_down * self.microjoules_per_byte_down)
        )


class CostMeter:
    """A device's tally since its last report; sans-IO (the adapter measures CPU time)."""

    def __init__(self, model: EnergyModel | None = None) -> None:
        self.model = model or EnergyModel()
        self._cpu_s = 0.0
        self._up = 0
        self._down = 0

    def cpu(self, seconds: float) -> None:
        if isinstance(seconds, float | int) and math.isfinite(seconds) and seconds > 0:
            self._cpu_s += float(seconds)

    def sent(self, size: int) -> None:
        self._up += max(0, int(size))

    def received(self, size: int) -> None:
        self._down += max(0, int(size))

    def give_back(self, report: Cost) -> None:
        """A report whose update reached no aggregate: count it again in the next one."""
        self._cpu_s += report.cpu_s
        self._up += round(report.bytes_up)
        self._down += round(report.bytes_down)

    def take(self) -> Cost:
        """The report of everything since the last one (each figure clamped to its bound);
        the tally starts again from zero."""
        cpu, up, down = (
            min(self._cpu_s, MAX_CPU_S),
            min(float(self._up), MAX_BYTES),
            min(float(self._down), MAX_BYTES),
        )
        self._cpu_s, self._up, self._down = 0.0, 0, 0
        energy = min(self.model.joules(cpu, up, down), MAX_ENERGY_J)
        return Cost(cpu_s=cpu, bytes_up=up, bytes_down=down, energy_j=energy)


def integer_units(cost: Cost) -> tuple[int, ...]:
    """The report in milliseconds, bytes, bytes and millijoules (rounded to nearest)."""
    return tuple(round(value * unit) for value, unit in zip(cost.values(), UNITS, strict=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class CostTotals:
    """Sums over the devices whose reports are in an aggregate (`devices` of them)."""

    devices: int = 0
    cpu_s: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    energy_j: float = 0.0

    @classmethod
    def of_units(cls, devices: int, totals: list[int]) -> CostTotals:
        """From sums in integer units (`integer_units`) over `devices` reports; ValueError
        when a sum is larger than that many reports can make."""
        values = {}
        for name, unit, total in zip(FIELDS, UNITS, totals, strict=True):
            if not 0 <= total <= devices * round(BOUNDS[name] * unit):
                raise ValueError(f"{name} sum {total} is impossible for {devices} reports")
            values[name] = total / unit
        return cls(devices=devices, **values)

    @classmethod
    def of(cls, reports: list[Cost]) -> CostTotals:
        sums = [math.fsum(getattr(c, name) for c in reports) for name in FIELDS]
        return cls(devices=len(reports), **dict(zip(FIELDS, sums, strict=True)))

    def as_dict(self) -> dict[str, Any]:
        """For `metrics`: bytes rounded to whole bytes, seconds and joules to 1e-3."""
        return {
            "devices": self.devices,
            "cpu_s": round(self.cpu_s, 3),
            "bytes_up": round(self.bytes_up),
            "bytes_down": round(self.bytes_down),
            "energy_j": round(self.energy_j, 3),
        }

"""Per-device cost reports (shared.cost): the meter, the bounds, and hostile reports."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zstandard

from fleetlearn.shared import cost, wire
from fleetlearn.shared.compression import Compression, SparseMode, compress
from fleetlearn.shared.errors import ConfigError
from fleetlearn.shared.rounds import PlainUpdate


def test_the_meter_reports_what_was_spent_since_the_last_report_and_starts_again() -> None:
    meter = cost.CostMeter(
        cost.EnergyModel(
            joules_per_cpu_second=3.0, microjoules_per_byte_up=2.0, microjoules_per_byte_down=1.0
        )
    )
    meter.cpu(0.5)
    meter.cpu(float("nan"))  # a broken clock reading adds nothing
    meter.cpu(-1.0)
    meter.received(10_000)
    meter.sent(2_000)
    report = meter.take()
    assert report == cost.Cost(
        cpu_s=0.5, bytes_up=2000.0, bytes_down=10_000.0, energy_j=1.5 + 0.004 + 0.01
    )
    assert meter.take() == cost.Cost()


def test_a_report_is_clamped_to_its_bounds() -> None:
    meter = cost.CostMeter(cost.EnergyModel(joules_per_cpu_second=20.0))
    meter.cpu(10 * cost.MAX_CPU_S)
    meter.sent(10 * int(cost.MAX_BYTES))
    meter.received(10 * int(cost.MAX_BYTES))
    report = meter.take()
    assert report.values() == (cost.MAX_CPU_S, cost.MAX_BYTES, cost.MAX_BYTES, cost.MAX_ENERGY_J)


@pytest.mark.parametrize(
    "bad",
    [
        {"joules_per_cpu_second": -1.0},
        {"joules_per_cpu_second": math.inf},
        {"microjoules_per_byte_up": 1e12},
        {"microjoules_per_byte_down": True},
    ],
)
def test_an_energy_model_out_of_range_is_a_config_error(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        cost.EnergyModel(**bad)


def _update(report: dict[str, object]) -> bytes:
    """A plain update whose cost map is whatever a hostile device puts there."""
    msg = PlainUpdate(
        round_id=1,
        sender="d00",
        update=compress(
            np.zeros(4), Compression(mode=SparseMode.DENSE), rng=np.random.default_rng(0)
        ).message,
        weight=1.0,
        loss=0.0,
        correct=0,
        samples=0,
        cost=cost.Cost(cpu_s=1.0),
    )
    fields = wire.to_map(msg)
    fields["cost"] = report
    return zstandard.ZstdCompressor().compress(msgpack.packb(fields))


@pytest.mark.parametrize(
    "report",
    [
        {"cpu_s": -1.0},
        {"cpu_s": math.nan},
        {"bytes_up": 2 * cost.MAX_BYTES},
        {"energy_j": "lots"},
        {"cpu_s": True},
        {"cpu_s": 1.0, "extra": 1.0},
    ],
)
def test_a_hostile_report_is_refused_with_a_wire_error(report: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(_update(report), PlainUpdate)


def test_an_honest_report_round_trips() -> None:
    good = {"cpu_s": 2.5, "bytes_up": 100.0, "bytes_down": 4000.0, "energy_j": 5.0}
    decoded = wire.decode(_update(good), PlainUpdate)
    assert decoded.cost == cost.Cost(**good)

"""Prometheus series over a `FleetView`: what the dashboard's `/metrics` serves.

What it owns: `FleetCollector`, a prometheus_client custom collector that turns the view's
state into `fleetlearn_*` series at each scrape, and `registry_for(view)`, a registry of its
own (never the process-wide one: two views in one process, a demo's and a test's, must not
share series).

Rules:
- Every series is in the table of docs/dashboard.md; tests/test_dashboard_web.py holds the
  two to each other, so a series added here without a row (or the reverse) fails there.
- Counters (`*_total`) are sums since the dashboard started over the summaries it saw, and
  never go down (the view's totals only grow, `dashboard.view`); a restarted dashboard starts
  again from zero, which is what Prometheus' rate() expects.
- Round gauges describe the newest round that ran (`fleetlearn_round`); a figure that round
  does not have (an aborted round's accuracy) is NaN, so a graph shows a gap rather than an
  older round's value. Series whose source is absent (no round yet, no privacy accounting) are
  left out rather than made up.
- A scrape reads the view on the event loop's thread (the app's handlers are coroutines) and
  never walks the device table: the device counts are kept as the table changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fleetlearn.dashboard.payloads import ROUND_STATES
from fleetlearn.dashboard.view import FleetView

PREFIX = "fleetlearn_"


def _value(value: float | None) -> float:
    return math.nan if value is None else float(value)


class FleetCollector(Collector):
    """The fleet's series, computed from the view at each scrape."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view
        yield from self._rounds(view)
        yield from self._totals(view)
        yield from self._devices(view)
        yield from self._privacy(view)
        rejected = CounterMetricFamily(
            PREFIX + "dashboard_rejected",
            "Messages the dashboard dropped, by reason (docs/dashboard.md)",
            labels=["reason"],
        )
        for reason, count in view.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected

    def _rounds(self, view: FleetView) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            PREFIX + "rounds", "Round summaries seen, by state", labels=["state"]
        )
        for state in ROUND_STATES:
            counts.add_metric([state], view.totals.rounds[state])
        yield counts
        version = view.model_version()
        if version is not None:
            yield GaugeMetricFamily(
                PREFIX + "model_version", "Newest model release the summaries tell of", version
            )
        latest = view.latest_round()
        if latest is None:
            return
        gauges: list[tuple[str, str, Any]] = [
            ("round", "Id of the newest round that ran", latest["round"]),
            ("round_accuracy", "Federated accuracy of that round's model", latest["accuracy"]),
            ("round_loss", "Federated mean loss of that round's model", latest["mean_loss"]),
            ("round_survivors", "Devices whose updates are in that round", latest["survivors"]),
            ("round_cohort", "Devices selected for that round", latest["cohort"]),
            ("round_stragglers", "Devices that missed a stage of it", latest["stragglers"]),
            ("round_duration_seconds", "Announcement to outcome", latest["duration_s"]),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, _value(value))
        seconds = GaugeMetricFamily(
            PREFIX + "stage_seconds", "Seconds each stage of that round was open", labels=["stage"]
        )
        dropped = GaugeMetricFamily(
            PREFIX + "stage_dropped",
            "Devices that had not answered a stage of that round when it closed",
            labels=["stage"],
        )
        for stage, figures in latest["stages"].items():
            seconds.add_metric([stage], _value(figures["seconds"]))
            dropped.add_metric([stage], _value(figures["dropped"]))
        yield seconds
        yield dropped

    def _totals(self, view: FleetView) -> Iterator[Metric]:
        t = view.totals
        counters = [
            (
                "dropouts_recovered",
                "Dropped devices whose masks were recovered",
                t.dropouts_recovered,
            ),
            ("uplink_bytes", "Device-to-aggregator payload bytes of the rounds", t.uplink_bytes),
            (
                "downlink_bytes",
                "Aggregator-to-device payload bytes of the rounds",
                t.downlink_bytes,
            ),
            ("device_cpu_seconds", "Training CPU seconds devices report", t.cpu_s),
            ("device_bytes_up", "Payload bytes devices report sending", t.bytes_up),
            ("device_bytes_down", "Payload bytes devices report receiving", t.bytes_down),
            ("device_energy_joules", "Energy devices estimate they spent", t.energy_j),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)

    def _devices(self, view: FleetView) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            PREFIX + "devices",
            "Devices by their last status: online, offline, and eligible (online and eligible)",
            labels=["state"],
        )
        devices.add_metric(["online"], view.online)
        devices.add_metric(["offline"], view.offline)
        devices.add_metric(["eligible"], view.eligible)
        yield devices

    def _privacy(self, view: FleetView) -> Iterator[Metric]:
        privacy = view.latest_privacy()
        if privacy is None:
            return
        if privacy["epsilon"] is not None:
            yield GaugeMetricFamily(
                PREFIX + "privacy_epsilon", "Epsilon the run has spent", privacy["epsilon"]
            )
        if privacy["epsilon_budget"] is not None:
            yield GaugeMetricFamily(
                PREFIX + "privacy_epsilon_budget",
                "The fleet's epsilon budget",
                privacy["epsilon_budget"],
            )


def registry_for(view: FleetView) -> CollectorRegistry:
    """A registry of its own holding only the view's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(view))
    return registry

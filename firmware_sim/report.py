"""Round tables and the demo's report (JSON + PNG), from the aggregator's round summaries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

COLUMNS = (
    ("round", "round"),
    ("state", "state"),
    ("cohort", "cohort"),
    ("survivors", "in sum"),
    ("stragglers", "stragglers"),
    ("dropouts_recovered", "recovered"),
    ("uplink_bytes_per_device", "uplink B/dev"),
    ("accuracy", "accuracy"),
    ("device_accuracy", "on device"),
    ("server_eval", "test set"),
    ("duration_s", "seconds"),
)


_OPTIONAL = ("device_accuracy", "server_eval")


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    values = []
    for m in rows:
        value = m.get(key)
        if isinstance(value, dict):
            value = value.get("accuracy")
        values.append(float(value) if isinstance(value, int | float) else float("nan"))
    return values


def cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if key == "server_eval" and isinstance(value, dict):
        value = value.get("accuracy")
    if value is None:
        return "-"
    if key in ("accuracy", "device_accuracy", "server_eval"):
        return f"{value:.3f}"
    if key == "duration_s":
        return f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def round_table(rows: Sequence[dict[str, Any]], title: str | None = "rounds") -> Table:
    """One row per round; the evaluation columns only when some round has the figure."""
    table = Table(title=title)
    columns = [
        (key, header)
        for key, header in COLUMNS
        if key not in _OPTIONAL or any(m.get(key) is not None for m in rows)
    ]
    for _, header in columns:
        table.add_column(header, justify="right")
    for metrics in rows:
        table.add_row(*(cell(metrics, key) for key, _ in columns))
    return table


def cost_line(rows: Sequence[dict[str, Any]]) -> str | None:
    """What the devices in the rounds' aggregates reported they spent, summed over the rounds
    (the `cost` of each summary; docs/dashboard.md)."""
    costs = [m["cost"] for m in rows if isinstance(m.get("cost"), dict)]
    if not costs:
        return None
    total = {
        k: sum(float(c.get(k) or 0.0) for c in costs)
        for k in ("cpu_s", "bytes_up", "bytes_down", "energy_j")
    }
    return (
        f"devices spent (their reports, summed over {len(costs)} rounds): "
        f"{total['cpu_s']:.2f} s of training CPU, {total['bytes_up'] / 1e6:.2f} MB up, "
        f"{total['bytes_down'] / 1e6:.2f} MB down, about {total['energy_j']:.1f} J"
    )


def class_recall_line(rows: Sequence[dict[str, Any]]) -> str | None:
    """Recall per class in the last round that has it (federated evaluation on the devices'
    held-out rows), with each class's row count: where overall accuracy hides a rare fault."""
    for metrics in reversed(rows):
        classes = metrics.get("per_class")
        if isinstance(classes, list) and classes:
            parts = [
                f"{c.get('label')} "
                + ("-" if c.get("recall") is None else f"{c['recall']:.3f}")
                + f" ({c.get('samples')})"
                for c in classes
                if isinstance(c, dict)
            ]
            return f"recall per class, round {metrics.get('round')} (held-out rows): " + ", ".join(
                parts
            )
    return None


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )


def write_plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Accuracy (federated evaluation; per device and on the aggregator's test set when
    present) and uplink bytes per device, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in rows]
    uplink = [m.get("uplink_bytes_per_device") or 0 for m in rows]
    fig, ax1 = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax1.plot(
        rounds,
        _series(rows, "accuracy"),
        marker="o",
        color="tab:blue",
        label="global model, devices' held-out rows",
    )
    for key, color, label in (
        ("device_accuracy", "tab:green", "what each device runs (personal layers), same rows"),
        ("server_eval", "tab:purple", "new release, aggregator's test set"),
    ):
        if any(m.get(key) is not None for m in rows):
            ax1.plot(rounds, _series(rows, key), marker=".", color=color, label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy", color="tab:blue")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax2 = ax1.twinx()
    ax2.bar(rounds, uplink, alpha=0.25, color="tab:orange", label="uplink bytes per device")
    ax2.set_ylabel("uplink bytes per device", color="tab:orange")
    ax1.set_zorder(ax2.get_zorder() + 1)
    ax1.patch.set_visible(False)
    lines = ax1.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + bars[0], lines[1] + bars[1], loc="lower right")
    ax1.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

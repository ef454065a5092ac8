"""How client updates become one model step: aggregation rules and server optimizers.

Aggregation rules (plain mode only; in secure mode the server sees nothing but the weighted sum):
- `mean`: FedAvg's sample-weighted mean.
- `median`: coordinate-wise median (unweighted; robust to < 50% arbitrary updates).
- `trimmed`: coordinate-wise trimmed mean, dropping the `trim` fraction at each end.
Norm clipping (`clip_norm > 0`) scales every update to at most that L2 norm first; it bounds what
any one device can do to the mean and composes with every rule.

Server optimizers treat the aggregated update as a pseudo-gradient (Reddi et al. 2021):
`fedavg` applies it with a server learning rate, `fedavgm` adds momentum, `fedadam` uses Adam's
moment estimates. Optimizer state is a dict of numpy arrays so the store can persist it.

Pure numpy; float64 accumulation so that sums over a thousand devices do not lose precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fleetlearn.shared.errors import ConfigError

RuleName = Literal["mean", "median", "trimmed"]
OptimizerName = Literal["fedavg", "fedavgm", "fedadam"]


def clip_to_norm(update: np.ndarray, max_norm: float) -> np.ndarray:
    if max_norm <= 0:
        return update
    norm = float(np.linalg.norm(update))
    if not np.isfinite(norm):
        return np.zeros_like(update)
    return update if norm <= max_norm else update * (max_norm / norm)


def aggregate(
    updates: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    rule: RuleName = "mean",
    trim: float = 0.2,
    clip_norm: float = 0.0,
) -> np.ndarray:
    """Combine plain-mode updates (each a flat float vector) into one float64 vector."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    stacked = np.stack([clip_to_norm(np.asarray(u, dtype=np.float64), clip_norm) for u in updates])
    if rule == "mean":
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return (w[:, None] * stacked).sum(axis=0) / w.sum()
    if rule == "median":
        return np.median(stacked, axis=0)
    if rule == "trimmed":
        if not 0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        n = stacked.shape[0]
        cut = int(np.floor(trim * n))
        if n - 2 * cut <= 0:
            cut = (n - 1) // 2
        ordered = np.sort(stacked, axis=0)
        return ordered[cut : n - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation rule {rule!r}")


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    name: OptimizerName = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # FedAdam's adaptivity floor

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError("server.lr", f"must be > 0, got {self.lr}")
        for key, value in (
            ("server.momentum", self.momentum),
            ("server.beta1", self.beta1),
            ("server.beta2", self.beta2),
        ):
            if not 0 <= value < 1:
                raise ConfigError(key, f"must be in [0, 1), got {value}")
        if not self.tau > 0:
            raise ConfigError("server.tau", f"must be > 0, got {self.tau}")


@dataclass(slots=True)
class ServerOptimizer:
    """Applies aggregated updates to the global weights; `state` survives restarts via the store."""

    config: OptimizerConfig
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        """New weights from `weights` and the aggregated client update (new - old direction)."""
        if weights.shape != update.shape:
            raise ValueError(f"update has shape {update.shape}, weights {weights.shape}")
        if not np.all(np.isfinite(update)):
            raise ValueError("aggregated update holds NaN or infinity")
        c = self.config
        delta = update.astype(np.float64)
        if c.name == "fedavg":
            step = c.lr * delta
        elif c.name == "fedavgm":
            m = self.state.get("m", np.zeros_like(delta))
            m = c.momentum * m + delta
            self.state["m"] = m
            step = c.lr * m
        elif c.name == "fedadam":
            m = self.state.get("m", np.zeros_like(delta))
            v = self.state.get("v", np.full_like(delta, c.tau**2))
            m = c.beta1 * m + (1 - c.beta1) * delta
            v = c.beta2 * v + (1 - c.beta2) * delta * delta
            self.state["m"], self.state["v"] = m, v
            step = c.lr * m / (np.sqrt(v) + c.tau)
        else:  # pragma: no cover - Literal guards this
            raise ValueError(f"unknown optimizer {c.name!r}")
        return (weights.astype(np.float64) + step).astype(weights.dtype)

"""Helpers for the SecAgg tests: deterministic cohorts, inputs, rounds, and an outcome oracle.

The oracle re-states the survival rules from the protocol description (ARCHITECTURE §5, issue 4)
with plain set arithmetic, independently of the server's bookkeeping, so a harness run can be
checked against what *should* happen for a given drop script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import nacl.signing
import numpy as np

from fleetlearn.shared.secagg import keys
from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig
from fleetlearn.shared.secagg.contribution import TrainingMetrics
from fleetlearn.shared.secagg.graph import NeighbourGraph
from fleetlearn.shared.secagg.harness import DeviceInput, DropPoint, InMemoryRound, RoundRun, Tamper
from fleetlearn.shared.secagg.keys import RandomSource


def deterministic_random(label: str) -> RandomSource:
    """A reproducible byte stream (SHA-256 in counter mode). Tests only, never production."""
    state = {"counter": 0}

    def draw(count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            block = label.encode() + state["counter"].to_bytes(8, "big")
            out += hashlib.sha256(block).digest()
            state["counter"] += 1
        return bytes(out[:count])

    return draw


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def identities(n: int, label: str = "fleet") -> dict[str, nacl.signing.SigningKey]:
    return {
        d: nacl.signing.SigningKey(hashlib.sha256(f"{label}/{d}".encode()).digest())
        for d in device_ids(n)
    }


def graph_draws(devices: list[str], round_seed: bytes) -> dict[str, bytes]:
    """Reproducible graph draws, varied by `round_seed` so property tests see many rings.
    (Only in tests does anything tie draws to the round seed; see shared.secagg.graph.)"""
    return {
        d: hashlib.sha256(b"test-draw/" + round_seed + d.encode()).digest()[: keys.DRAW_BYTES]
        for d in devices
    }


def tickets_of(draws: Mapping[str, bytes]) -> dict[str, bytes]:
    return {d: keys.ticket_of(d, draw) for d, draw in draws.items()}


def make_inputs(config: SecAggConfig, devices: list[str], seed: int) -> dict[str, DeviceInput]:
    """Updates within the clip range, positive weights and consistent metrics."""
    rng = np.random.default_rng(seed)
    out = {}
    for d in devices:
        samples = int(rng.integers(1, min(config.max_samples, 500) + 1))
        out[d] = DeviceInput(
            vector=rng.uniform(-config.clip, config.clip, config.dimension).astype(np.float32),
            weight=float(rng.uniform(0.1, 1.0) * config.max_weight),
            metrics=TrainingMetrics(
                loss=float(rng.uniform(0.0, 3.0)),
                correct=int(rng.integers(0, samples + 1)),
                samples=samples,
            ),
        )
    return out


def run_round(
    config: SecAggConfig,
    *,
    drops: Mapping[str, DropPoint] | None = None,
    round_id: int = 1,
    round_seed: bytes = b"\x07" * 32,
    input_seed: int = 0,
    uplink: Tamper | None = None,
    downlink: Tamper | None = None,
    random_label: str = "r",
    random_for: Callable[[str], RandomSource] | None = None,
    inputs: dict[str, DeviceInput] | None = None,
    draws: Mapping[str, bytes] | None = None,
    floor: PrivacyFloor | None = None,
    keep_contributions: bool = False,
) -> RoundRun:
    ids = identities(config.cohort_size)
    given = inputs if inputs is not None else make_inputs(config, list(ids), input_seed)
    draws = draws if draws is not None else graph_draws(list(ids), round_seed)
    harness = InMemoryRound(
        config=config,
        round_id=round_id,
        round_seed=round_seed,
        identities=ids,
        inputs=given.__getitem__,
        random_for=random_for or (lambda d: deterministic_random(f"{random_label}/{round_id}/{d}")),
        drops=drops,
        uplink=uplink,
        downlink=downlink,
        draws=draws,
        floor=floor,
        keep_contributions=keep_contributions,
    )
    return harness.run()


def predict(config: SecAggConfig, round_seed: bytes, drops: Mapping[str, DropPoint]) -> str | None:
    """The stage at which the round must abort for this drop script, or None if it must finish
    (for the draws `run_round` uses with this round seed, and the minimal device floor)."""
    cohort = device_ids(config.cohort_size)
    draws = graph_draws(cohort, round_seed)
    advertisers = {d for d in cohort if drops.get(d) is not DropPoint.BEFORE_ADVERTISE}
    graph = NeighbourGraph(cohort, config.neighbours, {d: draws[d] for d in advertisers})
    t = config.threshold

    def live(u: str, alive: set[str]) -> int:
        return len(set(graph.of(u)) & alive)

    def holds(alive: set[str]) -> bool:
        return len(alive) >= config.min_survivors and all(live(u, alive) >= t for u in alive)

    def without(alive: set[str], *points: DropPoint) -> set[str]:
        return {d for d in alive if drops.get(d) not in points}

    u1 = without(set(graph.cohort), DropPoint.BEFORE_ADVERTISE)
    if not holds(u1):
        return "ADVERTISE"
    u2 = without(u1, DropPoint.AFTER_ADVERTISE)
    if not holds(u2):
        return "SHARE"
    u3 = without(u2, DropPoint.AFTER_SHARE)
    if not holds(u3):
        return "COLLECT"
    orphaned = {v for v in u2 - u3 if live(v, u3) > 0}
    if any(live(v, u3) < t for v in orphaned):
        return "COLLECT"
    answering = without(u3, DropPoint.AFTER_MASKED, DropPoint.DURING_UNMASK)
    if any(live(u, answering) < t for u in u3 | orphaned):
        return "UNMASK"
    return None


def pick_drops(
    devices: list[str], count: int, point: DropPoint | Callable[[int], DropPoint], seed: int
) -> dict[str, DropPoint]:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(devices), size=count, replace=False)
    return {devices[int(i)]: (point(j) if callable(point) else point) for j, i in enumerate(chosen)}


def weighted_mean(inputs: Mapping[str, DeviceInput]) -> np.ndarray:
    weights = np.array([i.weight for i in inputs.values()], dtype=np.float64)
    vectors = np.array([i.vector for i in inputs.values()], dtype=np.float64)
    return (weights[:, None] * vectors).sum(axis=0) / weights.sum()

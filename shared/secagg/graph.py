"""The neighbour graph of a round: who masks with and holds shares for whom.

What it owns: turning the roster (cohort) and the round seed into a k-regular graph that every
party derives by itself, so the aggregator cannot choose anyone's neighbours.

Construction (a Harary graph on a pseudo-random ring, as in Bell et al. 2020): the round seed
orders the cohort on a ring; each device is joined to the k//2 nearest devices on either side,
and when k is odd also to the device diametrically opposite (n is then even, as n*k must be).
Every device gets exactly k distinct neighbours and the relation is symmetric. k = n - 1 makes
the complete graph, i.e. classic SecAgg.

Rules: pure function of (sorted cohort, k, round seed); the ring order comes from a ChaCha20
keystream keyed by HKDF(round seed, own label), so it is the same on every platform and numpy
version and independent of any mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from shared.secagg.errors import SecAggConfigError
from shared.secagg.keys import derive
from shared.secagg.prg import chacha20_keystream

LABEL_GRAPH = b"fleetlearn/secagg/v1/neighbour-graph"


class NeighbourGraph:
    """k-regular neighbour graph over a cohort. `of(device)` gives a device's neighbours."""

    __slots__ = ("_cache", "_cohort", "_index", "_k", "_position", "_ring")

    def __init__(self, cohort: Sequence[str], neighbours: int, round_seed: bytes) -> None:
        members = tuple(sorted(cohort))
        n, k = len(members), neighbours
        if len(set(members)) != n:
            raise SecAggConfigError("cohort", "a device appears twice in the roster")
        if not 2 <= k <= n - 1 or (n * k) % 2:
            raise SecAggConfigError(
                "neighbours",
                f"{k} neighbours is impossible for {n} devices (need 2..n-1, n*k even)",
            )
        key = derive(LABEL_GRAPH, round_seed, round_seed=round_seed, context=n.to_bytes(4, "big"))
        draws = np.frombuffer(chacha20_keystream(key, 8 * n), dtype="<u8")
        # A stable sort breaks the (2^-64-rare) ties by roster order, so all parties agree.
        order = np.argsort(draws, kind="stable")
        self._cohort = members
        self._k = k
        self._ring = tuple(members[i] for i in order)
        self._position = {device: pos for pos, device in enumerate(self._ring)}
        self._index = {device: i for i, device in enumerate(members)}
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def cohort(self) -> tuple[str, ...]:
        """The roster, sorted: the canonical order of devices in the round."""
        return self._cohort

    @property
    def degree(self) -> int:
        return self._k

    def __contains__(self, device: object) -> bool:
        return device in self._index

    def share_x(self, device: str) -> int:
        """The Shamir x-coordinate of `device`: its position in the sorted roster, plus one."""
        return self._index[device] + 1

    def of(self, device: str) -> tuple[str, ...]:
        """The k neighbours of `device`, sorted."""
        cached = self._cache.get(device)
        if cached is not None:
            return cached
        n, k = len(self._ring), self._k
        pos = self._position[device]
        offsets = [d for step in range(1, k // 2 + 1) for d in (step, -step)]
        if k % 2:
            offsets.append(n // 2)
        result = tuple(sorted(self._ring[(pos + d) % n] for d in offsets))
        self._cache[device] = result
        return result

    def live(self, device: str, alive: Iterable[str] | set[str] | frozenset[str]) -> set[str]:
        """Neighbours of `device` that are in `alive`."""
        alive_set = alive if isinstance(alive, set | frozenset) else set(alive)
        return {v for v in self.of(device) if v in alive_set}

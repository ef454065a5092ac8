"""The neighbour graph of a round: who masks with and holds shares for whom.

What it owns: turning the advertisers of a round (U1) and their graph draws into a graph that
every party derives by itself, and the membership bitmap that tells a device who U1 is.

Construction (a Harary graph on a pseudo-random ring, as in Bell et al. 2020, over U1): the
ring seed is SHA-256 over U1 and the draws of all its members, and a ChaCha20 keystream keyed
by it orders U1 on a ring. Each device is joined to the k//2 nearest advertisers on either
side and, when k is odd and |U1| even, also to the one diametrically opposite. So:

- with everyone advertising and n*k even (what `SecAggConfig` requires), every device has
  exactly k distinct, symmetric neighbours; k = n - 1 is the complete graph, classic SecAgg;
- when |U1|*k is odd there is no opposite device: every device gets k - 1 (k//2 on each side);
- when |U1| <= k every advertiser is a neighbour of every other (|U1| - 1 each).

Where the randomness comes from, and why: each draw is a device's secret, committed before the
round by the ticket in its retained status (the announcement copies it) and revealed only in
its signed advert. So the ring depends on secrets no party knew when the cohort, the round seed
and the colluders' draws were fixed: the aggregator cannot try round seeds, and colluding
devices cannot grind their draws into positions next to each other (they could if each device
placed itself; see docs/secagg.md). What the aggregator can still do is choose which
advertisers make up U1: each choice gives another uniformly random ring, which it must find
within the stage and pay for with devices it leaves out (bounded by each device's
`PrivacyFloor`); bench/graph_grinding_bench.py puts numbers on it.

Rules: pure function of (cohort, k, U1 and its draws). The cohort order is sorted ids; Shamir
x-coordinates come from it (not from U1), so they never change within a round. The round seed
plays no part. Ties in the ring keystream (2^-64-rare) break by cohort order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fleetlearn.shared.secagg.errors import SecAggConfigError
from fleetlearn.shared.secagg.keys import DRAW_BYTES, ring_seed
from fleetlearn.shared.secagg.prg import chacha20_keystream


class NeighbourGraph:
    """The neighbour graph over the advertisers of a round. `of(device)` gives its neighbours."""

    __slots__ = ("_cache", "_cohort", "_index", "_k", "_members", "_position", "_ring")

    def __init__(self, cohort: Sequence[str], neighbours: int, draws: Mapping[str, bytes]) -> None:
        """`draws`: the graph draw of every advertiser (U1, a subset of the cohort)."""
        members = tuple(sorted(cohort))
        index = self._check(members, neighbours)
        strangers = [d for d in draws if d not in index]
        if strangers:
            raise SecAggConfigError("draws", f"{strangers[:3]} are not in the cohort")
        for device, draw in draws.items():
            if type(draw) is not bytes or len(draw) != DRAW_BYTES:
                raise SecAggConfigError(
                    "draws", f"the draw of {device!r} is not {DRAW_BYTES} bytes"
                )
        u1 = tuple(d for d in members if d in draws)
        blob = b"".join(draws[d] for d in u1)
        self._build(members, index, neighbours, u1, membership_bitmap(members, u1), blob)

    @classmethod
    def from_roster(
        cls,
        cohort: Sequence[str],
        neighbours: int,
        advertisers: tuple[str, ...],
        advertised: bytes,
        draws: bytes,
    ) -> NeighbourGraph:
        """The same graph from a roster's own fields: `advertisers` in cohort order as
        `advertised` names them, `draws` theirs concatenated (what a device checked)."""
        members = tuple(sorted(cohort))
        if len(draws) != DRAW_BYTES * len(advertisers):
            raise SecAggConfigError("draws", f"expected {DRAW_BYTES} bytes per advertiser")
        graph = cls.__new__(cls)
        graph._build(
            members, cls._check(members, neighbours), neighbours, advertisers, advertised, draws
        )
        return graph

    @staticmethod
    def _check(members: tuple[str, ...], k: int) -> dict[str, int]:
        n = len(members)
        if len(set(members)) != n:
            raise SecAggConfigError("cohort", "a device appears twice in the roster")
        if not 2 <= k <= n - 1:
            raise SecAggConfigError(
                "neighbours", f"{k} neighbours is impossible for {n} devices (need 2..n-1)"
            )
        return {device: i for i, device in enumerate(members)}

    def _build(
        self,
        members: tuple[str, ...],
        index: dict[str, int],
        k: int,
        u1: tuple[str, ...],
        advertised: bytes,
        draws: bytes,
    ) -> None:
        self._cohort = members
        self._index = index
        self._k = k
        self._members = u1
        if u1:
            seed = ring_seed(advertised, draws)
            spots = np.frombuffer(chacha20_keystream(seed, 8 * len(u1)), dtype="<u8")
            order = np.argsort(spots, kind="stable")
            self._ring = tuple(u1[i] for i in order)
        else:
            self._ring = ()
        self._position = {device: pos for pos, device in enumerate(self._ring)}
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def cohort(self) -> tuple[str, ...]:
        """The roster (U0), sorted: the canonical order of devices in the round."""
        return self._cohort

    @property
    def members(self) -> tuple[str, ...]:
        """The advertisers (U1) the graph is over, sorted."""
        return self._members

    @property
    def ring(self) -> tuple[str, ...]:
        """U1 in ring order."""
        return self._ring

    @property
    def degree(self) -> int:
        """k, the configured number of neighbours (see the module docstring for fewer)."""
        return self._k

    def __contains__(self, device: object) -> bool:
        return device in self._position

    def share_x(self, device: str) -> int:
        """The Shamir x-coordinate of `device`: its position in the sorted roster, plus one."""
        return self._index[device] + 1

    def of(self, device: str) -> tuple[str, ...]:
        """The neighbours of `device` in U1, sorted."""
        cached = self._cache.get(device)
        if cached is not None:
            return cached
        ring, k = self._ring, self._k
        m = len(ring)
        pos = self._position[device]
        if m - 1 <= k:
            result = tuple(d for d in self._members if d != device)
        else:
            offsets = [d for step in range(1, k // 2 + 1) for d in (step, -step)]
            if k % 2 and m % 2 == 0:
                offsets.append(m // 2)
            result = tuple(sorted(ring[(pos + d) % m] for d in offsets))
        self._cache[device] = result
        return result

    def live(self, device: str, alive: Iterable[str] | set[str] | frozenset[str]) -> set[str]:
        """Neighbours of `device` that are in `alive`."""
        alive_set = alive if isinstance(alive, set | frozenset) else set(alive)
        return {v for v in self.of(device) if v in alive_set}


def membership_bitmap(cohort: Sequence[str], members: Iterable[str]) -> bytes:
    """Bit i (little-endian over the bytes) is set when the i-th device of the sorted cohort is
    a member. ceil(n/8) bytes: 125 at n = 1000."""
    index = {device: i for i, device in enumerate(cohort)}
    value = 0
    for device in members:
        value |= 1 << index[device]
    return value.to_bytes((len(cohort) + 7) // 8, "little")


def members_of(cohort: Sequence[str], bitmap: bytes) -> tuple[str, ...] | None:
    """The members a bitmap names, in cohort order; None if it does not fit the cohort (wrong
    length, or bits set past the last device)."""
    n = len(cohort)
    if len(bitmap) != (n + 7) // 8:
        return None
    value = int.from_bytes(bitmap, "little")
    if value >> n:
        return None
    return tuple(device for i, device in enumerate(cohort) if value >> i & 1)

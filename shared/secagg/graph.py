"""The neighbour graph of a round: who masks with and holds shares for whom.

What it owns: turning the advertisers of a round (U1) and their graph draws into a graph that
every party derives by itself, and the membership bitmap that tells a device who U1 is.

Construction (a Harary graph on a ring, as in Bell et al. 2020, but over U1 and placed by the
devices' own draws): each advertiser u sits on the ring at `keys.ring_position(u, draw_u)`; its
draw is a secret it committed to (the ticket in its retained status, copied into the round
announcement) before the round, and revealed only in its signed advert. Each device is joined to
the k//2 nearest advertisers on either side and, when k is odd and |U1| even, also to the one
diametrically opposite. So:

- with everyone advertising and n*k even (what `SecAggConfig` requires), every device has
  exactly k distinct, symmetric neighbours; k = n - 1 is the complete graph, classic SecAgg;
- when |U1|*k is odd there is no opposite device: every device gets k - 1 (k//2 on each side);
- when |U1| <= k every advertiser is a neighbour of every other (|U1| - 1 each).

Why not a graph from the round seed: the aggregator draws the seed and could try seeds until one
puts colluders around a victim. Here nobody can aim: the positions of colluding devices are
fixed by tickets published before the round, and an honest device's position is unknown to
everyone until its advert. Leaving an honest advertiser out of U1 only removes that node; it
reshuffles nobody else (what it can still do is bounded by the device's `PrivacyFloor`, see
docs/secagg.md). The round seed plays no part.

Rules: pure function of (cohort, k, draws of U1); the cohort order is sorted ids, and Shamir
x-coordinates come from it (not from U1), so they never change within a round. Ties in ring
position (2^-64-rare) break by device id, so all parties agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from shared.secagg.errors import SecAggConfigError
from shared.secagg.keys import DRAW_BYTES, ring_position


class NeighbourGraph:
    """The neighbour graph over the advertisers of a round. `of(device)` gives its neighbours."""

    __slots__ = ("_cache", "_cohort", "_index", "_k", "_members", "_position", "_ring")

    def __init__(
        self,
        cohort: Sequence[str],
        neighbours: int,
        draws: Mapping[str, bytes],
        *,
        positions: Mapping[str, int] | None = None,
    ) -> None:
        """`draws`: the graph draw of every advertiser (U1, a subset of the cohort).

        `positions` may pass ring positions already computed from those draws (a device computes
        them while it checks the draws against their tickets); they are trusted as given."""
        members = tuple(sorted(cohort))
        n, k = len(members), neighbours
        if len(set(members)) != n:
            raise SecAggConfigError("cohort", "a device appears twice in the roster")
        if not 2 <= k <= n - 1:
            raise SecAggConfigError(
                "neighbours", f"{k} neighbours is impossible for {n} devices (need 2..n-1)"
            )
        index = {device: i for i, device in enumerate(members)}
        strangers = [d for d in draws if d not in index]
        if strangers:
            raise SecAggConfigError("draws", f"{strangers[:3]} are not in the cohort")
        for device, draw in draws.items():
            if type(draw) is not bytes or len(draw) != DRAW_BYTES:
                raise SecAggConfigError(
                    "draws", f"the draw of {device!r} is not {DRAW_BYTES} bytes"
                )
        if positions is None:
            positions = {d: ring_position(d, draw) for d, draw in draws.items()}
        self._cohort = members
        self._index = index
        self._k = k
        self._members = tuple(sorted(draws))
        self._ring = tuple(sorted(self._members, key=lambda d: (positions[d], d)))
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
    def degree(self) -> int:
        """k, the configured number of neighbours (see the module docstring for fewer)."""
        return self._k

    def __contains__(self, device: object) -> bool:
        return device in self._position

    def in_cohort(self, device: str) -> bool:
        return device in self._index

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

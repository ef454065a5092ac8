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
        self._ring = tuple(d for _, d in sorted((positions[d], d) for d in self._members))
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


def fewest_exclusions(colluding: Sequence[bool], victim: int, k: int, t: int) -> int | None:
    """The fewest advertisers an aggregator must leave out of U1 so that the device at ring
    index `victim` gets t colluding neighbours; None when no exclusion can do it.

    `colluding` flags every advertiser in ring order. Exact for even k; for odd k a lower
    bound (the opposite neighbour is counted as a colluder whenever it could be one). Used by
    bench/graph_exclusion_bench.py and the tests to put numbers on what `PrivacyFloor
    .min_advertised_fraction` bounds (docs/secagg.md). Leaving colluders out never helps: it
    only lets other nodes into the victim's windows.
    """
    m = len(colluding)
    if colluding[victim] or k < 2:
        raise ValueError("the victim must be an honest advertiser; k >= 2")
    colluders = sum(colluding)
    if colluders < t:
        return None
    half = k // 2
    need = t if k % 2 == 0 else t - 1
    # Shrinking U1 to k + 1 devices makes the victim a neighbour of all of them.
    best = max(0, m - (k + 1))

    def walk(step: int) -> list[tuple[int, int]]:
        """(honest passed, distance) at each colluder met walking from the victim."""
        found, honest = [], 0
        for distance in range(1, m):
            if colluding[(victim + step * distance) % m]:
                found.append((honest, distance))
            else:
                honest += 1
        return found

    left, right = walk(-1), walk(1)
    for a in range(half + 1):
        b = need - a
        if not 0 <= b <= half or a > len(left) or b > len(right) or a + b > colluders:
            continue
        cost, reach = 0, 0
        for count, side in ((a, left), (b, right)):
            if count:
                honest, distance = side[count - 1]
                cost += max(0, honest - (half - count))
                reach += distance
        # Both windows must fit on what is left of the ring without meeting.
        if reach <= m - 1 and m - cost >= k + 2:
            best = min(best, cost)
    return best

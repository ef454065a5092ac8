"""What choosing U1 buys an aggregator that colludes with c devices.

The neighbour ring of a round is seeded by all advertisers' committed draws (see
shared/secagg/graph.py), so for a given U1 it is a uniformly random ring nobody could aim. What
the aggregator can still do: pick which advertisers make up U1 (leaving honest ones out), get
another random ring for each choice, and look for one that gives some honest device t colluding
neighbours. A device's `PrivacyFloor.min_advertised_fraction` bounds how many it can leave out;
the stage deadline bounds how many rings it can try.

For a uniformly random ring over m advertisers, a device's neighbours are a uniformly random
set of d of the m - 1 others (d = k, or k - 1 / m - 1, see graph.py), so it is exposed with the
hypergeometric tail P(X >= t), X ~ Hyp(m - 1, c, d). This prints, per (n, k, t, c):

- p0: the chance that an honest round (everyone advertises) exposes some honest device: what an
  aggregator gets per round by aborting and retrying (each retry is a visible aborted round);
- rings: how many random rings it must try to find one when it shrinks U1 to the smallest size
  the floor allows (smaller U1, more colluders per neighbourhood; leaving j of the n - c
  honest devices out gives C(n - c, j) different U1s, more than enough whenever rings is not
  astronomical), for the minimal fraction 0.5 and the default;
- cpu s: rings x the measured time to build one ring and check every honest device (this
  Python; a determined attacker is faster), to compare with the stage time (seconds): the
  search can only start once the last advert is in, and must end before devices give up.

Also checked by simulation with the real NeighbourGraph (tests/test_secagg_graph_floor.py).

    python bench/graph_grinding_bench.py
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetlearn.shared.secagg.config import PrivacyFloor, SecAggConfig
from fleetlearn.shared.secagg.graph import NeighbourGraph
from fleetlearn.shared.secagg.keys import DRAW_BYTES


def degree(m: int, k: int) -> int:
    if m - 1 <= k:
        return m - 1
    return k - 1 if (m * k) % 2 else k


def exposed(m: int, k: int, t: int, c: int) -> float:
    """P(a given honest advertiser has >= t colluding neighbours) in a random ring over m."""
    d, others = degree(m, k), m - 1
    total = math.comb(others, d)
    return (
        sum(math.comb(c, x) * math.comb(others - c, d - x) for x in range(t, min(c, d) + 1)) / total
    )


def any_exposed(m: int, k: int, t: int, c: int) -> float:
    """P(some honest advertiser is exposed), union bound (tight when small)."""
    return min(1.0, (m - c) * exposed(m, k, t, c))


def ring_seconds(n: int, k: int, c: int) -> float:
    """Time to build one ring and count colluding neighbours of every honest device."""
    cohort = [f"dev-{i:05d}" for i in range(n)]
    colluders = set(cohort[:c])
    draws = {d: os.urandom(DRAW_BYTES) for d in cohort}
    began = time.perf_counter()
    reps = 5
    for _ in range(reps):
        graph = NeighbourGraph(cohort, k, draws)
        for d in cohort:
            if d not in colluders:
                sum(v in colluders for v in graph.of(d))
    return (time.perf_counter() - began) / reps


def row(n: int, k: int, t: int, c: int, fractions: tuple[float, ...]) -> str:
    config = SecAggConfig.create(cohort_size=n, dimension=1, neighbours=k, threshold=t)
    cells = [f"{any_exposed(n, k, t, c):.2g}"]
    seconds = ring_seconds(n, k, c)
    for fraction in fractions:
        floor = PrivacyFloor(min_advertised_fraction=fraction)
        smallest = floor.advertisers_needed(config)
        p = any_exposed(smallest, k, t, c)
        if p == 0:
            cells += ["never", "-"]
            continue
        # Leaving n - smallest honest devices out gives C(n - c, n - smallest) different U1s,
        # far more than needed whenever p is not negligible; each is a fresh random ring.
        cells += [f"{1 / p:.2g}", f"{seconds / p:.2g}"]
    return f"| {n} | {k} | {t} | {c} | " + " | ".join(cells) + " |"


def main() -> None:
    fractions = (0.5, PrivacyFloor().min_advertised_fraction)
    print("command: python bench/graph_grinding_bench.py " + " ".join(sys.argv[1:]))
    head = " | ".join(f"rings f={f} | cpu s f={f}" for f in fractions)
    print(f"| n | k | t | c | p0 (per honest round) | {head} |")
    print("|---|---|---|---|---|" + "---|" * (2 * len(fractions)))
    for n, k, t, cs in (
        (60, 12, 7, (6, 7, 8, 10, 12, 15)),
        (60, 19, 10, (9, 10, 12, 15)),
        (1000, 23, 12, (12, 30, 50, 100)),
    ):
        for c in cs:
            print(row(n, k, t, c, fractions), flush=True)


if __name__ == "__main__":
    main()

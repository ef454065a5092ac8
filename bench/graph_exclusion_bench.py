"""What leaving honest advertisers out of U1 buys an aggregator that colludes with c devices.

The neighbour ring is over U1, each advertiser placed by its own committed draw (see
shared/secagg/graph.py). Colluding devices may grind their draws before the round to sit
wherever they like, but nobody knows an honest device's place until its advert. What the
aggregator can still do after the adverts: leave honest advertisers out of U1 so that colluders
become a victim's neighbours. A device's `PrivacyFloor.min_advertised_fraction` bounds how many
it can leave out: at most n - ceil(fraction * n) (fewer when devices really dropped).

For each number of colluders c and each colluder placement (random; evenly spread; in g tight
clusters spread evenly, g = 1..c), this draws honest positions from real draws
(`keys.ring_position`), lets the aggregator pick its best victim, and computes the fewest
exclusions that give the victim t colluding neighbours (`graph.fewest_exclusions`: exact for
even k, a lower bound for odd k). It prints, per c, the worst placement's chance per round that
the exclusions fit within the floor's budget, for several fractions, and the median exclusions
the best victim needs.

    python bench/graph_exclusion_bench.py                       # n=60, k=12, t=7 and k=19, t=10
    python bench/graph_exclusion_bench.py --n 1000 --k 23 --t 12 --colluders 12 20 30 50 --trials 40
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.secagg import keys
from shared.secagg.graph import fewest_exclusions

FRACTIONS = (0.5, 0.7, 0.8, 0.85, 0.9)


def placements(c: int) -> dict[str, list[float]]:
    """Colluder positions on [0, 1) for each strategy; chosen before the round."""
    out: dict[str, list[float]] = {"even": [i / c for i in range(c)]}
    for groups in range(1, min(c, 16) + 1):
        # tight clusters (1e-9 apart) spread evenly; sizes differ by at most one
        out[f"{groups} clusters"] = [(i % groups) / groups + 1e-9 * i for i in range(c)]
    return out


def best_victim(positions_honest: np.ndarray, colluders: list[float], k: int, t: int) -> int:
    """Fewest exclusions over every honest victim (a large number when impossible)."""
    items = sorted([(float(p), False) for p in positions_honest] + [(p, True) for p in colluders])
    ring = [flag for _, flag in items]
    best = 10**9
    for index, flag in enumerate(ring):
        if not flag:
            need = fewest_exclusions(ring, index, k, t)
            if need is not None:
                best = min(best, need)
    return best


def run(n: int, k: int, t: int, colluders: list[int], trials: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)  # names the honest draws below; simulation only
    rows = []
    for c in colluders:
        worst: dict[float, float] = dict.fromkeys(FRACTIONS, 0.0)
        worst_median = 10**9
        worst_name = ""
        for name, spots in placements(c).items():
            needs = []
            for _ in range(trials):
                draws = [rng.bytes(keys.DRAW_BYTES) for _ in range(n - c)]
                honest = np.array(
                    [keys.ring_position(f"h{i}", d) / 2**64 for i, d in enumerate(draws)]
                )
                # the whole placement turns by a random angle: the ring has no origin
                offset = float(rng.random())
                needs.append(best_victim(honest, [(p + offset) % 1.0 for p in spots], k, t))
            median = statistics.median(needs)
            if median < worst_median:
                worst_median, worst_name = median, name
            for f in FRACTIONS:
                budget = n - math.ceil(f * n - 1e-9)
                worst[f] = max(worst[f], sum(x <= budget for x in needs) / trials)
        cells = " | ".join(f"{100 * worst[f]:.0f}%" for f in FRACTIONS)
        median_text = "impossible" if worst_median >= 10**9 else f"{worst_median:g}"
        rows.append(f"| {n} | {k} | {t} | {c} | {median_text} ({worst_name}) | {cells} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--t", type=int)
    parser.add_argument("--colluders", type=int, nargs="+")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.n is None:
        configs = [(60, 12, 7, [6, 7, 8, 9, 10, 12]), (60, 19, 10, [9, 10, 12, 15])]
    else:
        configs = [(args.n, args.k, args.t, args.colluders)]
    print("command: python bench/graph_exclusion_bench.py " + " ".join(sys.argv[1:]))
    budgets = " | ".join(f"f={f}" for f in FRACTIONS)
    print(f"| n | k | t | c | median exclusions, best victim (worst placement) | {budgets} |")
    print("|---|---|---|---|---|" + "---|" * len(FRACTIONS))
    for n, k, t, cs in configs:
        for row in run(n, k, t, cs, args.trials, args.seed):
            print(row, flush=True)


if __name__ == "__main__":
    main()

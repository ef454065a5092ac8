"""Secure FedAvg vs central training on the simulator's predictive-maintenance data.

    python bench/convergence_bench.py [--repeats 3] [--rounds 10]

200 devices (default scenario: three sites, non-IID fault mixes, 300 windows each), 10% of the
cohort vanishing after sharing keys (before the masked input), rand-10% compression, secure
rounds of 80 (+20% over-selection) devices, five local epochs, seeds 0..repeats-1. Prints the
central accuracy of the same model on all data pooled, then per configuration the held-out
accuracy after each round (median over repeats) and the ratio to central after the last round.
Runs in memory (firmware_sim.inmemory): the real engine, SecAgg+, participants and LiteRT.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fleetlearn.aggregator import rules
from fleetlearn.aggregator.engine import EngineConfig
from fleetlearn.firmware_sim.inmemory import InMemoryFleet, central_accuracy, held_out_set
from fleetlearn.firmware_sim.scenario import Scenario
from fleetlearn.shared import rounds

CONFIGS = {
    # Without error feedback the aggregator scales rand-k's mean by d/k itself (unbiased).
    "EF off, unbiased rand-k": (False, 1.0),
    "EF on, server lr 1": (True, 1.0),
    "EF on, server lr 2": (True, 2.0),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    scenario = Scenario.parse("[dropout]\ncollect = 0.1\n")
    test = held_out_set(scenario)
    central = central_accuracy(scenario, 200, test, epochs=10)
    print(
        "command: python bench/convergence_bench.py",
        f"--repeats {args.repeats} --rounds {args.rounds}",
    )
    print(f"central accuracy (all 60,000 windows pooled, 10 epochs): {central:.3f}")
    for name, (feedback, lr) in CONFIGS.items():
        curves = []
        started = time.perf_counter()
        for repeat in range(args.repeats):
            config = EngineConfig(
                mode="secure",
                cohort=80,
                over_select=1.2,
                training=rounds.TrainingPlan(epochs=5, max_samples=256, error_feedback=feedback),
                sparsity="rand_k",
                density=0.1,
                clip=1.0,
                expected_dropout=0.1,
            )
            fleet = InMemoryFleet(
                200, config, scenario, optimizer=rules.OptimizerConfig(lr=lr), seed=repeat
            )
            curve = []
            for _ in range(args.rounds):
                fleet.run_round()
                curve.append(fleet.evaluate(*test))
            curves.append(curve)
        medians = [statistics.median(c[r] for c in curves) for r in range(args.rounds)]
        elapsed = (time.perf_counter() - started) / args.repeats
        print(
            f"{name:30s} "
            + " ".join(f"{a:.3f}" for a in medians)
            + f" | last/central {medians[-1] / central:.1%} | {elapsed:.0f} s per run"
        )


if __name__ == "__main__":
    main()

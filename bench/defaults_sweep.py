"""The sweep behind the aggregator's training defaults (docs/learning.md, "Defaults").

    python bench/defaults_sweep.py [--seeds 0,1] [--rounds 20] [--configs A,B,...] [--json F]

Every configuration runs `bench/quality_bench.py` in the acceptance setting (50 devices,
Dirichlet 0.3 label skew, 10% dropouts after sharing, secure rounds, 20 rounds) on all four of
its datasets, with the settings below laid over the aggregator's shipped defaults. Prints one
table row per configuration: federated / central test accuracy at round 20 (median over seeds)
per dataset, the worst dataset, and the mean, then the command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bench

# Settings that every row states in full, so a later change of the shipped defaults does not
# change what a row measured.
OLD = {  # the defaults before this sweep
    "compression.sparsity": "rand_k",
    "compression.density": "0.1",
    "training.error_feedback": "true",
    "server.optimizer": "fedavg",
    "server.lr": "1.0",
    "training.epochs": "1",
    "training.steps": "0",
    "training.learning_rate": "0.05",
    "training.prox_mu": "0.0",
    "training.lr_decay": "1.0",
    "training.eval_fraction": "0.2",
    "server.momentum": "0.9",
}
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "A": ("old defaults: rand-10% + EF, 1 epoch, lr 0.05", {}),
    "B": (
        "rand-10%, EF off (unbiased: mean x d/k)",
        {"training.error_feedback": "false"},
    ),
    "C": ("dense, 1 epoch, lr 0.05", {"compression.sparsity": "dense"}),
    "D": ("dense, 5 epochs, lr 0.05", {"compression.sparsity": "dense", "training.epochs": "5"}),
    "E": ("dense, 20 steps, lr 0.05", {"compression.sparsity": "dense", "training.steps": "20"}),
    "F": (
        "dense, 20 steps, lr 0.1",
        {"compression.sparsity": "dense", "training.steps": "20", "training.learning_rate": "0.1"},
    ),
    "G": (
        "dense, 50 steps, lr 0.1",
        {"compression.sparsity": "dense", "training.steps": "50", "training.learning_rate": "0.1"},
    ),
    "H": (
        "dense, 20 steps, lr 0.2",
        {"compression.sparsity": "dense", "training.steps": "20", "training.learning_rate": "0.2"},
    ),
    "I": (
        "F + server momentum 0.9 (FedAvgM)",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.1",
            "server.optimizer": "fedavgm",
        },
    ),
    "J": (
        "F + server Adam lr 0.01 (FedAdam)",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.1",
            "server.optimizer": "fedadam",
            "server.lr": "0.01",
        },
    ),
    "K": (
        "F + FedProx mu 0.01",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.1",
            "training.prox_mu": "0.01",
        },
    ),
    "L": (
        "F + lr decay 0.95 per round",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.1",
            "training.lr_decay": "0.95",
        },
    ),
    "M": (
        "rand-10% + EF, 20 steps, lr 0.1",
        {"training.steps": "20", "training.learning_rate": "0.1"},
    ),
    "N": (
        "rand-25%, EF off, 20 steps, lr 0.1",
        {
            "compression.density": "0.25",
            "training.error_feedback": "false",
            "training.steps": "20",
            "training.learning_rate": "0.1",
        },
    ),
    # Second round, around the best of the first (H).
    "O": (
        "dense, 40 steps, lr 0.2",
        {"compression.sparsity": "dense", "training.steps": "40", "training.learning_rate": "0.2"},
    ),
    "P": (
        "dense, 20 steps, lr 0.3",
        {"compression.sparsity": "dense", "training.steps": "20", "training.learning_rate": "0.3"},
    ),
    "Q": (
        "H + server momentum 0.5",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.2",
            "server.optimizer": "fedavgm",
            "server.momentum": "0.5",
        },
    ),
    "R": (
        "H + FedProx mu 0.1",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.2",
            "training.prox_mu": "0.1",
        },
    ),
    "S": (
        "rand-25% + EF, 20 steps, lr 0.2",
        {"compression.density": "0.25", "training.steps": "20", "training.learning_rate": "0.2"},
    ),
    "T": (
        "rand-25%, EF off, 20 steps, lr 0.2",
        {
            "compression.density": "0.25",
            "training.error_feedback": "false",
            "training.steps": "20",
            "training.learning_rate": "0.2",
        },
    ),
    # Third round: Q (the best so far) at a quarter of the upload, and with more margin.
    "U": (
        "Q at rand-25%, EF off",
        {
            "compression.density": "0.25",
            "training.error_feedback": "false",
            "training.steps": "20",
            "training.learning_rate": "0.2",
            "server.optimizer": "fedavgm",
            "server.momentum": "0.5",
        },
    ),
    "V": (
        "Q at local lr 0.15",
        {
            "compression.sparsity": "dense",
            "training.steps": "20",
            "training.learning_rate": "0.15",
            "server.optimizer": "fedavgm",
            "server.momentum": "0.5",
        },
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--datasets", default="pdm,italy_power,digits,vowels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.datasets.split(",")
    rows = {}
    print("| config | " + " | ".join(names) + " | worst | mean |")
    print("|---|" + "---|" * (len(names) + 2))
    for key in args.configs.split(","):
        label, sets = CONFIGS[key]
        merged = {**OLD, **sets}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            argv = [
                "--rounds", str(args.rounds), "--partitions", "dirichlet",
                "--modes", "central,secure", "--seeds", args.seeds,
                "--datasets", args.datasets, "--json", str(out),
                *(a for k, v in merged.items() for a in ("--set", f"{k}={v}")),
            ]  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                quality_bench.main(argv)
            result = json.loads(out.read_text())
        ratios = {
            name: result["datasets"][name]["runs"]["secure/dirichlet"]["ratios"][str(args.rounds)]
            for name in names
        }
        rows[key] = {"label": label, "sets": merged, "ratios": ratios}
        cells = " | ".join(f"{ratios[n]:.1%}" for n in names)
        worst, mean = min(ratios.values()), statistics.mean(ratios.values())
        print(f"| {key}: {label} | {cells} | {worst:.1%} | {mean:.1%} |", flush=True)
    print(
        f"\ncommand: python bench/defaults_sweep.py --seeds {args.seeds} --rounds {args.rounds}"
        f" --configs {args.configs}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

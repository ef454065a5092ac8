"""Bytes per update and encode/decode time of shared.compression, against dense float32.

    .venv/bin/python bench/sparse_bench.py                 # d in {100k, 1M}, the docs table
    .venv/bin/python bench/sparse_bench.py --dims 100000 --repeat 3

For each model size d and density (1%, 10%, 100%) it compresses one synthetic update (Student-t
with 3 degrees of freedom: gradient-like, a few large coordinates) in each mode:

- dense: float32 DenseUpdate, the baseline;
- plain top-k: int8 values + float32 scale, delta-coded indices (what plain rounds send);
- secure-compatible rand-k: 8-bit grid values, coordinates from the round seed (no indices);
- masked size: k uniformly random uint32 in the same envelope. Masks make SecAgg's vector
  incompressible, so this is what a secure round's k coordinates cost on the wire at b = 32
  (masking itself is shared.secagg's and not timed here).

encode = compress() (selection, quantization, sent vector for error feedback) + wire.encode;
decode = wire.decode + check against the round + to_dense (including re-deriving rand-k's
coordinates from the seed). Times are the median of --repeat runs on this machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.compression import (
    Compression,
    SharedUpdate,
    SparseMode,
    compress,
    decode_update,
    to_dense,
)

SEED = bytes(range(32))


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(update: np.ndarray, config: Compression, repeat: int) -> tuple[int, float, float]:
    dim = update.shape[0]
    rng = np.random.default_rng(1)

    def encode() -> bytes:
        return wire.encode(compress(update, config, rng=rng, seed=SEED).message)

    payload = encode()

    def decode() -> np.ndarray:
        msg = decode_update(payload, config=config, dim=dim)
        return to_dense(msg, config=config, dim=dim, seed=SEED)

    return len(payload), median_seconds(encode, repeat), median_seconds(decode, repeat)


def masked_size(k: int, dim: int) -> int:
    ring = np.random.default_rng(2).integers(0, 2**32, size=k, dtype=np.uint32)
    return len(wire.encode(SharedUpdate(dim=dim, bits=32, clip=1.0, values=ring)))


def row(dim: int, density: str, mode: str, size: int, enc: float | None, dec: float | None) -> None:
    timing = "- | -" if enc is None or dec is None else f"{enc * 1e3:.1f} | {dec * 1e3:.1f}"
    print(f"| {dim:,} | {density} | {mode} | {size:,} | {size / (4 * dim):.4f} | {timing} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    print(
        f"# numpy {np.__version__}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}; median of {args.repeat}"
    )
    print()
    print("| d | density | mode | bytes/update | vs dense f32 | encode ms | decode ms |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for dim in args.dims:
        update = np.random.default_rng(0).standard_t(3, size=dim) * 1e-3
        clip = float(4 * np.std(update))

        size, enc, dec = measure(update, Compression(mode=SparseMode.DENSE), args.repeat)
        row(dim, "100%", "dense float32", size, enc, dec)
        for density in args.densities:
            label = f"{density:.0%}"
            top_k = Compression(mode=SparseMode.TOP_K, density=density, bits=8)
            row(dim, label, "plain top-k int8", *measure(update, top_k, args.repeat))
            rand_k = Compression(mode=SparseMode.RAND_K, density=density, bits=8, clip=clip)
            row(dim, label, "secure-compat. rand-k q=8", *measure(update, rand_k, args.repeat))
            row(dim, label, "masked size (k x uint32)", masked_size(rand_k.k(dim), dim), None, None)


if __name__ == "__main__":
    main()

"""Split one dataset into per-device files: `fleetlearn partition`.

    fleetlearn partition --data plant.csv --devices 50 --scheme dirichlet --alpha 0.3 --out parts/

Schemes (rows are assigned, never copied or dropped; every device gets at least `min_rows`):
- `iid`: a random permutation dealt out in near-equal shares.
- `dirichlet`: label skew as in the federated-learning literature (Hsu et al. 2019): for each
  class, the class's rows are split among devices by proportions drawn from
  Dirichlet(alpha, ..., alpha). Small alpha (0.1-0.5) gives devices few classes each; large
  alpha approaches iid. Needs labels.
- `group`: whole groups (a site, a machine: the `groups` array or `--group-column`) go to
  devices, largest first onto the device with the fewest rows, so no group is split. Needs at
  least as many groups as devices.

Rules: deterministic for a given seed; the device files are named like provisioned device ids
(`dev-0001.npz`, ...), so `fleetlearn sim --data DIR` and `fleetlearn device --data` find
them; a `partition.json` beside them records the scheme, the seed and each device's label
counts. Problems (too few rows or groups for the devices asked, no labels for `dirichlet`) are
one `PartitionError` naming what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from fleetlearn.shared.dataset import Dataset, save_npz
from fleetlearn.shared.errors import FleetlearnError

Scheme = Literal["iid", "dirichlet", "group"]
SCHEMES: tuple[Scheme, ...] = ("iid", "dirichlet", "group")
MAX_DEVICES = 100_000


class PartitionError(FleetlearnError):
    """The dataset cannot be split the way asked."""


def partition(
    data: Dataset,
    devices: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.3,
    seed: int = 0,
    min_rows: int = 1,
) -> list[np.ndarray]:
    """Row indices per device (each sorted, together a partition of all rows)."""
    n = len(data)
    if not 1 <= devices <= MAX_DEVICES:
        raise PartitionError(f"--devices must be 1..{MAX_DEVICES}, not {devices}")
    if min_rows < 1:
        raise PartitionError(f"--min-rows must be at least 1, not {min_rows}")
    if seed < 0:
        raise PartitionError(f"--seed must be a non-negative integer, not {seed}")
    if n < devices * min_rows:
        raise PartitionError(
            f"{n} rows cannot give {devices} devices {min_rows} row(s) each; use fewer devices"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), devices)
    elif scheme == "dirichlet":
        parts = _dirichlet(data, devices, alpha, rng, min_rows)
    elif scheme == "group":
        parts = _by_group(data, devices, rng, min_rows)
    else:
        raise PartitionError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    data: Dataset, devices: int, alpha: float, rng: np.random.Generator, min_rows: int
) -> list[np.ndarray]:
    if data.y is None or data.targets:
        raise PartitionError(
            "the dirichlet scheme splits by class label; the data has "
            + ("float targets" if data.targets else "no labels")
        )
    if not 0 < alpha <= 1e6 or not np.isfinite(alpha):
        raise PartitionError(f"--alpha must be a positive number, not {alpha}")
    y = data.y
    # Redraw until every device has min_rows (small alpha can leave devices empty); after a
    # bounded number of tries, move rows from the largest devices instead.
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for label in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * rows.size).astype(np.int64)
            for device, chunk in enumerate(np.split(rows, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_rows:
            return [np.asarray(p) for p in parts]
    return _top_up([np.asarray(p, dtype=np.int64) for p in parts], min_rows, rng)


def _top_up(parts: list[np.ndarray], min_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give short devices rows taken at random from the largest ones."""
    parts = [p.copy() for p in parts]
    for i in range(len(parts)):
        while parts[i].size < min_rows:
            donor = max(range(len(parts)), key=lambda j: parts[j].size)
            pick = int(rng.integers(parts[donor].size))
            parts[i] = np.append(parts[i], parts[donor][pick])
            parts[donor] = np.delete(parts[donor], pick)
    return parts


def _by_group(
    data: Dataset, devices: int, rng: np.random.Generator, min_rows: int
) -> list[np.ndarray]:
    if data.groups is None:
        raise PartitionError("the group scheme needs groups: a 'groups' array or --group-column")
    names, inverse = np.unique(data.groups, return_inverse=True)
    if names.size < devices:
        raise PartitionError(
            f"{names.size} groups cannot fill {devices} devices without splitting a group; "
            "use fewer devices or another scheme"
        )
    members = [np.flatnonzero(inverse == g) for g in range(names.size)]
    # Largest group first onto the device with the fewest rows (ties broken at random, so the
    # seed decides which of equal groups go together).
    order = sorted(range(names.size), key=lambda g: (-members[g].size, rng.random()))
    parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
    sizes = np.zeros(devices, dtype=np.int64)
    for g in order:
        device = int(np.argmin(sizes))
        parts[device].append(members[g])
        sizes[device] += members[g].size
    if int(sizes.min()) < min_rows:
        raise PartitionError(f"a device would get fewer than {min_rows} rows; use fewer devices")
    return [np.concatenate(p) for p in parts]


def device_files(count: int, prefix: str = "dev") -> list[str]:
    """File names matching `fleetlearn provision`'s device ids."""
    return [f"{prefix}-{i:04d}.npz" for i in range(1, count + 1)]


def write(
    out: Path,
    data: Dataset,
    parts: Sequence[np.ndarray],
    *,
    prefix: str = "dev",
    summary: dict[str, object],
) -> list[Path]:
    """Write one .npz per device and `partition.json`; returns the device files."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    counts = []
    classes = data.classes
    for name, rows in zip(device_files(len(parts), prefix), parts, strict=True):
        path = out / name
        save_npz(path, data.take(rows))
        paths.append(path)
        entry: dict[str, object] = {"file": name, "rows": int(rows.size)}
        if data.y is not None and not data.targets:
            entry["labels"] = np.bincount(data.y[rows], minlength=classes).tolist()
        counts.append(entry)
    report = {**summary, "rows": len(data), "classes": classes, "devices": counts}
    (out / "partition.json").write_text(json.dumps(report, indent=1) + "\n")
    return paths

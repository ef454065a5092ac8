"""The local data format: what a device trains on, and what `fleetlearn partition` reads and writes.

One example is one row: a vector of numeric features and, for devices that train, an integer
class label (or, for a regression model, a float target). Two file formats carry it:

- `.npz` (numpy, no pickles): `x` float [n, features] and, optionally, `y` [n]: integer class
  labels, or floats (regression targets, e.g. remaining useful life); an
  optional `groups` [n] (integers or strings) names each row's site or machine, for
  partitioning by group.
- `.csv` with a header row: every column is a feature except the label column (`label` unless
  told otherwise; absent means unlabelled) and an optional group column. Cells are numbers; an
  empty cell, `nan` or `inf` in a feature is an error, not a silent zero.

Rules: files are untrusted input. Every problem is a `DataError` naming the file and what is
wrong (with the row and column for CSV), never a traceback or a half-loaded array. Features
come back as float32 and finite; labels as int32 in [0, MAX_CLASSES), float targets as finite
float32 (`Dataset.targets`). Nothing is rescaled here:
the model sees the features as given (docs/data.md says how to scale them). Reading is bounded
(`MAX_ROWS`, `MAX_FEATURES`) so a corrupt or hostile file cannot exhaust memory.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.shared.errors import FleetlearnError

MAX_ROWS = 10_000_000
MAX_FEATURES = 100_000
MAX_CLASSES = 65_536
MAX_MEMBER_BYTES = 2**31  # one array of an .npz, uncompressed
DEFAULT_LABEL_COLUMN = "label"


class DataError(FleetlearnError):
    """A data file is missing, unreadable, or not in the format (the message says which)."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """Examples in memory: `x` float32 [n, features], `y` int32 [n] (class labels), float32
    [n] (regression targets) or None (unlabelled),
    `groups` [n] (str) or None, `features` the column names when the file had them."""

    x: np.ndarray
    y: np.ndarray | None
    groups: np.ndarray | None = None
    features: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def targets(self) -> bool:
        """Whether `y` holds regression targets (floats) rather than class labels."""
        return self.y is not None and self.y.dtype.kind == "f"

    @property
    def classes(self) -> int:
        if self.y is None or self.y.size == 0 or self.targets:
            return 0
        return int(self.y.max()) + 1

    def take(self, rows: np.ndarray) -> Dataset:
        return Dataset(
            self.x[rows],
            None if self.y is None else self.y[rows],
            None if self.groups is None else self.groups[rows],
            self.features,
        )


def load(
    path: Path | str, *, label: str = DEFAULT_LABEL_COLUMN, group: str | None = None
) -> Dataset:
    """Read an .npz or .csv file (by its suffix). `label` and `group` name CSV columns; an
    .npz always uses the arrays `y` and `groups` (when present)."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        data = _load_npz(p)
    elif p.suffix.lower() == ".csv":
        data = _load_csv(p, label=label, group=group)
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use .npz or .csv")
    if group is not None and data.groups is None:
        raise DataError(
            f"{p}: no group column {group!r}"
            if p.suffix.lower() == ".csv"
            else f"{p}: no 'groups' array to partition by"
        )
    return data


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def holdout_rows(count: int, fraction: float) -> np.ndarray:
    """An even split of a file's `count` rows by position: a boolean mask, True = held out.

    Row i is held out when frac((i + 1) * golden ratio) < fraction: about `fraction` of the
    rows, spread evenly over the file (so over time, for data kept in time order), no
    randomness needed. For a one-off split of one file (the demo's test set); a device's
    evaluation rows come from `evaluation_rows`, which does not depend on positions. When
    this would leave nothing, nothing is held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    index = np.arange(1, count + 1, dtype=np.float64)
    mask = np.mod(index * _GOLDEN, 1.0) < fraction
    if mask.all():
        mask[:] = False
    return mask


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def row_keys(x: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per row of `x`, from the row's values alone (as float32; -0.0 as
    0.0). Not a cryptographic hash: it spreads rows evenly, it does not hide them."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    rows = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1) + 0.0)
    raw = rows.view(np.uint8).reshape(len(rows), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), np.uint8)], axis=1)
    words = raw.view(np.uint64) if raw.shape[1] else np.zeros((len(raw), 0), np.uint64)
    h = np.full(len(rows), 0x6A09E667F3BCC908, dtype=np.uint64)
    for column in words.T:
        h = _mix(h ^ column)
    h = _mix(h ^ np.uint64(words.shape[1]))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def evaluation_rows(x: np.ndarray, fraction: float) -> np.ndarray:
    """Which of a device's rows it holds out for evaluation: a boolean mask, True = held out.

    Whether a row is held out depends only on its features (`row_keys(row) < fraction`), not
    on where it sits or what else the device has. So the held-out set stays held out when
    the device reads a different window of its data (another `max_samples`), when rows are
    appended or old ones dropped, and when a row appears twice; raising `fraction` only adds
    rows to it. About `fraction` of the rows, at random over rows; a device with very few
    rows may hold out none. When it would hold out every row, nothing is held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    mask = row_keys(x) < fraction if fraction > 0.0 else np.zeros(len(x), dtype=bool)
    if mask.all():
        mask[:] = False
    return mask


def save_npz(path: Path, data: Dataset) -> None:
    """Write `data` as an .npz this module reads back (no pickles; groups as strings)."""
    arrays: dict[str, np.ndarray] = {"x": data.x}
    if data.y is not None:
        arrays["y"] = data.y
    if data.groups is not None:
        arrays["groups"] = data.groups.astype(str)
    if data.features:
        arrays["features"] = np.asarray(data.features, dtype=str)
    np.savez(path, **arrays)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ npz


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if "x" not in names:
                raise DataError(f"{path}: needs an array 'x' [n, features]; has {sorted(names)}")
            for name in ("x", "y", "groups", "features"):
                if name in names:
                    _check_npz_member(path, archive, name)
            x = np.asarray(archive["x"])
            y = np.asarray(archive["y"]) if "y" in names else None
            groups = np.asarray(archive["groups"]) if "groups" in names else None
            features = np.asarray(archive["features"]) if "features" in names else None
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({_short(exc)})") from None
    if x.ndim != 2:
        raise DataError(f"{path}: 'x' must be 2-D [n, features], not of shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{path}: 'x' must be numeric, not {x.dtype}")
    names_out: tuple[str, ...] = ()
    if features is not None:
        if features.shape != (x.shape[1],) or features.dtype.kind not in "US":
            raise DataError(f"{path}: 'features' must name each of the {x.shape[1]} columns")
        names_out = tuple(str(f) for f in features)
    return _checked(path, x, y, groups, names_out)


def _check_npz_member(path: Path, archive: np.lib.npyio.NpzFile, name: str) -> None:
    """Refuse object arrays and sizes beyond the bounds before the array is read."""
    members = archive.zip
    if members is None:  # closed archive: cannot happen inside the `with` that reads it
        raise DataError(f"{path}: the archive was closed while reading")
    info = members.getinfo(f"{name}.npy")
    if info.file_size > MAX_MEMBER_BYTES:
        raise DataError(f"{path}: '{name}' is {info.file_size} bytes, more than this reads")


# ------------------------------------------------------------------------------------ csv


def _load_csv(path: Path, *, label: str, group: str | None) -> Dataset:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file; needs a header row and examples")
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                raise DataError(f"{path}: duplicate column names in the header")
            label_at = header.index(label) if label in header else None
            if group is not None and group not in header:
                raise DataError(f"{path}: no group column {group!r} (columns: {header[:8]})")
            group_at = header.index(group) if group is not None else None
            feature_at = [i for i in range(len(header)) if i not in (label_at, group_at)]
            if not feature_at:
                raise DataError(f"{path}: no feature columns")
            if len(feature_at) > MAX_FEATURES:
                raise DataError(
                    f"{path}: {len(feature_at)} feature columns, at most {MAX_FEATURES}"
                )
            rows_x: list[list[float]] = []
            rows_y: list[int] = []
            rows_g: list[str] = []
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {line}: {len(row)} cells, the header has {len(header)}"
                    )
                if len(rows_x) >= MAX_ROWS:
                    raise DataError(f"{path}: more than {MAX_ROWS} rows")
                rows_x.append([_number(path, line, header[i], row[i]) for i in feature_at])
                if label_at is not None:
                    rows_y.append(_label(path, line, header[label_at], row[label_at]))
                if group_at is not None:
                    rows_g.append(row[group_at].strip())
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
    x = np.asarray(rows_x, dtype=np.float64).reshape(len(rows_x), len(feature_at))
    y = np.asarray(rows_y, dtype=np.int64) if label_at is not None else None
    groups = np.asarray(rows_g, dtype=str) if group_at is not None else None
    return _checked(path, x, y, groups, tuple(header[i] for i in feature_at))


def _number(path: Path, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{path}, line {line}, column {column!r}: {cell[:20]!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{path}, line {line}, column {column!r}: {cell[:20]!r} is not finite")
    return value


def _label(path: Path, line: int, column: str, cell: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not value.is_integer() or not 0 <= value < MAX_CLASSES:
        raise DataError(
            f"{path}, line {line}, column {column!r}: label {cell[:20]!r} is not a class "
            f"number 0..{MAX_CLASSES - 1}"
        )
    return int(value)


# ----------------------------------------------------------------------------- common checks


def _checked(
    path: Path,
    x: np.ndarray,
    y: np.ndarray | None,
    groups: np.ndarray | None,
    features: tuple[str, ...],
) -> Dataset:
    n = x.shape[0]
    if n == 0:
        raise DataError(f"{path}: holds no examples")
    if n > MAX_ROWS or x.shape[1] > MAX_FEATURES or x.shape[1] == 0:
        raise DataError(f"{path}: {n} rows x {x.shape[1]} features is outside what this reads")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: 'x' row {bad} is not finite (NaN or inf, or beyond float32)")
    if y is not None:
        y = _checked_y(path, y, n)
    if groups is not None:
        if groups.shape != (n,):
            raise DataError(
                f"{path}: 'groups' must name one group per row ({n}), not {groups.shape}"
            )
        if groups.dtype.kind not in "iuUS":
            raise DataError(f"{path}: 'groups' must be integers or strings, not {groups.dtype}")
        groups = groups.astype(str)
    return Dataset(x, y, groups, features)


def _checked_y(path: Path, y: np.ndarray, n: int) -> np.ndarray:
    """Class labels as int32 in [0, MAX_CLASSES), or float targets as finite float32."""
    if y.shape != (n,):
        raise DataError(f"{path}: 'y' must hold one label per row of 'x' ({n}), not {y.shape}")
    if y.dtype.kind == "f":  # regression targets
        with np.errstate(over="ignore"):
            targets = y.astype(np.float32)
        if not np.all(np.isfinite(targets)):
            bad = int(np.argwhere(~np.isfinite(targets))[0][0])
            raise DataError(f"{path}: 'y' row {bad} is not finite (NaN or inf)")
        return targets
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'y' must hold integer class labels or float targets, not {y.dtype}"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES):
        raise DataError(f"{path}: labels must be class numbers 0..{MAX_CLASSES - 1}")
    return y.astype(np.int32)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__

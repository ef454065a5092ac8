"""The aggregator's state directory: sqlite for rounds, metrics and releases; model files beside it.

Layout of `state_dir`:
    fleetlearn.sqlite3          rounds, releases, key-value state (optimizer moments)
    releases/v{N}.release       the signed release exactly as published (wire bytes)
    releases/v{N}.tflite        the model inside it, for humans and `fleetlearn model inspect`

Rules that make a SIGKILL at any instant harmless:
- A release's files are written and fsync-ed *before* its row is committed; the row is the
  commit point. A file without a row is an orphan from a crash and is overwritten later.
- Versions come from the releases table: `latest_release()` is the highest committed one, the
  next version is that plus one, so a version is never lost or issued twice.
- A round row is written `running` when it starts. On startup, rows still `running` were
  interrupted; the service marks them `aborted` with a reason (and announces that).
- A closed round, its release and the optimizer state that produced it are committed in ONE
  transaction (`close_round`): a crash leaves either all three or none, so a round is never
  recorded aborted while its release is live, nor closed without one.
- Privacy charges (aggregator.privacy) are written with the round they belong to: the
  planned (largest) charge in `begin_round`'s transaction, replaced by what the round spent,
  or removed when it computed no noisy sum, in the transaction that ends the round. A round
  interrupted by a crash keeps its planned charge: the budget never counts less than spent.
- The database appears with its tables or not at all (built under another name, then linked
  into place), so whoever reads the state directory never meets a half-made schema.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator.privacy import PrivacyError, RoundCharge
from fleetlearn.shared.errors import FleetlearnError

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    version     INTEGER PRIMARY KEY,
    round_id    INTEGER,
    sha256      TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id        INTEGER PRIMARY KEY,
    mode            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'aborted')),
    reason          TEXT NOT NULL DEFAULT '',
    model_version   INTEGER NOT NULL,
    new_version     INTEGER,
    cohort          TEXT NOT NULL,
    announce        BLOB,
    metrics         TEXT NOT NULL DEFAULT '{}',
    started_at      REAL NOT NULL,
    ended_at        REAL
);
CREATE TABLE IF NOT EXISTS privacy_charges (
    round_id    INTEGER PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('planned', 'spent')),
    charge      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


class StoreError(FleetlearnError):
    """The state directory is unusable (unreadable, corrupt, or from an incompatible run)."""


@dataclass(frozen=True, slots=True)
class StoredRelease:
    version: int
    round_id: int | None
    sha256: str
    payload: bytes  # the signed release as published


@dataclass(frozen=True, slots=True)
class RoundRow:
    round_id: int
    mode: str
    status: str
    reason: str
    model_version: int
    new_version: int | None
    cohort: list[str]
    metrics: dict[str, Any]
    started_at: float
    ended_at: float | None


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # npz, loaded with allow_pickle=False
    return buf.getvalue()


def _charge_json(charge: RoundCharge) -> str:
    return json.dumps(
        {
            "sampling_rate": charge.sampling_rate,
            "noise_multiplier": charge.noise_multiplier,
            "mechanism": charge.mechanism,
            "dimension": charge.dimension,
            "scale": charge.scale,
        }
    )


def _charge_of(text: str, round_id: int) -> RoundCharge:
    try:
        fields = json.loads(text)
        return RoundCharge(
            sampling_rate=float(fields["sampling_rate"]),
            noise_multiplier=float(fields["noise_multiplier"]),
            mechanism=str(fields["mechanism"]),  # type: ignore[arg-type]  # checked by RoundCharge
            dimension=int(fields["dimension"]),
            scale=float(fields["scale"]),
        )
    except (ValueError, TypeError, KeyError, PrivacyError) as exc:
        raise StoreError(f"round {round_id}'s privacy charge is unreadable: {exc}") from None


def _settle_charge(db: sqlite3.Connection, round_id: int, charge: RoundCharge | None) -> None:
    """In the transaction that ends a round: its spent charge replaces the planned one, or
    no noisy sum was computed and the planned one goes."""
    if charge is None:
        db.execute("DELETE FROM privacy_charges WHERE round_id = ?", (round_id,))
    else:
        db.execute(
            "INSERT OR REPLACE INTO privacy_charges (round_id, state, charge)"
            " VALUES (?, 'spent', ?)",
            (round_id, _charge_json(charge)),
        )


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _create_database(path: Path) -> None:
    """Build a new database with its schema beside `path`, then link it into place."""
    tmp = path.with_name(f"{path.name}.new-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # recorded in the file
        db.executescript(SCHEMA)
    finally:
        db.close()  # the last connection's close folds the WAL into the file and removes it
    try:
        os.link(tmp, path)  # never replaces: a database that appeared meanwhile is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class Store:
    def __init__(self, state_dir: Path | str) -> None:
        self.root = Path(state_dir)
        self._lock = threading.RLock()
        path = self.root / "fleetlearn.sqlite3"
        try:
            (self.root / "releases").mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _create_database(path)
            # Used from the event loop and from worker threads, one call at a time (see _lock).
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state directory {self.root}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------------------ releases

    def release_path(self, version: int) -> Path:
        return self.root / "releases" / f"v{version}.release"

    def save_release(
        self,
        version: int,
        round_id: int | None,
        sha256: str,
        payload: bytes,
        model: bytes,
        now: float,
    ) -> None:
        latest = self.latest_version()
        if version != latest + 1:
            raise StoreError(f"release v{version} does not follow v{latest}")
        _fsync_write(self.root / "releases" / f"v{version}.tflite", model)
        _fsync_write(self.release_path(version), payload)
        with self._tx() as db:
            db.execute(
                "INSERT INTO releases (version, round_id, sha256, created_at) VALUES (?, ?, ?, ?)",
                (version, round_id, sha256, now),
            )

    def close_round(
        self,
        round_id: int,
        *,
        version: int,
        sha256: str,
        payload: bytes,
        model: bytes,
        arrays: dict[str, dict[str, np.ndarray]],
        metrics: dict[str, Any],
        now: float,
        charge: RoundCharge | None = None,
    ) -> None:
        """Record a closed round with its new release and state, atomically (see module doc).
        The release's files are written and fsync-ed first; the transaction is the commit.
        `charge`: with privacy, what the round spent."""
        latest = self.latest_version()
        if version != latest + 1:
            raise StoreError(f"release v{version} does not follow v{latest}")
        _fsync_write(self.root / "releases" / f"v{version}.tflite", model)
        _fsync_write(self.release_path(version), payload)
        blobs = {key: _npz(value) for key, value in arrays.items()}
        with self._tx() as db:
            db.execute(
                "INSERT INTO releases (version, round_id, sha256, created_at) VALUES (?, ?, ?, ?)",
                (version, round_id, sha256, now),
            )
            for key, blob in blobs.items():
                db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, blob))
            cur = db.execute(
                "UPDATE rounds SET status = 'done', reason = '', metrics = ?, new_version = ?,"
                " ended_at = ? WHERE round_id = ? AND status = 'running'",
                (json.dumps(metrics), version, now, round_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"round {round_id} is not running")
            _settle_charge(db, round_id, charge)

    def latest_version(self) -> int:
        row = self._query("SELECT MAX(version) FROM releases")[0]
        return int(row[0]) if row and row[0] is not None else 0

    def latest_release(self) -> StoredRelease | None:
        rows = self._query(
            "SELECT version, round_id, sha256 FROM releases ORDER BY version DESC LIMIT 1"
        )
        if not rows:
            return None
        row = rows[0]
        version, round_id, sha = row
        try:
            payload = self.release_path(version).read_bytes()
        except OSError as exc:
            raise StoreError(
                f"release v{version} is recorded but its file is unreadable: {exc}"
            ) from None
        return StoredRelease(version, round_id, sha, payload)

    def model_bytes(self, version: int) -> bytes:
        return (self.root / "releases" / f"v{version}.tflite").read_bytes()

    # -------------------------------------------------------------------------------- rounds

    def next_round_id(self) -> int:
        row = self._query("SELECT MAX(round_id) FROM rounds")[0]
        return int(row[0]) + 1 if row and row[0] is not None else 1

    def begin_round(
        self,
        round_id: int,
        mode: str,
        model_version: int,
        cohort: list[str],
        now: float,
        announce: bytes = b"",
        charge: RoundCharge | None = None,
    ) -> None:
        """`charge`: with privacy, the most the round can spend (kept if it is interrupted)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (round_id, mode, status, model_version, cohort, announce,"
                " started_at) VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (round_id, mode, model_version, json.dumps(cohort), announce, now),
            )
            if charge is not None:
                db.execute(
                    "INSERT INTO privacy_charges (round_id, state, charge)"
                    " VALUES (?, 'planned', ?)",
                    (round_id, _charge_json(charge)),
                )

    def announce_of(self, round_id: int) -> bytes:
        """The round's announcement as published (to close it after a restart)."""
        rows = self._query("SELECT announce FROM rounds WHERE round_id = ?", (round_id,))
        return bytes(rows[0][0]) if rows and rows[0][0] else b""

    def finish_round(
        self,
        round_id: int,
        *,
        status: str,
        reason: str = "",
        metrics: dict[str, Any] | None = None,
        new_version: int | None = None,
        now: float,
        charge: RoundCharge | None = None,
    ) -> None:
        """`charge`: with privacy, what the round spent; None when it computed no noisy
        sum (its planned charge is removed)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE rounds SET status = ?, reason = ?, metrics = ?, new_version = ?,"
                " ended_at = ?"
                " WHERE round_id = ? AND status = 'running'",
                (status, reason, json.dumps(metrics or {}), new_version, now, round_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"round {round_id} is not running")
            _settle_charge(db, round_id, charge)

    def planned_charge(self, round_id: int) -> RoundCharge | None:
        """The charge a round holds while it runs (an interrupted round keeps it)."""
        rows = self._query("SELECT charge FROM privacy_charges WHERE round_id = ?", (round_id,))
        return _charge_of(rows[0][0], round_id) if rows else None

    def charges(self) -> list[RoundCharge]:
        """Every round's privacy charge, oldest first: what the budget has spent."""
        rows = self._query("SELECT round_id, charge FROM privacy_charges ORDER BY round_id")
        return [_charge_of(text, int(round_id)) for round_id, text in rows]

    def interrupted_rounds(self) -> list[int]:
        rows = self._query("SELECT round_id FROM rounds WHERE status = 'running'")
        return [int(r[0]) for r in rows]

    def last_finished_round(self) -> tuple[RoundRow, bytes] | None:
        """The newest round that ended, with its announcement: what the retained round and
        metrics topics should show after a restart."""
        rows = self._query(
            "SELECT round_id FROM rounds WHERE status != 'running' ORDER BY round_id DESC LIMIT 1"
        )
        if not rows:
            return None
        round_id = int(rows[0][0])
        row = next(r for r in self.rounds(since=round_id) if r.round_id == round_id)
        return row, self.announce_of(round_id)

    def rounds(self, since: int = 0) -> list[RoundRow]:
        rows = self._query(
            "SELECT round_id, mode, status, reason, model_version, new_version, cohort, metrics,"
            " started_at, ended_at FROM rounds WHERE round_id >= ? ORDER BY round_id",
            (since,),
        )
        return [
            RoundRow(
                r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), json.loads(r[7]), r[8], r[9]
            )
            for r in rows
        ]

    # ------------------------------------------------------------------------------ kv state

    def save_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        blob = _npz(arrays)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, blob))

    def load_arrays(self, key: str) -> dict[str, np.ndarray]:
        rows = self._query("SELECT value FROM kv WHERE key = ?", (key,))
        if not rows:
            return {}
        row = rows[0]
        try:
            with np.load(io.BytesIO(row[0]), allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise StoreError(f"state {key!r} in {self.root} is corrupt: {exc}") from None

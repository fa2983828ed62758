"""The batch manifest: one SQLite row per scene saying what was done to it, with what, and how it went.

SQLite rather than JSON Lines: every change is one transaction, so a crash at any moment (even a
power cut, with ``synchronous=FULL``) leaves the previous consistent state; in WAL mode readers
(``sqlite3 manifest.sqlite``, a dashboard, a second process) never block the writer and never see
half a row; and a scene's row is updated in place instead of appending records that a reader must
fold. JSON Lines would need fsync per line, a reader tolerant of a torn last line, and compaction.
It is in the standard library. Only the batch driver writes it (workers report through dask).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from .errors import OutputError

MANIFEST_NAME = "geoseg-manifest.sqlite"
Status = Literal["queued", "running", "done", "failed", "skipped"]
#: Statuses whose output is complete; a scene in one of them may be skipped by a later run.
COMPLETE: tuple[Status, ...] = ("done", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scenes (
    input TEXT PRIMARY KEY,          -- path (absolute) or URI, as given to predict
    input_size INTEGER,              -- bytes; NULL for remote inputs
    input_mtime_ns INTEGER,          -- modification time; NULL for remote inputs
    model_sha256 TEXT,
    config_hash TEXT,                -- sha256 of the settings that change the output
    status TEXT NOT NULL,            -- queued, running (on a worker), done, failed, skipped
    output TEXT,                     -- absolute path of the class raster
    output_sha256 TEXT,
    output_size INTEGER,
    extra_outputs TEXT,              -- JSON {path: size (NULL: a folder, or not written)} of --stats, ...
    attempts INTEGER NOT NULL DEFAULT 0,  -- starts on a worker in the latest run (2 = retried once)
    worker TEXT,                     -- address of the worker of the latest attempt
    worker_pid INTEGER,
    width INTEGER,
    height INTEGER,
    model_loaded INTEGER,            -- 1 when this scene's worker loaded the model for it (once per worker)
    model_load_seconds REAL,         -- 0 when the worker had the model loaded already
    predict_seconds REAL,
    started_at REAL,                 -- Unix time of the latest attempt's start
    finished_at REAL,
    error TEXT,                      -- one line, for failures
    run_id TEXT,                     -- the run that last touched the row
    geoseg_version TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pid INTEGER,
    host TEXT,
    scheduler TEXT,
    started_at REAL,
    finished_at REAL,                -- NULL while running, or when the run crashed
    done INTEGER, skipped INTEGER, failed INTEGER
);
"""


@dataclass(frozen=True)
class SceneRecord:
    """One row of the ``scenes`` table (see the schema for the meaning of each field)."""

    input: str
    status: Status
    updated_at: float
    input_size: int | None = None
    input_mtime_ns: int | None = None
    model_sha256: str | None = None
    config_hash: str | None = None
    output: str | None = None
    output_sha256: str | None = None
    output_size: int | None = None
    extra_outputs: str | None = None
    attempts: int = 0
    worker: str | None = None
    worker_pid: int | None = None
    width: int | None = None
    height: int | None = None
    model_loaded: bool | None = None
    model_load_seconds: float | None = None
    predict_seconds: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    run_id: str | None = None
    geoseg_version: str | None = None

    def extra_output_sizes(self) -> dict[str, int | None] | None:
        """The extra outputs (``--stats``, ...) and their sizes; ``None``: not recorded (older manifests)."""
        return json.loads(self.extra_outputs) if self.extra_outputs is not None else None

    @property
    def megapixels(self) -> float:
        """Scene size in megapixels (0 when unknown)."""
        return (self.width or 0) * (self.height or 0) / 1e6


_COLUMNS = [f.name for f in fields(SceneRecord)]


class Manifest:
    """The manifest of one out dir, open for writing by the batch driver.

    Every method commits its own transaction before returning, unless called inside
    :meth:`transaction`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NOTE: FULL, not WAL's usual NORMAL: a committed 'done' must survive a power cut too;
            # a few fsyncs per scene cost nothing next to a prediction.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(scenes)")}
            missing = [name for name in _COLUMNS if name not in columns and name != "extra_outputs"]
            if missing:
                self._db.close()
                raise OutputError(
                    f"{self.path}: cannot open the batch manifest (not a geoseg manifest: "
                    f"table scenes has no column {', '.join(missing)})"
                )
            if "extra_outputs" not in columns:  # written before geoseg recorded them
                self._db.execute("ALTER TABLE scenes ADD COLUMN extra_outputs TEXT")
        except sqlite3.DatabaseError as err:
            raise OutputError(f"{self.path}: cannot open the batch manifest ({err})") from err

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group changes into one transaction (one fsync); nested calls join the outer one."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, input: str) -> SceneRecord | None:
        """The row of ``input``, or ``None``."""
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM scenes WHERE input = ?", (input,)
        ).fetchone()
        return SceneRecord(**dict(zip(_COLUMNS, row, strict=True))) if row else None

    def records(self) -> list[SceneRecord]:
        """Every row, ordered by input."""
        return _select_all(self._db)

    def upsert(self, input: str, **values: Any) -> None:
        """Create or update the row of ``input`` with ``values`` (column names), in one transaction."""
        unknown = set(values) - set(_COLUMNS)
        assert not unknown, f"unknown manifest columns {unknown}"
        values = {"updated_at": time.time(), **values}
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        updates = ", ".join(f"{name} = excluded.{name}" for name in values)
        with self.transaction():
            self._db.execute(
                f"INSERT INTO scenes (input, {names}) VALUES (?, {marks}) "
                f"ON CONFLICT(input) DO UPDATE SET {updates}",
                (input, *values.values()),
            )

    def start_run(self, run_id: str, scheduler: str) -> None:
        """Record that a run began (the host and pid say who held the out-dir lock)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO runs (run_id, pid, host, scheduler, started_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, os.getpid(), os.uname().nodename, scheduler, time.time()),
            )

    def finish_run(self, run_id: str, done: int, skipped: int, failed: int) -> None:
        """Record the end of a run and its counts."""
        with self.transaction():
            self._db.execute(
                "UPDATE runs SET finished_at = ?, done = ?, skipped = ?, failed = ? WHERE run_id = ?",
                (time.time(), done, skipped, failed, run_id),
            )

    def close(self) -> None:
        """Close the connection (a no-op when already closed)."""
        self._db.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: str | os.PathLike[str]) -> list[SceneRecord]:
    """Every scene row of a manifest, read without taking any lock that would stop a running batch.

    Raises:
        OutputError: The file is missing or not a geoseg manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise OutputError(f"{path}: no batch manifest here")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'scenes'").fetchone():
                return []  # created a moment ago; its tables are not committed yet
            return _select_all(db)
    except sqlite3.DatabaseError as err:
        raise OutputError(f"{path}: not a readable geoseg manifest ({err})") from err


def _select_all(db: sqlite3.Connection) -> list[SceneRecord]:
    present = {row[1] for row in db.execute("PRAGMA table_info(scenes)")}
    columns = [name for name in _COLUMNS if name in present]  # an older manifest lacks extra_outputs
    rows = db.execute(f"SELECT {', '.join(columns)} FROM scenes ORDER BY input").fetchall()
    return [SceneRecord(**dict(zip(columns, row, strict=True))) for row in rows]

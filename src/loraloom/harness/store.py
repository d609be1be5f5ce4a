"""The results store: one SQLite file in RUN_DIR, one row per (task, method, seed, run, settings hash).

Each finished cell is committed at once, so an interrupted sweep loses only the cells in flight. A re-run
skips cells that are done (or skipped for a recorded reason) and retries failed ones, counting attempts;
cells of other settings are new rows beside the old ones, never over them. Only one process writes
(the driver, also under Ray). The store also remembers the base model it was made with, and which
cells the latest ``experiment`` call asked for (what ``report`` shows).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

DB_NAME = "results.sqlite"
FINISHED = ("done", "skipped")
Key = tuple[str, str, int, int, str]  # task, method, seed, run, settings_hash

COLUMNS = (
    "task",
    "method",
    "seed",
    "run",
    "settings_hash",
    "status",  # done, skipped or failed
    "score",  # exact match in [0, 1]
    "n_test",
    "input_tokens",  # mean input tokens per test example
    "seconds",  # wall time of the cell
    "peak_memory_mb",
    "predictions",  # the predictions file, relative to RUN_DIR
    "weights",  # JSON list (LoraHub weights; retrieval-best [1.0])
    "modules",  # JSON list of module folders
    "details",  # JSON: what the method chose and ran with
    "error",  # why it failed (or was skipped)
    "attempts",
    "finished_at",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    task TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL, run INTEGER NOT NULL,
    settings_hash TEXT NOT NULL, status TEXT NOT NULL, score REAL, n_test INTEGER, input_tokens REAL,
    seconds REAL, peak_memory_mb REAL, predictions TEXT, weights TEXT, modules TEXT, details TEXT, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1, finished_at REAL,
    PRIMARY KEY (task, method, seed, run, settings_hash)
);
CREATE TABLE IF NOT EXISTS settings (settings_hash TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
JSON_COLUMNS = ("weights", "modules", "details")
LOCK_NAME = ".lock"


def lock_run_dir(run_dir: Path) -> IO[str]:
    """An exclusive lock on RUN_DIR/.lock, or an error naming the process that holds it."""
    lock = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held open until Store.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ValueError(
            f"{run_dir}: an experiment (pid {holder}) is writing to this run folder; wait for it to finish "
            "or use another --out"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


class Store:
    """``create=True`` opens the store to write: one writer per run folder at a time (a lock held until
    ``close``, freed by the system if the process dies), so a report never shows another run's cells."""

    def __init__(self, run_dir: str | Path, *, create: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_NAME
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.run_dir}: no {DB_NAME} (not an experiment run folder)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock_run_dir(self.run_dir) if create else None
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
            self.db.commit()
        except sqlite3.DatabaseError as e:
            self.close()
            raise ValueError(
                f"{self.path}: not a loraloom results database (corrupt, or another kind of file): {e}"
            ) from e

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
        if self.lock is not None:
            self.lock.close()  # closing the file frees the lock
            self.lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))
        self.db.commit()

    def check_base(self, identity: dict[str, Any]) -> None:
        """Record the base model's identity, or fail if the folder holds results of another base model."""
        stored = self.get_meta("base")
        if stored is None:
            self.set_meta("base", identity)
            return
        differ = [k for k in ("config", "weights") if stored.get(k) != identity.get(k)]
        if differ:
            raise ValueError(
                f"{self.run_dir}: holds results for base model {stored.get('base')}, whose "
                f"{' and '.join(differ)} differ from those of {identity.get('base')}; use another output folder"
            )

    def put_settings(self, settings_hash: str, value: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO settings VALUES (?, ?)", (settings_hash, json.dumps(value, default=str))
        )
        self.db.commit()

    def settings(self) -> dict[str, dict[str, Any]]:
        return {h: json.loads(v) for h, v in self.db.execute("SELECT settings_hash, value FROM settings")}

    # ---- cells -----------------------------------------------------------------------------

    def statuses(self) -> dict[Key, tuple[str, int]]:
        """(status, attempts) of every stored cell."""
        rows = self.db.execute("SELECT task, method, seed, run, settings_hash, status, attempts FROM cells")
        return {tuple(r[:5]): (r[5], r[6]) for r in rows}

    def write(self, row: dict[str, Any]) -> None:
        """Insert or replace one cell (attempts counted up from a stored failure) and commit."""
        key = tuple(row[c] for c in COLUMNS[:5])
        previous = self.db.execute(
            "SELECT attempts FROM cells WHERE task = ? AND method = ? AND seed = ? AND run = ? AND settings_hash = ?",
            key,
        ).fetchone()
        values = dict(row)
        values["attempts"] = previous[0] + 1 if previous else 1
        values["finished_at"] = time.time()
        for c in JSON_COLUMNS:
            if values.get(c) is not None:
                values[c] = json.dumps(values[c], default=str)
        self.db.execute(
            f"INSERT OR REPLACE INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [values.get(c) for c in COLUMNS],
        )
        self.db.commit()

    def rows(self, keys: Iterable[Key] | None = None) -> list[dict[str, Any]]:
        """Stored cells as dicts (JSON columns decoded): those of ``keys`` in that order, or all."""
        cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM cells")
        by_key = {}
        for values in cursor:
            row = dict(zip(COLUMNS, values, strict=True))
            for c in JSON_COLUMNS:
                row[c] = json.loads(row[c]) if row[c] is not None else None
            by_key[tuple(values[:5])] = row
        if keys is None:
            return list(by_key.values())
        return [by_key[k] for k in keys if k in by_key]

    def set_latest(self, keys: Sequence[Key], info: dict[str, Any]) -> None:
        """The cells (and what produced them) of the latest experiment call: what the report shows."""
        self.set_meta("latest", {"cells": [list(k) for k in keys], **info})

    def latest(self) -> tuple[list[Key], dict[str, Any]]:
        value = self.get_meta("latest")
        if value is None:
            raise ValueError(f"{self.run_dir}: no experiment has run here yet")
        keys = [tuple(k) for k in value.pop("cells")]
        return keys, value


__all__ = ["COLUMNS", "DB_NAME", "FINISHED", "Store"]

"""Persistent SQLite cache of medical-LLM-judge scores, so re-scoring a caption is free.

One row per (judge model, prompt version, reference, prediction), keyed by the SHA-256 of
those four strings (JSON-encoded, so no separator is ambiguous); the row holds the five
1..5 scores. The texts themselves are not stored: a run scores millions of captions and
the key is all a lookup needs. Missing scores (the judge failed) are never cached, so a
later run asks again.

The database is in WAL mode: readers never block the writer nor each other, so several
processes (e.g. one per rank) can share one file; writes wait up to ``busy_timeout_s``
for another process's write to finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

SCHEMA_VERSION = 1
_MAX_PARAMS = 500  # SQL variables per IN (...) query; SQLite's floor is 999


def cache_key(model: str, prompt_version: str, reference: str, prediction: str) -> str:
    """Hex SHA-256 of the JSON list ``[model, prompt_version, reference, prediction]``."""
    payload = json.dumps([model, prompt_version, reference, prediction], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """``key -> five int scores`` in an SQLite file (WAL mode); safe to share across threads and processes."""

    def __init__(self, path: str | os.PathLike, dimensions: Sequence[str], *, busy_timeout_s: float = 30.0) -> None:
        """Open (creating if needed) the cache at ``path`` with one integer column per dimension."""
        self.path = Path(path)
        self.dimensions = tuple(dimensions)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )  # autocommit; transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses at most recent rows
        columns = ", ".join(f"{d} INTEGER NOT NULL" for d in self.dimensions)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS judge_scores (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            f"prompt_version TEXT NOT NULL, {columns}, created REAL NOT NULL) WITHOUT ROWID"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"JudgeCache(path={str(self.path)!r})"

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """The cached scores of those ``keys`` that are present (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, tuple[int, ...]] = {}
        select = ", ".join(self.dimensions)
        with self._lock:
            for start in range(0, len(keys), _MAX_PARAMS):
                chunk = keys[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, {select} FROM judge_scores WHERE key IN ({marks})", chunk)
                found.update((row[0], tuple(row[1:])) for row in rows)
        return found

    def put_many(self, rows: Iterable[tuple[str, str, str, Sequence[int]]]) -> None:
        """Store ``(key, model, prompt_version, scores)`` rows in one transaction (replacing same keys)."""
        now = time.time()
        values = [(key, model, version, *scores, now) for key, model, version, scores in rows]
        if not values:
            return
        columns = ", ".join(self.dimensions)
        marks = ",".join("?" * (len(self.dimensions) + 4))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO judge_scores (key, model, prompt_version, {columns}, "
                    f"created) VALUES ({marks})",
                    values,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judge_scores").fetchone()[0]

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed into the main file)."""
        with self._lock:
            self._db.close()

"""Several `trainwarden tune` processes on one study: each trial claimed once, the study ends at N.

Optuna lets many workers share a study through its storage, but its `ask()` always makes a new
trial: workers that each check "fewer than N trials?" and then ask, at the same moment, end the
study past N (measured: 3 workers on PostgreSQL asked for 12 trials and made 14), and two workers
that find a new study empty both enqueue the baseline trial, which then runs twice. So the check
and the ask (and the baseline's enqueue) happen under one lock kept in the storage's own
database, the one place every worker reaches: PostgreSQL's session advisory lock, MySQL's
GET_LOCK, and for SQLite (a file: one machine) an flock on a file beside the database. The same
lock decides which worker writes the tuned file: the one that tells the study's last trial.
Another RDB gets no lock (`exact` is False; tune says so): the study may end a trial or two past N.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: The study's user attribute that records the trial count a tuned file was written for.
WRITTEN_ATTR = "trainwarden_tuned_written"


class StudyLock:
    """A lock shared by every worker of one study (re-entrant in neither sense: hold it briefly)."""

    def __init__(self, storage: str, study_name: str) -> None:
        self.storage = storage
        self.study_name = study_name
        self.key = int.from_bytes(
            hashlib.sha256(f"trainwarden-tune:{study_name}".encode()).digest()[:8], "big"
        )
        self.key -= 1 << 63  # a signed 64-bit key, as pg_advisory_lock takes
        self._conn: Any = None
        self._engine: Any = None
        self._fd: int | None = None
        scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
        self.kind = {"sqlite": "file", "postgresql": "postgresql", "mysql": "mysql"}.get(scheme, "none")
        self.path: Path | None = None
        if self.kind == "file":
            db = storage[len("sqlite:///") :] if storage.startswith("sqlite:///") else ""
            if not db or db == ":memory:":
                self.kind = "none-needed"  # an in-memory database lives in one process
            else:
                self.path = Path(db).with_name(Path(db).name + ".lock")

    @property
    def exact(self) -> bool:
        """Whether workers are really serialized (a storage with no lock: False)."""
        return self.kind != "none"

    def _connection(self) -> Any:
        if self._conn is None:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(self.storage, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def __enter__(self) -> StudyLock:
        if self.kind == "file":
            import fcntl

            assert self.path is not None
            if not self.path.parent.is_dir():
                return self  # open_study says what is wrong with the folder
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.kind in ("postgresql", "mysql"):
            from sqlalchemy import text

            sql = "SELECT pg_advisory_lock(:k)" if self.kind == "postgresql" else "SELECT GET_LOCK(:n, -1)"
            try:
                conn = self._connection()
            except Exception:  # no server, no driver: open_study reports it with the fix
                self.close()
                return self
            conn.execute(text(sql), {"k": self.key, "n": f"tw{self.key & 0xFFFFFFFFFFFF:x}"})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "file" and self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self.kind in ("postgresql", "mysql") and self._conn is not None:
            from sqlalchemy import text

            sql = "SELECT pg_advisory_unlock(:k)" if self.kind == "postgresql" else "SELECT RELEASE_LOCK(:n)"
            self._conn.execute(text(sql), {"k": self.key, "n": f"tw{self.key & 0xFFFFFFFFFFFF:x}"})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._engine is not None:
            self._engine.dispose()
        self._conn = self._engine = None


class NoLock:
    """For a caller with one worker (tests, the replay benchmark's single process)."""

    exact = True

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def close(self) -> None:
        return None

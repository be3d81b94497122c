"""The ledger: the durable record of every deployment step.

Kept behind a small interface (`Ledger`) so that a networked store can stand
in later. The default is SQLite from the standard library: one file in the
state directory, WAL journal, `synchronous=FULL` so that a record is on disk
when `append` returns, and forward migrations keyed by `PRAGMA user_version`.
`append` blocks; the server calls it on a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

FILE_NAME = "ledger.sqlite3"

# Each entry upgrades the schema by one version; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE step_records (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        role     TEXT NOT NULL,
        version  TEXT NOT NULL,
        step     TEXT NOT NULL,
        event    TEXT NOT NULL,
        attempt  INTEGER NOT NULL,
        at       REAL NOT NULL,
        error    TEXT
    );
    CREATE INDEX step_records_by_target ON step_records (role, version, seq);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
_FIELDS = ("role", "version", "step", "event", "attempt", "at", "error")


class LedgerError(RuntimeError):
    pass


class Ledger(Protocol):
    def load(self) -> list[dict[str, Any]]: ...

    def append(self, record: dict[str, Any]) -> None: ...

    def check_writable(self) -> None: ...

    def close(self) -> None: ...


class SQLiteLedger:
    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from None
        # Which file was opened: if the path later names another file (or none),
        # records still go to the open one and are lost at the next start.
        self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    @classmethod
    def in_state_dir(cls, state_dir: str | Path, *, create: bool = True) -> SQLiteLedger:
        return cls(Path(state_dir) / FILE_NAME, create=create)

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger {self.path} has schema version {current}, newer than this exocom knows "
                f"({SCHEMA_VERSION}): upgrade exocom"
            )
        for version in range(current, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM step_records ORDER BY seq").fetchall()
        return [dict(zip(_FIELDS, row)) for row in rows]

    def append(self, record: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO step_records ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
                    tuple(record.get(f) for f in _FIELDS),
                )
            except sqlite3.Error as e:
                raise LedgerError(f"cannot write to the ledger {self.path}: {e}") from None

    def check_writable(self) -> None:
        """Raise LedgerError unless a record written now would be durable and
        found again at the next start: the write lock can be taken, the path
        still names the open file, and the state directory accepts new files
        (SQLite creates its -wal and -shm files there when it reopens)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise LedgerError(f"the ledger {self.path} is not writable: {e}") from None
        try:
            identity = self._file_identity()
        except OSError as e:
            raise LedgerError(f"the ledger {self.path} is gone ({e.strerror}): it was moved or deleted while "
                              "the broker was running; records written now are lost at the next start") from None
        if identity != self._identity:
            raise LedgerError(f"the ledger {self.path} was replaced by another file while the broker was running; "
                              "records written now go to the old file and are lost at the next start")
        try:
            fd, probe = tempfile.mkstemp(prefix=".exocom-probe-", dir=self.path.parent)
            try:
                os.write(fd, b"exocom")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise LedgerError(f"the state directory {self.path.parent} does not accept new files "
                              f"({e.strerror or e}): the ledger cannot be reopened there") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

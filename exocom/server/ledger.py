"""The ledger: the durable record of every deployment step.

Kept behind a small interface (`Ledger`) so that a networked store can stand
in later. The default is SQLite from the standard library: one file in the
state directory, WAL journal, `synchronous=FULL` so that a record is on disk
when `append` returns, and forward migrations keyed by `PRAGMA user_version`.
`append` blocks; the server calls it on a worker thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..core.deployments import RECORD_EVENTS, RECORD_STEPS

FILE_NAME = "ledger.sqlite3"
# Written next to the ledger when it is created: a state directory with this
# marker (or SQLite's -wal/-shm files) but no ledger lost its ledger, and an
# empty one would run every recorded step again.
MARKER_NAME = "ledger.created"
_SQLITE_SIDE_FILES = ("-wal", "-shm")

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
    # 2: rollouts (contract 7): the figures that decided a ramp step or an abort, as JSON.
    """
    ALTER TABLE step_records ADD COLUMN detail TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
_FIELDS = ("role", "version", "step", "event", "attempt", "at", "error", "detail")


class LedgerError(RuntimeError):
    pass


class LedgerLost(LedgerError):
    """The path no longer names the file the ledger has open."""


def _start_over_hint(state_dir: Path) -> str:
    return (f"restore it from a backup, or run `exocom deployments reset --state-dir {state_dir}` to move what is "
            "left aside and start over (every deployment step then runs again)")


def traces_of_a_lost_ledger(path: Path) -> list[str]:
    """Files next to a missing ledger that show it existed."""
    candidates = [path.with_name(MARKER_NAME), *(path.with_name(path.name + s) for s in _SQLITE_SIDE_FILES)]
    return [c.name for c in candidates if c.exists()]


def lost_ledger_error(path: Path, traces: list[str]) -> LedgerError:
    return LedgerError(f"the ledger {path} is missing, but {', '.join(traces)} in {path.parent} show that it "
                       f"existed; exocom does not start over with an empty ledger by itself: {_start_over_hint(path.parent)}")


class Ledger(Protocol):
    def load(self) -> list[dict[str, Any]]: ...

    def append(self, record: dict[str, Any]) -> None: ...

    def check_writable(self) -> None: ...

    def check_path(self) -> None: ...

    def recreate(self, records: list[dict[str, Any]]) -> tuple[Ledger, list[str]]: ...

    def close(self) -> None: ...


class SQLiteLedger:
    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        existed = self.path.exists()
        if not existed:
            if not create:
                raise LedgerError(f"no ledger at {self.path}")
            traces = traces_of_a_lost_ledger(self.path)
            if traces:
                raise lost_ledger_error(self.path, traces)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}; pass a writable --state-dir or set "
                              "EXOCOM_STATE_DIR") from None
        try:
            if existed:
                # Before anything that could write: a damaged file stays as it is.
                self._check_integrity()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            _migrate(self._db, self.path)
        except sqlite3.Error as e:
            self._db.close()
            if _is_damage(e):
                raise self._damaged(str(e)) from None
            raise LedgerError(f"cannot open the ledger {self.path}: {e}; pass a writable --state-dir or set "
                              "EXOCOM_STATE_DIR") from None
        except LedgerError:
            self._db.close()
            raise
        if create and not self.path.with_name(MARKER_NAME).exists():
            _write_marker(self.path)
        # Which file was opened: if the path later names another file (or none),
        # records still go to the open one and are lost at the next start.
        self._identity = self._file_identity()

    def _damaged(self, what: str) -> LedgerError:
        what = " ".join(what.split())  # quick_check reports over several lines; an error is one
        return LedgerError(f"the ledger {self.path} is damaged ({what}); exocom did not change it: "
                           f"{_start_over_hint(self.path.parent)}")

    def _check_integrity(self) -> None:
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise self._damaged("; ".join(problems[:3]))

    def _file_identity(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    @classmethod
    def in_state_dir(cls, state_dir: str | Path, *, create: bool = True) -> SQLiteLedger:
        return cls(Path(state_dir) / FILE_NAME, create=create)

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                rows = self._db.execute(f"SELECT seq, {', '.join(_FIELDS)} FROM step_records ORDER BY seq").fetchall()
            except sqlite3.Error as e:
                raise (self._damaged(str(e)) if _is_damage(e) else LedgerError(
                    f"cannot read the ledger {self.path}: {e}")) from None
        records = []
        for seq, *values in rows:
            record = dict(zip(_FIELDS, values))
            try:
                record["detail"] = json.loads(record["detail"]) if record["detail"] is not None else None
            except ValueError:
                raise self._damaged(f"record {seq} has a detail that is not JSON") from None
            problem = _record_problem(record)
            if problem:
                raise self._damaged(f"record {seq} {problem}")
            records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._db.execute(_INSERT, _row(record))
            except sqlite3.Error as e:
                raise LedgerError(f"cannot write to the ledger {self.path}: {e}") from None

    def check_writable(self) -> None:
        """Raise LedgerError unless a record written now would be durable and
        found again at the next start: the write lock can be taken, the path
        still names the open file (LedgerLost), and the state directory
        accepts new files (SQLite creates its -wal and -shm files there when
        it reopens)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise LedgerError(f"the ledger {self.path} is not writable: {e}") from None
        self.check_path()
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

    def check_path(self) -> None:
        """Raise LedgerLost unless the path still names the open file."""
        try:
            identity = self._file_identity()
        except OSError as e:
            raise LedgerLost(f"the ledger {self.path} is gone ({e.strerror}): it was moved or deleted while "
                             "the broker was running; records written now are lost at the next start") from None
        if identity != self._identity:
            raise LedgerLost(f"the ledger {self.path} was replaced by another file while the broker was running; "
                             "records written now go to the old file and are lost at the next start")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def recreate(self, records: list[dict[str, Any]]) -> tuple[SQLiteLedger, list[str]]:
        """A fresh ledger at this one's path holding `records`, for a broker
        whose ledger was deleted or replaced (close this one first). Whatever
        is at the path now is moved aside, never deleted; returns the new
        ledger and the names of the files moved aside. The new file appears
        complete or not at all."""
        path = self.path
        if not path.parent.is_dir():
            raise LedgerError(f"the state directory {path.parent} is gone: the ledger cannot be written again "
                              "until it is back (restore or recreate it)")
        fresh = path.with_name(f".{path.name}.fresh")
        for leftover in (fresh, fresh.with_name(fresh.name + "-journal")):
            leftover.unlink(missing_ok=True)
        try:
            db = sqlite3.connect(fresh, isolation_level=None)
            try:
                db.execute("PRAGMA synchronous=FULL")
                _migrate(db, fresh)
                db.execute("BEGIN IMMEDIATE")
                db.executemany(_INSERT, [_row(r) for r in records])
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot write a fresh ledger at {fresh}: {e}") from None
        # A stale -wal left by another file would be replayed into the fresh one.
        moved = move_aside(path, f"replaced-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(fresh, path)
        _sync_directory(path.parent)
        return SQLiteLedger(path), moved


def _row(record: dict[str, Any]) -> tuple:
    detail = record.get("detail")
    return (*(record.get(f) for f in _FIELDS[:-1]), json.dumps(detail) if detail is not None else None)


_INSERT = f"INSERT INTO step_records ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"


def move_aside(path: Path, suffix: str) -> list[str]:
    """Rename the ledger at `path` and its SQLite side files to NAME.SUFFIX; the names moved."""
    moved = []
    for name in (path.name, *(path.name + s for s in _SQLITE_SIDE_FILES)):
        source = path.with_name(name)
        if source.exists():
            target = source.with_name(f"{name}.{suffix}")
            os.replace(source, target)
            moved.append(target.name)
    return moved


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger {path} has schema version {current}, newer than this exocom knows "
            f"({SCHEMA_VERSION}): upgrade exocom"
        )
    for version in range(current, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _is_damage(e: sqlite3.Error) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB surface as plain DatabaseError; locks,
    # I/O and permissions as OperationalError.
    return type(e) is sqlite3.DatabaseError


def _record_problem(record: dict[str, Any]) -> str | None:
    """Why the broker could not replay `record`, if it could not."""
    if not all(isinstance(record[f], str) for f in ("role", "version", "step", "event")):
        return "has a role, version, step or event that is not text"
    if record["step"] not in RECORD_STEPS or record["event"] not in RECORD_EVENTS:
        return f"has an unknown step {record['step']!r} or event {record['event']!r}"
    if not isinstance(record["attempt"], int) or not isinstance(record["at"], (int, float)):
        return "has an attempt or time that is not a number"
    return None


def _write_marker(path: Path) -> None:
    marker = path.with_name(MARKER_NAME)
    marker.write_text(f"exocom created {path.name} in this directory. If {path.name} is ever missing, `exocom serve` "
                      "refuses to start instead of creating an empty ledger (which would run every recorded deployment "
                      "step again): restore the file, or run `exocom deployments reset --state-dir DIR` to start over.\n")
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

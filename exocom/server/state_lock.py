"""One broker per state directory: an exclusive `flock` on `broker.lock`.

Two brokers on one ledger would both drive the same deployments (a step
recorded done ran again; two runs of one step overlapped). The lock is held
for the broker's lifetime and released by the kernel when the process ends,
crashed or not, so a stale lock file never blocks a restart. The file holds
the holder's pid and listen address, for the refusal of the next one.
`exocom deployments` (read-only) does not take it; commands that write the
ledger behind a broker's back (`retry` with the broker down, `reset`) do.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LOCK_NAME = "broker.lock"


class StateDirBusy(RuntimeError):
    pass


class StateDirLock:
    def __init__(self, state_dir: str | Path, fd: int):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd = fd

    @classmethod
    def acquire(cls, state_dir: str | Path, purpose: str) -> StateDirLock:
        """Lock `state_dir` (created if missing) or raise StateDirBusy naming
        the holder. `purpose` says what the holder does, for the next one."""
        path = Path(state_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not truncated before the lock is ours: the holder's details stay readable.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(f"{_holder(path)} uses the state directory {path.parent} (lock file {path})") from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(state_dir, fd)
        lock._write({"pid": os.getpid(), "purpose": purpose, "address": None})
        return lock

    def announce_address(self, address: str) -> None:
        """Called once listening: the next broker's refusal names the address."""
        self._write({"pid": os.getpid(), "purpose": "exocom serve", "address": address})

    def _write(self, holder: dict) -> None:
        data = json.dumps(holder).encode() + b"\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        pid, purpose, address = holder["pid"], holder.get("purpose") or "exocom", holder.get("address")
    except (OSError, ValueError, KeyError, TypeError):
        # Read while the holder was writing it: rare, and the lock itself is certain.
        return "another exocom process"
    where = f", listening on {address}" if address else ""
    return f"another process ({purpose}, pid {pid}{where})"

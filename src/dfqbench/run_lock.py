"""One process per run folder: two sweeps (or a sweep and a single run) that reach the same cell must not both
compute it, resume the same training checkpoint, or overwrite each other's record.

The lock is an advisory `flock` on `<run dir>/.dfqbench.lock`, which holds the holder's pid, host, start time and
command for the message the second process prints. The kernel drops the lock when its process dies (even by
SIGKILL), so a crashed run never leaves a stale lock behind; on NFS the Linux client maps flock to NFS locks. The
file is removed on release; a process that locked a file which was removed meanwhile checks the inode and tries
again. Where `fcntl` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".dfqbench.lock"


class RunInProgress(RuntimeError):
    """Another process holds the run folder: this one computes nothing there and writes nothing."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
                f"({info.get('command') or 'no command recorded'})")
    except (OSError, ValueError):
        return "another process"


def _acquire(run_dir: Path, command: str | None) -> int | None:
    if fcntl is None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInProgress(f"{run_dir} is being computed by {_holder(path)}; this process leaves it alone "
                                f"(run the command again once that run has finished: it is then skipped)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # released and removed between our open and our flock
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    return fd


@contextmanager
def hold(run_dir: Path, command: str | None = None):
    """Hold run_dir's lock for the body; raises RunInProgress at once if another process holds it."""
    fd = _acquire(Path(run_dir), command)
    try:
        yield
    finally:
        if fd is not None:
            Path(run_dir, LOCK_NAME).unlink(missing_ok=True)  # before the unlock: a waiter then retries on a new file
            os.close(fd)

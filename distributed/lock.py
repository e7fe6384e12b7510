"""One run per output folder: the driver holds an exclusive lock on `<output>/.polyfid.lock` while it runs.

The lock is an advisory `flock` on the file, so the operating system releases it when the holder dies in any
way (SIGKILL and a lost head node included): a lock left by a dead process is simply taken over. The file
itself names the holder (host, pid, start time, command), so that a second run refused on the folder can say
who holds it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("polyfid.lock")
LOCK_FILE = ".polyfid.lock"


class FolderInUse(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """`with RunLock(output):` holds the folder for the life of the block; a second holder gets FolderInUse."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.path = Path(output) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise FolderInUse(
                f"the output folder {self.path.parent} is in use by another run: pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')} "
                f"({holder.get('command', '?')}). Wait for it to finish, stop it, or choose another output=."
            ) from None
        previous = _read(fd)
        if previous:
            log.warning("taking over %s, left by pid %s on %s (started %s), which no longer runs", self.path,
                        previous.get("pid"), previous.get("host"), previous.get("started"))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly, nobody to take over from
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}

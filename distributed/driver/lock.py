"""One run per output folder: the driver holds an exclusive lock on `<output>/.polyfid.lock` while it runs.

The lock is an advisory `flock` on the file, so the operating system releases it when the holder dies in any
way (SIGKILL and a lost head node included): a lock left by a dead process is simply taken over. The file
itself names the holder (host, pid, start time, command), so that a second run refused on the folder can say
who holds it.

Training workers hold a shared lock on the same file for as long as they train. When a driver dies by SIGKILL,
its Ray workers can outlive it for a few seconds (longer on a loaded machine) and still write a checkpoint. A
new run that finds the folder held, by a driver that no longer runs on this host, therefore waits for those
workers to exit before it reads any checkpoint. The driver itself holds the lock shared after it has taken it
exclusively, so that its own workers can join.

An output on object storage (`output=s3://...`) has no file to lock: `run_lock` then gives a lease on the bucket
(infra/run_storage.py), and workers hold nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from polyfid.infra.run_storage import (FolderInUse, LeaseLock, dead_here as _dead_here, describe_holder,
                                       holder_record, is_remote, parse_holder)

log = logging.getLogger("polyfid.lock")
LOCK_FILE = ".polyfid.lock"


__all__ = ["FolderInUse", "LOCK_FILE", "RunLock", "run_lock", "worker_hold"]


def run_lock(output: str | os.PathLike) -> "RunLock | LeaseLock":
    """The lock of a run's output: flock on a local folder, a renewed lease on object storage."""
    return LeaseLock(os.fspath(output)) if is_remote(output) else RunLock(output)


class RunLock:
    """`with RunLock(output):` holds the folder for the life of the block; a second holder gets FolderInUse."""

    def __init__(self, output: str | os.PathLike, orphan_wait_s: float = 300.0) -> None:
        self.path = Path(output) / LOCK_FILE
        self.orphan_wait_s = orphan_wait_s
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take(fd)
        except BaseException:
            os.close(fd)
            raise
        previous = _read(fd)
        if previous:
            log.warning("taking over %s, left by pid %s on %s (started %s), which no longer runs", self.path,
                        previous.get("pid"), previous.get("host"), previous.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        os.fsync(fd)
        try:  # downgrade, so that this run's workers can join (flock converts by release and re-take)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"another run took {self.path.parent} at the same moment; run again") from None
        self._fd = fd
        return self

    def _take(self, fd: int) -> None:
        """The exclusive lock, or FolderInUse naming the holder. A holder that is a dead driver on this host
        means its orphaned workers still hold the folder: wait up to orphan_wait_s for them to exit."""
        deadline, said = time.monotonic() + self.orphan_wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = _read(fd)
            orphans = _dead_here(holder)
            if not orphans or time.monotonic() > deadline:
                raise FolderInUse(_in_use(self.path, holder, orphans=orphans))
            if not said:
                log.warning("the run of pid %s that held %s died; waiting up to %.0f s for its workers to exit",
                            holder.get("pid"), self.path.parent, self.orphan_wait_s)
                said = True
            time.sleep(0.5)

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


@contextmanager
def worker_hold(output: str | os.PathLike) -> Iterator[None]:
    """A training worker's shared hold on its run's folder, for as long as it trains (see the module doc)."""
    if is_remote(output):  # the driver's lease covers the run
        yield
        return
    try:
        fd = os.open(Path(output) / LOCK_FILE, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as err:  # no lock file (a worker started without the driver): nothing to join
        log.debug("no shared hold on %s: %s", output, err)
        yield
        return
    try:
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the hold


def _in_use(path: Path, holder: dict, orphans: bool) -> str:
    who = describe_holder(holder)
    if orphans:
        return (f"the output folder {path.parent} is still held by the workers of a run that died ({who}). "
                f"Stop them (`ray stop`, or kill the leftover ray::RayTrainWorker processes) and run again.")
    return (f"the output folder {path.parent} is in use by another run: {who}. Wait for it to finish, stop it, "
            f"or choose another output=.")


def _read(fd: int) -> dict:
    try:
        return parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}

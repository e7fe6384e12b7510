"""A run's output folder on object storage (`output=s3://bucket/runs/NAME`), for clusters with no shared filesystem.

Every process works in a node-local staging folder and copies to and from the bucket at fixed points, so nothing
but the bucket carries state from one command (or node) to the next:

- the driver stages under `<cache>/runs/<name>-<hash>/driver`: it takes the lock, reads `mlflow_run.json`,
  writes `config.yaml` and `summary.json`, and downloads the package the workers uploaded to register it;
- each training rank stages under `.../rank<R>`: it writes its own DeepSpeed checkpoint files there and uploads
  them; rank 0 then writes the checkpoint's manifest (every rank's files with their sizes and SHA-256) last, so a
  checkpoint without one never finished. Resume downloads the newest checkpoint whose manifest verifies, on any
  node and with any number of workers. Rank 0 also uploads `validation.jsonl`, `best.json` and the package.

The lock is a lease, not `flock`: one object, `.polyfid.lock`, created with a conditional put (If-None-Match) and
renewed by the driver every third of its lease (If-Match on its last ETag). A driver that dies stops renewing, and
the next run takes the folder over once the lease has expired ($POLYFID_LOCK_LEASE_S, default 60 s).

The cache is $POLYFID_CACHE (default ~/.cache/polyfid); $POLYFID_STAGE_DIR puts the staging folders elsewhere.
Credentials and the endpoint come from the standard AWS environment, as for stores; none is ever written out.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("polyfid.run_storage")
LOCK_KEY = ".polyfid.lock"
LEASE_ENV, STAGE_ENV = "POLYFID_LOCK_LEASE_S", "POLYFID_STAGE_DIR"
SCHEMES = ("s3://",)


def is_remote(output: str | os.PathLike) -> bool:
    """Whether a run's output is a URL on object storage (file:// and plain paths are local)."""
    text = os.fspath(output)
    return "://" in text and not text.startswith("file://")


def check_output_url(output: str) -> None:
    """A ValueError naming the URL unless it is one this polyfid can hold a run in."""
    if not output.startswith(SCHEMES):
        raise ValueError(f"output={output}: a run's outputs on object storage need an s3:// URL (S3 or an "
                         f"S3-compatible endpoint: its conditional writes hold the run's lock)")
    bucket, _, prefix = output[len("s3://"):].partition("/")
    if not bucket or not prefix.strip("/"):
        raise ValueError(f"output={output}: name a folder inside the bucket, for example s3://{bucket or 'BUCKET'}"
                         f"/runs/NAME")


def stage_root(url: str) -> Path:
    """The node-local staging folder of the run at `url` (the same path on every node, each node its own copy)."""
    from polyfid.data_shards.named import cache_root

    base = Path(os.environ[STAGE_ENV]) if os.environ.get(STAGE_ENV) else cache_root() / "runs"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return base / f"{name}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:10]}"


class RunStorage:
    """Copies between a staging folder and the run's folder on object storage (keys relative to the run)."""

    def __init__(self, url: str, role: str) -> None:
        import fsspec

        check_output_url(url)
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = stage_root(self.url) / role
        self.local.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of(cls, output: str, role: str) -> "RunStorage | None":
        """The storage of a remote output (None for a local folder)."""
        return cls(output, role) if is_remote(output) else None

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()  # other nodes write here: never answer from a cached listing
        return bool(self.fs.exists(self.key(rel)))

    def push(self, rel: str) -> None:
        """Upload a file or folder of the staging folder to the same place in the run's folder (if it exists)."""
        src = self.local / rel
        if src.is_dir():
            for p in sorted(q for q in src.rglob("*") if q.is_file()):
                self.fs.put_file(str(p), self.key(str(p.relative_to(self.local))))
        elif src.is_file():
            self.fs.put_file(str(src), self.key(rel))

    def put_text(self, rel: str, text: str) -> None:
        self.fs.pipe_file(self.key(rel), text.encode())

    def pull(self, rel: str, dst: Path | None = None) -> bool:
        """Download a file or folder of the run into the staging folder (or `dst`); False if there is none."""
        src, dst = self.key(rel), dst or self.local / rel
        self.fs.invalidate_cache()
        files = [src] if self.fs.isfile(src) else self.fs.find(src)
        for f in files:
            target = dst if f == src else dst / f[len(src) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f, str(target))
        return bool(files)

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.key(rel), recursive=True)

    def listdir(self, rel: str) -> list[str]:
        """Names directly inside a folder of the run (empty if absent)."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(rel), detail=False,
                                                                                refresh=True))
        except FileNotFoundError:
            return []


class FolderInUse(RuntimeError):
    """Another live run holds the output folder."""


class LeaseLock:
    """`with LeaseLock(url):` holds the run's folder on object storage; a second holder gets FolderInUse."""

    def __init__(self, url: str, lease_s: float | None = None) -> None:
        check_output_url(url)
        self.url = url.rstrip("/")
        self.lease_s = float(lease_s if lease_s is not None else os.environ.get(LEASE_ENV, 60))
        self._me = holder_record()  # who holds it; each renewal moves only its expiry
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when a renewal found the lock taken by someone else

    def _store(self):
        from obstore.store import S3Store

        bucket, _, prefix = self.url[len("s3://"):].partition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        return S3Store(bucket, prefix=prefix, client_options={"allow_http": endpoint.startswith("http://")})

    def _body(self) -> bytes:
        return json.dumps({**self._me, "expires": time.time() + self.lease_s, "lease_s": self.lease_s}).encode()

    def acquire(self) -> "LeaseLock":
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        self._s3 = self._store()
        waited = False
        while True:
            try:
                self._etag = obstore.put(self._s3, LOCK_KEY, self._body(), mode="create")["e_tag"]
                break
            except AlreadyExistsError:
                pass
            except Exception as err:  # no such bucket, no access, no endpoint: one line naming the output
                raise FileNotFoundError(f"output={self.url}: cannot write its lock {LOCK_KEY} there "
                                        f"({_first_line(err, 300)}) ({CHECK})") from None
            got = obstore.get(self._s3, LOCK_KEY)
            holder = parse_holder(bytes(got.bytes()))
            left = holder.get("expires", 0) - time.time()
            if left <= 0:  # the holder stopped renewing: take over, unless another run does at this moment
                try:
                    self._etag = obstore.put(self._s3, LOCK_KEY, self._body(), mode={"e_tag": got.meta["e_tag"]})[
                        "e_tag"]
                except PreconditionError:
                    continue
                log.warning("taking over %s/%s, left by pid %s on %s (started %s), whose lease expired", self.url,
                            LOCK_KEY, holder.get("pid"), holder.get("host"), holder.get("started"))
                break
            if not dead_here(holder):
                raise FolderInUse(_in_use(self.url, holder, left))
            if not waited:  # a driver of this host that died: its workers may still write; its lease runs out
                log.warning("the run of pid %s that held %s died; waiting %.0f s for its lease to expire",
                            holder.get("pid"), self.url, left)
                waited = True
            time.sleep(min(left + 0.1, 1.0))
        self._thread = threading.Thread(target=self._renew, name="polyfid-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        import obstore
        from obstore.exceptions import PreconditionError

        while not self._stop.wait(self.lease_s / 3):
            try:
                self._etag = obstore.put(self._s3, LOCK_KEY, self._body(), mode={"e_tag": self._etag})["e_tag"]
            except PreconditionError:
                self.lost = True
                log.error("the lock on %s was taken by another run (this run's lease lapsed): stop this run, or "
                          "the two will write the same checkpoints", self.url)
                return
            except Exception as err:  # a network blip: the next renewal retries, well inside the lease
                log.warning("could not renew the lock on %s: %s", self.url, err)

    def release(self) -> None:
        import obstore

        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.lost:
            try:
                obstore.delete(self._s3, LOCK_KEY)
            except Exception as err:  # the lease then simply expires
                log.warning("could not remove the lock %s/%s: %s", self.url, LOCK_KEY, err)

    def __enter__(self) -> "LeaseLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def storage_error(err: BaseException) -> str | None:
    """One line for an error of the object-storage clients (s3fs/botocore, obstore, aiohttp), anywhere in the
    chain of `err`, naming the endpoint and what to check; None for any other error."""
    seen = err
    while seen is not None:
        mod = type(seen).__module__ or ""
        if mod.startswith(("botocore", "aiobotocore", "obstore", "aiohttp")):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
            return f"object storage at {endpoint}: {_first_line(seen, 400)} ({CHECK})"
        seen = seen.__cause__ or seen.__context__
    return None


CHECK = ("check AWS_ENDPOINT_URL, the bucket's name, and the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
         "or AWS_PROFILE")


def _first_line(err: BaseException, limit: int) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def holder_record() -> dict:
    """Who holds a run's lock: this process, its host, when and by which command (the lock file or lease says it)."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:500]}


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')})")


def parse_holder(raw: bytes) -> dict:
    """A lock's holder record from its bytes ({} when empty or unreadable)."""
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


def dead_here(holder: dict) -> bool:
    """The holder record names a process on this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _in_use(url: str, holder: dict, left: float) -> str:
    return (f"the output {url} is in use by another run: {describe_holder(holder)}; its lease runs {left:.0f} s more unless renewed. "
            f"Wait for it to finish, stop it, or choose another output=.")

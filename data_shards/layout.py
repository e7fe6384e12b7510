"""The store's on-disk layout: where it lives (local or fsspec), array names, chunking and checksums."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping

import google_crc32c  # a dependency of zarr itself: hardware CRC-32C, several GB/s
import numpy as np
import zarr
from zarr.codecs import BloscCodec

MANIFEST_KEY = "polyfid"
SHARDS = "shards"
TMP_PREFIX = "tmp-"  # temporary names: <stem>tmp-<host>-<pid>-<random hex>, see tmp_name
# Arrays every shard has, with their on-disk dtypes; labels live under energy/<fid> and forces/<fid>.
BASE_ARRAYS: dict[str, str] = {
    "atomic_numbers": "uint8",
    "positions": "float64",
    "offsets": "int64",
    "cell": "float64",
    "pbc": "bool",
    "dataset": "int16",
    "structure_id": "int64",
}
ENERGY_DTYPE = "float64"
FORCES_DTYPE = "float32"
CHUNK_BYTES = 32 * 2**20  # a shard of a few hundred thousand atoms reads in a few whole chunks
CHECKSUM = "crc32c"  # the algorithm of new shards; "sha256" (format 1 stores) still verifies


def compressor() -> BloscCodec:
    """The codec new arrays are written with: Blosc with LZ4 and byte shuffle.

    Zarr records the codec in each array's metadata, so stores written with Blosc/Zstd (before) still read.
    LZ4 decodes about 4x faster than Zstd level 5 on float data, for about 7% more bytes on disk.
    """
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk along axis 0: at most CHUNK_BYTES (whole rows), split evenly (no mostly-empty last chunk)."""
    row = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(shape[0], 1)
    n_chunks = -(-rows // max(1, CHUNK_BYTES // row))
    return -(-rows // n_chunks)


def shard_checksum(arrays: Mapping[str, np.ndarray], algorithm: str = CHECKSUM) -> str:
    """'<algorithm>:<sha256 hex>' over (key, dtype, shape, content) of a shard's arrays, in sorted key order.

    crc32c: the content of each array is its CRC-32C (hardware, several GB/s), which catches any
    corruption of the bytes; sha256 then digests the keys, dtypes, shapes and CRCs. sha256 (the checksum of
    format-1 stores): the raw bytes themselves go through sha256 (about 1 GB/s).
    """
    if algorithm not in ("crc32c", "sha256"):
        raise ValueError(f"unknown shard checksum algorithm {algorithm!r} (this polyfid knows crc32c, sha256)")
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        data = a.reshape(-1).view(np.uint8)  # no copy of the shard's bytes
        if algorithm == "crc32c":
            h.update(f"{google_crc32c.value(data):08x}|".encode())
        elif a.size:
            h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def checksum_matches(arrays: Mapping[str, np.ndarray], expected: str) -> tuple[bool, str]:
    """(whether the arrays match `expected`, the checksum computed with `expected`'s algorithm)."""
    algorithm = expected.split(":", 1)[0]
    try:
        got = shard_checksum(arrays, algorithm)
    except ValueError as err:
        return False, str(err)
    return got == expected, got


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def tmp_name(stem: str = "", random_hex: int = 12) -> str:
    """A temporary name that records its writer: '<stem>tmp-<host>-<pid>-<hex>' (see `is_stale_tmp`)."""
    return f"{stem}{TMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:random_hex]}"


def is_stale_tmp(name: str, stem: str = "") -> bool:
    """Whether `name` is a temporary of a writer on this host whose process is gone (safe to delete).

    Names of other hosts, of live processes, or without a recorded writer (written by an older polyfid)
    are never stale: a live writer on another host may still be using them.
    """
    head = stem + TMP_PREFIX
    if not name.startswith(head):
        return False
    parts = name[len(head):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class Location:
    """Where a store lives, a local directory or an fsspec URL; opens it and renames and removes inside it."""

    def __init__(self, path: str | os.PathLike) -> None:
        text = os.fspath(path)
        self.path = text
        if text.startswith("file://"):
            text = text[len("file://"):]
        if "://" in text:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(text)
            self.local: str | None = None
            self.url = text
        else:
            self.fs, self.root = None, os.path.abspath(text)
            self.local = self.root
            self.url = self.root

    def _join(self, rel: str) -> str:
        return self.root if not rel else f"{self.root.rstrip('/')}/{rel}"

    def exists(self, rel: str = "") -> bool:
        """Whether the path (relative to the store root) exists."""
        if self.local is not None:
            return os.path.exists(self._join(rel))
        return bool(self.fs.exists(self._join(rel)))

    def is_empty_dir(self) -> bool:
        """Whether the root exists and is an empty directory."""
        if self.local is not None:
            return os.path.isdir(self.root) and not os.listdir(self.root)
        return self.fs.isdir(self.root) and not self.fs.ls(self.root)

    def listdir(self, rel: str) -> list[str]:
        """Names directly inside a folder of the store (empty if absent)."""
        if not self.exists(rel):
            return []
        if self.local is not None:
            return sorted(os.listdir(self._join(rel)))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._join(rel), detail=False))

    def rename(self, src: str, dst: str) -> None:
        """Move a folder inside the store into place (atomic on a local file system)."""
        if self.local is not None:
            os.replace(self._join(src), self._join(dst))
            return
        # Object storage has no rename and no folders: copy each object (server side on S3), then delete them.
        a, b = self._join(src).rstrip("/"), self._join(dst).rstrip("/")
        files = self.fs.find(a)
        if not files:
            raise FileNotFoundError(f"{self.path}: nothing under {src!r} to move to {dst!r}")
        for f in files:
            self.fs.copy(f, b + f[len(a):])
        self.fs.rm(files)

    def remove(self, rel: str = "") -> None:
        """Delete a folder (or the whole store) if it exists."""
        if not self.exists(rel):
            return
        if self.local is not None:
            shutil.rmtree(self._join(rel))
        else:
            self.fs.rm(self._join(rel), recursive=True)

    def open_group(self, mode: str = "r", path: str | None = None) -> zarr.Group:
        """The zarr group at the root (or at `path` inside it). An s3:// store is read through obstore when it is
        installed (its requests run outside Python's GIL: 4x less waiting than s3fs on a busy machine,
        benchmarks/bench_s3_reader.py) and written through fsspec (s3fs); $POLYFID_OBJECT_STORE=fsspec reads
        through s3fs too, =obstore writes through obstore too."""
        choice = os.environ.get(OBJECT_STORE_ENV, "auto")
        if self.url.startswith("s3://") and (choice == "obstore" or (choice == "auto" and mode == "r" and _has_obstore())):
            return zarr.open_group(store=_obstore(self.root, read_only=mode == "r"), mode=mode, path=path or "",
                                   zarr_format=3)
        return zarr.open_group(store=self.url, mode=mode, path=path or "", zarr_format=3)


OBJECT_STORE_ENV = "POLYFID_OBJECT_STORE"


def _has_obstore() -> bool:
    import importlib.util

    return importlib.util.find_spec("obstore") is not None


def _obstore(root: str, read_only: bool):
    """A zarr store on S3 through obstore (Rust's object_store: requests outside Python's GIL); credentials,
    region and endpoint from the standard AWS environment, as for s3fs."""
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    bucket, _, prefix = root.partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    s3 = S3Store(bucket, prefix=prefix or None, client_options={"allow_http": endpoint.startswith("http://")})
    return ObjectStore(s3, read_only=read_only)

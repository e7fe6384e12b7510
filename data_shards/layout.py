"""The store's on-disk layout: where it lives (local or fsspec), array names, chunking and checksums."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec

MANIFEST_KEY = "polyfid"
SHARDS = "shards"
TMP_PREFIX = "tmp-"
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


def compressor() -> BloscCodec:
    """The codec every array is written with: Blosc with Zstd and byte shuffle."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk along axis 0, so a chunk holds at most CHUNK_BYTES (whole rows)."""
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return max(1, min(max(shape[0], 1), CHUNK_BYTES // max(row, 1)))


def shard_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over (key, dtype, shape, raw bytes) of a shard's arrays, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")  # no copy of the shard's bytes
    return "sha256:" + h.hexdigest()


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
        else:
            self.fs.mv(self._join(src), self._join(dst), recursive=True)

    def remove(self, rel: str = "") -> None:
        """Delete a folder (or the whole store) if it exists."""
        if not self.exists(rel):
            return
        if self.local is not None:
            shutil.rmtree(self._join(rel))
        else:
            self.fs.rm(self._join(rel), recursive=True)

    def open_group(self, mode: str = "r", path: str | None = None) -> zarr.Group:
        """The zarr group at the root (or at `path` inside it)."""
        return zarr.open_group(store=self.url, mode=mode, path=path or "", zarr_format=3)

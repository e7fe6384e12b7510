"""A polyfid store: a zarr v3 group of shards plus a manifest, opened read-only for training.

Layout: root attrs["polyfid"] holds the manifest; shard k lives at `shards/<name>` with atomic_numbers[A]
uint8, positions[A,3], offsets[S+1], cell[S,3,3], pbc[S,3], dataset[S] int16, structure_id[S] int64,
energy/<fid>[S] float64 and forces/<fid>[A,3] float32. A label array that a shard does not have (all NaN,
or a fidelity added later) reads as NaN. Writing lives in `writer.py` (`StoreWriter`, `Structure`,
`write_structures`), which builds on this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from polyfid.data_shards.layout import BASE_ARRAYS, MANIFEST_KEY, SHARDS, Location, checksum_matches, tmp_name
from polyfid.data_shards.schema import FORMAT_VERSION, Fidelity

log = logging.getLogger("polyfid.store")

__all__ = ["CorruptShardError", "ShardInfo", "Store", "StoreWriter", "Structure", "write_structures"]


class CorruptShardError(RuntimeError):
    """A shard that cannot be decoded or whose checksum does not match the manifest."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard's manifest entry: its name, counts, checksum and which label arrays it holds."""

    name: str
    n_structures: int
    n_atoms: int
    checksum: str
    energy: tuple[str, ...] = ()  # fidelities with an energy/<fid> array in this shard
    forces: tuple[str, ...] = ()  # fidelities with a forces/<fid> array in this shard
    ids: tuple[str, ...] = ()  # merge keys with an ids/<key> array (hashed source ids, for --merge-on id:KEY)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["energy"], d["forces"], d["ids"] = list(self.energy), list(self.forces), list(self.ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(name=str(d["name"]), n_structures=int(d["n_structures"]), n_atoms=int(d["n_atoms"]),
                   checksum=str(d["checksum"]), energy=tuple(d.get("energy", ())),
                   forces=tuple(d.get("forces", ())), ids=tuple(d.get("ids", ())))


class Store:
    """Read access to a finished store: manifest properties and whole-shard reads with checksums."""

    def __init__(self, location: Location, manifest: dict[str, Any]) -> None:
        self._loc = location
        self._manifest = manifest
        self._root = location.open_group("r")
        self._shards = [ShardInfo.from_dict(s) for s in manifest["shards"]]
        self._fidelities = [Fidelity.from_dict(f) for f in manifest["fidelities"]]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Open a local directory or an fsspec URL (file://, memory://, s3://…) holding a polyfid store. A named
        store (`corpus:NAME`) is opened with data_shards.named.open_store, which builds it on first use."""
        loc = Location(path)
        manifest = read_manifest(loc)
        if manifest is None:
            raise ValueError(f"{loc.path} is not a polyfid store: no '{MANIFEST_KEY}' manifest in its root "
                             "group (an interrupted first write leaves none; delete it and ingest again)")
        version = int(manifest.get("format_version", -1))
        if version > FORMAT_VERSION or version < 1:
            raise ValueError(f"{loc.path}: store format version {version} is not supported "
                             f"(this polyfid reads 1..{FORMAT_VERSION})")
        return cls(loc, manifest)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as (path, manifest) so a store can be sent to Ray workers; they reopen it lazily.
        return (_reopen, (self._loc.path, self._manifest))

    # ---- manifest ---------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._loc.path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def fidelities(self) -> list[Fidelity]:
        return list(self._fidelities)

    @property
    def datasets(self) -> list[str]:
        return list(self._manifest["datasets"])

    @property
    def elements(self) -> list[int]:
        return [int(z) for z in self._manifest["elements"]]

    @property
    def reference_energies(self) -> dict[str, dict[int, float]]:
        return {fid: {int(z): float(e) for z, e in refs.items()}
                for fid, refs in self._manifest["reference_energies"].items()}

    @property
    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    @property
    def n_structures(self) -> int:
        return int(self._manifest["n_structures"])

    @property
    def n_atoms(self) -> int:
        return int(self._manifest["n_atoms"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the shard checksums and fidelities: names this exact content in model lineage."""
        payload = json.dumps({"fidelities": [f.to_dict() for f in self._fidelities],
                              "shards": [s.checksum for s in self._shards]}, sort_keys=True)
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, shards={len(self._shards)}, structures={self.n_structures}, "
                f"fidelities={[f.name for f in self._fidelities]})")

    # ---- reading ----------------------------------------------------------------------------------
    def _corrupt(self, info: ShardInfo, why: str) -> CorruptShardError:
        return CorruptShardError(f"store {self.path}: shard {info.name!r} is corrupt: {why}")

    def _raw(self, k: int) -> tuple[dict[str, np.ndarray], bool]:
        """Every array shard k has, keyed as on disk ('energy/<fid>' …), as stored, and whether their checksum was
        already matched here (the shard cache checks it, so read_shard need not again). From object storage, the
        arrays are fetched concurrently, and through the node-local shard cache when one is set."""
        info = self._shards[k]
        cached = _cache_file(info.checksum) if self._loc.local is None else None
        if cached is not None and cached.is_file():
            try:
                with np.load(cached) as npz:
                    raw = {key.replace("|", "/"): npz[key] for key in npz.files}
                if checksum_matches(raw, info.checksum)[0]:
                    return raw, True
            except (OSError, ValueError, KeyError):  # a damaged cache file: fetched again below
                pass
            log.warning("shard cache: %s does not match shard %s of %s; fetching it again", cached, info.name,
                        self.path)
            cached.unlink(missing_ok=True)
        keys = list(BASE_ARRAYS) + [f"energy/{f}" for f in info.energy] + [f"forces/{f}" for f in info.forces]
        keys += [f"ids/{k}" for k in info.ids]
        try:
            group = self._root[f"{SHARDS}/{info.name}"]
            if self._loc.local is None:  # one request after another would wait out each round trip
                with ThreadPoolExecutor(max_workers=min(8, len(keys))) as pool:
                    raw = dict(zip(keys, pool.map(lambda key: np.asarray(group[key][...]), keys)))
            else:
                raw = {key: np.asarray(group[key][...]) for key in keys}
        except Exception as err:  # a missing or undecodable chunk, or missing metadata
            raise self._corrupt(info, f"{type(err).__name__}: {err}") from err
        if cached is None or not checksum_matches(raw, info.checksum)[0]:  # never cache a corrupt read
            return raw, False
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(tmp_name(cached.stem + ".") + ".npz")
        np.savez(tmp, **{key.replace("/", "|"): v for key, v in raw.items()})
        os.replace(tmp, cached)
        return raw, True

    @property
    def remote(self) -> bool:
        """Whether the store lives on object storage or another fsspec filesystem (not a local folder)."""
        return self._loc.local is None

    def fetch(self, k: int) -> tuple[dict[str, np.ndarray], bool]:
        """Shard k's arrays as stored, fetched now (through the node-local cache, if set), for a later
        read_shard(k, fetched=...): a reader fetches the next shards of object storage this way, several at once."""
        return self._raw(k)

    def read_array(self, k: int, key: str) -> np.ndarray:
        """One array of shard k, unverified (e.g. 'offsets' to plan without reading positions)."""
        info = self._shards[k]
        try:
            return np.asarray(self._root[f"{SHARDS}/{info.name}/{key}"][...])
        except Exception as err:
            raise self._corrupt(info, f"cannot read {key!r}: {type(err).__name__}: {err}") from err

    def read_shard(self, k: int, verify: bool = True, fill_missing: bool = True,
                   fetched: tuple[dict[str, np.ndarray], bool] | None = None) -> dict[str, Any]:
        """Arrays of shard k; 'energy' and 'forces' are {fid: array} over all store fidelities (NaN = missing).

        With fill_missing=False, a fidelity whose array the shard lacks is left out instead of NaN-filled.
        `fetched`: what fetch(k) returned, checked here as a read would be.
        """
        info = self._shards[k]
        raw, checked = fetched if fetched is not None else self._raw(k)
        if verify and not checked:
            ok, got = checksum_matches(raw, info.checksum)
            if not ok:
                raise self._corrupt(info, f"checksum {got} does not match the manifest's {info.checksum}")
        s, a = info.n_structures, info.n_atoms
        offsets = raw["offsets"]
        if (offsets.shape != (s + 1,) or raw["atomic_numbers"].shape != (a,)
                or (s and (int(offsets[0]) != 0 or int(offsets[-1]) != a))):
            raise self._corrupt(info, f"array sizes do not match the manifest ({s} structures, {a} atoms)")
        if not (np.diff(offsets) > 0).all():
            raise self._corrupt(info, "offsets do not rise: a structure would have no atoms or a negative count")
        out: dict[str, Any] = {key: raw[key] for key in BASE_ARRAYS}
        out["energy"] = {f.name: raw.get(f"energy/{f.name}", None) for f in self._fidelities}
        out["forces"] = {f.name: raw.get(f"forces/{f.name}", None) for f in self._fidelities}
        for kind, shape, dtype in (("energy", (s,), np.float64), ("forces", (a, 3), np.float32)):
            for name, arr in list(out[kind].items()):
                if arr is None and fill_missing:
                    out[kind][name] = np.full(shape, np.nan, dtype=dtype)
                elif arr is None:
                    del out[kind][name]
        return _mask_labels(out, self._manifest.get("masked_labels") or {})

    def verify(self) -> list[str]:
        """Names of shards that cannot be read or whose checksum does not match (empty if all good)."""
        bad = []
        for k, info in enumerate(self._shards):
            try:
                self.read_shard(k, verify=True)
            except CorruptShardError:
                bad.append(info.name)
        return bad


_CACHE_DIR: Path | None = None


def set_shard_cache(path: str | os.PathLike | None) -> None:
    """Keep shards read from object storage in this node-local folder (config `data.cache_dir`); None: off."""
    global _CACHE_DIR
    _CACHE_DIR = Path(path).expanduser().resolve() if path else None


def _cache_file(checksum: str) -> Path | None:
    """The cache file of a shard with this checksum (the checksum names its content), or None without a cache."""
    if _CACHE_DIR is None:
        return None
    return _CACHE_DIR / (checksum.replace(":", "-") + ".npz")


def _mask_labels(out: dict[str, Any], masked: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Labels dropped as outliers at ingest become NaN (missing) in a shard read."""
    for fid, kinds in masked.items():
        for kind, ids in kinds.items():
            arr = out[kind].get(fid)
            rows = np.isin(out["structure_id"], ids)
            if arr is None or not rows.any():
                continue
            arr = np.array(arr, copy=True)
            arr[rows if kind == "energy" else np.repeat(rows, np.diff(out["offsets"]))] = np.nan
            out[kind][fid] = arr
    return out


def _reopen(path: str, manifest: dict[str, Any]) -> Store:
    """Unpickle a Store without rereading its manifest."""
    return Store(Location(path), manifest)


def read_manifest(loc: Location) -> dict[str, Any] | None:
    """The manifest at a location; None if there is a zarr group without one; raises if nothing is there."""
    import zarr

    if not loc.exists():
        raise FileNotFoundError(f"{loc.path}: no such store (path does not exist)")
    try:
        root = loc.open_group("r")
    except (FileNotFoundError, zarr.errors.BaseZarrError) as err:
        raise ValueError(f"{loc.path} is not a polyfid store: no zarr v3 group at its root ({err})") from err
    manifest = root.attrs.get(MANIFEST_KEY)
    return None if manifest is None else dict(manifest)

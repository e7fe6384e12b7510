"""Writing a store: buffer structures into shards, write each under a temporary name, rename, manifest last.

A crash leaves no visible half shard: readers see only the shards the manifest lists, and the manifest
is written after every shard is in place. `append=True` adds shards (and new fidelities and datasets)
without touching old ones, and refits the reference energies over all shards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from polyfid._version import __version__
from polyfid.data_shards.layout import (ENERGY_DTYPE, FORCES_DTYPE, SHARDS, Location, checksum_matches, chunk_rows,
                                        compressor, is_stale_tmp, shard_checksum, tmp_name)
from polyfid.data_shards.refs import ReferenceAccumulator, shard_sums
from polyfid.data_shards.schema import FORMAT_VERSION, Fidelity
from polyfid.data_shards.store import ShardInfo, Store, read_manifest

log = logging.getLogger("polyfid.writer")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+()\-]*$")


@dataclasses.dataclass
class Structure:
    """One structure to write: Z, R (Å), cell (Å; zeros for a molecule), pbc, and labels in eV, eV/Å."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, dtype=bool))
    energies: dict[str, float] = dataclasses.field(default_factory=dict)  # fid -> eV; absent = missing
    forces: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # fid -> [n, 3] eV/Å
    ids: dict[str, int] = dataclasses.field(default_factory=dict)  # merge key -> hashed source id (int64)


MISSING_ID = np.iinfo(np.int64).min


def shard_arrays(items: Sequence[tuple[Structure, int]], fids: Iterable[str],
                 first_id: int) -> tuple[dict[str, np.ndarray], list[str], list[str], list[str]]:
    """The arrays of one shard from (structure, dataset index) pairs; also the energy/forces/ids keys it has."""
    structs = [s for s, _ in items]
    counts = np.array([len(s.numbers) for s in structs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_s, n_a = len(structs), int(offsets[-1])
    arrays: dict[str, np.ndarray] = {
        "atomic_numbers": np.concatenate([np.asarray(s.numbers) for s in structs]).astype(np.uint8),
        "positions": np.concatenate([np.asarray(s.positions, dtype=np.float64) for s in structs]),
        "offsets": offsets,
        "cell": np.stack([np.asarray(s.cell, dtype=np.float64) for s in structs]),
        "pbc": np.stack([np.asarray(s.pbc, dtype=bool) for s in structs]),
        "dataset": np.array([d for _, d in items], dtype=np.int16),
        "structure_id": first_id + np.arange(n_s, dtype=np.int64),
    }
    energy, forces = [], []
    for fid in fids:
        e = np.array([s.energies.get(fid, np.nan) for s in structs], dtype=ENERGY_DTYPE)
        if np.isfinite(e).any():
            arrays[f"energy/{fid}"] = e
            energy.append(fid)
        if any(fid in s.forces for s in structs):
            f = np.full((n_a, 3), np.nan, dtype=FORCES_DTYPE)
            for s, lo, hi in zip(structs, offsets[:-1], offsets[1:]):
                if fid in s.forces:
                    f[lo:hi] = s.forces[fid]
            arrays[f"forces/{fid}"] = f
            forces.append(fid)
    ids = sorted({k for s in structs for k in s.ids})
    for key in ids:
        arrays[f"ids/{key}"] = np.array([s.ids.get(key, MISSING_ID) for s in structs], dtype=np.int64)
    return arrays, energy, forces, ids


def write_group(group: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays into a zarr group with the store's chunking and codec."""
    for key, a in arrays.items():
        chunks = (chunk_rows(a.shape, a.dtype.itemsize),) + a.shape[1:]
        group.create_array(key, data=a, chunks=chunks, compressors=compressor())


def check_name(kind: str, name: str) -> str:
    """Validate a name: any non-empty text for a dataset; for a fidelity (an array path), a safe subset."""
    if kind == "dataset" and isinstance(name, str) and name.strip():
        return name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid {kind} name {name!r}: use letters, digits and _ . + ( ) - "
                         "(starting with a letter or digit)")
    return name


def _same_level(a: Fidelity, b: Fidelity) -> bool:
    """Whether two fidelity records describe the same level of theory (the source unit may differ)."""
    return dataclasses.replace(a, source_unit="") == dataclasses.replace(b, source_unit="")


class StoreWriter:
    """Writes structures into a new store, or appends shards to an existing one; use as a context manager.

    A new local store is built in a hidden sibling folder and renamed into place by `close`, so a killed
    ingest leaves no store at all. On append, new shards are renamed into place and listed by the manifest,
    which is written last; `add_labels` adds label arrays of new fidelities to existing shards without
    rewriting their other arrays (unlisted until the manifest is written).
    """

    def __init__(self, path: str | os.PathLike, fidelities: Sequence[Fidelity], shard_size: int = 50_000,
                 append: bool = False) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self._final = Location(path)
        self._loc = self._final
        self.shard_size = int(shard_size)
        old = None
        self._leftover: set[str] = set()  # shards of an interrupted first write to object storage (kept if equal)
        if self._final.exists() and not self._final.is_empty_dir():
            old = read_manifest(self._final)
            if old is None and self._final.local is None and not append:
                self._leftover = {n for n in self._final.listdir(SHARDS) if n.startswith("shard-")}
                log.warning("%s: continuing an interrupted first write (%d shards there, no manifest): each is kept "
                            "if it equals the shard this ingest makes, else rewritten", self._final.path,
                            len(self._leftover))
            elif old is None:
                raise FileExistsError(f"{self._final.path} exists but is not a polyfid store (or a first write "
                                      "was interrupted); delete it or choose another path")
            elif not append:
                raise FileExistsError(f"{self._final.path} already holds a polyfid store; pass append=True "
                                      "to add to it")
        self._created = old is None
        self._remove_stale_tmps()
        if self._created and self._final.local is not None:  # build beside it, rename into place on close
            parent, name = os.path.split(self._final.local)
            os.makedirs(parent, exist_ok=True)
            self._loc = Location(os.path.join(parent, tmp_name(f".{name}.", 8)))
        self._made_root = not self._final.exists()
        self._old = old
        self._fids: dict[str, Fidelity] = {}
        for f in (old or {}).get("fidelities", []):
            self._fids[f["name"]] = Fidelity.from_dict(f)
        for f in fidelities:
            check_name("fidelity", f.name)
            if f.name in self._fids and not _same_level(self._fids[f.name], f):
                raise ValueError(f"{self._final.path}: fidelity {f.name!r} is already in the store as "
                                 f"{self._fids[f.name]}; the new description {f} differs")
            self._fids.setdefault(f.name, f)
        self._datasets: list[str] = list((old or {}).get("datasets", []))
        self._shards: list[ShardInfo] = [ShardInfo.from_dict(s) for s in (old or {}).get("shards", [])]
        self._n_old_shards = len(self._shards)
        self._elements: set[int] = set((old or {}).get("elements", []))
        self._provenance: list[dict[str, Any]] = list((old or {}).get("provenance", []))
        self._masked: dict[str, dict[str, list[int]]] = dict((old or {}).get("masked_labels", {}))
        self._next_id = int((old or {}).get("n_structures", 0))
        self._refs = ReferenceAccumulator()
        self._buffer: list[tuple[Structure, int]] = []
        self._written: list[str] = []
        self._tmps: list[str] = []
        self._added: list[str] = []  # label arrays added to old shards ("shard/energy/fid")
        self._closed = False
        self._root = self._loc.open_group("a")
        self._shard_group = self._root.require_group(SHARDS)

    def _remove_stale_tmps(self) -> None:
        """Delete what killed writers on this host left: a new store's hidden build folder, temporary shards."""
        if self._final.local is not None:
            parent, name = os.path.split(self._final.local)
            for entry in os.listdir(parent) if os.path.isdir(parent) else []:
                if is_stale_tmp(entry, f".{name}."):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        for entry in self._final.listdir(SHARDS) if not self._created else []:
            if is_stale_tmp(entry):
                self._final.remove(f"{SHARDS}/{entry}")

    # ---- adding -----------------------------------------------------------------------------------
    @property
    def fidelities(self) -> list[Fidelity]:
        return list(self._fids.values())

    @property
    def location(self) -> Location:
        """Where shards are being written now (a hidden sibling folder for a new local store)."""
        return self._loc

    @property
    def next_id(self) -> int:
        """The structure_id the next structure will get."""
        return self._next_id

    def add_dataset(self, dataset: str) -> int:
        """Register a dataset name; returns its index."""
        check_name("dataset", dataset)
        if dataset not in self._datasets:
            self._datasets.append(dataset)
        return self._datasets.index(dataset)

    def add(self, structures: Iterable[Structure], dataset: str) -> int:
        """Buffer structures of one dataset, flushing full shards; returns how many were added."""
        if self._closed:
            raise RuntimeError("StoreWriter is closed")
        d = self.add_dataset(dataset)
        n = 0
        for s in structures:
            self._check(s, n)
            self._buffer.append((s, d))
            n += 1
            if len(self._buffer) >= self.shard_size:
                self._flush()
        return n

    def add_provenance(self, record: Mapping[str, Any]) -> None:
        """Record where a batch of structures came from (inputs, units, keys) in the manifest."""
        self._provenance.append(dict(record))

    def _check(self, s: Structure, i: int) -> None:
        n = len(s.numbers)
        if n == 0 or np.shape(s.positions) != (n, 3) or np.shape(s.cell) != (3, 3) or np.shape(s.pbc) != (3,):
            raise ValueError(f"structure {i}: bad shapes (numbers {np.shape(s.numbers)}, positions "
                             f"{np.shape(s.positions)}, cell {np.shape(s.cell)}, pbc {np.shape(s.pbc)})")
        z = np.asarray(s.numbers)
        if z.min() < 1 or z.max() > 118:
            raise ValueError(f"structure {i}: atomic numbers must be in 1..118")
        for fid, f in s.forces.items():
            if np.shape(f) != (n, 3):
                raise ValueError(f"structure {i}: forces[{fid!r}] has shape {np.shape(f)}, expected ({n}, 3)")
        for fid in list(s.energies) + list(s.forces):
            if fid not in self._fids:
                raise ValueError(f"structure {i}: label for unknown fidelity {fid!r}; known: {list(self._fids)}")

    # ---- shards -----------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the buffered structures as one shard (temporary name, then rename into place)."""
        if not self._buffer:
            return
        items, self._buffer = self._buffer, []
        arrays, energy, forces, ids = shard_arrays(items, self._fids, self._next_id)
        info = ShardInfo("", len(items), int(arrays["offsets"][-1]), shard_checksum(arrays), tuple(energy),
                         tuple(forces), tuple(ids))
        refs, elements = shard_sums(arrays, energy, forces), np.unique(arrays["atomic_numbers"])
        if self._loc.local is None:  # object storage has no rename: the final key at once, unlisted until close
            name = self._kept(info, list(arrays))
            if name is not None:
                self._place(name, info, refs, elements)
                return
            name = self._next_shard_name()
            write_group(self._shard_group.create_group(name), arrays)
            self._place(name, info, refs, elements)
            return
        tmp = self.new_tmp_name()
        write_group(self._shard_group.create_group(tmp), arrays)
        self.adopt(tmp, info, refs, elements)

    def _kept(self, info: ShardInfo, keys: list[str]) -> str | None:
        """The next shard's name if it is already in place, whole and equal (by checksum), from an interrupted
        first write that this ingest continues (the same input in the same order makes the same shards)."""
        name = f"shard-{len(self._shards):06d}"
        if name not in self._leftover:
            return None
        self._leftover.discard(name)
        try:
            group = self._shard_group[name]
            same = checksum_matches({k: group[k][...] for k in keys}, info.checksum)[0]
        except (KeyError, ValueError, OSError):  # half written: rewritten
            same = False
        if not same:
            return None
        self._written.append(name)
        return name

    def new_tmp_name(self) -> str:
        """A fresh temporary shard name (removed by `abort` unless adopted)."""
        tmp = tmp_name()
        self._tmps.append(tmp)
        return tmp

    def adopt(self, tmp: str, info: ShardInfo, refs: ReferenceAccumulator, elements: Iterable[int]) -> None:
        """Rename a fully written temporary shard into place as the next shard (used by parallel ingest)."""
        name = self._next_shard_name()
        self._loc.rename(f"{SHARDS}/{tmp}", f"{SHARDS}/{name}")
        self._place(name, info, refs, elements)

    def _next_shard_name(self) -> str:
        """The next shard's name, cleared of an unlisted leftover of an interrupted write."""
        name = f"shard-{len(self._shards):06d}"
        if self._loc.exists(f"{SHARDS}/{name}"):
            self._loc.remove(f"{SHARDS}/{name}")
        self._written.append(name)
        return name

    def _place(self, name: str, info: ShardInfo, refs: ReferenceAccumulator, elements: Iterable[int]) -> None:
        """Record a shard written under its final name (listed by the manifest that close writes last)."""
        self._shards.append(dataclasses.replace(info, name=name))
        self._next_id += info.n_structures
        self._elements.update(int(z) for z in elements)
        self._refs.merge(refs)

    def add_labels(self, k: int, energy: Mapping[str, np.ndarray], forces: Mapping[str, np.ndarray]) -> None:
        """Add whole label arrays (NaN = missing) of fidelities an existing shard k does not have yet."""
        if k >= self._n_old_shards:
            raise ValueError(f"shard {k} is not an existing shard of the store")
        info = self._shards[k]
        group = self._shard_group[info.name]
        arrays = {}
        for kind, labels, have in (("energy", energy, info.energy), ("forces", forces, info.forces)):
            for fid, a in labels.items():
                if fid not in self._fids or fid in have:
                    raise ValueError(f"shard {info.name!r} already has {kind} for {fid!r} (or it is unknown)")
                key = f"{kind}/{fid}"
                if self._loc.exists(f"{SHARDS}/{info.name}/{key}"):  # unlisted leftover of a killed merge
                    self._loc.remove(f"{SHARDS}/{info.name}/{key}")
                arrays[key] = np.asarray(a, dtype=ENERGY_DTYPE if kind == "energy" else FORCES_DTYPE)
        self._added += [f"{SHARDS}/{info.name}/{key}" for key in arrays]
        write_group(group, arrays)
        old = Store(self._loc, self._old)  # type: ignore[arg-type]
        raw = old._raw(k)[0] | arrays
        self._shards[k] = dataclasses.replace(info, checksum=shard_checksum(raw),
                                              energy=info.energy + tuple(energy), forces=info.forces + tuple(forces))

    def screen(self, check: "OutlierCheck", source=None) -> list:
        """Flag label outliers among the shards this writer wrote (outliers.py); with check.policy == "drop"
        their labels are masked in the manifest and taken out of the reference sums."""
        from polyfid.data_shards.outliers import find_outliers, mask_record, masked_sums

        self._flush()  # the last, partial shard too
        shards = []
        for info in self._shards[self._n_old_shards:]:
            group = self._shard_group[info.name]
            keys = ["atomic_numbers", "offsets", "dataset", "structure_id"]
            keys += [f"{kind}/{f}" for kind, fids in (("energy", info.energy), ("forces", info.forces)) for f in fids]
            shards.append({k: np.asarray(group[k][...]) for k in keys})
        refs = self._refs.solve(self._fids, sorted(self._elements))
        found = find_outliers(shards, refs, self._datasets, check, source)
        if found and check.policy == "drop":
            self._refs.merge(masked_sums(shards, found), sign=-1.0)
            for fid, kinds in mask_record(found).items():
                for kind, ids in kinds.items():
                    mine = self._masked.setdefault(fid, {}).setdefault(kind, [])
                    mine[:] = sorted(set(mine) | set(ids))
        return found

    # ---- finishing --------------------------------------------------------------------------------
    def close(self) -> Store:
        """Flush, refit reference energies over all shards, write the manifest (last) and open the store."""
        if self._closed:
            return Store.open(self._final.path)
        self._flush()
        if not self._shards:
            self.abort()
            raise ValueError(f"{self._final.path}: no structures were added; nothing written")
        if self._n_old_shards:
            for k in range(self._n_old_shards):
                info = self._shards[k]
                group = self._shard_group[info.name]
                keys = ["atomic_numbers", "offsets"] + [f"{kind}/{f}" for kind, fids in
                                                        (("energy", info.energy), ("forces", info.forces)) for f in fids]
                self._refs.merge(shard_sums({k: group[k][...] for k in keys}, info.energy, info.forces))
        for name in sorted(self._leftover):  # an interrupted write's shards beyond this ingest's: unlisted, removed
            self._loc.remove(f"{SHARDS}/{name}")
        elements = sorted(self._elements)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fidelities": [f.to_dict() for f in self._fids.values()],
            "datasets": list(self._datasets),
            "elements": elements,
            "reference_energies": {fid: {str(z): e for z, e in refs.items()}
                                   for fid, refs in self._refs.solve(self._fids, elements).items()},
            "reference_sums": self._refs.to_dict(),  # a run adds these over its stores (reference_fit.py)
            "shards": [s.to_dict() for s in self._shards],
            "n_structures": int(sum(s.n_structures for s in self._shards)),
            "n_atoms": int(sum(s.n_atoms for s in self._shards)),
            "created_by": f"polyfid {__version__}",
            "provenance": self._provenance,
            "masked_labels": self._masked,  # label outliers dropped at ingest: read as missing (outliers.py)
        }
        self._root.attrs["polyfid"] = manifest
        if self._loc is not self._final:
            os.replace(self._loc.local, self._final.local)  # type: ignore[arg-type]
        self._closed = True
        return Store.open(self._final.path)

    def abort(self) -> None:
        """Remove everything this writer wrote; an existing store is left as it was."""
        self._closed = True
        self._buffer = []
        if self._loc is not self._final:  # a new local store: drop the hidden build folder
            self._loc.remove()
            return
        if self._created:
            if self._made_root:
                self._loc.remove()
            else:  # was an empty directory: leave it empty
                for name in self._loc.listdir(""):
                    self._loc.remove(name)
            return
        for rel in self._added:
            self._loc.remove(rel)
        for name in self._written + self._tmps:
            self._loc.remove(f"{SHARDS}/{name}")

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_structures(path: str | os.PathLike, structures: Iterable[Structure], fidelities: Sequence[Fidelity],
                     dataset: str, shard_size: int = 50_000, append: bool = False) -> Store:
    """Write structures of one dataset into a new store (or append to one); returns the opened store."""
    writer = StoreWriter(path, fidelities, shard_size=shard_size, append=append)
    try:
        writer.add(structures, dataset)
        return writer.close()
    except BaseException:
        writer.abort()
        raise

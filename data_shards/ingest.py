"""Ingest extxyz(.gz), ASE db, ANI-style HDF5, SPICE HDF5, ASE-LMDB and MD17 npz files into a store, validating
every frame.

`energy` maps a fidelity to the key holding its energy (atoms.info key, db key_value_pairs/data key, HDF5
dataset or npz array); `forces` maps a fidelity to the per-atom key holding its forces. The keys 'energy'
and 'forces' also find ASE calculator results (extxyz stores those there). A frame without a mapped key
gets NaN (a missing label). Energies are converted from `energy_unit` (default: the format's own unit, see
`sources.DEFAULT_ENERGY_UNIT`) to eV, lengths from `length_unit` (default: the format's own, Bohr for SPICE,
else Å) to Å, forces accordingly. `dataset` names the structures' dataset; `{KEY}` in it is filled from each
frame's text field KEY, so `'{subset}'` keeps SPICE's subsets apart (`sources.dataset_name`).

Any bad input raises `IngestError` naming the file, the frame and the field, and leaves nothing behind:
a new store is never created, an existing one is left exactly as it was. Three ways to run: serial
(default; `parallel.ingest_serial`), `workers > 1` (Ray tasks, one per output shard; `parallel.py`), and
`merge_on` (labels for the same structures from several sources merge into one row; `merge.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.parallel import ingest_parallel, ingest_serial
from polyfid.data_shards.schema import Fidelity, energy_factor, length_factor
from polyfid.data_shards.outliers import OutlierCheck, report
from polyfid.data_shards.sources import (DEFAULT_ENERGY_UNIT, DEFAULT_LENGTH_UNIT, Frame, IngestError, _selection,
                                         read_frames, scan_frames, source_format, split_spec)
from polyfid.data_shards.store import Store
from polyfid.data_shards.writer import StoreWriter, Structure, check_name

log = logging.getLogger("polyfid.ingest")

__all__ = ["Converter", "IngestError", "ingest", "read_frames"]
_META_FIELDS = {f.name for f in dataclasses.fields(Fidelity)} - {"name"}
MIN_DISTANCE = 0.1  # Å; closer atoms mean a broken frame (or a unit mix-up)


def _label(spec: str, i: int, key: str, value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """A present label as a finite float array of the expected shape, or an IngestError."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise IngestError(spec, i, key, f"not a number: {value!r}") from err
    if shape is not None and arr.shape != shape:
        raise IngestError(spec, i, key, f"has shape {arr.shape}, expected {shape}")
    if shape is None and arr.ndim != 0:
        raise IngestError(spec, i, key, f"expected one energy, got an array of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise IngestError(spec, i, key, "label is present but not finite (NaN or inf)")
    return arr


def _closest_pair(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                  limit: float) -> tuple[int, int, float] | None:
    """The first pair of atoms closer than `limit` (minimum image where periodic), or None."""
    n = len(positions)
    if n < 2 or limit <= 0:
        return None
    if not pbc.any() and n <= 512:
        d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
        d[np.diag_indices(n)] = np.inf
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return (int(min(i, j)), int(max(i, j)), float(d[i, j])) if d[i, j] < limit else None
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    ii, jj, dd = neighbor_list("ijd", Atoms(positions=positions, cell=cell, pbc=pbc), limit)
    if len(dd) == 0:
        return None
    k = int(np.argmin(dd))
    return int(ii[k]), int(jj[k]), float(dd[k])


@dataclasses.dataclass
class Converter:
    """Turns one input frame into a validated Structure in eV, Å and eV/Å (picklable, for Ray tasks)."""

    energy: dict[str, str]
    forces: dict[str, str]
    energy_unit: str | None = None  # None: each file's format default
    length_unit: str | None = None  # None: each file's format default (Bohr for SPICE, else Å)
    min_distance: float = MIN_DISTANCE

    def unit(self, spec: str) -> str:
        """The energy unit of an input: the one given, else its format's published unit."""
        return self.energy_unit or DEFAULT_ENERGY_UNIT[source_format(split_spec(spec)[0])]

    def length(self, spec: str) -> str:
        """The length unit of an input: the one given, else its format's published unit."""
        return self.length_unit or DEFAULT_LENGTH_UNIT.get(source_format(split_spec(spec)[0]), "angstrom")

    def __call__(self, spec: str, i: int, frame: Frame) -> Structure:
        e_factor, l_factor = energy_factor(self.unit(spec)), length_factor(self.length(spec))
        if frame.where:
            spec = f"{spec}:{frame.where}"
        z = np.asarray(frame.numbers, dtype=np.int64)
        if z.size == 0:
            raise IngestError(spec, i, "numbers", "frame has no atoms")
        bad = z[(z < 1) | (z > 118)]
        if bad.size:
            raise IngestError(spec, i, "numbers", f"unknown element Z={int(bad[0])} (allowed 1..118)")
        n = z.size
        positions = np.asarray(frame.positions, dtype=np.float64) * l_factor
        cell = np.asarray(frame.cell, dtype=np.float64) * l_factor
        if positions.shape != (n, 3):
            raise IngestError(spec, i, "positions", f"has shape {positions.shape}, expected ({n}, 3)")
        if not np.all(np.isfinite(positions)):
            raise IngestError(spec, i, "positions", "positions are not finite")
        if not np.all(np.isfinite(cell)):
            raise IngestError(spec, i, "cell", "cell is not finite")
        pbc = np.asarray(frame.pbc, dtype=bool)
        close = _closest_pair(positions, cell, pbc, self.min_distance)
        if close is not None:
            a, b, d = close
            raise IngestError(spec, i, "positions", f"atoms {a} and {b} are {d:.4f} Å apart, closer than "
                              f"min_distance={self.min_distance} Å")
        energies = {fid: float(_label(spec, i, key, frame.scalars[key], None)) * e_factor
                    for fid, key in self.energy.items() if frame.scalars.get(key) is not None}
        frc = {fid: _label(spec, i, key, frame.arrays[key], (n, 3)) * (e_factor / l_factor)
               for fid, key in self.forces.items() if frame.arrays.get(key) is not None}
        return Structure(z, positions, cell, pbc, energies, frc)


def _fidelities(out: str, names: Sequence[str], append: bool, ranks: Mapping[str, int],
                meta: Mapping[str, Mapping], unit: str, file: str) -> list[Fidelity]:
    """Fidelity records for the mapped names: the store's own where it has them, updated by ranks/meta."""
    existing: dict[str, Fidelity] = {}
    if append:
        try:
            existing = {f.name: f for f in Store.open(out).fidelities}
        except FileNotFoundError:
            pass
    for fid in list(ranks) + list(meta):
        if fid not in names:
            raise IngestError(file, None, "ranks/fidelity_meta", f"fidelity {fid!r} is not in energy/forces")
    fids = []
    for fid in names:
        try:
            check_name("fidelity", fid)
        except ValueError as err:
            raise IngestError(file, None, "energy/forces", str(err)) from err
        extra = dict(meta.get(fid, {}))
        unknown = set(extra) - _META_FIELDS
        if unknown:
            raise IngestError(file, None, "fidelity_meta", f"unknown keys {sorted(unknown)} for {fid!r}; "
                              f"allowed: {sorted(_META_FIELDS)}")
        if fid in ranks:
            extra["rank"] = int(ranks[fid])
        base = existing.get(fid, Fidelity(fid, source_unit=unit))
        fids.append(dataclasses.replace(base, **extra))
    return fids


def ingest(inputs: Sequence[str], out: str, dataset: str, energy: Mapping[str, str],
           forces: Mapping[str, str] | None = None, ranks: Mapping[str, int] | None = None,
           energy_unit: str | None = None, append: bool = False, shard_size: int = 50_000,
           fidelity_meta: Mapping[str, Mapping] | None = None, progress: bool = True,
           length_unit: str | None = None, min_distance: float = MIN_DISTANCE, merge_on: str | None = None,
           workers: int = 1, outliers: str | OutlierCheck = "warn") -> Store:
    """Read the inputs, convert to eV/Å, and write (or append) one dataset into the store at `out`.

    Label outliers (outliers.py) are then flagged: `outliers` is "warn" (default), "drop", "error" or an
    OutlierCheck with its own thresholds."""
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    first = inputs[0] if inputs else "<no inputs>"
    if not inputs:
        raise IngestError(first, None, "inputs", "no input files given")
    conv = Converter(dict(energy), dict(forces or {}), energy_unit, length_unit, float(min_distance))
    for spec in inputs:  # fail on a bad unit or a missing file before writing anything
        try:
            energy_factor(conv.unit(spec))
        except ValueError as err:
            raise IngestError(spec, None, "energy_unit", str(err)) from err
        if not os.path.exists(split_spec(spec)[0]):
            raise IngestError(spec, None, "path", "no such file")
        try:
            length_factor(conv.length(spec))
        except ValueError as err:
            raise IngestError(spec, None, "length_unit", str(err)) from err
    try:
        check = outliers if isinstance(outliers, OutlierCheck) else OutlierCheck(str(outliers))
    except ValueError as err:
        raise IngestError(first, None, "outliers", str(err)) from err
    names = list(dict.fromkeys(list(conv.energy) + list(conv.forces)))
    if not names:
        raise IngestError(first, None, "energy", "map at least one fidelity to an energy or forces key")
    fids = _fidelities(out, names, append, dict(ranks or {}), dict(fidelity_meta or {}), conv.unit(first), first)
    try:
        check_name("dataset", dataset)
    except ValueError as err:
        raise IngestError(first, None, "dataset", str(err)) from err
    how = None
    if merge_on and ("{" in dataset or "}" in dataset):
        raise IngestError(first, None, "dataset", "a per-frame dataset template is not supported with merge_on")
    if merge_on:
        from polyfid.data_shards.merge import parse_merge_on

        how = parse_merge_on(merge_on, first)
    old = Store.open(out) if append and merge_on and _is_store(out) else None
    from tqdm.auto import tqdm

    try:
        writer = StoreWriter(out, fids, shard_size=shard_size, append=append)
    except (ValueError, FileExistsError) as err:
        raise IngestError(first, None, "out", str(err)) from err
    first_id = writer.next_id
    with writer:
        # disable=None: no bar when stderr is not a terminal (a log file gets the summary line, not \r updates)
        bar = tqdm(desc=f"ingest {dataset}", unit="frame", disable=None if progress else True)
        record: dict[str, Any] = {}
        try:
            if how is not None:
                from polyfid.data_shards.merge import ingest_merged

                record = ingest_merged(writer, old, inputs, conv, dataset, how, bar)
                total = record["n_frames"]
            elif workers > 1:
                total, stats = ingest_parallel(writer, inputs, conv, dataset, workers, bar)
                record = {"parallel": stats} if stats else {}
            else:
                total = ingest_serial(writer, inputs, conv, dataset, bar)
        finally:
            bar.close()
        if how is None:  # merged labels are checked per source as they are merged, not here
            record["outliers"] = _screen(writer, check, inputs, first_id)
        writer.add_provenance({"dataset": dataset, "inputs": inputs, "n_structures": total,
                               "energy_unit": {spec: conv.unit(spec) for spec in inputs},
                               "length_unit": {spec: conv.length(spec) for spec in inputs},
                               "energy_keys": dict(conv.energy), "forces_keys": dict(conv.forces),
                               "min_distance": conv.min_distance,
                               "merge_on": merge_on, **record})
    return Store.open(out)


def _screen(writer: StoreWriter, check: OutlierCheck, inputs: Sequence[str], first_id: int) -> dict[str, Any]:
    """Flag the label outliers of what this ingest wrote; warn, drop or refuse as `check.policy` says."""
    found = writer.screen(check, source=_source_namer(inputs, first_id))
    if found and check.policy == "error":
        o = found[0]
        file, _, frame = o.source.rpartition("@")
        raise IngestError(file or o.source, int(frame) if frame.isdigit() else None, f"{o.kind}/{o.fidelity}",
                          f"{len(found)} label outlier(s), the first: {o.describe()} (--outliers warn or drop to go on)")
    if found:
        shown = "\n  ".join(o.describe() for o in found[:20])
        more = f"\n  … and {len(found) - 20} more (all in the store's provenance)" if len(found) > 20 else ""
        action = "their labels are masked (read as missing)" if check.policy == "drop" else "kept (--outliers drop masks them)"
        log.warning("%d label outlier(s) at ingest; %s:\n  %s%s", len(found), action, shown, more)
    return report(found, check.policy)


def _source_namer(inputs: Sequence[str], first_id: int):
    """structure id → 'file@frame' for the structures of this ingest (in input order, frames as selected)."""
    sizes: list[tuple[str, range]] = []

    def name(sid: int) -> str:
        if not sizes:
            for spec in inputs:
                path, index = split_spec(spec)
                sizes.append((path, _selection(index, scan_frames(path)[0])))
        k = sid - first_id
        for path, sel in sizes:
            if 0 <= k < len(sel):
                return f"{path}@{sel[k]}"
            k -= len(sel)
        return f"structure {sid}"

    return name


def _is_store(out: str) -> bool:
    try:
        Store.open(out)
        return True
    except (FileNotFoundError, ValueError):
        return False

"""Ingest extxyz (also .gz) and ASE db files into a store, converting units and validating every frame.

`energy` maps a fidelity to the atoms.info key (or db key_value_pairs/data key) holding its energy;
`forces` maps a fidelity to the atoms.arrays (or db data) key holding its forces. The keys 'energy' and
'forces' also find ASE calculator results (extxyz stores those there). A frame without a mapped key gets
NaN (a missing label). Any bad input raises `IngestError` naming the file, the frame and the field, and
leaves nothing behind: a new store is removed, an existing one is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.schema import Fidelity, energy_factor, length_factor
from polyfid.data_shards.store import Store
from polyfid.data_shards.writer import StoreWriter, Structure, check_name

_META_FIELDS = {f.name for f in dataclasses.fields(Fidelity)} - {"name"}


class IngestError(ValueError):
    """A bad input; the message names the file, the frame index and the field."""

    def __init__(self, file: str, index: int | None, field: str, message: str) -> None:
        where = f"frame {index}" if index is not None else "(no frame)"
        super().__init__(f"{file}: {where}: field {field!r}: {message}")
        self.file, self.index, self.field = file, index, field


@dataclasses.dataclass
class _Frame:
    """One input frame in a source-neutral form: geometry plus the scalar and per-atom fields found."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    scalars: Mapping[str, Any]
    arrays: Mapping[str, Any]


def _split_spec(spec: str) -> tuple[str, Any]:
    """'file@0:80' -> ('file', slice(0, 80)); ASE's own parser, so the syntax is ASE's."""
    from ase.io.formats import parse_filename

    name, index = parse_filename(spec)
    return str(name), (slice(None) if index is None else index)


def _absolute(index: Any, i: int) -> int:
    """Index in the file of the i-th selected frame, where the selection makes that easy."""
    if isinstance(index, int):
        return index
    start, step = index.start or 0, index.step or 1
    return start + i * step if start >= 0 and step > 0 else i


def _from_atoms(atoms: Any) -> _Frame:
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    scalars = {k: v for k, v in results.items() if np.ndim(v) == 0} | dict(atoms.info)
    arrays = {k: v for k, v in results.items() if np.ndim(v) == 2} | dict(atoms.arrays)
    return _Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell.array), atoms.pbc, scalars, arrays)


def _from_row(row: Any) -> _Frame:
    atoms = row.toatoms()
    data = dict(row.get("data", {}) or {})
    scalars = {k: v for k, v in data.items() if np.ndim(v) == 0} | dict(row.key_value_pairs)
    arrays = {k: v for k, v in data.items() if np.ndim(v) == 2}
    for key in ("energy", "free_energy"):
        if row.get(key) is not None:
            scalars.setdefault(key, row.get(key))
    if row.get("forces") is not None:
        arrays.setdefault("forces", row.get("forces"))
    return _Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell.array), atoms.pbc, scalars, arrays)


def read_frames(spec: str) -> Iterator[tuple[int, _Frame]]:
    """(index in file, frame) for an extxyz/ASE-readable file or an ASE .db, honouring ASE's '@slice'."""
    path, index = _split_spec(spec)
    if not os.path.exists(path):
        raise IngestError(spec, None, "path", "no such file")
    if path.endswith(".db"):
        import ase.db

        with ase.db.connect(path) as db:
            ids = [row.id for row in db.select(include_data=False)]
            chosen = [ids[index]] if isinstance(index, int) else ids[index]
            for i, row_id in enumerate(chosen):
                yield _absolute(index, i), _from_row(db.get(id=row_id))
        return
    import ase.io

    frames = ase.io.iread(path, index=index)
    i = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as err:  # a parse error from ASE
            if i == 0 and "Empty file" in str(err):
                raise IngestError(spec, None, "frames", "input is empty (no frames)") from err
            raise IngestError(spec, _absolute(index, i), "format", f"cannot parse: {err}") from err
        yield _absolute(index, i), _from_atoms(atoms)
        i += 1


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


def to_structure(spec: str, i: int, frame: _Frame, energy: Mapping[str, str], forces: Mapping[str, str],
                 e_factor: float, l_factor: float) -> Structure:
    """Validate one frame and convert it to a Structure in eV, Å and eV/Å."""
    z = np.asarray(frame.numbers, dtype=np.int64)
    if z.size == 0:
        raise IngestError(spec, i, "numbers", "frame has no atoms")
    bad = z[(z < 1) | (z > 118)]
    if bad.size:
        raise IngestError(spec, i, "numbers", f"unknown element Z={int(bad[0])} (allowed 1..118)")
    n = z.size
    positions = np.asarray(frame.positions, dtype=np.float64) * l_factor
    cell = np.asarray(frame.cell, dtype=np.float64) * l_factor
    if not np.all(np.isfinite(positions)):
        raise IngestError(spec, i, "positions", "positions are not finite")
    if not np.all(np.isfinite(cell)):
        raise IngestError(spec, i, "cell", "cell is not finite")
    energies = {fid: float(_label(spec, i, key, frame.scalars[key], None)) * e_factor
                for fid, key in energy.items() if frame.scalars.get(key) is not None}
    frc = {fid: _label(spec, i, key, frame.arrays[key], (n, 3)) * (e_factor / l_factor)
           for fid, key in forces.items() if frame.arrays.get(key) is not None}
    return Structure(z, positions, cell, np.asarray(frame.pbc, dtype=bool), energies, frc)


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
           energy_unit: str = "eV", append: bool = False, shard_size: int = 50_000,
           fidelity_meta: Mapping[str, Mapping] | None = None, progress: bool = True,
           length_unit: str = "angstrom") -> Store:
    """Read the inputs, convert to eV/Å, and write (or append) one dataset into the store at `out`."""
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    first = inputs[0] if inputs else "<no inputs>"
    if not inputs:
        raise IngestError(first, None, "inputs", "no input files given")
    forces = dict(forces or {})
    try:
        e_factor = energy_factor(energy_unit)
    except ValueError as err:
        raise IngestError(first, None, "energy_unit", str(err)) from err
    try:
        l_factor = length_factor(length_unit)
    except ValueError as err:
        raise IngestError(first, None, "length_unit", str(err)) from err
    names = list(dict.fromkeys(list(energy) + list(forces)))
    if not names:
        raise IngestError(first, None, "energy", "map at least one fidelity to an energy or forces key")
    fids = _fidelities(out, names, append, dict(ranks or {}), dict(fidelity_meta or {}), energy_unit, first)
    try:
        check_name("dataset", dataset)
    except ValueError as err:
        raise IngestError(first, None, "dataset", str(err)) from err
    for spec in inputs:  # fail on a missing file before writing anything
        if not os.path.exists(_split_spec(spec)[0]):
            raise IngestError(spec, None, "path", "no such file")
    from tqdm.auto import tqdm

    with StoreWriter(out, fids, shard_size=shard_size, append=append) as writer:
        bar = tqdm(desc=f"ingest {dataset}", unit="frame", disable=not progress)
        total = 0
        try:
            for spec in inputs:
                count = 0
                for i, frame in read_frames(spec):
                    s = to_structure(spec, i, frame, energy, forces, e_factor, l_factor)
                    writer.add([s], dataset)
                    count += 1
                    bar.update(1)
                if count == 0:
                    raise IngestError(spec, None, "frames", "input is empty (no frames selected)")
                total += count
        finally:
            bar.close()
        writer.add_provenance({"dataset": dataset, "inputs": inputs, "n_structures": total,
                               "energy_unit": energy_unit, "length_unit": length_unit,
                               "energy_keys": dict(energy), "forces_keys": forces})
    return Store.open(out)

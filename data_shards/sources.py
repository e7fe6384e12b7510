"""Input formats, read into one source-neutral frame: extxyz(.gz), ASE db, ANI-style HDF5, SPICE HDF5, ASE-LMDB,
MD17/rMD17 npz.

Every reader yields (index in file, `Frame`) and honours ASE's `path@slice` syntax. The energy unit each
format is published in is `DEFAULT_ENERGY_UNIT[format]` (ANI and SPICE: Hartree; MD17: kcal/mol), the
length unit `DEFAULT_LENGTH_UNIT.get(format, "angstrom")` (SPICE: Bohr). The readers pass values on in the
file's own units; `ingest.Converter` converts them.

- **ANI HDF5** (ANI-1x, ANI-1ccx, ANI-2x): any group holding `coordinates` [C, n, 3] and `atomic_numbers`
  [n] (or `species`, element symbols) is a molecule with C conformers; its other datasets with C rows are
  labels: 1-D ones (`wb97x_dz.energy`) energies, [C, n, 3] ones (`wb97x_dz.forces`) forces. Frames are
  numbered across groups in the order h5py lists them (by name). NaN is ANI's own "not computed" marker,
  so a NaN energy (or an all-NaN forces block) there is a missing label, not an error; inf still is.
- **SPICE HDF5** (SPICE 1/2, MACE-OFF's training data): an `.h5`/`.hdf5` file whose first group holds
  `conformations` (the format is told from the content; ANI files hold `coordinates`). One group per
  molecule: `atomic_numbers` [n], `conformations` [C, n, 3] (Bohr), and per-conformation datasets such as
  `dft_total_energy` [C] (Hartree) and `dft_total_gradient` [C, n, 3] (Hartree/Bohr). Labels are keyed by
  their dataset names: 1-D ones are energies, [C, n, 3] ones per-atom arrays, and a `*_gradient` dataset
  is read as **forces, its negative**, so `forces=dft_total_gradient` gives -dE/dR. The string datasets
  (`smiles`, `subset`) are text fields of every conformation (for `ingest`'s `--dataset '{subset}'`). A
  float label with another row count than `conformations` is refused; NaN is not a missing marker here (an
  error when mapped). Groups are read one at a time, frames numbered across groups as h5py lists them.
- **ASE-LMDB** (`.aselmdb`, fairchem's format: OMol25, OMat24, OC20...): read with fairchem's own backend,
  `ase-db-backends`' `LMDBDatabase`, read-only. Frame j is the j-th row in id order (as for `.db`); the
  keys are those of an ASE db row: `energy`/`forces` (its calculator results), `key_value_pairs`, and
  `data` (scalars as energies, [n, 3] arrays as forces, strings as text fields).
- **MD17 / rMD17 npz**: `nuclear_charges` (or `z`), `coords` (or `R`), and per-frame labels such as
  `energies`/`forces` (or `E`/`F`).
"""

from __future__ import annotations

import array
import dataclasses
import functools
import gzip
import io
import os
import shutil
import string
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

DEFAULT_ENERGY_UNIT = {"extxyz": "eV", "db": "eV", "ani-h5": "hartree", "md17-npz": "kcal/mol",
                       "spice-h5": "hartree", "aselmdb": "eV"}
DEFAULT_LENGTH_UNIT = {"spice-h5": "bohr"}  # every other format: angstrom


class IngestError(ValueError):
    """A bad input; the message names the file, the frame index and the field."""

    def __init__(self, file: str, index: int | None, field: str, message: str) -> None:
        where = f"frame {index}" if index is not None else "(no frame)"
        super().__init__(f"{file}: {where}: field {field!r}: {message}")
        self.file, self.index, self.field, self.message = file, index, field, message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so Ray tasks can hand it back
        return (IngestError, (self.file, self.index, self.field, self.message))


@dataclasses.dataclass
class Frame:
    """One input frame in a source-neutral form: geometry plus the scalar and per-atom fields found."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    scalars: Mapping[str, Any]
    arrays: Mapping[str, Any]
    where: str = ""  # extra location inside the file (an HDF5 group), for error messages


def split_spec(spec: str) -> tuple[str, Any]:
    """'file@0:80' -> ('file', slice(0, 80)); ASE's own parser, so the syntax is ASE's."""
    from ase.io.formats import parse_filename

    name, index = parse_filename(spec)
    return str(name), (slice(None) if index is None else index)


def source_format(path: str) -> str:
    """The format of an input file: ani-h5 or spice-h5 (by content), md17-npz, db, aselmdb or extxyz (anything
    ASE reads), from its name."""
    low = path.lower()
    if low.endswith((".h5", ".hdf5")):
        try:
            st = os.stat(path)
        except OSError:
            return "ani-h5"
        return "spice-h5" if _is_spice(os.path.abspath(path), st.st_mtime_ns, st.st_size) else "ani-h5"
    if low.endswith(".npz"):
        return "md17-npz"
    if low.endswith(".db"):
        return "db"
    if low.endswith(".aselmdb"):
        return "aselmdb"
    return "extxyz"


@functools.lru_cache(maxsize=256)
def _is_spice(path: str, mtime_ns: int, size: int) -> bool:
    """Whether an HDF5 file is SPICE-style: its first group holds `conformations` (cached per file version)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            for name in f:
                if hasattr(f[name], "keys"):
                    return "conformations" in f[name]
    except OSError:
        pass  # unreadable: the reader says so
    return False


def dataset_name(template: str, spec: str, i: int, frame: Frame) -> str:
    """A frame's dataset: `template` with each `{KEY}` filled from the frame's text field KEY (SPICE: `subset`).

    A template without braces is the name itself; `{{` and `}}` are literal braces.
    """
    if "{" not in template and "}" not in template:
        return template
    where = f"{spec}:{frame.where}" if frame.where else spec
    try:
        keys = [key for _, key, _, _ in string.Formatter().parse(template) if key is not None]
    except ValueError as err:
        raise IngestError(where, i, "dataset", f"bad dataset template {template!r}: {err}") from err
    values = {}
    for key in keys:
        value = frame.scalars.get(key)
        if isinstance(value, bytes):
            value = value.decode()
        if not isinstance(value, str) or not value.strip():
            texts = sorted(k for k, v in frame.scalars.items() if isinstance(v, (str, bytes)))
            raise IngestError(where, i, key, f"the dataset template {template!r} needs a text field {key!r}; "
                              f"this frame's text fields are {texts}")
        values[key] = value
    return template.format_map(values)


def _absolute(index: Any, i: int) -> int:
    """Index in the file of the i-th selected frame, where the selection makes that easy."""
    if isinstance(index, int):
        return index
    start, step = index.start or 0, index.step or 1
    return start + i * step if start >= 0 and step > 0 else i


def _selection(index: Any, n: int) -> range:
    """The selected frame indices out of n, as a range."""
    return range(n)[index : index + 1 if index != -1 else None] if isinstance(index, int) else range(n)[index]


def _no_zero(spec: str, n: int) -> None:
    if n == 0:
        raise IngestError(spec, None, "frames", "input is empty (no frames)")


def _from_atoms(atoms: Any) -> Frame:
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    scalars = {k: v for k, v in results.items() if np.ndim(v) == 0} | dict(atoms.info)
    arrays = {k: v for k, v in results.items() if np.ndim(v) == 2} | dict(atoms.arrays)
    return Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell.array), atoms.pbc, scalars, arrays)


def _from_row(row: Any) -> Frame:
    atoms = row.toatoms()
    data = dict(row.get("data", {}) or {})
    scalars = {k: v for k, v in data.items() if np.ndim(v) == 0} | dict(row.key_value_pairs)
    arrays = {k: v for k, v in data.items() if np.ndim(v) == 2}
    for key in ("energy", "free_energy"):
        if row.get(key) is not None:
            scalars.setdefault(key, row.get(key))
    if row.get("forces") is not None:
        arrays.setdefault("forces", row.get("forces"))
    return Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell.array), atoms.pbc, scalars, arrays)


def _molecule(numbers: Any, coords: np.ndarray, scalars: dict, arrays: dict, where: str = "") -> Frame:
    return Frame(numbers, coords, np.zeros((3, 3)), np.zeros(3, dtype=bool), scalars, arrays, where)


def _species(spec: str, i: int, group: str, raw: np.ndarray) -> np.ndarray:
    """Atomic numbers from ANI `atomic_numbers` or `species` (element symbols)."""
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    from ase.data import atomic_numbers

    out = []
    for s in raw:
        sym = s.decode() if isinstance(s, bytes) else str(s)
        if sym not in atomic_numbers or atomic_numbers[sym] == 0:
            raise IngestError(f"{spec}:{group}", i, "species", f"unknown element {sym!r}")
        out.append(atomic_numbers[sym])
    return np.array(out, dtype=np.int64)


def _ani_groups(f: Any) -> list[Any]:
    groups: list[Any] = []
    f.visititems(lambda name, obj: groups.append(obj) if hasattr(obj, "keys") and "coordinates" in obj else None)
    return groups


def _read_ani(spec: str, path: str, index: Any) -> Iterator[tuple[int, Frame]]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise IngestError(spec, None, "format", f"not a readable HDF5 file: {err}") from err
    with f:
        groups = _ani_groups(f)
        sizes = [int(g["coordinates"].shape[0]) for g in groups]
        _no_zero(spec, sum(sizes))
        chosen = _selection(index, sum(sizes))
        base = 0
        for g, c in zip(groups, sizes):
            lo, hi = base, base + c
            base = hi
            if not any(i in chosen for i in range(lo, hi)):
                continue
            zkey = "atomic_numbers" if "atomic_numbers" in g else "species"
            if zkey not in g:
                raise IngestError(f"{spec}:{g.name}", lo, "atomic_numbers", "group has neither atomic_numbers "
                                  "nor species")
            z = _species(spec, lo, g.name, np.asarray(g[zkey][...]))
            coords = np.asarray(g["coordinates"][...])
            labels = {k: np.asarray(g[k][...]) for k in g.keys()
                      if k not in ("coordinates", zkey) and hasattr(g[k], "shape") and g[k].shape[:1] == (c,)}
            for j in range(c):
                if lo + j not in chosen:
                    continue
                scalars = {k: v[j] for k, v in labels.items() if v.ndim == 1 and not np.isnan(v[j])}
                arrays = {k: v[j] for k, v in labels.items() if v.ndim == 3 and not np.isnan(v[j]).all()}
                yield lo + j, _molecule(z, coords[j], scalars, arrays, g.name)


def _text(dataset: Any) -> str:
    value = np.asarray(dataset[()]).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _spice_groups(spec: str, f: Any, index: Any) -> Iterator[tuple[Any, int, list[int], dict[str, str]]]:
    """(group, index of its first frame, its selected conformations, its text fields) for each SPICE molecule
    with a selected conformation, opening one group at a time."""
    names = [name for name in f if hasattr(f[name], "keys")]
    sizes = []
    for name in names:
        if "conformations" not in f[name]:
            raise IngestError(f"{spec}:/{name}", None, "conformations", "SPICE molecule group has no conformations")
        sizes.append(int(f[name]["conformations"].shape[0]))
    _no_zero(spec, sum(sizes))
    chosen = _selection(index, sum(sizes))
    if len(chosen) == 0:
        return
    first, last = min(chosen[0], chosen[-1]), max(chosen[0], chosen[-1])
    hi = 0
    for name, c in zip(names, sizes):
        lo, hi = hi, hi + c
        if hi <= first or lo > last:
            continue
        js = [j for j in range(c) if lo + j in chosen]
        if js:
            g = f[name]
            texts = {k: _text(d) for k, d in g.items() if hasattr(d, "dtype") and d.dtype.kind in "SOU" and d.size}
            yield g, lo, js, texts


def _spice_arrays(where: str, lo: int, g: Any) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A SPICE molecule's atomic numbers, conformations and labels (1-D and [C, n, 3] float datasets)."""
    if "atomic_numbers" not in g:
        raise IngestError(where, lo, "atomic_numbers", "SPICE molecule group has no atomic_numbers")
    c = int(g["conformations"].shape[0])
    labels = {}
    try:
        for k, d in g.items():
            if k in ("atomic_numbers", "conformations") or not hasattr(d, "dtype") or d.dtype.kind not in "fiu":
                continue
            if d.ndim in (1, 3) and d.shape[0] != c:
                raise IngestError(where, lo, k, f"has shape {d.shape}; a SPICE label has one row per "
                                  f"conformation ({c})")
            if d.ndim in (1, 3):
                labels[k] = np.asarray(d[...])
        return np.asarray(g["atomic_numbers"][...]), np.asarray(g["conformations"][...]), labels
    except (OSError, KeyError, RuntimeError) as err:  # a damaged dataset
        raise IngestError(where, lo, "format", f"cannot read the group: {err}") from err


def _read_spice(spec: str, path: str, index: Any) -> Iterator[tuple[int, Frame]]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise IngestError(spec, None, "format", f"not a readable HDF5 file: {err}") from err
    with f:
        for g, lo, js, texts in _spice_groups(spec, f, index):
            where = f"{spec}:{g.name}"
            z, coords, labels = _spice_arrays(where, lo, g)
            for j in js:
                scalars = {k: v[j] for k, v in labels.items() if v.ndim == 1} | texts
                arrays = {k: -v[j] if k.endswith("_gradient") else v[j] for k, v in labels.items() if v.ndim == 3}
                yield lo + j, _molecule(z, coords[j], scalars, arrays, g.name)


def _open_aselmdb(spec: str, path: str) -> Any:
    import lmdb
    from ase_db_backends.aselmdb import LMDBDatabase

    try:  # checked with lmdb first: a failed LMDBDatabase() retries the open in its __del__ and prints noise
        with lmdb.open(path, subdir=False, readonly=True, lock=False) as env:
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except lmdb.Error as err:
        raise IngestError(spec, None, "format", f"not a readable ASE-LMDB file: {err}") from err
    if os.path.getsize(path) < need:  # reading a page past the end of the map would kill the process (SIGBUS)
        raise IngestError(spec, None, "format", f"truncated ASE-LMDB file: {os.path.getsize(path)} bytes, its "
                          f"pages need {need}")
    return LMDBDatabase(path, readonly=True, use_lock_file=False)


def _read_aselmdb(spec: str, path: str, index: Any) -> Iterator[tuple[int, Frame]]:
    db = _open_aselmdb(spec, path)
    try:
        ids = list(db.ids)
        _no_zero(spec, len(ids))
        for j in _selection(index, len(ids)):
            try:
                row = db.get(id=ids[j])
            except Exception as err:  # a missing or corrupt entry
                raise IngestError(spec, j, "format", f"cannot read row id {ids[j]}: {err}") from err
            yield j, _from_row(row)
    finally:
        db.close()


def _read_npz(spec: str, path: str, index: Any) -> Iterator[tuple[int, Frame]]:
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as err:
        raise IngestError(spec, None, "format", f"not a readable npz file: {err}") from err
    zkey = next((k for k in ("nuclear_charges", "z") if k in data), None)
    rkey = next((k for k in ("coords", "R") if k in data), None)
    if zkey is None or rkey is None:
        raise IngestError(spec, None, "nuclear_charges" if zkey is None else "coords",
                          f"MD17 npz needs nuclear_charges/z and coords/R; found {sorted(data)}")
    coords = data[rkey]
    if coords.ndim != 3 or coords.shape[2] != 3:
        raise IngestError(spec, None, rkey, f"expected [frames, atoms, 3], got shape {coords.shape}")
    n = coords.shape[0]
    _no_zero(spec, n)
    labels = {}
    for k, v in data.items():
        if k in (zkey, rkey) or v.ndim == 0 or v.shape[0] != n:
            continue
        labels[k] = v[:, 0] if v.ndim == 2 and v.shape[1] == 1 else v  # MD17's E is [frames, 1]
    for j in _selection(index, n):
        scalars = {k: v[j] for k, v in labels.items() if v.ndim == 1}
        arrays = {k: v[j] for k, v in labels.items() if v.ndim >= 2}
        yield j, _molecule(data[zkey], coords[j], scalars, arrays)


def _read_db(spec: str, path: str, index: Any) -> Iterator[tuple[int, Frame]]:
    import ase.db

    with ase.db.connect(path) as db:
        ids = [row.id for row in db.select(include_data=False)]
        _no_zero(spec, len(ids))
        for j in _selection(index, len(ids)):
            yield j, _from_row(db.get(id=ids[j]))


def _seekable(path: str) -> Any:
    """A gzipped file decompressed into an anonymous temporary file, else the path itself.

    ASE's extxyz reader indexes the frames, then seeks back to each one; on a GzipFile every backward seek
    decompresses from the start again, so reading N frames costs O(N^2) (a 30k-frame file was unfinished
    after 20 minutes; `benchmarks/bench_gzip_read.py`). The temporary file is on disk, so memory stays
    bounded, and it is gone when the reader is."""
    if not path.endswith(".gz"):
        return path
    tmp = tempfile.TemporaryFile("w+")
    with gzip.open(path, "rt") as fh:
        shutil.copyfileobj(fh, tmp, 1 << 22)
    tmp.seek(0)
    return tmp


def _read_ase(spec: str, path: str, index: Any,
              span: tuple[int, int, int] | None = None) -> Iterator[tuple[int, Frame]]:
    import ase.io

    if span is None:
        fmt = "extxyz" if path.endswith((".xyz", ".extxyz", ".xyz.gz", ".extxyz.gz")) else None
        source: Any = _seekable(path) if fmt else path
    else:  # frames first.. of a plain extxyz, bytes [lo, hi) of the file (hi = -1: to its end)
        first, lo, hi = span
        with open(path, "rb") as fh:
            fh.seek(lo)
            source, fmt, index = io.StringIO(fh.read(-1 if hi < 0 else hi - lo).decode()), "extxyz", slice(first, None)
    frames = ase.io.iread(source, index=":" if span else index, format=fmt)
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


_READERS = {"ani-h5": _read_ani, "spice-h5": _read_spice, "md17-npz": _read_npz, "db": _read_db,
            "aselmdb": _read_aselmdb, "extxyz": _read_ase}


def read_frames(spec: str, span: tuple[int, int, int] | None = None) -> Iterator[tuple[int, Frame]]:
    """(index in file, frame) for any supported input, honouring ASE's '@slice'.

    `span` = (index of the first frame, first byte, end byte or -1) reads just that part of a plain extxyz
    file (from `scan_frames`' offsets), instead of letting ASE scan the file from its start.
    """
    path, index = split_spec(spec)
    if not os.path.exists(path):
        raise IngestError(spec, None, "path", "no such file")
    if os.path.getsize(path) == 0:
        raise IngestError(spec, None, "frames", "input is empty (file has 0 bytes)")
    if span is not None:
        yield from _read_ase(spec, path, index, span)
        return
    yield from _READERS[source_format(path)](spec, path, index)


def dataset_names(spec: str, template: str) -> list[str]:
    """The distinct datasets `template` gives an input's selected frames, in order of first appearance.

    SPICE reads just each group's text fields; other formats read the frames.
    """
    if "{" not in template and "}" not in template:
        return [template]
    path, index = split_spec(spec)
    if source_format(path) != "spice-h5":
        return list(dict.fromkeys(dataset_name(template, spec, i, frame) for i, frame in read_frames(spec)))
    import h5py

    with h5py.File(path, "r") as f:
        return list(dict.fromkeys(
            dataset_name(template, spec, lo + js[0], _molecule(np.zeros(0), np.zeros((0, 3)), texts, {}, g.name))
            for g, lo, js, texts in _spice_groups(spec, f, index)))


def scan_frames(path: str) -> tuple[int, np.ndarray | None]:
    """(frames in a file, byte offsets of their starts plus the end of the last, for a plain extxyz, else None).

    extxyz is scanned by its atom-count lines, without parsing; a malformed or truncated frame ends the
    count there (the parser says where, when it reads it).
    """
    fmt = source_format(path)
    if fmt == "ani-h5":
        import h5py

        with h5py.File(path, "r") as f:
            return sum(int(g["coordinates"].shape[0]) for g in _ani_groups(f)), None
    if fmt == "spice-h5":
        import h5py

        with h5py.File(path, "r") as f:
            return sum(int(g["conformations"].shape[0]) for g in f.values() if hasattr(g, "keys")
                       and "conformations" in g), None
    if fmt == "aselmdb":
        db = _open_aselmdb(path, path)
        try:
            return len(db.ids), None
        finally:
            db.close()
    if fmt == "md17-npz":
        with np.load(path) as data:
            return int(data["coords" if "coords" in data else "R"].shape[0]), None
    if fmt == "db":
        import ase.db

        with ase.db.connect(path) as db:
            return db.count(), None
    gz = path.endswith(".gz")
    starts = array.array("q")
    pos = end = 0
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        while line := fh.readline():
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                natoms = int(line)
            except ValueError:
                break  # malformed: the parser will say where
            for _ in range(natoms + 1):
                line = fh.readline()
                if not line:
                    break
                pos += len(line)
            if not line:
                break
            starts.append(start)
            end = pos
    n = len(starts)
    return n, None if gz or not n else np.append(np.frombuffer(starts, dtype=np.int64), end)

"""The generator's resumable result store: sampled structures per molecule, labels per level.

Layout under the corpus root (all committed, so a later session resumes from git):

- ``structures/<molecule>.npz``: atomic numbers, positions quantised to 1e-5 A (int32), sampler names,
  temperatures, scan values and the sampling CPU time. Written once, atomically.
- ``labels/<level>/seg-NNNN.npz``: append-only segments of labels keyed by content key
  sha1(level, Z, quantised positions). A segment is rewritten atomically (temporary name, then rename)
  while its run adds to it; every run starts a new segment, so committed segments never change.
  Failed calculations are stored as ``ok=False`` records: counted, never exported, never retried.

Forces are stored as int32 in units of 1e-6 eV/A, energies as float64 eV.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

POS_SCALE = 1e5  # positions are rounded to 1e-5 Angstrom
FORCE_SCALE = 1e6  # forces are stored to 1e-6 eV/Angstrom
SEGMENT_RECORDS = 5000


def quantise(positions: np.ndarray) -> np.ndarray:
    """Positions (A) as int32 multiples of 1e-5 A; the labels are computed on ``dequantise`` of these."""
    return np.round(np.asarray(positions) * POS_SCALE).astype(np.int32)


def dequantise(qpos: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantise`."""
    return np.asarray(qpos, dtype=np.float64) / POS_SCALE


def structure_hash(numbers: np.ndarray, qpos: np.ndarray) -> str:
    """Content hash of one structure (atomic numbers and quantised positions)."""
    h = hashlib.sha1(np.asarray(numbers, dtype=np.int16).tobytes())
    h.update(np.ascontiguousarray(qpos, dtype=np.int32).tobytes())
    return h.hexdigest()


def label_key(shash: str, level: str) -> str:
    """Content key of one label: the structure hash and the level."""
    return hashlib.sha1(f"{level}:{shash}".encode()).hexdigest()[:24]


def fractions(shash: str) -> tuple[float, float]:
    """Two independent uniform numbers from a structure hash: (level-subset fraction u, split fraction v)."""
    return int(shash[:13], 16) / 16.0 ** 13, int(shash[13:26], 16) / 16.0 ** 13


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class Structures:
    """All sampled structures of one molecule (one atom order)."""

    name: str
    numbers: np.ndarray  # [N]
    qpos: np.ndarray  # [S, N, 3] int32
    sampler: np.ndarray  # [S] str
    temperature: np.ndarray  # [S] K (0 where not thermal)
    scan_value: np.ndarray  # [S] A or degrees (NaN where not a scan)
    cpu_s: float
    _hashes: Optional[list[str]] = dataclasses.field(default=None, repr=False, compare=False)

    def hashes(self) -> list[str]:
        """Structure hash of each structure (computed once)."""
        if self._hashes is None:
            self._hashes = [structure_hash(self.numbers, q) for q in self.qpos]
        return self._hashes

    def save(self, root: Path) -> None:
        """Write ``structures/<name>.npz`` atomically."""
        _atomic_savez(root / "structures" / f"{self.name}.npz", numbers=self.numbers.astype(np.int16),
                      qpos=self.qpos.astype(np.int32), sampler=self.sampler.astype("U16"),
                      temperature=self.temperature.astype(np.float32),
                      scan_value=self.scan_value.astype(np.float32), cpu_s=np.float64(self.cpu_s))

    @classmethod
    def load(cls, root: Path, name: str) -> Optional["Structures"]:
        """The molecule's structures, or None when it has not been sampled yet."""
        path = root / "structures" / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path) as z:
            return cls(name, z["numbers"].astype(np.int64), z["qpos"], z["sampler"], z["temperature"],
                       z["scan_value"], float(z["cpu_s"]))


@dataclasses.dataclass
class Record:
    """One label (or one dropped failure) of one structure at one level."""

    key: str
    ok: bool
    energy: float  # eV (NaN when not ok)
    forces: Optional[np.ndarray]  # [N, 3] eV/A, or None
    cpu_s: float  # CPU seconds, retry included
    retried: bool
    error: str = ""


class LabelStore:
    """The labels of one level: loaded from all segments; new records go to this run's own segment."""

    def __init__(self, root: Path, level: str, segment_records: int = SEGMENT_RECORDS):
        self.dir = Path(root) / "labels" / level
        self.segment_records = segment_records
        self.records: dict[str, Record] = {}
        segs = sorted(self.dir.glob("seg-*.npz"))
        for seg in segs:
            for rec in _read_segment(seg):
                self.records[rec.key] = rec
        self._next = 1 + max((int(s.stem.split("-")[1]) for s in segs), default=-1)
        self._open: list[Record] = []  # records of the segment this run is writing
        self._dirty = False

    def get(self, key: str) -> Optional[Record]:
        """The stored record under ``key``, if any."""
        return self.records.get(key)

    def add(self, records: Iterable[Record]) -> None:
        """Add records (in memory until :meth:`flush`)."""
        for rec in records:
            self.records[rec.key] = rec
            self._open.append(rec)
            self._dirty = True

    def flush(self) -> None:
        """Write this run's open segment atomically; start a new one once it is full."""
        if not self._dirty:
            return
        _write_segment(self.dir / f"seg-{self._next:04d}.npz", self._open)
        self._dirty = False
        if len(self._open) >= self.segment_records:
            self._open, self._next = [], self._next + 1


def _write_segment(path: Path, recs: list[Record]) -> None:
    with_f = [r for r in recs if r.forces is not None]
    forces = (np.concatenate([r.forces for r in with_f]) if with_f else np.zeros((0, 3)))
    _atomic_savez(path, key=np.array([r.key for r in recs], dtype="S24"),
                  ok=np.array([r.ok for r in recs], dtype=bool),
                  energy=np.array([r.energy for r in recs], dtype=np.float64),
                  natoms_forces=np.array([0 if r.forces is None else len(r.forces) for r in recs],
                                         dtype=np.int16),
                  forces=np.round(forces * FORCE_SCALE).astype(np.int32),
                  cpu_s=np.array([r.cpu_s for r in recs], dtype=np.float32),
                  retried=np.array([r.retried for r in recs], dtype=bool),
                  error=np.array([r.error[:120] for r in recs], dtype="U120"))


def _read_segment(path: Path) -> list[Record]:
    with np.load(path) as z:
        nf = z["natoms_forces"].astype(np.int64)
        forces = z["forces"].astype(np.float64) / FORCE_SCALE
        starts = np.concatenate([[0], np.cumsum(nf)])
        return [Record(k.decode(), bool(ok), float(e), forces[starts[i]:starts[i + 1]] if nf[i] else None,
                       float(c), bool(rt), str(err))
                for i, (k, ok, e, c, rt, err) in enumerate(zip(z["key"], z["ok"], z["energy"], z["cpu_s"],
                                                                 z["retried"], z["error"]))]

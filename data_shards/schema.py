"""The contract between the store, the reader, the model and the trainer: fidelities, batch keys, units.

Every part of polyfid that hands data to another part uses the names defined here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypedDict

import numpy as np
from ase import units as ase_units

FORMAT_VERSION = 2  # 2: crc32c shard checksums (1: sha256, still read)

# ---- units ---------------------------------------------------------------------------------------
# Energies are stored in eV, forces in eV/Å, positions in Å. Ingest converts with these factors.
ENERGY_UNITS: dict[str, float] = {
    "ev": 1.0,
    "hartree": ase_units.Hartree,
    "ha": ase_units.Hartree,
    "kcal/mol": ase_units.kcal / ase_units.mol,
    "kj/mol": ase_units.kJ / ase_units.mol,
}
LENGTH_UNITS: dict[str, float] = {"angstrom": 1.0, "a": 1.0, "bohr": ase_units.Bohr}


def energy_factor(unit: str) -> float:
    """Factor that converts an energy in `unit` to eV; raises naming the allowed units."""
    key = unit.strip().lower()
    if key not in ENERGY_UNITS:
        raise ValueError(f"unknown energy unit {unit!r}; allowed: eV, hartree, kcal/mol, kJ/mol")
    return ENERGY_UNITS[key]


def length_factor(unit: str) -> float:
    """Factor that converts a length in `unit` to Å."""
    key = unit.strip().lower()
    if key not in LENGTH_UNITS:
        raise ValueError(f"unknown length unit {unit!r}; allowed: angstrom, bohr")
    return LENGTH_UNITS[key]


# ---- fidelities ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fidelity:
    """One level of theory. Two datasets at the same level share one Fidelity and so one head."""

    name: str
    rank: int = 0  # higher means more accurate
    method: str = ""
    basis: str = ""
    code: str = ""
    dispersion: str = ""
    source_unit: str = "eV"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fidelity":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _rank_key(f: Fidelity) -> tuple[int, str]:
    return f.rank, f.name


def highest_rank(fidelities: list[Fidelity]) -> Fidelity:
    """The most accurate fidelity (ties broken by name, for determinism)."""
    return max(fidelities, key=_rank_key)


def by_rank(fidelities: Iterable[Fidelity]) -> list[Fidelity]:
    """The fidelities from least to most accurate (ties broken by name, as in `highest_rank`)."""
    return sorted(fidelities, key=_rank_key)


# ---- batches -------------------------------------------------------------------------------------
class Batch(TypedDict):
    """A batch of structures as numpy arrays, as the reader yields it.

    S structures, A atoms in all, F fidelities (column order = the reader's fidelity list).
    A missing label is NaN here; the trainer turns NaN into a 0/1 mask.
    """

    atomic_numbers: np.ndarray  # int64 [A]
    positions: np.ndarray  # float64 [A, 3], Å
    cell: np.ndarray  # float64 [S, 3, 3], Å; zeros for a molecule
    pbc: np.ndarray  # bool [S, 3]
    n_atoms: np.ndarray  # int64 [S]
    structure_id: np.ndarray  # int64 [S], unique within a store (the ingest order)
    store: np.ndarray  # int64 [S], index of the store in the reader's list of stores
    dataset: np.ndarray  # int64 [S], index into the reader's dataset list
    energy: np.ndarray  # float64 [S, F], eV, NaN = missing
    forces: np.ndarray  # float64 [A, F, 3], eV/Å, NaN = missing


BATCH_KEYS = tuple(Batch.__annotations__)


def concat_batches(parts: list[Batch]) -> Batch:
    """Concatenate batches along the structure axis."""
    return Batch(**{k: np.concatenate([p[k] for p in parts], axis=0) for k in BATCH_KEYS})  # type: ignore[misc]

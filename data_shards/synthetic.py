"""Small synthetic structures and stores for tests and smoke runs (labels are arbitrary, not physics)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import Store
from polyfid.data_shards.writer import Structure, write_structures

MOLECULES = ("H2O", "CH4", "NH3", "C2H6", "CH3OH", "HCOOH", "C6H6", "CH3CH2OH")
# Per-element "reference energies" (eV) per fidelity index; synthetic energies are their sum plus noise.
_REFS = {1: -13.6, 6: -1027.0, 7: -1484.0, 8: -2040.0, 11: -4418.0, 17: -12522.0}


def random_atoms(n: int, seed: int = 0, jitter: float = 0.05, periodic_every: int = 0) -> list:
    """`n` ASE Atoms: g2 molecules with jittered positions; every k-th one a rattled NaCl cell if k > 0."""
    from ase.build import bulk, molecule

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if periodic_every and i % periodic_every == periodic_every - 1:
            atoms = bulk("NaCl", "rocksalt", a=5.64) * (1, 1, int(rng.integers(1, 3)))
        else:
            atoms = molecule(MOLECULES[int(rng.integers(len(MOLECULES)))])
        atoms.positions += rng.normal(scale=jitter, size=atoms.positions.shape)
        out.append(atoms)
    return out


def random_structures(n: int, seed: int = 0, energy_fidelities: Sequence[str] = ("lo", "hi"),
                      force_fidelities: Sequence[str] = ("lo",), missing: float = 0.25,
                      periodic_every: int = 5) -> list[Structure]:
    """Structures with energies at every fidelity (a `missing` fraction left out) and forces at some."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for atoms in random_atoms(n, seed, periodic_every=periodic_every):
        z = atoms.numbers
        energies = {}
        for j, fid in enumerate(energy_fidelities):
            if j == 0 or rng.random() >= missing:  # the first fidelity is always labelled
                energies[fid] = float(sum(_REFS[int(a)] * (1 + 0.01 * j) for a in z) + rng.normal(scale=0.1))
        forces = {fid: rng.normal(size=(len(z), 3)) for fid in force_fidelities}
        out.append(Structure(z.copy(), atoms.positions.copy(), np.asarray(atoms.cell.array, dtype=np.float64),
                             atoms.pbc.copy(), energies, forces))
    return out


def synthetic_store(path: str | os.PathLike, n: int = 64, seed: int = 0, shard_size: int = 16,
                    dataset: str = "synthetic", fidelities: Sequence[Fidelity] | None = None,
                    force_fidelities: Sequence[str] = ("lo",), append: bool = False) -> Store:
    """A store of `n` random structures (default fidelities: 'lo' rank 0 with forces, 'hi' rank 1)."""
    fids = list(fidelities or [Fidelity("lo", rank=0), Fidelity("hi", rank=1)])
    structs = random_structures(n, seed, [f.name for f in fids], force_fidelities)
    return write_structures(path, structs, fids, dataset, shard_size=shard_size, append=append)

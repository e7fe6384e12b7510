"""An atom graph: the model's input. Neighbour pairs come from vesin, periodic cells included.

Pairs are directed (i -> j and j -> i both present). The displacement of pair p is
    r_p = pos[pair_j[p]] - pos[pair_i[p]] + pair_shift[p]
so that autograd through `pos` gives forces, and `pair_shift` (cell shift @ cell) is a constant.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import torch
import vesin


@dataclasses.dataclass
class Graph:
    """A batch of structures as torch tensors plus their neighbour pairs."""

    z: torch.Tensor  # int64 [A] atomic numbers
    pos: torch.Tensor  # float [A, 3]
    batch: torch.Tensor  # int64 [A] index of the structure of each atom
    n_structures: int
    pair_i: torch.Tensor  # int64 [P]
    pair_j: torch.Tensor  # int64 [P]
    pair_shift: torch.Tensor  # float [P, 3], Å

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Graph":
        """Move to a device and/or cast the float tensors."""
        f = {"device": device, "dtype": dtype}
        return Graph(
            z=self.z.to(device=device),
            pos=self.pos.to(**f),
            batch=self.batch.to(device=device),
            n_structures=self.n_structures,
            pair_i=self.pair_i.to(device=device),
            pair_j=self.pair_j.to(device=device),
            pair_shift=self.pair_shift.to(**f),
        )


def neighbor_cells(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs (i, j, integer cell shift S) within `cutoff` for one structure; the shift vector is S @ cell."""
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not pbc.any():
        cell = np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s = nl.compute(points=positions, box=cell, periodic=[bool(p) for p in pbc], quantities="ijS")
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.int64)


def neighbor_pairs(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs (i, j, shift vector in Å) within `cutoff` for one structure."""
    i, j, s = neighbor_cells(positions, cell, pbc, cutoff)
    periodic = np.asarray(pbc, dtype=bool).any()
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3) if periodic else np.zeros((3, 3))
    return i, j, s.astype(np.float64) @ cell


def build_graph(
    arrays: Mapping[str, np.ndarray],
    cutoff: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Graph:
    """Build a Graph from a reader batch (keys atomic_numbers, positions, cell, pbc, n_atoms)."""
    z = np.asarray(arrays["atomic_numbers"], dtype=np.int64)
    pos = np.asarray(arrays["positions"], dtype=np.float64)
    n_atoms = np.asarray(arrays["n_atoms"], dtype=np.int64)
    cells = np.asarray(arrays["cell"], dtype=np.float64).reshape(-1, 3, 3)
    pbcs = np.asarray(arrays["pbc"], dtype=bool).reshape(-1, 3)
    if n_atoms.sum() != len(z):
        raise ValueError(f"n_atoms sums to {n_atoms.sum()} but the batch holds {len(z)} atoms")
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    ii, jj, ss = [], [], []
    for s in range(len(n_atoms)):
        a, b = offsets[s], offsets[s + 1]
        i, j, sh = neighbor_pairs(pos[a:b], cells[s], pbcs[s], cutoff)
        ii.append(i + a)
        jj.append(j + a)
        ss.append(sh)
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
    return Graph(
        z=torch.as_tensor(z, device=device),
        pos=torch.as_tensor(pos, dtype=dtype, device=device),
        batch=torch.as_tensor(np.repeat(np.arange(len(n_atoms)), n_atoms), device=device),
        n_structures=int(len(n_atoms)),
        pair_i=torch.as_tensor(cat(ii, (0,)).astype(np.int64), device=device),
        pair_j=torch.as_tensor(cat(jj, (0,)).astype(np.int64), device=device),
        pair_shift=torch.as_tensor(cat(ss, (0, 3)), dtype=dtype, device=device),
    )


def graph_from_atoms(atoms_list, cutoff: float, dtype: torch.dtype = torch.float32, device="cpu") -> Graph:
    """Build a Graph from ASE Atoms objects."""
    arrays = {
        "atomic_numbers": np.concatenate([a.numbers for a in atoms_list]),
        "positions": np.concatenate([a.positions for a in atoms_list]),
        "cell": np.stack([np.asarray(a.cell) for a in atoms_list]),
        "pbc": np.stack([a.pbc for a in atoms_list]),
        "n_atoms": np.array([len(a) for a in atoms_list]),
    }
    return build_graph(arrays, cutoff, dtype=dtype, device=device)

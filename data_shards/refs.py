"""Per-element reference energies: E(structure) ≈ Σ_Z count_Z · e_Z, fitted by least squares.

Each fidelity head adds its reference energies, so the network only learns what the isolated-atom
sum does not explain. The fit is the usual one of MACE's `E0s="average"` / hippynn's linear prior.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

MAX_Z = 118
RIDGE = 1e-8  # relative to the largest eigenvalue of XᵀX; used only when XᵀX is rank-deficient


def _solve_normal(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Solve (XᵀX) e = Xᵀy exactly when well-posed, else with a tiny ridge (minimum-ish norm)."""
    n = xtx.shape[0]
    if n == 0:
        return np.zeros(0)
    evals = np.linalg.eigvalsh(xtx)
    top = float(evals[-1]) if evals.size else 0.0
    if top <= 0.0:
        return np.zeros(n)
    if float(evals[0]) > 1e-10 * top:
        return np.linalg.solve(xtx, xty)
    return np.linalg.solve(xtx + RIDGE * top * np.eye(n), xty)


def fit_reference_energies(compositions: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Per-element energies e [n_elements] with energies ≈ compositions @ e; NaN energies are skipped."""
    x = np.asarray(compositions, dtype=np.float64)
    y = np.asarray(energies, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"compositions must be [S, n_elements] and energies [S]; got {x.shape}, {y.shape}")
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    return _solve_normal(x.T @ x, x.T @ y)


def composition_matrix(numbers: Sequence[np.ndarray], elements: Sequence[int]) -> np.ndarray:
    """Counts [S, len(elements)] of each element in each structure's atomic-number list."""
    index = {int(z): i for i, z in enumerate(elements)}
    out = np.zeros((len(numbers), len(elements)), dtype=np.float64)
    for s, zs in enumerate(numbers):
        for z, c in zip(*np.unique(np.asarray(zs), return_counts=True)):
            out[s, index[int(z)]] += c
    return out


def fit_reference_energies_from_numbers(numbers: Sequence[np.ndarray], energies: np.ndarray,
                                        elements: Sequence[int] | None = None) -> dict[int, float]:
    """Fit from atomic-number lists; returns {Z: eV} for `elements` (default: all Z seen)."""
    if elements is None:
        elements = sorted({int(z) for zs in numbers for z in np.asarray(zs)})
    e = fit_reference_energies(composition_matrix(numbers, elements), np.asarray(energies))
    return {int(z): float(v) for z, v in zip(elements, e)}


class ReferenceAccumulator:
    """Streams structures into per-fidelity normal equations, so a fit over a huge store stays in O(1) memory."""

    def __init__(self) -> None:
        self._xtx: dict[str, np.ndarray] = {}
        self._xty: dict[str, np.ndarray] = {}

    def add(self, counts: np.ndarray, energies: dict[str, np.ndarray]) -> None:
        """Add structures: counts [S, MAX_Z+1] (column = Z) and per-fidelity energies [S] (NaN skipped)."""
        for fid, y in energies.items():
            y = np.asarray(y, dtype=np.float64)
            keep = np.isfinite(y)
            if not keep.any():
                continue
            x = counts[keep]
            xtx = self._xtx.setdefault(fid, np.zeros((MAX_Z + 1, MAX_Z + 1)))
            xty = self._xty.setdefault(fid, np.zeros(MAX_Z + 1))
            xtx += x.T @ x
            xty += x.T @ y[keep]

    def merge(self, other: "ReferenceAccumulator") -> None:
        """Add another accumulator's normal equations (e.g. one filled by a parallel ingest task)."""
        for fid, xtx in other._xtx.items():
            self._xtx.setdefault(fid, np.zeros_like(xtx))[...] += xtx
            self._xty.setdefault(fid, np.zeros_like(other._xty[fid]))[...] += other._xty[fid]

    def add_ragged(self, atomic_numbers: np.ndarray, offsets: np.ndarray,
                   energies: dict[str, np.ndarray]) -> None:
        """Add the structures of a shard given as concatenated atomic numbers and offsets."""
        block = 8192  # bounds the [block, 119] count matrix
        for lo in range(0, len(offsets) - 1, block):
            hi = min(lo + block, len(offsets) - 1)
            a0, a1 = int(offsets[lo]), int(offsets[hi])
            counts = counts_by_z(atomic_numbers[a0:a1], np.asarray(offsets[lo:hi + 1]) - a0)
            self.add(counts, {f: np.asarray(y)[lo:hi] for f, y in energies.items()})

    def solve(self, fidelities: Iterable[str], elements: Sequence[int]) -> dict[str, dict[int, float]]:
        """{fidelity: {Z: eV}} for every element; an element never seen at a fidelity gets 0.0."""
        out: dict[str, dict[int, float]] = {}
        for fid in fidelities:
            refs = {int(z): 0.0 for z in elements}
            if fid in self._xtx:
                xtx, xty = self._xtx[fid], self._xty[fid]
                seen = [int(z) for z in elements if xtx[z, z] > 0]
                if seen:
                    e = _solve_normal(xtx[np.ix_(seen, seen)], xty[seen])
                    refs.update({z: float(v) for z, v in zip(seen, e)})
            out[fid] = refs
        return out


def counts_by_z(atomic_numbers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Element counts [S, MAX_Z+1] (column = Z) of ragged structures."""
    n_struct = len(offsets) - 1
    counts = np.zeros((n_struct, MAX_Z + 1), dtype=np.float64)
    owner = np.repeat(np.arange(n_struct), np.diff(offsets))
    np.add.at(counts, (owner, np.asarray(atomic_numbers, dtype=np.int64)), 1.0)
    return counts

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
    """Streams structures into per-fidelity sums, so a fit over a huge store stays in O(1) memory.

    Per fidelity it keeps the normal equations of the total energies (XᵀX, Xᵀy, with X the element
    counts), the same sums per atom (x/n, y/n: for the shift and spread of the per-atom residual after
    the references) and the sum of squared force components. All are sums over structures, so the sums
    of several stores are the sums of their union: a fit from them cannot depend on how the data was split.
    """

    _MATRICES = ("xtx", "pxx")
    _VECTORS = ("xty", "px", "pxy")
    _SCALARS = ("n", "py", "pyy", "f2", "fn")

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, np.ndarray]] = {}

    def _get(self, fid: str) -> dict[str, np.ndarray]:
        if fid not in self._sums:
            z = MAX_Z + 1
            self._sums[fid] = ({k: np.zeros((z, z)) for k in self._MATRICES} | {k: np.zeros(z) for k in self._VECTORS}
                               | {k: np.zeros(()) for k in self._SCALARS})
        return self._sums[fid]

    @property
    def fidelities(self) -> list[str]:
        """The fidelities with at least one energy or force label."""
        return list(self._sums)

    def add(self, counts: np.ndarray, energies: dict[str, np.ndarray]) -> None:
        """Add structures: counts [S, MAX_Z+1] (column = Z) and per-fidelity energies [S] (NaN skipped)."""
        for fid, y in energies.items():
            y = np.asarray(y, dtype=np.float64)
            keep = np.isfinite(y)
            if not keep.any():
                continue
            x, y = counts[keep], y[keep]
            n_atoms = x.sum(1)
            px, py = x / n_atoms[:, None], y / n_atoms
            s = self._get(fid)
            s["xtx"] += x.T @ x
            s["xty"] += x.T @ y
            s["n"] += len(y)
            s["pxx"] += px.T @ px
            s["px"] += px.sum(0)
            s["pxy"] += px.T @ py
            s["py"] += py.sum()
            s["pyy"] += py @ py

    def add_forces(self, forces: dict[str, np.ndarray]) -> None:
        """Add force labels [A, 3] per fidelity (rows with NaN skipped): for the force scale of each head."""
        for fid, f in forces.items():
            f = np.asarray(f, dtype=np.float64).reshape(-1, 3)
            f = f[np.isfinite(f).all(1)]
            if len(f):
                s = self._get(fid)
                s["f2"] += float((f * f).sum())
                s["fn"] += f.size

    def merge(self, other: "ReferenceAccumulator", sign: float = 1.0) -> None:
        """Add another accumulator's sums (e.g. one filled by a parallel ingest task, or another store); with
        sign=-1, take them out (labels dropped as outliers)."""
        for fid, sums in other._sums.items():
            mine = self._get(fid)
            for k, v in sums.items():
                mine[k] = mine[k] + sign * v

    def add_ragged(self, atomic_numbers: np.ndarray, offsets: np.ndarray,
                   energies: dict[str, np.ndarray]) -> None:
        """Add the structures of a shard given as concatenated atomic numbers and offsets."""
        block = 8192  # bounds the [block, 119] count matrix
        for lo in range(0, len(offsets) - 1, block):
            hi = min(lo + block, len(offsets) - 1)
            a0, a1 = int(offsets[lo]), int(offsets[hi])
            counts = counts_by_z(atomic_numbers[a0:a1], np.asarray(offsets[lo:hi + 1]) - a0)
            self.add(counts, {f: np.asarray(y)[lo:hi] for f, y in energies.items()})

    def to_dict(self) -> dict[str, dict]:
        """JSON-able sums restricted to the elements seen (for the store manifest)."""
        out = {}
        for fid, s in self._sums.items():
            seen = [int(z) for z in np.nonzero(np.diag(s["xtx"]) + s["px"])[0]]
            d: dict = {"z": seen}
            d.update({k: s[k][np.ix_(seen, seen)].tolist() for k in self._MATRICES})
            d.update({k: s[k][seen].tolist() for k in self._VECTORS})
            d.update({k: float(s[k]) for k in self._SCALARS})
            out[fid] = d
        return out

    @classmethod
    def from_dict(cls, d: dict[str, dict]) -> "ReferenceAccumulator":
        """The inverse of `to_dict`."""
        acc = cls()
        for fid, e in d.items():
            s, seen = acc._get(fid), [int(z) for z in e["z"]]
            for k in cls._MATRICES:
                s[k][np.ix_(seen, seen)] = np.asarray(e[k], dtype=np.float64).reshape(len(seen), len(seen))
            for k in cls._VECTORS:
                s[k][seen] = np.asarray(e[k], dtype=np.float64)
            for k in cls._SCALARS:
                s[k] = np.asarray(float(e[k]))
        return acc

    def solve(self, fidelities: Iterable[str], elements: Sequence[int]) -> dict[str, dict[int, float]]:
        """{fidelity: {Z: eV}}, each fidelity fitted on its own (a store's own view, as at ingest)."""
        out: dict[str, dict[int, float]] = {}
        for fid in fidelities:
            refs = {int(z): 0.0 for z in elements}
            if fid in self._sums:
                xtx, xty = self._sums[fid]["xtx"], self._sums[fid]["xty"]
                seen = [int(z) for z in elements if xtx[z, z] > 0]
                if seen:
                    e = _solve_normal(xtx[np.ix_(seen, seen)], xty[seen])
                    refs.update({z: float(v) for z, v in zip(seen, e)})
            out[fid] = refs
        return out

    def sums(self, fid: str) -> dict[str, np.ndarray] | None:
        """The raw sums of one fidelity (None if it has no label)."""
        return self._sums.get(fid)


def shard_sums(arrays: dict[str, np.ndarray], energy: Iterable[str], forces: Iterable[str]) -> ReferenceAccumulator:
    """The sums of one shard's arrays (keys as on disk: 'energy/<fid>', 'forces/<fid>')."""
    acc = ReferenceAccumulator()
    acc.add_ragged(arrays["atomic_numbers"], arrays["offsets"], {f: arrays[f"energy/{f}"] for f in energy})
    acc.add_forces({f: arrays[f"forces/{f}"] for f in forces})
    return acc


def counts_by_z(atomic_numbers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Element counts [S, MAX_Z+1] (column = Z) of ragged structures."""
    n_struct = len(offsets) - 1
    counts = np.zeros((n_struct, MAX_Z + 1), dtype=np.float64)
    owner = np.repeat(np.arange(n_struct), np.diff(offsets))
    np.add.at(counts, (owner, np.asarray(atomic_numbers, dtype=np.int64)), 1.0)
    return counts

"""A neighbour list with a skin, kept between MD steps: pairs within the cutoff without a vesin call per step.

The list is built by vesin (graph.neighbor_cells) at cutoff + skin. While no atom has moved more than skin/2
since that build, every pair now within the cutoff is among its candidates: two atoms approach by at most the
sum of their displacements. Each call filters the candidates to the cutoff, so it returns the same pairs as a
fresh build (in another order). A change of cell, pbc or atom count, or a larger move, rebuilds.
"""

from __future__ import annotations

import numpy as np

from polyfid.models.graph import neighbor_cells


class SkinNeighborList:
    """Directed pairs (i, j, shift vector in Å) within `cutoff` for one structure, rebuilt only when needed."""

    def __init__(self, cutoff: float, skin: float) -> None:
        if not (isinstance(skin, (int, float)) and np.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin={skin!r}: the neighbour-list skin must be a finite number of Å >= 0 (0: rebuild every step)")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.builds = 0  # vesin calls so far
        self._ref_positions: np.ndarray | None = None  # positions at the last build
        self._cell = np.zeros((3, 3))
        self._pbc = np.zeros(3, dtype=bool)
        self._i = self._j = np.zeros(0, dtype=np.int64)
        self._shift = np.zeros((0, 3))  # S @ cell of every candidate

    def pairs(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs within the cutoff at `positions`: i, j (int64) and shift vectors [P, 3] with r = pos[j] − pos[i] + shift."""
        positions = np.asarray(positions, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool).reshape(3)
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3) if pbc.any() else np.zeros((3, 3))
        if self._stale(positions, cell, pbc):
            self._build(positions, cell, pbc)
        if self.skin == 0.0:
            return self._i, self._j, self._shift
        r = positions[self._j] - positions[self._i] + self._shift
        keep = np.einsum("pk,pk->p", r, r) < self.cutoff * self.cutoff
        return self._i[keep], self._j[keep], self._shift[keep]

    def _stale(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        """Whether the candidates may miss a pair: no build yet, another atom count, cell or pbc, or a move > skin/2."""
        ref = self._ref_positions
        if ref is None or ref.shape != positions.shape or not np.array_equal(pbc, self._pbc):
            return True
        if not np.array_equal(cell, self._cell):
            return True
        if self.skin == 0.0:
            return not np.array_equal(positions, ref)
        moved = np.einsum("ak,ak->a", positions - ref, positions - ref)
        return bool(moved.max(initial=0.0) > 0.25 * self.skin * self.skin)

    def _build(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        self._ref_positions = None  # an interrupted build leaves the list stale, not wrong
        i, j, s = neighbor_cells(positions, cell, pbc, self.cutoff + self.skin)
        self._i, self._j, self._shift = i, j, s.astype(np.float64) @ cell
        self._cell, self._pbc = cell.copy(), pbc.copy()
        self._ref_positions = positions.copy()
        self.builds += 1

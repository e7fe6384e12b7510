"""Which model head each label column of a batch belongs to.

A batch's `energy` [S, F] and `forces` [A, F, 3] have one column per fidelity the data was read with; the
model has one head per fidelity it knows. Training, Reptile's inner loop and evaluation all map one to the
other through a LabelLayout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

MISSING = -1  # a label column the model has no head for (evaluation skips it)


@dataclasses.dataclass(frozen=True)
class LabelLayout:
    """Label column k trains or is compared with model head `heads[k]` (MISSING: none)."""

    columns: tuple[str, ...]
    heads: tuple[int, ...]

    @classmethod
    def of(cls, head_names: Sequence[str], columns: Sequence[str], allow_missing: bool = False) -> "LabelLayout":
        """The layout of label `columns` on a model whose heads are `head_names` (in head order)."""
        names = list(head_names)
        unknown = [c for c in columns if c not in names]
        if unknown and not allow_missing:
            raise KeyError(f"label columns {unknown} have no head; the model's heads are {names}")
        return cls(tuple(columns), tuple(names.index(c) if c in names else MISSING for c in columns))

    def select(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's outputs [.., n_heads, ..] reduced to the label columns, in column order (float32)."""
        cols = list(self.heads)
        return {k: v[:, cols].float() for k, v in out.items()}

    def heads_of(self, columns: Sequence[int]) -> list[int]:
        """The heads of the given label column indices (e.g. those with force labels in a batch)."""
        return [self.heads[k] for k in columns]

"""Energies that follow the data: a closed-form refit of the trained heads' reference energies during training.

Next to its forces, a head's absolute energy is pinned weakly by the loss, and Adam's near-constant steps on
the readout, times the head's scale (eV per readout unit), move every structure's energy together. On a
fine-tuning target that swung the validation energy error by 1.4 eV between validations while the forces
improved steadily (issue 28). A least-squares fit of the per-element references to (label − prediction) is
exact for that offset, costs one forward pass over the training data, and is what MACE's and hippynn's
E0s are; `trainer.energy_refit_every` runs it before every validation and at the last step, so that what is
validated, kept as best and packaged carries the offset its weights call for.

Every rank reads its share of the training stores (at most `max_structures` in all); the normal equations
(XᵀX, Xᵀr per head) are all-reduced, so every rank sets the same references.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.refs import _solve_normal, composition_matrix
from polyfid.data_shards.store import Store
from polyfid.infra.comm import all_reduce_host
from polyfid.evaluation.metrics import predict

log = logging.getLogger("polyfid.energy_refit")


class EnergyRefit:
    """Refit the reference energies of `heads` on `stores` every `every` steps and at the last step (0: never)."""

    def __init__(self, every: int, last_step: int, stores: Sequence[Store], heads: Sequence[str],
                 atom_budget: int, dtype: torch.dtype | None, device, rank: int = 0, world: int = 1,
                 max_structures: int = 2048) -> None:
        self.every, self.last_step = int(every), int(last_step)
        present = {f.name for s in stores for f in s.fidelities}
        self.heads = [h for h in heads if h in present]
        self.stores = [s for s in stores if {f.name for f in s.fidelities} & set(self.heads)]
        self.atom_budget, self.dtype, self.device = atom_budget, dtype, device
        self.rank, self.world = rank, world
        self.max_structures = max_structures
        self.history: list[dict] = []

    @property
    def enabled(self) -> bool:
        return self.every > 0 and bool(self.heads) and bool(self.stores)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == self.last_step)

    def _batches(self):
        reader = ShardReader(self.stores, ShardReader.Config(atom_budget=self.atom_budget, shuffle=False, loop=False,
                                                             prefetch=0),
                             rank=self.rank, world_size=self.world, fidelities=self.heads)
        seen, cap = 0, max(1, self.max_structures // self.world)
        for batch in reader:
            yield batch
            seen += len(batch["n_atoms"])
            if seen >= cap:
                return

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict[str, float]:
        """Shift each head's references by the least-squares fit of its residuals; returns the mean shift per
        structure (eV) of each head, the size of the correction the weights had drifted by."""
        elements = list(model.elements)
        n_el = len(elements)
        columns = [model.fidelity_index(h) for h in self.heads]
        # per head: XᵀX [E, E], Xᵀr [E], Σ r, count
        sums = np.zeros((len(self.heads), n_el * n_el + n_el + 2))
        was_training = model.training
        model.eval()
        for batch in self._batches():
            e_pred, _ = predict(model, batch, model.config.cutoff, self.dtype, self.device, forces=False)
            offsets = np.concatenate([[0], np.cumsum(batch["n_atoms"])])
            z = batch["atomic_numbers"]
            x = composition_matrix([z[offsets[s]: offsets[s + 1]] for s in range(len(offsets) - 1)], elements)
            for j, (head, col) in enumerate(zip(self.heads, columns)):
                r = batch["energy"][:, j] - e_pred[:, col]
                ok = np.isfinite(r)
                if not ok.any():
                    continue
                xo, ro = x[ok], r[ok]
                sums[j, : n_el * n_el] += (xo.T @ xo).ravel()
                sums[j, n_el * n_el: n_el * n_el + n_el] += xo.T @ ro
                sums[j, -2] += ro.sum()
                sums[j, -1] += ok.sum()
        model.train(was_training)
        total = all_reduce_host(torch.from_numpy(sums)).numpy()
        out = {}
        for j, head in enumerate(self.heads):
            count = total[j, -1]
            if count == 0:
                continue
            xtx = total[j, : n_el * n_el].reshape(n_el, n_el)
            shift = _solve_normal(xtx, total[j, n_el * n_el: n_el * n_el + n_el])
            k = model.fidelity_index(head)
            old = model.reference_energies[k]
            model.set_reference_energies(head, {z: float(old[z]) + float(d) for z, d in zip(elements, shift)})
            out[head] = float(total[j, -2] / count)  # the mean residual the refit removed (eV per structure)
        self.history.append({"step": step, **out})
        return out

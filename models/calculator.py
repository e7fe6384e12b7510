"""An ASE calculator for a polyfid model package (or an in-memory Potential) at one fidelity."""

from __future__ import annotations

import os

import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from polyfid.data_shards.schema import highest_rank
from polyfid.models.graph import graph_from_atoms
from polyfid.models.package import load_package
from polyfid.models.potential import Potential


class Calculator(AseCalculator):
    """Energy (eV) and forces (eV/Å) from one fidelity head; by default the fidelity of highest rank.

    A Potential passed in is moved to `device` and `dtype` in place and put in eval mode.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        model: str | os.PathLike | Potential,
        fidelity: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, Potential):
            model = load_package(model, device=device)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.fidelity = fidelity if fidelity is not None else highest_rank(self.model.fidelities).name
        self.head = self.model.fidelity_index(self.fidelity)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        """Evaluate the model on `atoms` (periodic cells included)."""
        super().calculate(atoms, properties, system_changes)
        graph = graph_from_atoms([self.atoms], self.model.config.cutoff, dtype=self.dtype, device=self.device)
        with torch.no_grad():  # forces are still taken by autograd inside; outputs come back detached
            out = self.model(graph, force_heads=[self.head])
        energy = float(out["energy"][0, self.head])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = out["forces"][:, self.head].detach().to("cpu", torch.float64).numpy()

"""Tiny float64 models and physical checks (finite differences, NVE drift) shared by tests and benchmarks."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from polyfid.data_shards.schema import Fidelity
from polyfid.models.config import KINDS, ModelConfig
from polyfid.models.graph import graph_from_atoms
from polyfid.models.potential import Potential

TEST_ELEMENTS = (1, 6, 7, 8, 11, 14, 17)
TEST_FIDELITIES = (Fidelity("low", rank=0, method="HF", basis="6-31G"), Fidelity("high", rank=1, method="MP2", basis="cc-pVDZ"))


def tiny_config(kind: str, **overrides) -> ModelConfig:
    """A small but complete architecture of `kind` (hiphop at its full l_max=3, n_max=4)."""
    base = dict(kind=kind, width=8, n_interactions=2, n_atom_layers=1, n_sensitivities=6,
                cutoff=4.0, soft_min=0.8, soft_max=3.5, l_max=3 if kind == "hiphop" else 2, n_max=4)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_potential(
    kind: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    readout_std: float = 0.3,
    elements: Sequence[int] = TEST_ELEMENTS,
    fidelities: Sequence[Fidelity] = TEST_FIDELITIES,
    **overrides,
) -> Potential:
    """A seeded tiny Potential whose readouts and norms are randomised so every path affects the energy."""
    torch.manual_seed(seed)
    model = Potential(tiny_config(kind, **overrides), elements, fidelities)
    with torch.no_grad():
        for readout in model.readouts:
            readout.weight.normal_(0.0, readout_std)
            readout.bias.normal_(0.0, readout_std)
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return model.to(dtype)


def implemented_kinds() -> list[str]:
    """Every model kind that builds."""
    return list(KINDS)


def energy_forces(model: Potential, atoms_list, head: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Energies [S] and forces [A, 3] of one head as float64 numpy arrays."""
    graph = graph_from_atoms(atoms_list, model.config.cutoff, dtype=model.dtype)
    out = model(graph, force_heads=[head])
    return (out["energy"][:, head].detach().double().numpy(), out["forces"][:, head].detach().double().numpy())


def finite_difference_error(model: Potential, atoms, head: int = 0, step: float = 1e-5) -> float:
    """Largest |F − F_fd| over all coordinates, relative to the largest |F|, by central differences."""
    _, forces = energy_forces(model, [atoms], head)
    fd = np.zeros_like(forces)
    for a in range(len(atoms)):
        for d in range(3):
            energies = []
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.positions[a, d] += sign * step
                energies.append(energy_forces(model, [moved], head)[0][0])
            fd[a, d] = -(energies[0] - energies[1]) / (2.0 * step)
    return float(np.abs(forces - fd).max() / np.abs(forces).max())


def nve_drift(calculator, atoms, steps: int = 200, timestep_fs: float = 0.5, temperature_k: float = 300.0,
              seed: int = 0) -> dict[str, float]:
    """Run velocity Verlet from a Maxwell-Boltzmann start; returns the total-energy drift and fluctuation in eV."""
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.26
        vd.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary, ZeroRotation = vd.Stationary, vd.ZeroRotation
    Stationary(atoms)
    ZeroRotation(atoms)
    totals, kinetic = [], []

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        kinetic.append(atoms.get_kinetic_energy())

    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(steps)
    totals_arr = np.asarray(totals)
    return {
        "max_deviation_ev": float(np.abs(totals_arr - totals_arr[0]).max()),
        "end_drift_ev": float(totals_arr[-1] - totals_arr[0]),
        "mean_kinetic_ev": float(np.mean(kinetic)),
        "n_atoms": float(len(atoms)),
    }

"""TorchSim: polyfid's model class gives the Calculator's energies and forces for a batch, and NVE conserves energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_sim as ts
from ase.build import bulk, molecule
from torch_sim.models.interface import validate_model_outputs

from helpers import EXPORT_REFS, one_torch_thread
from polyfid.models import Calculator, save_package
from polyfid.models.testing import tiny_potential
from polyfid.models.torchsim import TorchSimModel

REFS = EXPORT_REFS
one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model = tiny_potential("hiphop", head_design="delta")
    model.set_reference_energies("high", REFS)
    model.set_reference_energies("low", {z: 0.99 * e for z, e in REFS.items()})
    return save_package(tmp_path_factory.mktemp("ts") / "pkg", model)


def _rattled(atoms, seed: int):
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


MOLECULES = [_rattled(molecule(name), n) for n, name in enumerate(("CH3CH2OH", "C6H6", "H2O", "CH3CONH2"))]
CRYSTALS = [_rattled(bulk("NaCl", "rocksalt", a=5.64), 7), _rattled(bulk("Si", "diamond", a=5.43) * (2, 1, 1), 8)]


@pytest.mark.parametrize("systems", [MOLECULES, CRYSTALS], ids=["molecules", "periodic"])
@pytest.mark.parametrize("fidelity", [None, "low"])
def test_batch_equals_calculator(package, systems, fidelity):
    """One batched forward over different systems gives each system's Calculator energy and forces."""
    model = TorchSimModel(package, fidelity=fidelity, device="cpu", dtype=torch.float64)
    out = model(ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64))
    calc = Calculator(package, fidelity=fidelity)
    expected_e, expected_f = [], []
    for atoms in systems:
        atoms = atoms.copy()
        atoms.calc = calc
        expected_e.append(atoms.get_potential_energy())
        expected_f.append(atoms.get_forces())
    assert out["energy"].shape == (len(systems),)
    np.testing.assert_allclose(out["energy"].numpy(), expected_e, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["forces"].numpy(), np.concatenate(expected_f), rtol=1e-10, atol=1e-10)


def test_stress_is_the_strain_derivative(package):
    """stress = (1/V) ∂E/∂ε, checked by central differences of the energy under symmetric strains."""
    model = TorchSimModel(package, device="cpu", compute_stress=True)
    crystal = CRYSTALS[0]
    stress = model(ts.io.atoms_to_state([crystal], torch.device("cpu"), torch.float64))["stress"][0].numpy()
    energy = TorchSimModel(package, device="cpu", compute_forces=False)
    h, fd = 1e-5, np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = []
            for sign in (1.0, -1.0):
                eps = np.zeros((3, 3))
                eps[a, b] += 0.5 * sign * h
                eps[b, a] += 0.5 * sign * h
                strained = crystal.copy()
                strained.set_cell(crystal.cell.array @ (np.eye(3) + eps), scale_atoms=True)
                e.append(float(energy(ts.io.atoms_to_state([strained], torch.device("cpu"), torch.float64))["energy"][0]))
            fd[a, b] = (e[0] - e[1]) / (2 * h) / crystal.get_volume()
    np.testing.assert_allclose(stress, fd, atol=1e-7 * max(1.0, np.abs(fd).max()))


def test_torchsim_own_validation():
    """TorchSim's validate_model_outputs (Si and Fe cells, batched against single) accepts the model."""
    model = tiny_potential("hipnn_ts", elements=(14, 26), readout_std=0.05)
    validate_model_outputs(TorchSimModel(model, device="cpu", compute_stress=True), torch.device("cpu"), torch.float64)


def _nve_run(model: TorchSimModel, systems, steps: int, dt_fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Velocity Verlet in TorchSim from a 300 K start: total energy [steps+1, S] and mean kinetic energy [S]."""
    state = ts.io.atoms_to_state(systems, model.device, model.dtype)
    dt = torch.tensor(dt_fs * 1e-3 * ts.units.MetalUnits.time, dtype=model.dtype)
    kt = torch.tensor(300.0 * ts.units.MetalUnits.temperature, dtype=model.dtype)
    if hasattr(ts.integrators, "nve_init"):  # torch-sim >= 0.4 (Python >= 3.12)
        state = ts.integrators.nve_init(state, model, kT=kt, seed=0)
        step = lambda s: ts.integrators.nve_step(s, model, dt=dt)  # noqa: E731
    else:
        init, update = ts.integrators.nve(model, dt=dt, kT=kt, seed=0)
        state, step = init(state), update
    totals, kinetic = [], []
    for n in range(steps + 1):
        if n:
            state = step(state)
        ke = ts.calc_kinetic_energy(masses=state.masses, momenta=state.momenta, system_idx=state.system_idx)
        totals.append((state.energy + ke).numpy())
        kinetic.append(ke.numpy())
    return np.asarray(totals), np.mean(kinetic, axis=0)


def test_nve_conserves_energy():
    """Batched NVE of three molecules (20 fs): the total energy stays within a few meV, and its error shrinks as dt².

    The tiny random model is stiff (its atoms collide hard), hence the short time steps.
    """
    model = TorchSimModel(tiny_potential("hiphop", readout_std=0.01), device="cpu")
    systems = [molecule("CH3CH2OH"), molecule("C6H6"), molecule("CH3CONH2")]
    coarse, kinetic = _nve_run(model, systems, steps=80, dt_fs=0.25)
    fine, _ = _nve_run(model, systems, steps=160, dt_fs=0.125)
    dev_coarse = np.abs(coarse - coarse[0]).max(axis=0)
    dev_fine = np.abs(fine - fine[0]).max(axis=0)
    print(f"NVE: mean KE {kinetic} eV; max |ΔE| dt=0.25 fs {dev_coarse} eV, dt=0.125 fs {dev_fine} eV")
    assert (kinetic > 0.05).all()  # the atoms move
    assert (dev_coarse < 5e-3).all(), dev_coarse
    assert (dev_fine < dev_coarse / 3.0).all(), (dev_coarse, dev_fine)


def test_exporters_never_import_ray_deepspeed_or_mlflow():
    """models/ stays free of the distributed stack, with the TorchSim and metatomic modules loaded too."""
    import subprocess
    import sys

    code = ("import sys, polyfid.models.torchsim, polyfid.models.metatomic;"
            "print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

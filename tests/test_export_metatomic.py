"""`polyfid export --to metatomic`: the TorchScript model, run through metatomic-ase, gives polyfid.Calculator's
energies and forces (to float32 precision in float32, to round-off in float64), for every head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from metatensor.torch import Labels
from metatomic.torch import ModelOutput, load_atomistic_model
from metatomic_ase import MetatomicCalculator

from helpers import EXPORT_REFS, one_torch_thread
from polyfid.launch.cli import main
from polyfid.models import Calculator, save_package
from polyfid.models.metatomic import export_metatomic
from polyfid.models.testing import tiny_potential

REFS = EXPORT_REFS
one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _rattled(atoms, seed: int):
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


SYSTEMS = [_rattled(molecule("CH3CH2OH"), 0), _rattled(molecule("CH3CONH2"), 1),
           _rattled(bulk("NaCl", "rocksalt", a=5.64), 2)]  # a periodic cell smaller than the cutoff's reach


def _package(path, kind: str = "hiphop", **overrides):
    model = tiny_potential(kind, **overrides)
    model.set_reference_energies("high", REFS)
    model.set_reference_energies("low", {z: 0.99 * e for z, e in REFS.items()})
    return save_package(path, model)


def _compare(package, exported, fidelity, rtol_e: float, tol_f: float) -> None:
    """Energy and forces of every system from metatomic-ase and from polyfid's Calculator (float64)."""
    ours = Calculator(package, fidelity=fidelity)
    theirs = MetatomicCalculator(str(exported), check_consistency=True,
                                 variants=None if fidelity is None else {"energy": fidelity})
    for atoms in SYSTEMS:
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = ours, theirs
        e_ref, f_ref = a.get_potential_energy(), a.get_forces()
        e, f = b.get_potential_energy(), b.get_forces()
        assert abs(e - e_ref) <= rtol_e * abs(e_ref), (atoms.get_chemical_formula(), e, e_ref)
        assert np.abs(f - f_ref).max() <= tol_f * max(1.0, np.abs(f_ref).max()), atoms.get_chemical_formula()


def test_cli_export_float32_matches_calculator(tmp_path, capsys):
    """The issue's check: float32 export through the CLI, every head, against the float64 Calculator."""
    package = _package(tmp_path / "pkg", head_design="delta")
    out = tmp_path / "model.pt"
    assert main(["export", "--to", "metatomic", str(package), str(out)]) == 0
    assert "energy/low" in capsys.readouterr().out
    # The energy is summed in float64 and rounded to float32 once: |ΔE| ≤ half an ulp (6e-8 relative; measured
    # ≤ 1e-7). Forces go through the float32 network: measured ≤ 4e-6 of the largest force.
    for fidelity in (None, "high", "low"):
        _compare(package, out, fidelity, rtol_e=5e-7, tol_f=3e-5)


@pytest.mark.parametrize("kind", ["hipnn", "hipnn_ts"])
def test_float64_export_equals_calculator(tmp_path, kind):
    """In float64 the scripted model (plain-torch pair sums) equals the eager one (fused) to round-off."""
    package = _package(tmp_path / "pkg", kind)
    out = export_metatomic(package, tmp_path / "model.pt", dtype="float64")
    _compare(package, out, None, rtol_e=1e-12, tol_f=1e-9)


def test_per_atom_energies_and_selected_atoms(tmp_path):
    """Per-atom energies sum to the total; with selected_atoms (domain decomposition) only those atoms count."""
    package = _package(tmp_path / "pkg")
    out = export_metatomic(package, tmp_path / "model.pt", dtype="float64", fidelity="low")
    calc = MetatomicCalculator(str(out), check_consistency=True)
    atoms = SYSTEMS[0].copy()
    atoms.calc = calc
    per_atom = atoms.get_potential_energies()
    expected = Calculator(package, fidelity="low").get_potential_energy(SYSTEMS[0].copy())
    np.testing.assert_allclose(per_atom.sum(), expected, rtol=1e-12)
    chosen = [0, 2, 5]
    selected = Labels(["system", "atom"], torch.tensor([[0, a] for a in chosen], dtype=torch.int32))
    request = {"energy": ModelOutput(unit="eV", sample_kind="atom")}
    result = calc.run_model(atoms, request, selected_atoms=selected)["energy"].block()
    np.testing.assert_allclose(result.values[:, 0].numpy(), per_atom[chosen], rtol=1e-12)
    assert result.samples.values[:, 1].tolist() == chosen


def test_capabilities_and_bad_requests(tmp_path, capsys):
    """The file declares the elements, the interaction range and every head; bad input fails with a message."""
    package = _package(tmp_path / "pkg")
    out = export_metatomic(package, tmp_path / "model.pt")
    caps = load_atomistic_model(str(out)).capabilities()
    assert list(caps.atomic_types) == [1, 6, 7, 8, 11, 14, 17]
    assert caps.interaction_range == pytest.approx(2 * 4.0)  # n_interactions × cutoff of the tiny model
    assert {"energy", "energy/high", "energy/low"} <= set(caps.outputs)
    assert caps.dtype == "float32"
    assert main(["export", "--to", "metatomic", str(package), str(tmp_path / "x.pt"), "--fidelity", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch_sim warns that metatrain (for .ckpt files) is missing
def test_torchsim_loads_the_export_through_metatomic(tmp_path):
    """TorchSim's own metatomic wrapper runs the exported file and agrees with polyfid's TorchSim model."""
    import torch_sim as ts
    from torch_sim.models.metatomic import MetatomicModel

    from polyfid.models.torchsim import TorchSimModel

    potential = tiny_potential("hiphop")
    out = export_metatomic(potential, tmp_path / "model.pt", dtype="float64")
    state = ts.io.atoms_to_state([SYSTEMS[0], SYSTEMS[1]], torch.device("cpu"), torch.float64)
    theirs = MetatomicModel(str(out), device="cpu", compute_stress=False)(state)
    ours = TorchSimModel(potential, device="cpu")(state)
    torch.testing.assert_close(theirs["energy"], ours["energy"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(theirs["forces"], ours["forces"], rtol=1e-10, atol=1e-10)

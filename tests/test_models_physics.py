"""Physical properties of every model kind, on tiny float64 models: gradients, symmetries, smoothness, PBC, NVE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from polyfid.models import Calculator
from polyfid.models.testing import energy_forces, finite_difference_error, implemented_kinds, nve_drift, tiny_potential

KINDS = implemented_kinds()


pytestmark = pytest.mark.usefixtures("one_thread")


def _ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)  # no accidental symmetry
    return atoms


def _random_orthogonal(seed: int, reflect: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q @ np.diag([-1.0, 1.0, 1.0]) if reflect else q


@pytest.mark.parametrize("kind", KINDS)
def test_forces_are_minus_energy_gradient(kind):
    model = tiny_potential(kind)
    for head in (0, 1):
        err = finite_difference_error(model, _ethanol(), head=head, step=1e-5)
        assert err < 1e-6, f"{kind} head {head}: relative force error {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_and_reflection(kind, reflect):
    model = tiny_potential(kind)
    atoms = _ethanol()
    e0, f0 = energy_forces(model, [atoms])
    rot = _random_orthogonal(3, reflect)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    e1, f1 = energy_forces(model, [turned])
    assert abs(e1[0] - e0[0]) < 1e-10 * max(1.0, abs(e0[0]))
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-10)
    assert np.abs(f0).max() > 1e-3  # the check above is not vacuous


@pytest.mark.parametrize("kind", KINDS)
def test_translation_and_permutation(kind):
    model = tiny_potential(kind)
    atoms = _ethanol()
    e0, f0 = energy_forces(model, [atoms])
    moved = atoms.copy()
    moved.positions += np.array([3.1, -7.4, 12.9])
    e1, f1 = energy_forces(model, [moved])
    assert abs(e1[0] - e0[0]) < 1e-10 * max(1.0, abs(e0[0]))
    np.testing.assert_allclose(f1, f0, atol=1e-10)
    perm = np.random.default_rng(0).permutation(len(atoms))
    shuffled = atoms[perm]
    e2, f2 = energy_forces(model, [shuffled])
    assert abs(e2[0] - e0[0]) < 1e-10 * max(1.0, abs(e0[0]))
    np.testing.assert_allclose(f2, f0[perm], atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_smooth_across_cutoff(kind):
    model = tiny_potential(kind)
    rc = model.config.cutoff
    water = molecule("H2O")
    water.positions -= water.positions[0]  # O at the origin, both H atoms on the −z side

    def system(d: float) -> Atoms:
        # A Cl atom on the +z axis: O is its nearest neighbour, so the pair O–Cl is the one crossing the cutoff.
        return water + Atoms("Cl", positions=[[0.0, 0.0, d]])

    e_far, f_far = energy_forces(model, [system(rc + 0.5)])
    for delta, e_tol, f_tol in ((1e-3, 1e-5, 1e-2), (1e-5, 1e-9, 1e-4)):
        e_in, f_in = energy_forces(model, [system(rc - delta)])
        e_out, f_out = energy_forces(model, [system(rc + delta)])
        assert abs(e_out[0] - e_far[0]) < 1e-12
        assert abs(e_in[0] - e_far[0]) < e_tol, f"energy jumps by {abs(e_in[0] - e_far[0]):.2e} at the cutoff"
        assert np.abs(f_in - f_out).max() < f_tol, f"forces jump by {np.abs(f_in - f_out).max():.2e}"
    # Well inside, the Cl atom does feel O: the tests above are not vacuous.
    e_near, _ = energy_forces(model, [system(rc - 0.5)])
    assert abs(e_near[0] - e_far[0]) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_periodic_supercell_is_extensive(kind):
    model = tiny_potential(kind)
    unit = bulk("NaCl", "rocksalt", a=5.64)  # primitive cell: 2 atoms, cell vectors 3.99 Å < cutoff... images
    unit.rattle(0.05, seed=2)
    e1, f1 = energy_forces(model, [unit])
    big = unit.repeat((2, 2, 2))
    e8, f8 = energy_forces(model, [big])
    assert abs(e8[0] - 8 * e1[0]) < 1e-9 * max(1.0, abs(e8[0]))
    np.testing.assert_allclose(f8, np.tile(f1, (8, 1)), atol=1e-9)
    assert np.abs(f1).max() > 1e-3
    # A molecule-like treatment of the same atoms (no pbc) gives a different energy: images matter.
    lone = unit.copy()
    lone.pbc = False
    assert abs(energy_forces(model, [lone])[0][0] - e1[0]) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_separate(kind):
    model = tiny_potential(kind)
    systems = [_ethanol(), molecule("NH3"), bulk("Si", "diamond", a=5.43)]
    e_batch, f_batch = energy_forces(model, systems)
    separate = [energy_forces(model, [s]) for s in systems]
    np.testing.assert_allclose(e_batch, [e[0] for e, _ in separate], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f_batch, np.concatenate([f for _, f in separate]), atol=1e-12)


def test_force_loss_gradient_matches_finite_difference():
    """create_graph=True gives the right second derivatives, as a force-matching loss needs."""
    model = tiny_potential("hipnn_ts")
    from polyfid.models.graph import graph_from_atoms

    graph = graph_from_atoms([_ethanol()], model.config.cutoff, dtype=torch.float64)
    param = model.backbone.blocks[0].interaction.sensitivity.mu

    def loss() -> torch.Tensor:
        return model(graph, force_heads=[1], create_graph=True)["forces"].pow(2).sum()

    (grad,) = torch.autograd.grad(loss(), param)
    h = 1e-6
    with torch.no_grad():
        param[2] += h
        up = loss().item()
        param[2] -= 2 * h
        down = loss().item()
        param[2] += h
    fd = (up - down) / (2 * h)
    assert abs(grad[2].item() - fd) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("kind", ["hipnn_ts", "hiphop"])
def test_nve_energy_conservation(kind):
    """Velocity Verlet through the Calculator conserves energy, with an error that shrinks as dt².

    100 fs here to keep CI fast; benchmarks/bench_models.py runs the full 2 ps at 300 K and writes the
    drift to benchmarks/RESULTS_models.md.
    """
    model = tiny_potential(kind, readout_std=0.01)  # the scale of a fresh model's readouts
    calc = Calculator(model, dtype=torch.float64)
    coarse = nve_drift(calc, molecule("CH3CH2OH"), steps=200, timestep_fs=0.5, temperature_k=300.0)
    fine = nve_drift(calc, molecule("CH3CH2OH"), steps=400, timestep_fs=0.25, temperature_k=300.0)
    print(f"NVE {kind}: dt=0.5 fs {coarse}; dt=0.25 fs {fine}")
    assert coarse["mean_kinetic_ev"] > 0.1  # atoms do move
    assert coarse["max_deviation_ev"] < 5e-3, coarse
    # Forces that are not −∇E would leave an error that does not vanish with the time step.
    assert fine["max_deviation_ev"] < coarse["max_deviation_ev"] / 3.0, (coarse, fine)

"""The MD calculator: its torch thread choice, the kept neighbour list with a skin, and the TorchScript path.

Properties, not timings (speed lives in benchmarks/bench_md.py): a small system runs on 1 thread by default and the
process's setting comes back; a setting is respected and a bad one is named; the skin list gives a fresh vesin
list's pairs along MD, across the cutoff, after a cell change and a jump; and energies and forces equal the
plain path (graph_from_atoms + Potential) to rounding.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md import velocitydistribution as vd
from ase.md.verlet import VelocityVerlet

from polyfid.models import Calculator
from polyfid.models import calculator
from polyfid.models.calculator import THREADS_ENV, AutoThreads, auto_threads, resolve_threads
from polyfid.models.graph import graph_from_atoms, neighbor_cells
from polyfid.models.neighbors import SkinNeighborList
from polyfid.models.testing import energy_forces, tiny_potential

CUTOFF = 4.0  # tiny_config's
pytestmark = pytest.mark.usefixtures("one_thread")  # the reference path too runs on torch's setting


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)


@pytest.fixture(scope="module")
def model():
    return tiny_potential("hipnn_ts")


def threads_seen(calc: Calculator, atoms: Atoms) -> int:
    """torch's thread count while the model runs inside calc (read by a forward hook on the backbone)."""
    seen = []
    handle = calc.model.backbone.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        atoms.calc = calc
        atoms.get_potential_energy()
    finally:
        handle.remove()
    assert seen, "the backbone did not run"
    return seen[-1]


@contextlib.contextmanager
def torch_threads(n: int):
    """The process runs on `n` torch threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """The process runs on 2 torch threads (torch's default on this 2-core machine) during the test."""
    with torch_threads(2):
        yield


# ---- threads ----------------------------------------------------------------------------------------

def test_small_system_runs_on_one_thread_and_the_setting_comes_back(model, two_threads):
    calc = Calculator(model, script=False)
    assert threads_seen(calc, molecule("CH3CH2OH")) == 1
    assert torch.get_num_threads() == 2


def test_auto_threads_grow_with_size_up_to_torchs_setting():
    assert auto_threads(9, limit=16) == 1
    assert auto_threads(1999, limit=16) == 1
    assert auto_threads(10**6, limit=2) == 2
    assert auto_threads(10**6, limit=1) == 1
    assert 1 <= auto_threads(10**6) <= torch.get_num_threads()


def test_auto_gives_a_large_system_only_the_cores_others_leave_idle(monkeypatch):
    """(wall s, machine busy CPU s, own CPU s) readings stand in for /proc/stat."""
    readings = iter([(0.0, 0.0, 0.0), (10.0, 20.0, 0.0),  # others kept both cores busy
                     (20.0, 21.0, 0.5),  # others used 0.05 cores
                     (21.0, 30.0, 0.5)])  # too soon to measure again
    monkeypatch.setattr(calculator, "_busy_seconds", lambda: next(readings))
    auto = AutoThreads(cores=2)
    big = 10**6  # wants every thread torch allows
    with torch_threads(2):
        assert auto(9) == 1  # small: no reading taken
        assert auto(big) == 1  # one reading: idle cores unknown yet
        assert auto(big) == 1  # busy machine
        assert auto(big) == 2  # idle machine
        assert auto(big) == 2  # kept until the next window
    monkeypatch.setattr(calculator, "_busy_seconds", lambda: None)  # no /proc/stat
    assert AutoThreads(cores=2)(big) == 1


def test_argument_and_environment_are_respected(model, monkeypatch, two_threads):
    torch.set_num_threads(1)
    atoms = molecule("CH3OH")
    assert threads_seen(Calculator(model, threads=2, script=False), atoms) == 2
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "2")
    assert threads_seen(Calculator(model, script=False), atoms) == 2
    assert threads_seen(Calculator(model, threads=1, script=False), atoms) == 1  # the argument wins
    monkeypatch.setenv(THREADS_ENV, "auto")
    assert threads_seen(Calculator(model, script=False), atoms) == 1
    assert resolve_threads(np.int64(3)) == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", "0", ""])
def test_bad_argument_names_the_setting(model, bad):
    with pytest.raises(ValueError, match=r"threads=.*positive integer or 'auto'"):
        Calculator(model, threads=bad)


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "1.5"])
def test_bad_environment_names_the_variable(model, monkeypatch, bad):
    monkeypatch.setenv(THREADS_ENV, bad)
    with pytest.raises(ValueError, match=rf"\${THREADS_ENV}=.*positive integer or 'auto'"):
        Calculator(model)


def test_bad_skin_and_script_are_named(model):
    with pytest.raises(ValueError, match="skin=-0.5"):
        Calculator(model, skin=-0.5)
    with pytest.raises(ValueError, match="script='yes'"):
        Calculator(model, script="yes")


# ---- the kept neighbour list ------------------------------------------------------------------------

def pair_set(i, j, shift, cell) -> set:
    """Pairs as (i, j, integer cell shift), comparable between lists built differently."""
    cell = np.asarray(cell, dtype=float)
    s = np.zeros((len(i), 3)) if not np.any(cell) else np.asarray(shift) @ np.linalg.inv(cell)
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.rint(s).astype(int).tolist())))


def fresh_set(atoms: Atoms) -> set:
    i, j, s = neighbor_cells(atoms.positions, atoms.cell.array, atoms.pbc, CUTOFF)
    return set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist())))


def skin_set(nl: SkinNeighborList, atoms: Atoms) -> set:
    i, j, shift = nl.pairs(atoms.positions, atoms.cell.array, atoms.pbc)
    assert len(i) == len(set(zip(i.tolist(), j.tolist(), map(tuple, np.round(shift, 6).tolist()))))  # no duplicates
    return pair_set(i, j, shift, atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3)))


def hot_md(atoms: Atoms, model, steps: int, temperature_k: float = 2000.0, seed: int = 0):
    """Yield `atoms` after each of `steps` Velocity Verlet steps (0.5 fs) under the plain calculator."""
    atoms.calc = Calculator(model, skin=0.0, script=False)
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.26
        vd.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    md = VelocityVerlet(atoms, 0.5 * units.fs)
    for _ in range(steps):
        md.run(1)
        yield atoms


def nacl() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))  # a small cell: the cutoff reaches several images
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.mark.parametrize("system", ["molecule", "periodic"])
def test_skin_list_equals_a_fresh_list_along_md(model, system):
    atoms = molecule("CH3CH2OH") if system == "molecule" else nacl()
    nl = SkinNeighborList(CUTOFF, skin=0.3)
    steps = 60
    for atoms in hot_md(atoms, model, steps):
        assert skin_set(nl, atoms) == fresh_set(atoms)
    assert 1 < nl.builds < steps  # rebuilt on the way, but not every step


def test_pairs_crossing_the_cutoff(model):
    """Two molecules pass through each other's cutoff: pairs appear and vanish exactly at the cutoff."""
    a = molecule("CH3OH")
    b = molecule("H2O")
    nl = SkinNeighborList(CUTOFF, skin=1.0)
    seen = set()
    for x in np.concatenate([np.linspace(8.0, 2.5, 60), np.linspace(2.5, 8.0, 60)]):
        m = b.copy()
        m.positions += (x, 0.0, 0.0)
        atoms = a + m
        got, want = skin_set(nl, atoms), fresh_set(atoms)
        assert got == want, x
        seen.add(len(want))
    assert len(seen) > 5  # the count of pairs changed along the way
    assert nl.builds < 60


def test_cell_change_pbc_change_and_jump_rebuild():
    atoms = nacl()
    nl = SkinNeighborList(CUTOFF, skin=1.0)
    assert skin_set(nl, atoms) == fresh_set(atoms)
    atoms.set_cell(atoms.cell.array * 1.03, scale_atoms=True)  # every move is small, but the cell changed
    assert skin_set(nl, atoms) == fresh_set(atoms) and nl.builds == 2
    atoms.positions[0] += (2.0, 0.0, 0.0)  # a jump beyond skin/2
    assert skin_set(nl, atoms) == fresh_set(atoms) and nl.builds == 3
    atoms.pbc = (True, True, False)
    assert skin_set(nl, atoms) == fresh_set(atoms) and nl.builds == 4
    atoms.positions[1] += (0.4, 0.0, 0.0)  # under skin/2: kept
    assert skin_set(nl, atoms) == fresh_set(atoms) and nl.builds == 4
    fewer = atoms[:-1]
    assert skin_set(nl, fewer) == fresh_set(fewer) and nl.builds == 5


def test_zero_skin_rebuilds_on_every_move():
    atoms = molecule("CH3CH2OH")
    nl = SkinNeighborList(CUTOFF, skin=0.0)
    nl.pairs(atoms.positions, atoms.cell.array, atoms.pbc)
    nl.pairs(atoms.positions, atoms.cell.array, atoms.pbc)
    assert nl.builds == 1
    atoms.positions[0, 0] += 1e-6
    assert skin_set(nl, atoms) == fresh_set(atoms) and nl.builds == 2


# ---- results equal the plain path -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hipnn_ts", "hiphop"])
@pytest.mark.parametrize("system", ["molecule", "periodic"])
def test_md_results_equal_the_plain_path(kind, system):
    """Eager and TorchScript paths with a kept list give Potential(graph_from_atoms)'s energies and forces."""
    model = tiny_potential(kind, readout_std=0.01)
    start = molecule("CH3CH2OH") if system == "molecule" else nacl()
    calcs = {"eager": Calculator(model, skin=0.3, script=False), "script": Calculator(model, skin=0.3, script=True),
             "auto": Calculator(model)}
    for atoms in hot_md(start, model, steps=40):
        e_ref, f_ref = energy_forces(model, [atoms], head=model.fidelity_index("high"))
        for name, calc in calcs.items():
            probe = atoms.copy()
            probe.calc = calc
            assert probe.get_potential_energy() == pytest.approx(e_ref[0], rel=1e-12, abs=1e-10), name
            np.testing.assert_allclose(probe.get_forces(), f_ref, rtol=0, atol=1e-10, err_msg=name)
    assert 1 < calcs["script"].neighbors.builds < 40
    assert calcs["auto"]._scripted is not None  # auto switched to TorchScript on the way


def test_results_after_cell_change_and_jump(model):
    atoms = nacl()
    calcs = [Calculator(model, script=False), Calculator(model, script=True)]
    head = model.fidelity_index("high")

    def check():
        e_ref, f_ref = energy_forces(model, [atoms], head=head)
        for calc in calcs:
            probe = atoms.copy()
            probe.calc = calc
            assert probe.get_potential_energy() == pytest.approx(e_ref[0], rel=1e-12, abs=1e-10)
            np.testing.assert_allclose(probe.get_forces(), f_ref, rtol=0, atol=1e-10)

    check()
    atoms.set_cell(atoms.cell.array * 0.97, scale_atoms=True)
    check()
    atoms.positions[2] += (1.5, -0.7, 0.3)
    check()
    assert [c.neighbors.builds for c in calcs] == [3, 3]


def test_other_head_and_float32(model):
    atoms = molecule("CH3CH2OH")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        m = tiny_potential("hipnn_ts", readout_std=0.01).to(dtype)
        e_ref, f_ref = energy_forces(m, [atoms], head=0)
        for script in (False, True):
            atoms.calc = Calculator(m, fidelity="low", dtype=dtype, script=script)
            assert atoms.get_potential_energy() == pytest.approx(e_ref[0], abs=tol * 10)
            np.testing.assert_allclose(atoms.get_forces(), f_ref, rtol=0, atol=tol)

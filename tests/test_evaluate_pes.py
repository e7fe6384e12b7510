"""PES smoothness metrics, bond/torsion scans, NVE drift, plots, and their MLflow logging through the CLI.

Real parts only: tiny float64 models, ASE's EMT as a reference calculator, ASE velocity Verlet, a zarr store
written by `polyfid ingest`, and an MLflow sqlite store in tmp_path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT

from conftest import emt_frames
from helpers import tiny_model
from polyfid.evaluation import pes
from polyfid.evaluation.plots import learning_curve_plot
from polyfid.evaluation.report import report_to_mlflow
from polyfid.infra.tracking import Tracker
from polyfid.launch.cli import main
from polyfid.models.package import save_package
from polyfid.models.testing import tiny_potential

pytestmark = pytest.mark.usefixtures("one_thread")


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.02, seed=3)  # no accidental symmetry
    return atoms


def _bond_lengths(atoms, adj) -> np.ndarray:
    return np.array([atoms.get_distance(i, j) for i in range(len(atoms)) for j in adj[i] if i < j])


# ---- metrics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.7, -2.5])
def test_roughness_of_a_quadratic_is_4a2_on_any_grid(a):
    """E = a x² + b x + c has E'' = 2a everywhere, so the normalised roughness is 4a² on every grid."""
    for x in (np.linspace(-1, 2, 7), np.linspace(-1, 2, 61), np.sort(np.random.default_rng(0).uniform(-1, 2, 25))):
        e = a * x**2 + 0.3 * x - 5.0
        assert pes.roughness(e, x) == pytest.approx(4 * a * a, rel=1e-8)


def test_roughness_sees_a_wiggle():
    x = np.linspace(0, np.pi, 40)
    smooth = np.cos(x)
    wiggly = smooth + 0.01 * np.sin(25 * x)
    assert pes.roughness(wiggly, x) > 5 * pes.roughness(smooth, x)
    with pytest.raises(ValueError):
        pes.roughness([1.0, 2.0], [0.0, 1.0])


def test_extrema_count_wiggles_but_not_noise():
    x = np.linspace(0, 2 * np.pi, 73)
    ref = np.cos(x)  # one interior minimum (x = π); the ends do not count
    assert pes.count_extrema(ref) == 1
    noisy = ref + np.random.default_rng(1).normal(0, 1e-5, x.shape)  # far below the 1 meV tolerance
    assert pes.spurious_extrema(noisy, ref) == 0
    wiggly = ref + 0.02 * np.sin(12 * x)  # 20 meV ripples add turning points
    assert pes.spurious_extrema(wiggly, ref) > 0
    assert pes.spurious_extrema(ref, wiggly) < 0  # the model misses extrema the reference has
    assert pes.count_extrema(wiggly, tol=0.5) == 1  # ripples smaller than the tolerance are ignored


# ---- scans ---------------------------------------------------------------------------------------
def test_bond_scan_hits_the_distances_and_moves_the_fragment_rigidly():
    atoms = _ethanol()
    adj = pes.bond_graph(atoms)
    i, j = pes.choose_bond(atoms, adj)
    assert atoms.numbers[i] > 1 and atoms.numbers[j] > 1  # heavy atoms first: the C–C bond
    side = pes.side_of(adj, i, j)
    fixed = [k for k in range(len(atoms)) if k not in side]
    distances = np.linspace(1.2, 2.2, 6)
    for r, g in zip(distances, pes.bond_scan(atoms, i, j, distances)):
        assert g.get_distance(i, j) == pytest.approx(r, abs=1e-10)
        np.testing.assert_allclose(g.positions[fixed], atoms.positions[fixed], atol=1e-12)
        shift = g.positions[side] - atoms.positions[side]
        np.testing.assert_allclose(shift, shift[:1].repeat(len(side), 0), atol=1e-12)  # a rigid translation
    assert pes.choose_bond(molecule("H2O")) == (0, 1)  # no heavy-heavy bond: a bond to H


def test_torsion_scan_changes_only_the_dihedral():
    atoms = _ethanol()
    adj = pes.bond_graph(atoms)
    a, b, c, d = pes.choose_torsion(atoms, adj)
    assert atoms.numbers[b] > 1 and atoms.numbers[c] > 1
    angles = np.arange(0.0, 360.0, 45.0)
    lengths = _bond_lengths(atoms, adj)
    angle_triples = [(n, k, m) for k in range(len(atoms)) for n in adj[k] for m in adj[k] if n < m]
    for phi, g in zip(angles, pes.torsion_scan(atoms, a, b, c, d, angles)):
        assert (g.get_dihedral(a, b, c, d) - phi + 180) % 360 - 180 == pytest.approx(0, abs=1e-8)
        np.testing.assert_allclose(_bond_lengths(g, adj), lengths, atol=1e-10)
        np.testing.assert_allclose(g.get_angles(angle_triples), atoms.get_angles(angle_triples), atol=1e-8)


def test_no_torsion_and_ring_errors_are_clear():
    with pytest.raises(ValueError, match="no torsion"):
        pes.choose_torsion(molecule("H2O"))
    benzene = molecule("C6H6")
    adj = pes.bond_graph(benzene)
    b, c = 0, next(n for n in adj[0] if benzene.numbers[n] == 6)  # a C–C bond of the ring
    a, d = next(n for n in adj[b] if n != c), next(n for n in adj[c] if n != b)
    with pytest.raises(ValueError, match="ring"):
        pes.torsion_scan(benzene, a, b, c, d, [0.0])
    with pytest.raises(ValueError, match="4 atom indices"):
        pes.scan(EMT(), _ethanol(), "torsion", indices=(0, 1))


def test_scan_against_references_given_three_ways():
    model = tiny_potential("hipnn_ts", readout_std=0.01)
    atoms = _ethanol()
    calc = pes.as_calculator(model, "high")
    r = pes.scan(calc, atoms, "torsion", points=13, reference=EMT())
    geoms = pes.torsion_scan(atoms, *r.atoms, r.x)
    ref = pes.energies(EMT(), geoms)
    np.testing.assert_allclose(r.reference, ref)
    for given in (ref, lambda gs: pes.energies(EMT(), gs)):
        r2 = pes.scan(model, atoms, "torsion", points=13, fidelity="high", reference=given)
        assert r2.metrics() == r.metrics()
    assert r.fidelity == "high" and r.x_unit == "deg"
    self_ref = pes.scan(calc, atoms, "bond", points=9, reference=calc).metrics()
    assert self_ref["mae_offset_ev"] < 1e-12 and self_ref["spurious_extrema"] == 0
    assert self_ref["roughness"] == pytest.approx(self_ref["roughness_ref"])
    with pytest.raises(ValueError, match="reference energies"):
        pes.scan(calc, atoms, "bond", points=9, reference=np.zeros(4))


# ---- NVE -----------------------------------------------------------------------------------------
def test_nve_drift_small_for_short_steps_and_large_for_huge_ones():
    model = tiny_potential("hipnn_ts", readout_std=0.01)
    atoms = molecule("CH3CH2OH")
    fine = pes.nve_drift(model, atoms, "high", steps=40, dt_fs=0.25, temperature_K=300.0, seed=1)
    coarse = pes.nve_drift(model, atoms, "high", steps=40, dt_fs=5.0, temperature_K=300.0, seed=1)
    mf, mc = fine.metrics(), coarse.metrics()
    assert len(fine.time_fs) == 41 and fine.time_fs[-1] == pytest.approx(10.0)
    assert all(np.isfinite(v) for v in mf.values())
    assert mf["mean_temperature_K"] > 50  # the atoms do move
    assert mf["max_abs_de_mev_per_atom"] < 0.5, mf
    assert mc["max_abs_de_mev_per_atom"] > 10 * mf["max_abs_de_mev_per_atom"], (mf, mc)
    assert abs(mc["drift_mev_per_atom_per_ps"]) > abs(mf["drift_mev_per_atom_per_ps"])
    again = pes.nve_drift(model, atoms, "high", steps=40, dt_fs=0.25, temperature_K=300.0, seed=1)
    np.testing.assert_array_equal(again.total, fine.total)  # the seed fixes the initial velocities


def test_plots_are_pngs(tmp_path):
    model = tiny_potential("hipnn_ts", readout_std=0.01)
    scans = [pes.scan(model, _ethanol(), k, points=7, reference=EMT()) for k in ("bond", "torsion")]
    nve = pes.nve_drift(model, _ethanol(), steps=5)
    for p in (pes.plot_scans(scans, tmp_path / "s.png"), pes.plot_nve(nve, tmp_path / "n" / "nve.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


# ---- MLflow: the post-training report and the CLI ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny lo/hi package, a 2-shard store of EMT-labelled molecules, and an MLflow run with a history."""
    import ase.io

    tmp = tmp_path_factory.mktemp("evalpes")
    frames = emt_frames(8)
    for a in frames:
        a.info = {k: v for k, v in a.info.items() if k.startswith("energy_")}
    ase.io.write(tmp / "frames.extxyz", frames, format="extxyz")
    assert main(["ingest", str(tmp / "frames.extxyz"), "--out", str(tmp / "s.zarr"), "--dataset", "emt", "--quiet",
                 "--shard-size", "4", "--energy", "lo=energy_lo", "--energy", "hi=energy_hi",
                 "--forces", "lo=forces_lo", "--rank", "lo=0", "--rank", "hi=1"]) == 0
    package = save_package(tmp / "package", tiny_model().double())
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.start("evalpes")
    for step in (10, 20, 30):
        tracker.log_metrics({"loss": 1.0 / step, "loss/lo": 0.5 / step, "valid/energy_mae/lo": 0.1 / step,
                             "valid/forces_mae/lo": 0.2 / step}, step)
    tracker.end()
    return {"tmp": tmp, "frames": frames, "store": str(tmp / "s.zarr"), "package": str(package), "uri": uri,
            "run_id": run_id}


def _artifacts(uri: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id, "plots")}


def test_structure_from_store_reads_the_indexed_frame(trained):
    from polyfid.data_shards.store import Store

    store = Store.open(trained["store"])
    for k in (0, 5, 7):  # shards of 4: index 5 and 7 are in the second shard
        atoms = pes.structure_from_store(store, k)
        np.testing.assert_array_equal(atoms.numbers, trained["frames"][k].numbers)
        np.testing.assert_allclose(atoms.positions, trained["frames"][k].positions, atol=1e-6)
    with pytest.raises(IndexError, match="8 structures"):
        pes.structure_from_store(store, 8)


def test_report_to_mlflow_logs_plots_and_eval_metrics(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    curve = learning_curve_plot(trained["run_id"], trained["uri"], tmp_path / "lc.png")
    assert curve is not None and curve.stat().st_size > 5000
    written = report_to_mlflow(trained["package"], [trained["store"]], trained["run_id"], trained["uri"],
                               tmp_path / "report", step=30)
    assert {p.name for p in written} >= {"eval.json", "parity_lo.png", "parity_hi.png", "learning_curve.png"}
    assert _artifacts(trained["uri"], trained["run_id"]) >= {"plots/parity_lo.png", "plots/learning_curve.png"}
    metrics = MlflowClient(trained["uri"]).get_run(trained["run_id"]).data.metrics
    local = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert metrics["eval/energy_mae/lo"] == pytest.approx(local["lo"]["energy_mae"])
    assert "eval/forces_mae/lo" in metrics and "eval/forces_mae/hi" not in metrics  # hi has no force labels


def test_report_to_mlflow_survives_a_tracking_outage(trained, tmp_path):
    dead = f"sqlite:///{tmp_path / 'no_such_dir' / 'm.db'}"  # the folder does not exist: every call fails
    with pytest.warns(RuntimeWarning):
        written = report_to_mlflow(trained["package"], [trained["store"]], "0123abcd", dead, tmp_path / "r")
    assert {p.name for p in written} >= {"parity_lo.png", "eval.json"}  # the local report is still written
    assert "learning_curve.png" not in {p.name for p in written}


def test_cli_evaluate_scans_nve_and_logs_to_the_run(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "res.json"
    rc = main(["evaluate", "--model", trained["package"], "--data", trained["store"], "--scan", "both",
               "--scan-structure", "3", "--scan-points", "9", "--reference-calc", "emt", "--nve-steps", "20",
               "--mlflow-run", trained["run_id"], "--tracking-uri", trained["uri"], "--json", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PES smoothness" in printed and "NVE: 20 steps" in printed
    res = json.loads(out.read_text())
    assert res["lo"]["n_structures"] == 8
    kinds = [s["kind"] for s in res["smoothness"]["scans"]]
    assert kinds == ["bond", "torsion"] and len(res["smoothness"]["scans"][1]["atoms"]) == 4  # CH3OH: H-C-O-H
    assert res["nve"]["steps"] == 20 and np.isfinite(res["nve"]["drift_mev_per_atom_per_ps"])
    assert _artifacts(trained["uri"], trained["run_id"]) >= {
        "plots/parity_lo.png", "plots/pes_scans.png", "plots/nve.png", "plots/learning_curve.png"}
    metrics = MlflowClient(trained["uri"]).get_run(trained["run_id"]).data.metrics
    for key in ("smoothness/bond/roughness", "smoothness/torsion/spurious_extrema", "nve/drift_mev_per_atom_per_ps",
                "eval/energy_mae/hi"):
        assert key in metrics, key
    assert metrics["smoothness/torsion/roughness"] == pytest.approx(res["smoothness"]["scans"][1]["roughness"])


def test_cli_evaluate_refuses_bad_scan_input(trained):
    base = ["evaluate", "--model", trained["package"], "--data", trained["store"], "--quiet", "--scan", "torsion"]
    with pytest.raises(SystemExit, match="no torsion"):
        main(base + ["--scan-structure", "1"])  # H2O
    with pytest.raises(SystemExit, match="2 atoms"):
        main(base + ["--scan-atoms", "1,2,3"])
    with pytest.raises(SystemExit, match="not a head"):
        main(base + ["--scan-fidelity", "ccsd"])

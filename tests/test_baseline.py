"""The linear baseline (S4): invariant features, an exact ridge fit, forces, real demo data and the CLI."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import Store
from polyfid.evaluation.baseline import (
    LINEAR, NETWORK, REFS, BaselineConfig, InvariantFeatures, LinearBaseline, design, fit_ridge, run_baseline,
)
from polyfid.evaluation.metrics import evaluate_batches
from polyfid.launch.cli import main
from polyfid.models.graph import build_graph

MOLECULES = ("ethanol", "malonaldehyde", "methylamine")
SMALL = BaselineConfig(n_radial=4, l_max=2, n_max=2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Real demo data split as `make demo` splits it: frames 0-79 of three molecules to fit, 80-99 to test."""
    from polyfid.data_shards.ingest import ingest

    root = tmp_path_factory.mktemp("baseline")
    files = {p.name.split(".")[0]: p for p in demo_files()}
    out = {"train": str(root / "train.zarr"), "test": str(root / "test.zarr")}
    energy = {LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"}
    for i, name in enumerate(MOLECULES):
        for key, part, forces in (("train", ":80", (LOW,)), ("test", "-20:", (LOW, HIGH))):
            ingest([f"{files[name]}@{part}"], out[key], dataset=name, energy=energy,
                   forces={f: f"forces_{f}" for f in forces}, ranks={LOW: 0, HIGH: 1}, append=i > 0,
                   progress=False)
    return out


def _arrays(atoms) -> dict:
    return {"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": np.zeros((1, 3, 3)),
            "pbc": np.zeros((1, 3), bool), "n_atoms": np.array([len(atoms)])}


def _features(feat: InvariantFeatures, atoms) -> torch.Tensor:
    graph = build_graph(_arrays(atoms), feat.config.cutoff, dtype=torch.float64)
    return feat(graph, graph.pos).detach()


def test_features_are_invariant_to_rotation_translation_and_permutation():
    atoms = ase.io.read(demo_files()[0], index=0)
    feat = InvariantFeatures([1, 6, 7, 8], BaselineConfig())
    phi = _features(feat, atoms)
    assert phi.shape == (len(atoms), 13 * 8 * 4) and float(phi.std()) > 0
    moved = atoms.copy()
    moved.positions = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).apply(atoms.positions) + [1.5, -2.0, 0.7]
    torch.testing.assert_close(_features(feat, moved), phi, rtol=1e-9, atol=1e-9)
    perm = np.random.default_rng(0).permutation(len(atoms))
    torch.testing.assert_close(_features(feat, atoms[perm]), phi[perm], rtol=1e-9, atol=1e-9)
    bent = atoms.copy()
    bent.positions[0] += [0.05, 0.0, 0.0]
    assert not torch.allclose(_features(feat, bent), phi, atol=1e-6)  # features do see geometry


def test_fit_recovers_a_known_linear_function():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10))
    counts = rng.integers(1, 6, size=(200, 3)).astype(float)
    w, a = rng.normal(size=10), np.array([-13.6, -1030.0, -2040.0])
    fit = fit_ridge(x, counts, x @ w + counts @ a)
    np.testing.assert_allclose(fit.weights, w, atol=1e-6)
    np.testing.assert_allclose(fit.references, a, atol=1e-6)
    assert fit.train_rmse < 1e-6


def test_fit_on_real_features_reproduces_a_per_element_linear_energy(stores):
    """Energies made from a known per-element function of the real features are predicted on unseen frames."""
    feat = InvariantFeatures([1, 6, 7, 8], SMALL)
    train, test = (design(feat, iter_all([Store.open(stores[k])])) for k in ("train", "test"))
    w = np.random.default_rng(2).normal(size=train["x"].shape[1]) * 1e-3
    a = np.array([-13.6, -1030.0, -1480.0, -2040.0])
    fit = fit_ridge(train["x"], train["counts"], train["x"] @ w + train["counts"] @ a,
                    groups=feat.column_groups())
    y_test = test["x"] @ w + test["counts"] @ a
    err = fit.predict(test["x"], test["counts"]) - y_test
    assert np.abs(err).max() < 1e-3 * (test["x"] @ w).std()


def test_forces_are_minus_the_gradient_of_the_energy(stores):
    feat = InvariantFeatures([1, 6, 7, 8], SMALL)
    d = design(feat, iter_all([Store.open(stores["train"])]))
    fit = fit_ridge(d["x"], d["counts"], d["energy"][:, 0], groups=feat.column_groups())
    model = LinearBaseline(feat, {LOW: fit})
    atoms = ase.io.read(demo_files()[0], index=5)
    batch = _arrays(atoms)
    _, forces = model.predict(batch, forces=True)
    h = 1e-5
    for atom, axis in ((0, 0), (3, 2), (7, 1)):
        plus, minus = (atoms.positions.copy() for _ in range(2))
        plus[atom, axis] += h
        minus[atom, axis] -= h
        e_plus = model.predict(dict(batch, positions=plus), forces=False)[0][0, 0]
        e_minus = model.predict(dict(batch, positions=minus), forces=False)[0][0, 0]
        assert forces[atom, 0, axis] == pytest.approx(-(e_plus - e_minus) / (2 * h), rel=1e-5, abs=1e-6)


def test_baseline_beats_reference_energies_on_real_data(stores):
    report = run_baseline([Store.open(stores["train"])], [Store.open(stores["test"])], config=SMALL)
    for fid in (LOW, HIGH):
        rows = report["results"][fid]
        assert rows[LINEAR]["n_structures"] == 60
        assert rows[LINEAR]["energy_mae"] < 0.6 * rows[REFS]["energy_mae"], rows
        assert rows[LINEAR]["forces_mae"] < rows[REFS]["forces_mae"], rows  # beats zero forces


def _tiny_package(path) -> str:
    from polyfid.models.config import ModelConfig
    from polyfid.models.package import save_package
    from polyfid.models.potential import Potential

    torch.manual_seed(0)
    cfg = ModelConfig(kind="hipnn_ts", width=8, n_interactions=1, n_atom_layers=1, n_sensitivities=4, cutoff=4.0)
    model = Potential(cfg, [1, 6, 7, 8], [Fidelity(LOW, rank=0), Fidelity(HIGH, rank=1)])
    return str(save_package(path, model))


def test_cli_prints_one_table_with_the_network_beside_the_baseline(stores, tmp_path, capsys):
    pkg = _tiny_package(tmp_path / "pkg")
    small = ["--n-radial", "4", "--l-max", "2", "--n-max", "2"]
    out_json = tmp_path / "baseline.json"
    rc = main(["baseline", "--data", stores["train"], "--test", stores["test"], "--model", pkg,
               "--json", str(out_json)] + small)
    assert rc == 0
    table = capsys.readouterr().out
    for fid in (LOW, HIGH):
        for label in (LINEAR, NETWORK):
            assert sum(line.startswith(fid) and label in line for line in table.splitlines()) == 1, table
    report = json.loads(out_json.read_text())
    from polyfid.models.package import load_package

    direct = evaluate_batches(load_package(pkg), iter_all([Store.open(stores["test"])], fidelities=[LOW, HIGH]),
                              [LOW, HIGH]).results()
    for fid in (LOW, HIGH):
        assert report["results"][fid][NETWORK]["energy_mae"] == pytest.approx(direct[fid]["energy_mae"])

    # No --test: a seeded 80/20 split, and the network is scored on the same held-out structures.
    rc = main(["baseline", "--data", stores["train"], "--model", pkg, "--no-forces",
               "--json", str(out_json)] + small)
    assert rc == 0
    assert "80/20 split" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["results"][HIGH]
    assert rows[LINEAR]["n_structures"] == rows[NETWORK]["n_structures"] == 48
    assert "forces_mae" not in rows[LINEAR]

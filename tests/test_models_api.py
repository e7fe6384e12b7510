"""The Potential's contract: config validation, heads, references, dtypes, errors, calculator defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from polyfid.data_shards.schema import Fidelity
from polyfid.models import Calculator, ModelConfig, Potential, graph_from_atoms, invariant_count
from polyfid.models.testing import TEST_FIDELITIES, implemented_kinds, tiny_config, tiny_potential


pytestmark = pytest.mark.usefixtures("one_thread")


def _graph(model, systems=None, dtype=torch.float64):
    systems = systems or [molecule("CH3CH2OH"), molecule("H2O")]
    return graph_from_atoms(systems, model.config.cutoff, dtype=dtype)


def test_config_defaults_round_trip_and_errors():
    cfg = ModelConfig()
    assert (cfg.kind, cfg.width, cfg.n_interactions, cfg.n_atom_layers) == ("hipnn_ts", 64, 2, 2)
    assert (cfg.n_sensitivities, cfg.cutoff, cfg.soft_min, cfg.soft_max) == (16, 5.0, 0.75, 4.5)
    assert (cfg.l_max, cfg.n_max, cfg.activation) == (2, 4, "silu")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="kind.*hipnn, hipnn_ts, hiphop"):
        ModelConfig(kind="mace")
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*'widht'"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=0)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu6")
    with pytest.raises(ValueError, match="n_max"):
        ModelConfig(kind="hiphop", n_max=5)


def test_invariant_counts_match_s2():
    assert [invariant_count(n, l) for n, l in [(4, 3), (4, 2), (3, 3), (3, 2)]] == [13, 6, 7, 5]
    for (n_max, l_max), count in {(4, 3): 13, (4, 2): 6, (3, 3): 7, (3, 2): 5}.items():
        model = Potential(tiny_config("hiphop", n_max=n_max, l_max=l_max), [1, 6], TEST_FIDELITIES)
        assert len(model.backbone.blocks[0].interaction.names) == count
        assert model.backbone.blocks[0].interaction.group_norm.num_groups == count


@pytest.mark.parametrize("kind", implemented_kinds())
def test_multi_fidelity_shapes_and_force_columns(kind):
    model = tiny_potential(kind)
    graph = _graph(model)
    out = model(graph)
    assert out["energy"].shape == (2, 2) and "forces" not in out
    out = model(graph, force_heads=[1])
    assert out["forces"].shape == (graph.n_atoms, 2, 3)
    assert torch.all(out["forces"][:, 0] == 0) and out["forces"][:, 1].abs().max() > 0
    both = model(graph, force_heads=[0, 1])
    torch.testing.assert_close(both["forces"][:, 1], out["forces"][:, 1])
    assert not torch.allclose(both["forces"][:, 0], both["forces"][:, 1])  # the heads differ
    with pytest.raises(IndexError):
        model(graph, force_heads=[2])


def test_pos_is_not_modified_and_no_grad_inference():
    model = tiny_potential("hipnn_ts")
    graph = _graph(model)
    before = graph.pos.clone()
    with torch.no_grad():
        out = model(graph, force_heads=[0])
    assert not graph.pos.requires_grad and torch.equal(graph.pos, before)
    assert out["energy"].grad_fn is None and out["forces"].grad_fn is None
    assert out["forces"][:, 0].abs().max() > 0


def test_create_graph_lets_a_force_loss_reach_the_weights():
    model = tiny_potential("hiphop")
    out = model(_graph(model), force_heads=[0], create_graph=True)
    loss = out["forces"].pow(2).sum() + out["energy"].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.backbone.blocks[0].interaction.sensitivity.sigma.grad.abs().max() > 0


def test_unknown_element_names_it():
    model = tiny_potential("hipnn")
    with pytest.raises(ValueError, match=r"\[26\].*\[1, 6, 7, 8, 11, 14, 17\]"):
        model(_graph(model, [molecule("H2O"), bulk("Fe")]))
    with pytest.raises(ValueError, match=r"\[118\]"):
        from ase import Atoms

        model(_graph(model, [Atoms("Og", positions=[[0, 0, 0]])]))


def test_reference_energies_add_per_atom_and_stay_float64():
    refs = {"low": {1: -13.6, 8: -2040.0}, "high": {1: -13.0, 8: -2041.5}}
    plain = tiny_potential("hipnn_ts")
    model = tiny_potential("hipnn_ts")
    for name, mapping in refs.items():
        model.set_reference_energies(name, mapping)
    graph = _graph(model, [molecule("H2O")])
    diff = model(graph)["energy"] - plain(graph)["energy"]
    torch.testing.assert_close(diff[0], torch.tensor([-2040.0 - 27.2, -2041.5 - 26.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="26"):
        model.set_reference_energies("low", {26: -1.0})
    with pytest.raises(KeyError, match="low.*high"):
        model.fidelity_index("ccsd(t)")
    model.to(torch.bfloat16)
    assert model.reference_energies.dtype == torch.float64
    e_bf16 = model(graph.to(dtype=torch.bfloat16))["energy"]
    assert e_bf16.dtype == torch.float32
    # The references survive the cast exactly; only the small learned part is bf16-rounded.
    assert abs(e_bf16[0, 0].item() - (-2067.2 + plain(graph)["energy"][0, 0].item())) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", implemented_kinds())
def test_dtypes(kind, dtype):
    model = tiny_potential(kind, dtype=dtype)
    graph = _graph(model, [molecule("CH3CH2OH"), bulk("Si", "diamond", a=5.43)], dtype=dtype)
    out = model(graph, force_heads=[0], create_graph=True)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    reference = tiny_potential(kind)(_graph(model, [molecule("CH3CH2OH"), bulk("Si", "diamond", a=5.43)]))
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 0.5}[dtype]
    assert (out["energy"].double() - reference["energy"]).abs().max() < tol
    out["forces"].pow(2).sum().backward()  # double backward works in this dtype


def test_add_fidelity_copies_head_and_parameter_groups():
    model = tiny_potential("hipnn_ts")
    model.set_reference_energies("high", {1: -13.0, 6: -1030.0, 8: -2041.5})
    graph = _graph(model)
    before = model(graph, force_heads=[1])
    k = model.add_fidelity(Fidelity("ccsdt", rank=5, method="CCSD(T)"), init_from="high")
    assert k == 2 and model.fidelity_names == ["low", "high", "ccsdt"]
    after = model(graph, force_heads=[1, 2])
    assert after["energy"].shape == (2, 3)
    torch.testing.assert_close(after["energy"][:, :2], before["energy"])
    torch.testing.assert_close(after["energy"][:, 2], after["energy"][:, 1])
    torch.testing.assert_close(after["forces"][:, 2], after["forces"][:, 1])
    fresh = model.add_fidelity(Fidelity("new", rank=-1))
    e = model(graph)["energy"]
    assert fresh == 3 and abs(e[0, 3].item()) < 1.0  # a fresh head starts near zero (no references)
    with pytest.raises(ValueError, match="already"):
        model.add_fidelity(Fidelity("low"))
    backbone, heads = model.backbone_parameters(), model.head_parameters()
    ids = {id(p) for p in backbone} | {id(p) for p in heads}
    assert ids == {id(p) for p in model.parameters()} and not {id(p) for p in backbone} & {id(p) for p in heads}
    assert all(p.shape[0] == 4 for p in heads)


def test_fresh_model_starts_near_references():
    refs = {"low": {1: -13.6, 6: -1029.0, 8: -2040.0}}
    torch.manual_seed(3)
    model = Potential(ModelConfig(width=32), [1, 6, 8], TEST_FIDELITIES, refs)
    graph = graph_from_atoms([molecule("CH3CH2OH")], model.config.cutoff)
    energy = model(graph)["energy"][0, 0].item()
    reference = 2 * -1029.0 + 6 * -13.6 - 2040.0
    assert abs(energy - reference) < 1.5  # eV, for 9 atoms


def test_calculator_defaults_to_highest_rank_and_handles_pbc():
    model = tiny_potential("hiphop")
    calc = Calculator(model)
    assert calc.fidelity == "high" and calc.head == 1
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    graph = graph_from_atoms([atoms], model.config.cutoff, dtype=torch.float64)
    out = model(graph, force_heads=[1])
    assert energy == pytest.approx(out["energy"][0, 1].item(), abs=1e-12)
    np.testing.assert_allclose(forces, out["forces"][:, 1].numpy(), atol=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == energy
    low = Calculator(model, fidelity="low")
    atoms.calc = low
    assert atoms.get_potential_energy() == pytest.approx(out["energy"][0, 0].item(), abs=1e-12)


def test_models_never_import_ray_deepspeed_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, polyfid.models, polyfid.models.calculator, polyfid.models.testing;"
        "print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

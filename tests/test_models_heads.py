"""Head designs: independent heads (S1) and delta heads (E_high = E_low + ΔE), their physics and persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import molecule

from polyfid.data_shards.schema import Fidelity
from polyfid.models import ModelConfig, Potential, graph_from_atoms, load_package, save_package
from polyfid.models.testing import finite_difference_error, implemented_kinds, tiny_config, tiny_potential

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = {
    "low": {1: -10.0, 6: -1000.0, 7: -1400.0, 8: -2000.0},
    "high": {1: -13.6, 6: -1029.5, 7: -1485.0, 8: -2040.25},
}
SYSTEMS = (molecule("CH3CH2OH"), molecule("NH3"))
FIDELITIES = (Fidelity("low", rank=0, method="HF"), Fidelity("high", rank=2, method="MP2"))  # room for a rank 1


def _delta(kind: str = "hipnn_ts", dtype=torch.float64, **overrides) -> Potential:
    model = tiny_potential(kind, dtype=dtype, fidelities=FIDELITIES, head_design="delta", **overrides)
    for name, refs in REFS.items():
        model.set_reference_energies(name, refs)
    return model


def _run(model: Potential, systems=SYSTEMS) -> dict[str, torch.Tensor]:
    graph = graph_from_atoms(list(systems), model.config.cutoff, dtype=model.dtype)
    return model(graph, force_heads=list(range(len(model.fidelities))))


def _ref_sum(name: str, systems=SYSTEMS) -> torch.Tensor:
    return torch.tensor([sum(REFS[name][int(z)] for z in a.numbers) for a in systems], dtype=torch.float64)


def _zero_head(model: Potential, name: str) -> None:
    k = model.fidelity_index(name)
    with torch.no_grad():
        for readout in model.readouts:
            readout.weight[k] = 0.0
            readout.bias[k] = 0.0


def test_config_head_design_defaults_and_errors():
    cfg = ModelConfig()
    assert cfg.head_design == "independent" and cfg.head_base == {}
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("head_design", "head_base")}  # a package before delta
    assert ModelConfig.from_dict(old).head_design == "independent"
    delta = ModelConfig(head_design="delta", head_base={"high": "low"})
    assert ModelConfig.from_dict(delta.to_dict()) == delta
    with pytest.raises(ValueError, match="head_design.*independent, delta"):
        ModelConfig(head_design="residual")
    with pytest.raises(ValueError, match="only used with head_design='delta'"):
        ModelConfig(head_base={"high": "low"})
    with pytest.raises(ValueError, match="must map fidelity names"):
        ModelConfig(head_design="delta", head_base={"high": 1})
    fids = [Fidelity("low", rank=0), Fidelity("high", rank=1)]
    with pytest.raises(ValueError, match="not among the heads"):
        Potential(tiny_config("hipnn", head_design="delta", head_base={"high": "mp2"}), [1, 6], fids)
    with pytest.raises(ValueError, match="cycle"):
        Potential(tiny_config("hipnn", head_design="delta", head_base={"high": "low", "low": "high"}), [1, 6], fids)


def test_bases_follow_rank_not_head_order_and_the_callers_config_is_untouched():
    cfg = tiny_config("hipnn", head_design="delta")
    fids = [Fidelity("ccsdt", rank=2), Fidelity("hf", rank=0), Fidelity("dft_a", rank=1), Fidelity("dft_b", rank=1)]
    model = Potential(cfg, [1, 6, 8], fids)
    assert model.config.head_base == {"ccsdt": "dft_a", "dft_a": "hf", "dft_b": "hf"}
    assert cfg.head_base == {}  # resolved on a copy
    assert model.head_chain("ccsdt") == ["ccsdt", "dft_a", "hf"] and model.head_chain("hf") == ["hf"]
    expected = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    assert torch.equal(model.head_sum, expected)
    independent = Potential(tiny_config("hipnn"), [1, 6, 8], fids)
    assert independent.head_chain("ccsdt") == ["ccsdt"] and torch.equal(independent.head_sum, torch.eye(4).double())


@pytest.mark.parametrize("kind", implemented_kinds())
def test_delta_forces_are_minus_the_gradient(kind):
    model = _delta(kind)
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    assert finite_difference_error(model, atoms, head=1) < 1e-6
    assert finite_difference_error(model, atoms, head=0) < 1e-6


def test_zeroing_the_delta_readout_gives_the_low_head_plus_high_references():
    model = _delta()
    out = _run(model)
    e_low, e_high = out["energy"][:, 0] - _ref_sum("low"), out["energy"][:, 1] - _ref_sum("high")
    assert (e_high - e_low).abs().max() > 1e-3  # a nonzero correction
    _zero_head(model, "high")
    out = _run(model)
    torch.testing.assert_close(out["energy"][:, 1] - _ref_sum("high"), out["energy"][:, 0] - _ref_sum("low"),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(out["forces"][:, 1], out["forces"][:, 0], rtol=0, atol=1e-12)
    # ... and the independent design has no such link: its zeroed head is flat
    independent = tiny_potential("hipnn_ts")
    _zero_head(independent, "high")
    assert _run(independent)["forces"][:, 1].abs().max() == 0


def test_high_energy_gradient_reaches_the_base_readout_row():
    model = _delta()
    _run(model)["energy"][:, 1].sum().backward()
    grad = model.readouts[-1].weight.grad
    assert grad[0].abs().max() > 0 and torch.equal(grad[0], grad[1])


def test_package_round_trip_keeps_the_chain_and_old_packages_load_independent(tmp_path):
    model = _delta()
    model.add_fidelity(Fidelity("mid", rank=1), init_from="low")
    path = save_package(tmp_path / "delta", model)
    loaded = load_package(path)
    assert loaded.config.head_design == "delta" and loaded.config.head_base == {"high": "low", "mid": "low"}
    a, b = _run(model), _run(loaded)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])

    old = save_package(tmp_path / "old", tiny_potential("hipnn_ts"))
    meta = json.loads((old / "polyfid.json").read_text())
    for key in ("head_design", "head_base"):
        del meta["config"][key]
    (old / "polyfid.json").write_text(json.dumps(meta))
    reloaded = load_package(old)
    assert reloaded.config.head_design == "independent"
    assert torch.equal(_run(reloaded)["energy"], _run(tiny_potential("hipnn_ts"))["energy"])


def test_add_fidelity_with_delta_heads():
    model = _delta()
    before = _run(model)
    # above every head, from the top head: it corrects "high", with a zero correction
    k = model.add_fidelity(Fidelity("ccsdt", rank=5), init_from="high")
    assert model.config.head_base["ccsdt"] == "high"
    assert all(not r.weight[k].any() and not r.bias[k].any() for r in model.readouts)
    # between the two, from the top head: it corrects "low", so its readout is high's correction
    mid = model.add_fidelity(Fidelity("mid", rank=1), init_from="high")
    # below every head: no base; its readout is low's effective readout
    bottom = model.add_fidelity(Fidelity("semi", rank=-1), init_from="low")
    assert model.config.head_base == {"high": "low", "ccsdt": "high", "mid": "low"}  # earlier chains kept
    after = _run(model)
    torch.testing.assert_close(after["energy"][:, :2], before["energy"], rtol=0, atol=1e-9)
    torch.testing.assert_close(after["forces"][:, :2], before["forces"], rtol=0, atol=1e-12)
    for new, src in ((k, 1), (mid, 1), (bottom, 0)):  # references copied, so energies equal the source's
        torch.testing.assert_close(after["energy"][:, new], after["energy"][:, src], rtol=0, atol=1e-9)
        torch.testing.assert_close(after["forces"][:, new], after["forces"][:, src], rtol=0, atol=1e-12)
    fresh = model.add_fidelity(Fidelity("new", rank=9))  # no init: a small correction on "ccsdt"
    e = _run(model)["energy"]
    assert model.config.head_base["new"] == "ccsdt" and (e[:, fresh] - e[:, k] + _ref_sum("high")).abs().max() < 2.0


def test_bf16_delta_model_keeps_float64_references():
    model = _delta()
    reference = _run(model)
    low = _delta(dtype=torch.bfloat16)
    assert low.reference_energies.dtype == torch.float64 and low.dtype == torch.bfloat16
    out = _run(low)
    assert out["energy"].dtype == torch.float32 and torch.isfinite(out["forces"]).all()
    assert (out["energy"].double() - reference["energy"]).abs().max() < 0.5  # eV; totals are ~ -4000 eV
    assert np.isfinite(out["forces"].double().numpy()).all()


@pytest.mark.parametrize("design", ["independent", "delta"])
def test_scale_and_shift_per_head(design):
    """With zeroed readouts each head is its references plus its own per-atom shift (delta chains included);
    a head added from a scaled source reproduces the source's energies and forces exactly."""
    model = _delta() if design == "delta" else tiny_potential("hipnn_ts", dtype=torch.float64, fidelities=FIDELITIES)
    if design != "delta":
        for name, refs in REFS.items():
            model.set_reference_energies(name, refs)
    model.set_scale_shift("low", 2.5, 0.3)
    model.set_scale_shift("high", 0.4, -0.2)
    with pytest.raises(ValueError, match="must be positive"):
        model.set_scale_shift("high", 0.0, 0.0)
    before = _run(model)
    n_atoms = torch.tensor([len(a) for a in SYSTEMS], dtype=torch.float64)
    zeroed = tiny_potential("hipnn_ts", dtype=torch.float64, fidelities=FIDELITIES, head_design=design)
    zeroed.load_state_dict(model.state_dict())
    for name in ("low", "high"):
        _zero_head(zeroed, name)
    e = _run(zeroed)["energy"]
    torch.testing.assert_close(e[:, 0], _ref_sum("low") + 0.3 * n_atoms, rtol=0, atol=1e-9)
    torch.testing.assert_close(e[:, 1], _ref_sum("high") - 0.2 * n_atoms, rtol=0, atol=1e-9)
    new = model.add_fidelity(Fidelity("wb97x", rank=3), init_from="low")
    assert model.scale_shift_dict()["wb97x"] == {"scale": 2.5, "shift": 0.3}
    after = _run(model)
    torch.testing.assert_close(after["energy"][:, :2], before["energy"], rtol=0, atol=1e-9)
    torch.testing.assert_close(after["energy"][:, new], after["energy"][:, 0], rtol=0, atol=1e-9)
    torch.testing.assert_close(after["forces"][:, new], after["forces"][:, 0], rtol=0, atol=1e-12)
    assert finite_difference_error(model, SYSTEMS[0], head=1) < 1e-5  # forces stay −∂E/∂R with a scale

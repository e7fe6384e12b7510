"""Fine-tuning parts in isolation: early stopping, the replay mix and its cursor, the anchored reference refit.

Stores are real zarr stores ingested from the embedded QM demo data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.data_shards.reader import ShardReader, iter_all
from polyfid.data_shards.store import Store
from polyfid.evaluation.metrics import predict
from polyfid.distributed.loop.stopping import EarlyStopping, convergence, convergence_words
from polyfid.distributed.finetune.plan import refit_references
from polyfid.distributed.modes.replay import MixedReader, replay_share, split_budget
from polyfid.distributed.modes.replay import mixed_reader
from polyfid.models.config import ModelConfig
from polyfid.models.potential import Potential


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    files = {p.name.split(".")[0]: p for p in demo_files()}
    energy = {LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"}
    for i, name in enumerate(("ethanol", "malonaldehyde", "methylamine")):
        ingest([f"{files[name]}@:30"], tmp / "pre.zarr", dataset=name, energy=energy, forces={LOW: f"forces_{LOW}"},
               ranks={LOW: 0, HIGH: 1}, append=i > 0, shard_size=16, progress=False)
    ingest([f"{files['formic_acid']}@:20"], tmp / "target.zarr", dataset="formic_acid",
           energy={HIGH: f"energy_{HIGH}"}, forces={HIGH: f"forces_{HIGH}"}, ranks={HIGH: 1}, progress=False)
    return Store.open(tmp / "pre.zarr"), Store.open(tmp / "target.zarr")


def test_early_stopping_keeps_best_weights():
    m = torch.nn.Linear(2, 1)
    es = EarlyStopping(patience=2, head="hi")
    res = lambda e: {"hi": {"energy_mae_per_atom": e, "forces_mae": 0.0}}  # noqa: E731
    assert not es.update(res(1.0), m, 10, keep=True)
    with torch.no_grad():
        m.weight += 1.0
    assert not es.update(res(0.5), m, 20, keep=True)  # better: these weights are kept
    best = m.weight.detach().clone()
    with torch.no_grad():
        m.weight += 1.0
    assert not es.update(res(0.7), m, 30, keep=True)  # one bad validation
    assert es.update(res(0.6), m, 40, keep=True)  # two in a row: stop
    assert es.best_step == 20
    es.restore_best(m)
    assert torch.equal(m.weight, best)
    assert not EarlyStopping(0, "hi").update(res(1.0), m, 1, keep=False)
    assert not es.update({"other": {"forces_mae": 0.1}}, m, 50, keep=True)  # no score for the head: ignored


def test_convergence_reads_the_fall_of_the_best_force_error_over_the_last_fifth():
    # still falling: the best by step 800 is 0.10, the best by 1000 is 0.08, a 25% fall
    falling = [(0, 0.5), (400, 0.2), (800, 0.10), (900, 0.09), (1000, 0.08)]
    c = convergence(falling, 1000)
    assert c["fall"] == pytest.approx(0.25) and c["converged"] is False
    assert convergence_words(c).startswith("NOT converged") and "25.0%" in convergence_words(c)
    # flat (noise above the best counts for nothing): 0.100 -> 0.098, a 2% fall
    flat = [(0, 0.5), (400, 0.11), (800, 0.100), (900, 0.13), (1000, 0.098)]
    c = convergence(flat, 1000)
    assert c["fall"] == pytest.approx(0.002 / 0.098) and c["converged"] is True
    assert convergence_words(c).startswith("converged:")
    assert convergence(flat, 1000, threshold=0.01)["converged"] is False  # stopping.converged_fall
    assert convergence(flat, 1000, window=0.05)["fall"] == pytest.approx(0.002 / 0.098)  # 900 is no new best
    # an early-stopped run: the window is read against its last step
    assert convergence([(100, 0.3), (150, 0.25), (250, 0.2)], 250)["converged"] is False
    assert convergence([(100, 0.3), (200, 0.2), (250, 0.21)], 250)["converged"] is True
    # no validation before the window, or none with forces: not measured, and said so
    assert convergence([(900, 0.1), (1000, 0.1)], 1000)["converged"] is None
    assert convergence([(0, float("nan")), (1000, 0.1)], 1000)["converged"] is None
    assert "not measured" in convergence_words(convergence([], 1000))


def test_split_budget():
    assert split_budget(256, 0.25) == (192, 64)
    assert split_budget(10, 0.01) == (9, 1)
    assert split_budget(10, 0.99) == (1, 9)


def test_mixed_reader_batches_columns_and_cursor(stores):
    pre, target = stores
    cfg = ShardReader.Config(atom_budget=120, shuffle_buffer=64, seed=3, loop=True, prefetch=0)
    fids = [LOW, HIGH]
    reader = mixed_reader([target], [pre], cfg, 0.25, fids, rank=0, world=1)
    assert isinstance(reader, MixedReader)
    it = iter(reader)
    batches = [next(it) for _ in range(5)]
    for b in batches:
        is_replay = b["store"] >= 1
        assert is_replay.any() and (~is_replay).any()
        assert b["energy"].shape == (len(b["n_atoms"]), 2) and b["forces"].shape == (len(b["atomic_numbers"]), 2, 3)
        # target rows have no LOW labels; replay rows have LOW energies and forces
        assert np.isnan(b["energy"][~is_replay, 0]).all() and np.isfinite(b["energy"][~is_replay, 1]).all()
        assert np.isfinite(b["energy"][is_replay, 0]).all()
        atom_store = np.repeat(b["store"], b["n_atoms"])
        assert np.isnan(b["forces"][atom_store == 0, 0]).all() and np.isfinite(b["forces"][atom_store >= 1, 0]).all()
        assert int(b["n_atoms"][is_replay].sum()) <= 30 and int(b["n_atoms"][~is_replay].sum()) <= 90
        assert 0 < replay_share(b, 1) < 1
    assert np.mean([replay_share(b, 1) for b in batches]) < 0.5  # 25% of the budget (a partial epoch-end batch aside)
    # exact resume: a reader restored from the state after batch 2 yields batches 3 and 4
    reader2 = mixed_reader([target], [pre], cfg, 0.25, fids, rank=0, world=1)
    it2 = iter(reader2)
    for _ in range(2):
        next(it2)
    state = MixedReader.gather_states([reader2.state_dict()])
    reader3 = mixed_reader([target], [pre], cfg, 0.25, fids, rank=0, world=1)
    reader3.load_state_dict(state)
    it3 = iter(reader3)
    for want in batches[2:4]:
        got = next(it3)
        assert np.array_equal(got["structure_id"], want["structure_id"]) and np.array_equal(got["store"], want["store"])


def _high_energy_error(model, store) -> float:
    k = model.fidelity_index(HIGH)
    errs = []
    for b in iter_all([store], fidelities=[HIGH]):
        e, _ = predict(model, b, model.config.cutoff, None, "cpu", forces=False)
        errs.append(np.abs(e[:, k] - b["energy"][:, 0]))
    return float(np.concatenate(errs).mean())


def test_refit_with_anchors_keeps_the_head_on_pretraining_data(stores):
    """A one-composition target cannot pin four elements' references; anchors on the pretraining data can."""
    pre, target = stores
    torch.manual_seed(0)
    fids = sorted({f.name: f for s in stores for f in s.fidelities}.values(), key=lambda f: f.rank)
    base = Potential(ModelConfig(kind="hipnn_ts", width=8, n_interactions=1, n_sensitivities=4), [1, 6, 7, 8], fids)
    refit_references(base, HIGH, [pre])  # a "pretrained" head: references that fit the pretraining data
    before_pre = _high_energy_error(base, pre)
    free = Potential(base.config, base.elements, fids)
    free.load_state_dict(base.state_dict())
    anchored = Potential(base.config, base.elements, fids)
    anchored.load_state_dict(base.state_dict())
    refit_references(free, HIGH, [target])
    refit_references(anchored, HIGH, [target], anchors=[pre])
    # both fit the target about equally well ...
    assert _high_energy_error(anchored, target) < 2 * _high_energy_error(free, target) + 0.05
    # ... but only the anchored refit leaves the pretraining molecules where they were
    assert _high_energy_error(anchored, pre) < 1.5 * before_pre + 0.05
    assert _high_energy_error(free, pre) > 10 * _high_energy_error(anchored, pre)


def test_early_stopping_smooths_and_waits_for_min_steps():
    m = torch.nn.Linear(2, 1)
    res = lambda e: {"hi": {"energy_mae_per_atom": e, "forces_mae": 0.0}}  # noqa: E731
    es = EarlyStopping(patience=1, head="hi", min_steps=100, smoothing=0.5)
    assert not es.update(res(1.0), m, 0, keep=True)
    assert not es.update(res(3.0), m, 25, keep=True)  # worse, but before min_steps: no patience spent
    assert es.bad == 0 and es.smoothed == pytest.approx(2.0)
    # one noisy good validation does not become "best" on its own: the smoothed score is 1.1, not 0.2
    assert not es.update(res(0.2), m, 50, keep=True)
    assert es.best_score == pytest.approx(1.0) and es.best_step == 0
    assert not es.update(res(0.2), m, 75, keep=True)  # smoothed 0.65: a real improvement
    assert es.best_step == 75
    assert es.update(res(5.0), m, 125, keep=True)  # after min_steps a worse validation counts: stop


def test_forgetting_advice_only_when_huge_and_without_replay():
    from polyfid.distributed.finetune.forgetting import forgetting_advice

    big = {HIGH: {"energy_mae_parent": 0.028, "energy_mae_finetuned": 1.104,
                  "forces_mae_parent": 0.185, "forces_mae_finetuned": 0.445}}
    hint = forgetting_advice(big, 0.0)
    assert hint is not None and "--replay 0.25" in hint and HIGH in hint and "28 → 1104 meV" in hint
    assert forgetting_advice(big, 0.25) is None  # replay was on: no hint
    small = {HIGH: {"energy_mae_parent": 0.028, "energy_mae_finetuned": 0.040,
                    "forces_mae_parent": 0.185, "forces_mae_finetuned": 0.190}}
    assert forgetting_advice(small, 0.0) is None and forgetting_advice(None, 0.0) is None


def test_forgetting_measures_every_level_of_a_parent_with_several_stores(stores, tmp_path):
    """The structure cap is shared among the parent's stores: a first store bigger than the cap does not crowd
    out the others' levels (a parent with one store per level failed with KeyError before)."""
    from polyfid.data_shards.schema import Fidelity
    from polyfid.distributed.finetune.forgetting import measure_forgetting
    from polyfid.models import save_package
    from polyfid.models.testing import tiny_potential

    files = {p.name.split(".")[0]: p for p in demo_files()}
    low_only = tmp_path / "low.zarr"  # LOW labels only, more atoms than one batch holds; the cap below is 10
    for i in range(5):
        ingest([str(files["ethanol"])], low_only, dataset=f"ethanol{i}", energy={LOW: f"energy_{LOW}"},
               forces={LOW: f"forces_{LOW}"}, ranks={LOW: 0}, append=i > 0, progress=False)
    assert Store.open(low_only).n_atoms > 4096  # iter_all's atom budget: the old cap ended inside this store
    levels = (Fidelity(LOW, rank=0), Fidelity(HIGH, rank=1))
    parent, child = (save_package(tmp_path / name, tiny_potential(
        "hipnn_ts", seed=seed, dtype=torch.float32, elements=(1, 6, 7, 8), fidelities=levels, width=16,
        cutoff=5.0, soft_max=4.5)) for name, seed in (("parent", 0), ("child", 1)))
    lineage = {"valid_stores": [{"path": str(low_only)}, {"path": str(stores[1].path)}]}
    out = measure_forgetting(str(parent), str(child), {"lineage": lineage}, max_structures=10)
    assert set(out) == {LOW, HIGH}
    for fid in (LOW, HIGH):
        r = out[fid]
        assert r["n_structures"] >= 1
        assert r["energy_mae_increase"] == pytest.approx(r["energy_mae_finetuned"] - r["energy_mae_parent"])


def test_energy_refit_removes_an_offset_the_weights_drifted_by_and_is_then_still(stores):
    """EnergyRefit (trainer.energy_refit_every): a drift of every structure's energy, as Adam's steps on a readout
    bias make, is removed in closed form; a second refit finds nothing left; forces are untouched."""
    from polyfid.distributed.loop.energy_refit import EnergyRefit

    pre, target = stores
    fids = sorted({f.name: f for s in stores for f in s.fidelities}.values(), key=lambda f: f.rank)
    torch.manual_seed(0)
    model = Potential(ModelConfig(kind="hipnn_ts", width=8, n_interactions=1, n_sensitivities=4), [1, 6, 7, 8], fids)
    refit_references(model, HIGH, [target])
    fitted = _high_energy_error(model, target)
    batch = next(iter_all([target], fidelities=[HIGH]))
    _, f0 = predict(model, batch, model.config.cutoff, None, "cpu")
    k = model.fidelity_index(HIGH)
    with torch.no_grad():
        model.readouts[0].bias[k] += 0.05  # +0.05 eV x scale on every atom: the kind of drift fine-tuning showed
    drifted = _high_energy_error(model, target)
    assert drifted > fitted + 0.1
    refit = EnergyRefit(every=10, last_step=35, stores=[target], heads=[HIGH], atom_budget=64, dtype=None,
                        device="cpu")
    assert refit.due(10) and not refit.due(15) and refit.due(35)  # every 10 steps and at the last
    shift = refit(model, 10)
    assert shift[HIGH] == pytest.approx(-0.05 * float(model.head_scale[k]) * 5, rel=0.05)  # 5 atoms per structure
    assert _high_energy_error(model, target) == pytest.approx(fitted, abs=2e-4)  # float32 total energies
    assert abs(refit(model, 20)[HIGH]) < 1e-3
    _, f1 = predict(model, batch, model.config.cutoff, None, "cpu")
    np.testing.assert_allclose(f1, f0, atol=1e-10)
    assert EnergyRefit(0, 35, [target], [HIGH], 64, None, "cpu").due(10) is False
    assert EnergyRefit(10, 35, [pre], ["no_such_level"], 64, None, "cpu").enabled is False


def test_rescaling_a_head_keeps_its_predictions_and_changes_its_units(stores):
    _, target = stores
    fids = sorted({f.name: f for s in stores for f in s.fidelities}.values(), key=lambda f: f.rank)
    torch.manual_seed(1)
    model = Potential(ModelConfig(kind="hipnn_ts", width=8, n_interactions=1, n_sensitivities=4), [1, 6, 7, 8], fids)
    model.set_scale_shift(HIGH, 11.8, 0.02)
    batch = next(iter_all([target], fidelities=[HIGH]))
    e0, f0 = predict(model, batch, model.config.cutoff, None, "cpu")
    assert model.rescale_head(HIGH, 1.2) == pytest.approx(11.8)
    e1, f1 = predict(model, batch, model.config.cutoff, None, "cpu")
    np.testing.assert_allclose(e1, e0, atol=1e-6)
    np.testing.assert_allclose(f1, f0, atol=1e-6)
    assert float(model.head_scale[model.fidelity_index(HIGH)]) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="positive"):
        model.rescale_head(HIGH, 0.0)

"""One reference fit per run over all training stores: it must not depend on how the data was split into
stores (the regression test for per-store references), it borrows undetermined directions from a donor
level, and training on one merged store or on one store per molecule gives the same curves.

Stores are real zarr stores ingested from the embedded QM demo data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.data_shards.refs import ReferenceAccumulator, counts_by_z
from polyfid.data_shards.reference_fit import fit_stores, joint_reference_fit, store_sums
from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import Store

MOLECULES = ("ethanol", "malonaldehyde", "methylamine", "formic_acid")
FIDS = [Fidelity(LOW, rank=0), Fidelity(HIGH, rank=1)]


def _ingest(files, out, dataset):
    return ingest(files, out, dataset=dataset, energy={LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"},
                  forces={LOW: f"forces_{LOW}"}, ranks={LOW: 0, HIGH: 1}, shard_size=16, progress=False)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 4 × 24 structures as one merged store and as one store per molecule (+ a validation store)."""
    tmp = tmp_path_factory.mktemp("split")
    files = {p.name.split(".")[0]: p for p in demo_files()}
    merged = _ingest([f"{files[m]}@:24" for m in MOLECULES], tmp / "merged.zarr", "all")
    split = [_ingest([f"{files[m]}@:24"], tmp / f"{m}.zarr", m) for m in MOLECULES]
    valid = _ingest([f"{files[m]}@-8:" for m in MOLECULES], tmp / "valid.zarr", "valid")
    return {"tmp": tmp, "merged": merged, "split": split, "valid": valid}


def _energies_per_atom(store: Store, refs: dict[str, dict[int, float]], fid: str) -> np.ndarray:
    """(E − Σ refs) / n of every structure of the store at `fid`."""
    out = []
    for k in range(len(store.shards)):
        sh = store.read_shard(k)
        counts = counts_by_z(sh["atomic_numbers"], sh["offsets"])
        e = sh["energy"][fid] - counts @ np.array([refs[fid].get(z, 0.0) for z in range(counts.shape[1])])
        out.append(e / counts.sum(1))
    return np.concatenate(out)


def test_joint_fit_does_not_depend_on_the_store_split(layouts):
    merged, split = layouts["merged"], layouts["split"]
    elements = [1, 6, 7, 8]
    one = fit_stores([merged], FIDS, elements)
    many = fit_stores(split, FIDS, elements)
    reversed_ = fit_stores(split[::-1], FIDS, elements)
    for fid in (LOW, HIGH):
        for z in elements:
            assert abs(one.energies[fid][z] - many.energies[fid][z]) < 1e-3, (fid, z)  # 1 meV per atom
            assert many.energies[fid][z] == pytest.approx(reversed_.energies[fid][z], abs=1e-9)
        assert one.shift[fid] == pytest.approx(many.shift[fid], abs=1e-6)
        assert one.scale[fid] == pytest.approx(many.scale[fid], rel=1e-6)
    # Four compositions determine four elements: the per-atom residual after the joint fit is small everywhere
    for s in split:
        res = _energies_per_atom(s, many.energies, HIGH)
        assert np.abs(res).max() < 0.2, s.path
    # ... whereas each one-molecule store's own references (what training used before) are far off elsewhere
    own = split[0].reference_energies  # ethanol's, applied to formic acid
    assert np.abs(_energies_per_atom(split[3], {HIGH: own[HIGH]}, HIGH)).mean() > 5.0
    assert one.report[LOW]["determined_directions"] == 4 and one.scale[LOW] > 0.1  # the GFN2 force RMS


def test_sums_in_the_manifest_equal_sums_read_from_the_shards(layouts):
    s = layouts["split"][1]
    kept = store_sums(s)
    manifest = s.manifest
    del manifest["reference_sums"]
    read = store_sums(Store(s._loc, manifest))  # a store written before the sums were kept: read once
    for fid in (LOW, HIGH):
        a, b = kept.sums(fid), read.sums(fid)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-9, err_msg=f"{fid} {key}")
    assert float(kept.sums(LOW)["fn"]) == 24 * 9 * 3 and float(kept.sums(HIGH)["fn"]) == 0  # no B3LYP forces


def test_undetermined_directions_come_from_the_donor_level():
    rng = np.random.default_rng(0)
    true_lo = np.zeros(119)
    true_lo[[1, 6, 8]] = [-10.0, -48.0, -70.0]
    true_hi = np.zeros(119)
    true_hi[[1, 6, 8]] = [-13.6, -1030.0, -2040.0]
    acc = ReferenceAccumulator()
    lo_counts = np.zeros((30, 119))
    lo_counts[:, [1, 6, 8]] = rng.integers(1, 8, size=(30, 3))
    acc.add(lo_counts, {"lo": lo_counts @ true_lo + rng.normal(0, 0.01, 30)})
    hi_counts = np.zeros((10, 119))
    hi_counts[:, [1, 6, 8]] = [4, 1, 1]  # one molecule (methanol): one direction of three determined
    acc.add(hi_counts, {"hi": hi_counts @ true_hi})
    fit = joint_reference_fit(acc, [Fidelity("lo", 0), Fidelity("hi", 1)], [1, 6, 8])
    lo = np.array([fit.energies["lo"][z] for z in (1, 6, 8)])
    hi = np.array([fit.energies["hi"][z] for z in (1, 6, 8)])
    comp = np.array([4.0, 1.0, 1.0])
    assert comp @ hi == pytest.approx(comp @ true_hi[[1, 6, 8]], abs=1e-6)  # the data are fitted exactly
    d = hi - lo  # only the determined direction moved away from the donor
    assert np.linalg.norm(d - comp * (d @ comp) / (comp @ comp)) < 1e-6
    assert fit.report["hi"]["donor"] == "lo" and fit.report["hi"]["determined_directions"] == 1
    assert fit.report["lo"]["donor"] is None
    assert fit.report["lo"]["scale_from"] == "per-atom energy residual std"  # no forces at any level


def test_an_element_without_energies_at_a_level_is_named(caplog):
    """The S1 corpus bug: 300 wB97X energies of molecules without N took N's GFN2 reference (1,400 eV off).
    The fit cannot know better, but it must say so, naming the level and the element."""
    rng = np.random.default_rng(1)
    acc = ReferenceAccumulator()
    lo_counts = np.zeros((30, 119))
    lo_counts[:, [1, 6, 7]] = rng.integers(1, 8, size=(30, 3))
    acc.add(lo_counts, {"lo": lo_counts @ np.r_[np.zeros(1), -10.0, np.zeros(4), -48.0, -60.0, np.zeros(111)]})
    hi_counts = np.zeros((12, 119))
    hi_counts[:, [1, 6]] = rng.integers(1, 8, size=(12, 2))  # no N at the high level
    acc.add(hi_counts, {"hi": hi_counts[:, 1] * -13.6 + hi_counts[:, 6] * -1030.0})
    with caplog.at_level("WARNING", logger="polyfid.refs"):
        fit = joint_reference_fit(acc, [Fidelity("lo", 0), Fidelity("hi", 1)], [1, 6, 7])
    assert fit.report["hi"]["absent_elements"] == [7] and fit.report["lo"]["absent_elements"] == []
    assert fit.energies["hi"][6] == pytest.approx(-1030.0) and fit.energies["hi"][7] == pytest.approx(-60.0)
    assert any("hi: no training energy has Z=7" in r.getMessage() for r in caplog.records)


def _train(rank, world, jobs, valid):
    """Train each (output, train stores) job in turn in this process (one import of DeepSpeed for all)."""
    from polyfid.distributed.config import RunConfig
    from polyfid.distributed.driver.worker import train_loop_per_worker

    for out, train in jobs:
        run = RunConfig.from_dict({
            "output": out, "model": {"width": 16, "n_interactions": 1, "n_sensitivities": 8},
            "data": {"train": train, "valid": valid, "atom_budget": 96, "prefetch": 0},
            "trainer": {"steps": 40, "log_every": 40, "valid_every": 40, "checkpoint_every": 1000, "lr": 2e-3,
                        "workers": world},
            "tracking": {"enabled": False},
        })
        train_loop_per_worker({"run": run.to_dict()})


def test_training_on_one_store_or_one_per_molecule_agrees(layouts, tmp_path):
    """The same structures and seed: the validation errors after training agree closely (a per-store
    reference fit left the split run hundreds of eV off)."""
    from dist_utils import spawn

    valid = [str(layouts["valid"].path)]
    jobs = [(str(tmp_path / "merged"), [str(layouts["merged"].path)]),
            (str(tmp_path / "split"), [str(s.path) for s in layouts["split"]])]
    spawn(_train, 1, jobs, valid, tmp=tmp_path)
    results = {k: json.loads((tmp_path / k / "package" / "polyfid.json").read_text()) for k in ("merged", "split")}
    for fid in (LOW, HIGH):
        a = results["merged"]["reference_energies"][fid]
        b = results["split"]["reference_energies"][fid]
        assert all(abs(a[z] - b[z]) < 1e-3 for z in a)
    from polyfid.distributed.finetune.scratch import compare_table

    table = compare_table({k: str(tmp_path / k / "package") for k in results}, valid)
    for fid in (LOW, HIGH):
        e = [table[k][fid]["energy_mae_per_atom"] for k in ("merged", "split")]
        assert max(e) < 0.1, table  # tens of meV per atom after 40 steps, not eV
        assert max(e) / min(e) < 1.5, table
    f = [table[k][LOW]["forces_mae"] for k in ("merged", "split")]
    assert max(f) / min(f) < 1.3, table
    lineage = results["split"]["lineage"]["reference_fit"]
    assert set(lineage["energies"]) == {LOW, HIGH} and lineage["report"][LOW]["n_structures"] == 96
    _step0_of_a_new_head(tmp_path / "split" / "package", layouts["tmp"])


def _step0_of_a_new_head(package, tmp):
    """Fine-tuning a new level (ωB97X) on an unseen molecule: after the reference refit the step-0 energy
    error is about the spread of the target's energies, not eV off."""
    from polyfid.data_shards.demo import EXTRA
    from polyfid.data_shards.reader import iter_all
    from polyfid.distributed.config import RunConfig
    from polyfid.evaluation.metrics import evaluate_batches
    from polyfid.distributed.finetune.plan import force_rms, prepare_finetune_model

    fa = {p.name.split(".")[0]: p for p in demo_files()}["formic_acid"]
    target = ingest([f"{fa}@:20"], tmp / "target.zarr", dataset="formic_acid", energy={EXTRA: f"energy_{EXTRA}"},
                    forces={EXTRA: f"forces_{EXTRA}"}, ranks={EXTRA: 2}, progress=False)
    cfg = RunConfig.from_dict({"finetune": {"source": str(package)}})
    model = prepare_finetune_model(cfg, [target])
    k = model.fidelity_index(EXTRA)
    # the new head's scale is the target's force RMS (finetune.rescale_head), not its parent head's
    assert float(model.head_scale[k]) == pytest.approx(force_rms([target], EXTRA), rel=1e-6)
    assert float(model.head_scale[k]) != pytest.approx(float(model.head_scale[model.fidelity_index(HIGH)]))
    res = evaluate_batches(model, iter_all([target], fidelities=[EXTRA]), [EXTRA]).results()[EXTRA]
    labels = np.concatenate([b["energy"][:, 0] for b in iter_all([target], fidelities=[EXTRA])])
    spread = np.abs(labels - labels.mean()).mean()
    assert res["energy_mae"] < 2.0 * spread, (res, spread)


def test_an_element_the_most_determined_level_lacks_is_named_too(caplog):
    """The most determined level has no donor: an element none of its energies contain gets 0 eV. The fit names
    that case as well, and the level that has the element still fits it from its own data."""
    rng = np.random.default_rng(2)
    acc = ReferenceAccumulator()
    lo_counts = np.zeros((30, 119))
    lo_counts[:, [1, 6, 8]] = rng.integers(1, 8, size=(30, 3))  # three directions, no N
    acc.add(lo_counts, {"lo": lo_counts @ np.r_[np.zeros(1), -10.0, np.zeros(4), -48.0, 0.0, -60.0, np.zeros(110)]})
    hi_counts = np.zeros((3, 119))
    hi_counts[:, [1, 7]] = [[3, 1], [4, 2], [2, 1]]  # ammonia-like: two directions, with N
    acc.add(hi_counts, {"hi": hi_counts[:, 1] * -13.6 + hi_counts[:, 7] * -1500.0})
    with caplog.at_level("WARNING", logger="polyfid.refs"):
        fit = joint_reference_fit(acc, [Fidelity("lo", 0), Fidelity("hi", 1)], [1, 6, 7, 8])
    assert fit.report["lo"]["donor"] is None and fit.report["lo"]["absent_elements"] == [7]
    assert fit.energies["lo"][7] == 0.0
    assert fit.energies["hi"][7] == pytest.approx(-1500.0) and fit.report["hi"]["absent_elements"] == [6, 8]
    assert any("lo: no training energy has Z=7, and no other level can lend" in r.getMessage()
               for r in caplog.records)

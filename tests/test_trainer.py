"""The training loop without Ray: the Trainer under plain torch.distributed with 2 gloo processes, on one store
per molecule at two levels of theory (real zarr stores from the embedded QM demo data).

Also: the mode registry, the fine-tuning plan as data, and the checks the driver makes before Ray starts.
"""

from __future__ import annotations

import json
import os

import pytest

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.distributed.config import ConfigError, RunConfig

MOLECULES = {"ethanol": LOW, "malonaldehyde": HIGH, "methylamine": LOW}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store per molecule, each at its own level (energies and forces), and a validation store per molecule."""
    tmp = tmp_path_factory.mktemp("trainer")
    files = {p.name.split(".")[0]: p for p in demo_files()}
    out: dict[str, list[str]] = {"train": [], "valid": []}
    for name, fid in MOLECULES.items():
        for split, sl in (("train", ":24"), ("valid", "-6:")):
            path = tmp / f"{name}_{split}.zarr"
            ingest([f"{files[name]}@{sl}"], path, dataset=name, energy={fid: f"energy_{fid}"},
                   forces={fid: f"forces_{fid}"}, ranks={fid: 0 if fid == LOW else 1}, shard_size=8, progress=False)
            out[split].append(str(path))
    return out


def _run(mode: str, out: str, stores: dict, steps: int, **trainer) -> RunConfig:
    return RunConfig.from_dict({
        "output": out, "model": {"width": 16, "n_interactions": 1, "n_sensitivities": 8},
        "data": {"train": stores["train"], "valid": stores["valid"], "atom_budget": 64, "prefetch": 2},
        "trainer": {"mode": mode, "steps": steps, "log_every": 5, "valid_every": 5, "checkpoint_every": 5,
                    "lr": 2e-3, "workers": 2, "trace_dir": f"{out}/trace", **trainer},
        "reptile": {"inner_steps": 2},
        "tracking": {"enabled": False},
    })


def _train(rank, world, runs):
    from polyfid.distributed.loop.trainer import Trainer

    for run in runs:
        t = Trainer(RunConfig.from_dict(run)).build()
        assert (t.rank, t.world) == (rank, world)
        t.train()


def _trace(out) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (out / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}


@pytest.mark.parametrize("mode", ["multifidelity", "reptile"])
def test_trainer_on_two_gloo_ranks_without_ray(stores, tmp_path, mode):
    from dist_utils import spawn

    out = tmp_path / mode
    first, longer = _run(mode, str(out), stores, 10), _run(mode, str(out), stores, 15)
    spawn(_train, 2, [first.to_dict(), longer.to_dict()], tmp=tmp_path)  # 10 steps, then resume to 15

    meta = json.loads((out / "package" / "polyfid.json").read_text())
    assert meta["lineage"]["mode"] == mode and meta["lineage"]["steps"] == 15
    assert set(meta["lineage"]["reference_fit"]["energies"]) == {LOW, HIGH}  # one joint fit over the 3 stores
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000015"]
    trace = _trace(out)
    steps = {r: [rec["step"] for rec in recs] for r, recs in trace.items()}
    assert steps[0] == steps[1] == list(range(1, 16))  # the resume went on at step 11 on both ranks
    if mode == "multifidelity":  # within an epoch, the ranks read disjoint structures, none twice
        for epoch in {rec["epoch"] for rec in trace[0]}:
            seen = [[tuple(i) for rec in trace[r] if rec["epoch"] == epoch for i in rec["ids"]] for r in (0, 1)]
            assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])
    else:  # each outer step reads k=2 batches of one task (one store)
        assert all(rec["epoch"] is None and len({s for s, _ in rec["ids"]}) == 1 for rec in trace[0])


def test_oversampled_store_gets_its_share_of_every_batch_on_two_ranks(stores, tmp_path):
    """data.oversample: the named store is read by its own reader with that share of each batch's atoms, and the
    trace still names stores by their place in data.train."""
    from dist_utils import spawn

    out = tmp_path / "over"
    run = _run("multifidelity", str(out), stores, 6).to_dict()
    run["data"].update(oversample=[stores["train"][1]], oversample_fraction=0.5)
    spawn(_train, 2, [run], tmp=tmp_path)
    for recs in _trace(out).values():
        assert [rec["step"] for rec in recs] == list(range(1, 7))
        for rec in recs:
            by_store = [s for s, _ in rec["ids"]]
            assert set(by_store) <= {0, 1, 2}
            # malonaldehyde (store 1, 9 atoms) fills its 32 atoms: 3 of the batch's structures; by size it
            # would get a third of them, here it gets about half
            assert by_store.count(1) == 3 and len(by_store) - 3 >= 3


def test_oversample_is_checked_before_the_run(stores, tmp_path):
    from polyfid.distributed.driver.launcher import check_on_driver

    def cfg(**data) -> RunConfig:
        c = _run("multifidelity", str(tmp_path / "x"), stores, 1).to_dict()
        c["data"].update(data)
        return RunConfig.from_dict(c)

    with pytest.raises(ConfigError, match="oversample_fraction must be in"):
        cfg(oversample=stores["train"][:1], oversample_fraction=1.0)
    with pytest.raises(ConfigError, match="not in data.train"):
        check_on_driver(cfg(oversample=stores["valid"][:1], oversample_fraction=0.3).resolve_paths())
    with pytest.raises(ConfigError, match="every store"):
        check_on_driver(cfg(oversample=stores["train"], oversample_fraction=0.3).resolve_paths())
    reptile = cfg(oversample=stores["train"][:1], oversample_fraction=0.3)
    reptile.trainer.mode = "reptile"
    with pytest.raises(ConfigError, match="multi-fidelity training without replay"):
        check_on_driver(reptile.resolve_paths())


def test_oversample_top_picks_the_highest_level_stores_where_they_are_a_small_share(stores, tmp_path):
    """data.oversample=top (the recipes' default): the stores holding the highest-rank fidelity (here malonaldehyde
    at the high level, 9 of the 25 atoms per frame triple = 36%) get the share when they hold less than it, and
    nothing happens where it does not apply."""
    from polyfid.distributed.driver.launcher import check_on_driver

    def resolved(fraction: float, train=None, mode="multifidelity") -> list[str]:
        c = _run(mode, str(tmp_path / "x"), stores, 1).to_dict()
        c["data"].update(oversample="top", oversample_fraction=fraction, train=train or stores["train"])
        run = RunConfig.from_dict(c).resolve_paths()
        resolved = check_on_driver(run)
        assert run.data.oversample == ["top"]  # the caller's config stays as written; the copy is resolved
        return resolved.data.oversample

    assert resolved(0.5) == [stores["train"][1]]
    assert resolved(0.3) == []  # already 36% of the atoms
    assert resolved(0.5, mode="reptile") == []
    assert resolved(0.5, train=stores["train"][1:2]) == []  # the only store
    mixed = _run("multifidelity", str(tmp_path / "y"), stores, 1).to_dict()
    mixed["data"].update(oversample=["top", stores["train"][0]], oversample_fraction=0.5)
    with pytest.raises(ConfigError, match="stands alone"):
        RunConfig.from_dict(mixed).check_oversample()


def test_force_prior_is_checked_before_the_run(stores, tmp_path):
    """loss.force_prior names levels of data.train, and the level it borrows from has force labels there."""
    from polyfid.distributed.driver.launcher import check_on_driver

    def check(prior: dict, train=None) -> None:
        c = _run("multifidelity", str(tmp_path / "x"), stores, 1).to_dict()
        c["loss"] = {"force_prior": prior}
        c["data"]["train"] = train or stores["train"]
        run = RunConfig.from_dict(c).resolve_paths()
        return check_on_driver(run).loss.force_prior

    check({HIGH: LOW})
    assert check("auto") == {}  # every level has forces here
    with pytest.raises(ConfigError, match="must be auto or map"):
        check("everything")
    with pytest.raises(ConfigError, match="'nope', which no store of data.train holds"):
        check({HIGH: "nope"})
    with pytest.raises(ConfigError, match="no store of data.train holds"):
        check({HIGH: LOW}, train=stores["train"][1:2])  # malonaldehyde alone: no low level
    with pytest.raises(ConfigError, match="maps .* to itself"):
        check({HIGH: HIGH})


def test_force_prior_auto_lends_the_most_forced_level_to_levels_without_forces(tmp_path):
    """loss.force_prior=auto (the recipes' default): a level with energies and no force labels in data.train
    borrows from the level with the most force-labelled atoms; in Reptile it is off."""
    from polyfid.distributed.driver.launcher import check_on_driver

    files = {p.name.split(".")[0]: p for p in demo_files()}
    train = []
    for name, fid, forces in (("ethanol", LOW, True), ("malonaldehyde", HIGH, False), ("methylamine", LOW, True)):
        path = tmp_path / f"{name}.zarr"
        ingest([f"{files[name]}@:8"], path, dataset=name, energy={fid: f"energy_{fid}"},
               forces={fid: f"forces_{fid}"} if forces else {}, ranks={fid: 0 if fid == LOW else 1}, shard_size=8,
               progress=False)
        train.append(str(path))

    def resolved(mode: str) -> dict:
        c = _run(mode, str(tmp_path / mode), {"train": train, "valid": []}, 1).to_dict()
        c["loss"] = {"force_prior": "auto"}
        run = RunConfig.from_dict(c).resolve_paths()
        resolved = check_on_driver(run)
        assert run.loss.force_prior == "auto"  # the caller's config stays as written
        return resolved.loss.force_prior

    assert resolved("multifidelity") == {HIGH: LOW}
    assert resolved("reptile") == {}


def test_mode_registry_names_the_modes():
    from polyfid.distributed.modes.registry import MODES, get_mode

    assert set(MODES) == {"multifidelity", "reptile"}
    with pytest.raises(ConfigError, match="available: multifidelity, reptile"):
        get_mode("maml")


def test_streams_declare_the_resumable_interface(stores):
    from polyfid.data_shards.reader import ShardReader
    from polyfid.data_shards.store import Store
    from polyfid.distributed.modes.replay import mixed_reader
    from polyfid.distributed.modes.reptile import ReptileMode
    from polyfid.distributed.modes.multifidelity import StreamSpec
    from polyfid.distributed.modes.stream import ResumableStream, TaskBatches

    opened = [Store.open(p) for p in stores["train"]]
    cfg = ShardReader.Config(atom_budget=64, seed=0, loop=True, prefetch=0)
    spec = StreamSpec(opened, [], 0.0, [LOW, HIGH], [LOW, HIGH], cfg, 0, 1)
    reptile = ReptileMode().stream(spec, _run("reptile", "unused", stores, 4))
    for stream in (ShardReader(opened, cfg, fidelities=[LOW, HIGH]), reptile,
                   mixed_reader(opened[:1], opened[1:], cfg, 0.25, [LOW, HIGH], 0, 1)):
        assert isinstance(stream, ResumableStream)
    item = next(iter(reptile))
    assert isinstance(item, TaskBatches) and len(item.batches) == 2


def test_finetune_plan_travels_as_data_and_the_config_keeps_what_the_user_wrote(stores, tmp_path):
    """The plan resolves replay on the driver (a replay store that cannot be read is an error that says how to get
    it and how to skip replay); what it resolved lives in the plan, not in the user's config."""
    from polyfid.data_shards.store import Store
    from polyfid.distributed.finetune.plan import FinetunePlan
    from polyfid.distributed.loop.trainer import build_model
    from polyfid.distributed.loop.packaging import write_package

    pre = _run("multifidelity", str(tmp_path / "pre"), stores, 1)
    model, fit = build_model(pre, [Store.open(p) for p in stores["train"]])
    pkg = write_package(model, pre, [Store.open(p) for p in stores["train"]], None, fit=fit)
    gone = RunConfig.from_dict({"finetune": {"source": str(pkg), "replay_fraction": 0.5,
                                             "replay_stores": [str(tmp_path / "gone.zarr")]},
                                "data": {"train": stores["valid"][1:2]}})
    target = [Store.open(p) for p in gone.data.train]
    with pytest.raises(FileNotFoundError, match="gone.zarr.*--replay 0"):
        FinetunePlan.build(gone, target)
    rel = os.path.relpath(stores["train"][0])  # as a user types it; the plan makes it absolute for the workers
    cfg = RunConfig.from_dict({"finetune": {"source": str(pkg), "replay_fraction": 0.5, "replay_stores": [rel]},
                               "data": {"train": stores["valid"][1:2]}})
    plan = FinetunePlan.build(cfg, target)
    assert plan.head == HIGH and plan.new_fidelity is None
    assert plan.replay_fraction == 0.5 and plan.replay_stores == [os.path.abspath(rel)]
    assert cfg.finetune.replay_fraction == 0.5 and cfg.finetune.replay_stores == [rel]
    again = FinetunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    tuned = again.apply(target, 256)
    assert tuned.fidelity_names == model.fidelity_names
    # the reference refit ran once, on the driver: the plan carries its result and apply() only sets it
    from polyfid.distributed.finetune.plan import refit_references
    from polyfid.models.package import load_package

    fresh = load_package(pkg)
    expected = refit_references(fresh, HIGH, target, cfg.data.atom_budget,
                                anchors=[Store.open(p) for p in plan.anchors])
    assert plan.references == {str(z): pytest.approx(e) for z, e in expected.items()}
    k = tuned.fidelity_index(HIGH)
    assert {str(z): float(tuned.reference_energies[k, z]) for z in tuned.elements} == pytest.approx(plan.references)
    from polyfid.distributed.loop.packaging import lineage

    lin = lineage(cfg, target, [], None, plan, None)
    assert lin["reference_refit"]["head"] == HIGH and lin["reference_refit"]["energies"] == plan.references


def test_precision_is_checked_on_the_driver_before_ray_starts(stores, tmp_path):
    import ray

    from polyfid.distributed.driver.launcher import run_training

    cfg = _run("multifidelity", str(tmp_path / "fp16"), stores, 1, precision="fp16", use_gpu=False)
    cfg.tracking.enabled = False
    ray_was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match="fp16"):
        run_training(cfg)
    assert ray.is_initialized() == ray_was_up  # no Ray started for it
    assert not (tmp_path / "fp16" / "config.yaml").exists()  # it failed before anything was written


def test_collated_stream_keeps_the_exact_cursor(stores):
    """Graphs are built ahead on a thread; the saved cursor is that of the last item taken, not of those read ahead."""
    import numpy as np

    from polyfid.data_shards.reader import ShardReader
    from polyfid.data_shards.store import Store
    from polyfid.distributed.modes.stream import Collated, Prepared, batches_of

    opened = [Store.open(p) for p in stores["train"]]
    cfg = ShardReader.Config(atom_budget=64, seed=1, loop=True, prefetch=2)

    def collated():
        return Collated(ShardReader(opened, cfg, fidelities=[LOW, HIGH]), lambda b: Prepared(b, None, None), depth=3)

    it = iter(first := collated())
    taken = [next(it) for _ in range(7)]  # past the end of epoch 0 (about 6 batches per epoch)
    state = first.gather_states([first.state_dict()])
    want = [next(it) for _ in range(4)]
    again = collated()
    again.load_state_dict(state)
    got = [x for x, _ in zip(again, range(4))]
    assert all(isinstance(x, Prepared) for x in taken)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(batches_of(a)[0]["structure_id"], batches_of(b)[0]["structure_id"])
        np.testing.assert_array_equal(batches_of(a)[0]["store"], batches_of(b)[0]["store"])


def test_label_layout_maps_columns_to_heads():
    import torch

    from polyfid.models.layout import MISSING, LabelLayout

    layout = LabelLayout.of(["gfn2", "b3lyp", "wb97x"], ["wb97x", "gfn2"])
    assert layout.heads == (2, 0) and layout.heads_of([0]) == [2]
    out = layout.select({"energy": torch.arange(6.0).view(2, 3)})
    assert out["energy"].tolist() == [[2.0, 0.0], [5.0, 3.0]]
    with pytest.raises(KeyError, match="ccsd"):
        LabelLayout.of(["gfn2"], ["ccsd"])
    assert LabelLayout.of(["gfn2"], ["ccsd", "gfn2"], allow_missing=True).heads == (MISSING, 0)


def test_resume_skips_a_truncated_checkpoint_for_the_one_before(stores, tmp_path, caplog):
    """Each checkpoint carries a manifest of checksums, written last. A truncated newest checkpoint is named in a
    warning and resume takes the one before; one whose write never finished (no manifest) is skipped too."""
    from dist_utils import spawn

    from polyfid.distributed.loop.checkpoint import MANIFEST, newest_verified, verify_checkpoint

    out = tmp_path / "ckpt"
    spawn(_train, 2, [_run("multifidelity", str(out), stores, 10).to_dict()], tmp=tmp_path)
    ckpts = out / "checkpoints"
    assert newest_verified(ckpts) == "step_00000010"
    manifest = json.loads((ckpts / "step_00000010" / MANIFEST).read_text())
    biggest = max(manifest["files"], key=lambda f: manifest["files"][f]["bytes"])
    with open(ckpts / "step_00000010" / biggest, "r+b") as fh:  # a node died while writing it
        fh.truncate(manifest["files"][biggest]["bytes"] // 2)
    assert "truncated" in verify_checkpoint(ckpts / "step_00000010") and biggest in verify_checkpoint(
        ckpts / "step_00000010")
    with caplog.at_level("WARNING", logger="polyfid.checkpoint"):
        assert newest_verified(ckpts) == "step_00000005"
    assert "step_00000010" in caplog.text and "trying the one before" in caplog.text

    spawn(_train, 2, [_run("multifidelity", str(out), stores, 15).to_dict()], tmp=tmp_path)
    steps = {r: [rec["step"] for rec in recs] for r, recs in _trace(out).items()}
    assert steps[0] == steps[1] == list(range(1, 11)) + list(range(6, 16))  # resumed at step 6, from step 5
    assert newest_verified(ckpts) == "step_00000015" and (out / "package" / "model.safetensors").exists()

    partial = ckpts / "step_00000020"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
    assert "no manifest" in verify_checkpoint(partial) and newest_verified(ckpts) == "step_00000015"


class _Planted:
    """The Trainer's stream with items spoiled or dropped on chosen ranks: (rank, item index, action)."""

    def __init__(self, inner, rank: int, plant: list) -> None:
        self.inner, self.rank, self.plant = inner, rank, {(r, i): a for r, i, a in plant}

    def __iter__(self):
        for i, item in enumerate(self.inner):
            action = self.plant.get((self.rank, i))
            if action == "drop":
                continue
            if action == "nan":  # one label of one structure: the loss of this rank's batch is NaN
                item.targets.energy[0, :] = float("nan")
            if action == "spike":  # every energy label 10 keV off: a few bad labels in a public dataset
                item.targets.energy += 1e4 * item.targets.energy_mask
            yield item

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _train_planted(rank, world, run, plant, report):
    from polyfid.distributed.loop.trainer import Trainer

    t = Trainer(RunConfig.from_dict(run)).build()
    t.stream = _Planted(t.stream, rank, plant)
    t.train()
    if rank == 0:
        with open(report, "w") as fh:
            json.dump({"skipped": t.guard.skipped, "rollbacks": t.guard.rollbacks,
                       "base_lrs": t.engine.lr_scheduler.base_lrs,
                       "rolled_back_to": getattr(t.checkpointer, "rolled_back_to", None)}, fh)


def _guarded_run(out, stores, steps: int, **guard) -> dict:
    d = _run("multifidelity", str(out), stores, steps, warmup_steps=0, lr_final_factor=1.0, valid_every=1000,
             checkpoint_every=10).to_dict()
    d["data"]["valid"] = []  # the package holds the last weights, not the best validated ones
    d["guard"].update(guard)
    return d


def test_a_nan_on_one_rank_makes_every_rank_skip_the_step(stores, tmp_path):
    """A NaN planted in rank 1's 4th batch: both ranks skip step 4. The weights then equal those of a run that
    never saw that step's batches (constant learning rate, so that the schedule does not differ). Without the
    guard (guard.skip_nonfinite=false) the same run ends with NaN weights (under ZeRO stage 0; DeepSpeed's ZeRO 1
    and 2 optimisers skip a step with non-finite gradients themselves, silently and per optimiser)."""
    import torch
    from dist_utils import spawn
    from safetensors.torch import load_file

    for name, steps, plant, guard in (("nan", 8, [[1, 3, "nan"]], {}),
                                      ("never", 7, [[0, 3, "drop"], [1, 3, "drop"]], {}),
                                      ("unguarded", 8, [[1, 3, "nan"]], {"skip_nonfinite": False})):
        run = _guarded_run(tmp_path / name, stores, steps, **guard)
        run["trainer"]["zero_stage"] = 0  # ZeRO 1 and 2 also skip a step with non-finite gradients by themselves
        spawn(_train_planted, 2, run, plant, str(tmp_path / f"{name}.json"), tmp=tmp_path)
    report = json.loads((tmp_path / "nan.json").read_text())
    assert report["skipped"] == 1 and report["rollbacks"] == 0
    a, b, c = (load_file(str(tmp_path / n / "package" / "model.safetensors")) for n in ("nan", "never", "unguarded"))
    assert a.keys() == b.keys() and all(a[k].isfinite().all() for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert json.loads((tmp_path / "unguarded.json").read_text())["skipped"] == 0
    assert not all(c[k].isfinite().all() for k in c)


def test_repeated_loss_spikes_roll_back_once_with_a_lower_learning_rate(stores, tmp_path):
    """Four planted spikes in a row on rank 0, with a rollback after 3 skips: all four steps are skipped on both
    ranks, the run rolls back exactly once (to the checkpoint at step 10) and halves the learning rate."""
    from dist_utils import spawn

    run = _guarded_run(tmp_path / "spiky", stores, 24, spike_warmup=5, rollback_after=3, rollback_window=50)
    spawn(_train_planted, 2, run, [[0, i, "spike"] for i in (13, 14, 15, 16)], str(tmp_path / "spiky.json"),
          tmp=tmp_path)
    report = json.loads((tmp_path / "spiky.json").read_text())
    assert report["skipped"] == 4 and report["rollbacks"] == 1
    assert report["rolled_back_to"] == "step_00000010"
    assert report["base_lrs"] == [run["trainer"]["lr"] * 0.5]
    assert (tmp_path / "spiky" / "package" / "model.safetensors").exists()


def _train_ema(rank, world, run, report):
    from safetensors.torch import load_file

    from polyfid.distributed.loop.trainer import Trainer

    t = Trainer(RunConfig.from_dict(run)).build()
    t.train()
    if rank == 0:
        pkg = load_file(f"{run['output']}/package/model.safetensors")
        live = dict(t.engine.module.named_parameters())
        ema = dict(zip(t.ema.names, t.ema.shadow))
        keys = [k for k in ema if k in pkg]
        with open(report, "w") as fh:
            json.dump({"keys": len(keys), "updates": t.ema.updates,
                       "pkg_vs_ema": max(float((pkg[k] - ema[k]).abs().max()) for k in keys),
                       "pkg_vs_live": max(float((pkg[k] - live[k].detach()).abs().max()) for k in keys)}, fh)


def test_the_package_holds_the_ema_weights(stores, tmp_path):
    """With trainer.ema_decay the package (and validation) use the average; the live weights differ from it."""
    from dist_utils import spawn

    run = _run("multifidelity", str(tmp_path / "ema"), stores, 10, ema_decay=0.9, valid_every=1000).to_dict()
    run["data"]["valid"] = []
    spawn(_train_ema, 2, run, str(tmp_path / "ema.json"), tmp=tmp_path)
    report = json.loads((tmp_path / "ema.json").read_text())
    assert report["keys"] > 0 and report["updates"] == 10
    assert report["pkg_vs_ema"] == 0.0 and report["pkg_vs_live"] > 1e-6


def test_a_time_cap_ends_the_run_with_its_best_weights_and_monitor_stores_are_logged_not_scored(stores, tmp_path):
    """trainer.max_wall_s: both ranks agree at the first validation past the cap, the run packages its best weights
    and best.json says why it stopped. data.monitor: a store evaluated at every validation into validation.jsonl,
    beside wall_s, that never enters the score (the same run without it picks the same best step and score)."""
    from dist_utils import spawn

    runs = {}
    for name, monitor in (("capped", [stores["valid"][0]]), ("plain", [])):
        run = _run("multifidelity", str(tmp_path / name), stores, 400, valid_every=3, max_wall_s=1e-3,
                   checkpoint_every=1000).to_dict()
        run["data"]["monitor"] = monitor
        runs[name] = run
    spawn(_train, 2, list(runs.values()), tmp=tmp_path)
    for name in runs:
        best = json.loads((tmp_path / name / "best.json").read_text())
        assert best["last_step"] == 3 and best["stop_reason"].startswith("time cap: trainer.max_wall_s=0.001 s")
        assert (tmp_path / name / "package" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (tmp_path / "capped" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3] and rows[0]["wall_s"] > 0
    assert set(rows[0]["monitor"]) == {LOW} and rows[0]["monitor"][LOW]["n_structures"] == 6
    assert rows[0]["monitor"][LOW]["forces_mae"] > 0
    plain = json.loads((tmp_path / "plain" / "validation.jsonl").read_text().splitlines()[0])
    assert "monitor" not in plain and plain["errors"] == rows[0]["errors"]
    capped, other = (json.loads((tmp_path / n / "best.json").read_text()) for n in ("capped", "plain"))
    assert capped["best_score"] == other["best_score"]


def test_the_time_cap_fetch_ahead_and_monitor_stores_are_checked():
    with pytest.raises(ConfigError, match="trainer.max_wall_s must be >= 0"):
        RunConfig.from_dict({"trainer": {"max_wall_s": -1}})
    with pytest.raises(ConfigError, match="data.fetch_ahead must be >= 0"):
        RunConfig.from_dict({"data": {"fetch_ahead": -2}})
    cfg = RunConfig.from_dict({"data": {"monitor": "a.zarr,b.zarr"}})
    assert cfg.data.monitor == ["a.zarr", "b.zarr"]

"""Reptile (S3) on real DeepSpeed engines over gloo: a plain reference, the mean over ranks, one all-reduce
per outer step, and the task sampler."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import emt_frames
from helpers import batch_from_frames, tiny_model
from polyfid.distributed.config import ConfigError, LossConfig, ReptileConfig, TrainerConfig, load_config
from polyfid.distributed.modes.losses import Targets, multifidelity_loss
from polyfid.models.graph import build_graph

EPS, INNER_LR, K = 0.5, 1e-2, 3


def _batches(seed: int) -> list[dict]:
    frames = emt_frames(4 * K, seed=seed)
    return [batch_from_frames(frames[4 * i : 4 * i + 4], forces_for=("lo",), energy_for=("lo",)) for i in range(K)]


def _rank_fn(rank, world, out, outer_steps):
    import torch.distributed as tdist

    from polyfid.distributed.loop.engine import build_engine
    from polyfid.distributed.modes.reptile import ReptileExtra, Task, reptile_step
    from polyfid.distributed.modes.multifidelity import StepContext

    sizes: list[int] = []  # numel of every all-reduce, in order
    orig = tdist.all_reduce

    def counting(*a, **kw):
        sizes.append(int(kw.get("tensor", a[0] if a else None).numel()))
        return orig(*a, **kw)

    tdist.all_reduce = counting
    model = tiny_model(seed=0)
    engine, _ = build_engine(model, TrainerConfig(steps=100, zero_stage=1), torch.device("cpu"),
                             reptile_epsilon=EPS)
    ctx = StepContext(engine, LossConfig(), ["lo", "hi"], model.config.cutoff, torch.float32, torch.device("cpu"),
                      extra=ReptileExtra([Task(0, "lo")], INNER_LR))
    per_step = []
    for s in range(outer_steps):
        before = len(sizes)
        reptile_step((0, _batches(seed=10 * s + rank)), ctx)
        per_step.append(sizes[before:])
    if rank == 0:
        torch.save({"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                    "all_reduces": per_step}, f"{out}/w{world}.pt")


def _plain_inner(theta: torch.nn.Module, batches: list[dict]) -> torch.nn.Module:
    """The inner loop written out: k Adam steps on the task's loss from a copy of θ."""
    phi = copy.deepcopy(theta)
    opt = torch.optim.Adam(phi.parameters(), lr=INNER_LR)
    for b in batches:
        t = Targets.from_batch(b, torch.float32, "cpu")
        out = phi(build_graph(b, phi.config.cutoff), force_heads=[0], create_graph=True)
        loss, _ = multifidelity_loss({k: v[:, [0]] for k, v in out.items()},
                                     Targets(t.energy[:, [0]], t.energy_mask[:, [0]], t.forces[:, [0]],
                                             t.forces_mask[:, [0]], t.n_atoms), LossConfig(), ["lo"], reduce=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return phi


def _reference(world: int) -> dict[str, torch.Tensor]:
    theta = tiny_model(seed=0)
    phis = [_plain_inner(theta, _batches(seed=r)) for r in range(world)]
    return {n: p.detach() + EPS * torch.stack([dict(f.named_parameters())[n].detach() - p.detach() for f in phis]).mean(0)
            for n, p in theta.named_parameters()}


@pytest.mark.parametrize("world", [1, 2])
def test_outer_step_matches_plain_reptile(tmp_path, world):
    from dist_utils import spawn

    spawn(_rank_fn, world, str(tmp_path), 1, tmp=tmp_path)
    got = torch.load(tmp_path / f"w{world}.pt")["params"]
    ref = _reference(world)
    theta0 = dict(tiny_model(seed=0).named_parameters())
    moved = sum(float((ref[n] - theta0[n]).abs().sum()) for n in ref)
    assert moved > 1e-3
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)


def test_one_all_reduce_per_outer_step_not_k(tmp_path):
    """k = 3 inner steps make no collective; the outer step all-reduces the gradient once. ZeRO-1 adds
    one scalar all-reduce (the gradient norm); stage 0 has none."""
    from dist_utils import spawn

    spawn(_rank_fn, 2, str(tmp_path), 2, tmp=tmp_path)
    per_step = torch.load(tmp_path / "w2.pt")["all_reduces"]
    n_params = sum(p.numel() for p in tiny_model().parameters())
    assert len(per_step) == 2
    for sizes in per_step:
        assert sorted(sizes, reverse=True) == [n_params, 1], sizes


def test_task_sampling_weights_and_config(tmp_path):
    from polyfid.data_shards.schema import Fidelity
    from polyfid.data_shards.writer import Structure, write_structures
    from polyfid.distributed.modes.reptile import list_tasks, sample_task, task_weights

    stores = []
    for i, n in enumerate((30, 10)):
        frames = emt_frames(n, seed=i)
        structs = [Structure(a.numbers, a.positions, energies={"lo": a.info["energy_lo"]}) for a in frames]
        stores.append(write_structures(tmp_path / f"s{i}.zarr", structs, [Fidelity("lo")], dataset=f"d{i}"))
    tasks = list_tasks(stores, ["lo", "hi"])
    assert [t.key for t in tasks] == ["0:lo", "1:lo"]
    np.testing.assert_allclose(task_weights(tasks, stores, "uniform"), [0.5, 0.5])
    w = task_weights(tasks, stores, "size")
    np.testing.assert_allclose(w, [0.75, 0.25])
    draws = [sample_task(w, seed=0, step=s, rank=0) for s in range(2000)]
    assert abs(np.mean(np.array(draws) == 0) - 0.75) < 0.04
    assert draws == [sample_task(w, seed=0, step=s, rank=0) for s in range(2000)]  # seeded: reproducible
    assert draws != [sample_task(w, seed=0, step=s, rank=1) for s in range(2000)]  # each rank its own task

    cfg = load_config(None, ["trainer.mode=reptile", "reptile.inner_steps=16", "reptile.epsilon=0.25",
                             "reptile.task_weights=size"])
    assert (cfg.reptile.inner_steps, cfg.reptile.epsilon, cfg.reptile.task_weights) == (16, 0.25, "size")
    with pytest.raises(ConfigError, match="task_weights"):
        ReptileConfig(task_weights="greedy")

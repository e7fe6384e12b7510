"""Real DeepSpeed on gloo: one step on 2 ranks equals one step on 1 rank with the same global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import emt_frames
from helpers import batch_from_frames, tiny_model
from polyfid.data_shards.schema import concat_batches
from polyfid.distributed.config import ConfigError, LossConfig, TrainerConfig
from polyfid.distributed.loop.engine import build_engine, resolve_precision
from polyfid.distributed.modes.losses import multifidelity_loss
from polyfid.distributed.modes.multifidelity import StepContext, multifidelity_step, prepare


def _one_step(rank, world, out, parts, stage):
    from deepspeed.utils import safe_get_full_grad

    model = tiny_model(seed=0)
    cfg = TrainerConfig(zero_stage=stage, lr=1e-3, warmup_steps=1, steps=10)
    engine, precision = build_engine(model, cfg, torch.device("cpu"))
    assert precision == "fp32"
    batch = parts[rank] if world == 2 else concat_batches(parts)
    ctx = StepContext(engine, LossConfig(), model.fidelity_names, model.config.cutoff, torch.float32, torch.device("cpu"))
    graph, targets = prepare(batch, ctx)
    pred = engine(graph, force_heads=targets.force_heads(), create_graph=True)
    loss, metrics = multifidelity_loss(pred, targets, ctx.loss, ctx.fidelity_names)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"grads": grads, "params": params, "metrics": metrics}, f"{out}/w{world}.pt")


@pytest.mark.parametrize("stage", [1])
def test_two_ranks_equal_one_rank(tmp_path, stage):
    from dist_utils import spawn

    frames = emt_frames(12)
    # Unequal label counts: rank 1 holds no force labels at all.
    parts = [batch_from_frames(frames[:8], forces_for=("lo", "hi")), batch_from_frames(frames[8:], forces_for=())]
    spawn(_one_step, 2, str(tmp_path), parts, stage, tmp=tmp_path)
    spawn(_one_step, 1, str(tmp_path), parts, stage, tmp=tmp_path)
    two, one = torch.load(tmp_path / "w2.pt"), torch.load(tmp_path / "w1.pt")
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
    for n in one["grads"]:
        torch.testing.assert_close(two["grads"][n], one["grads"][n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two["params"][n], one["params"][n], rtol=1e-5, atol=1e-6)
    moved = sum(float((one["params"][n] - tiny_model(seed=0).state_dict()[n]).abs().sum()) for n in one["params"])
    assert moved > 0  # the step really updated the weights


def _many_steps(rank, world, out, steps_parts, stage):
    model = tiny_model(seed=0)
    cfg = TrainerConfig(zero_stage=stage, lr=3e-3, warmup_steps=2, steps=len(steps_parts))
    engine, _ = build_engine(model, cfg, torch.device("cpu"))
    ctx = StepContext(engine, LossConfig(), model.fidelity_names, model.config.cutoff, torch.float32, torch.device("cpu"))
    losses = []
    for parts in steps_parts:
        batch = parts[rank] if world == 2 else concat_batches(parts)
        losses.append(multifidelity_step(batch, ctx)["loss"])
    if rank == 0:
        torch.save({"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}, "losses": losses},
                   f"{out}/many_w{world}.pt")


@pytest.mark.parametrize("stage", [1, 2])
def test_twenty_steps_two_ranks_match_one_rank(tmp_path, stage):
    """20 optimiser steps (Adam, warm-up and cosine schedule, clipping) agree within fp32 tolerance."""
    from dist_utils import spawn

    frames = emt_frames(20 * 6, seed=3)
    steps_parts = []
    for s in range(20):
        f = frames[6 * s : 6 * s + 6]
        rank1_forces = ("lo",) if s % 2 else ()  # on even steps rank 1 holds no force labels
        steps_parts.append([batch_from_frames(f[:4], forces_for=("lo", "hi")), batch_from_frames(f[4:], forces_for=rank1_forces)])
    spawn(_many_steps, 2, str(tmp_path), steps_parts, stage, tmp=tmp_path)
    spawn(_many_steps, 1, str(tmp_path), steps_parts, stage, tmp=tmp_path)
    two, one = torch.load(tmp_path / "many_w2.pt"), torch.load(tmp_path / "many_w1.pt")
    assert two["losses"][-1] < two["losses"][0]  # it trained
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-4)
    for n in one["params"]:
        torch.testing.assert_close(two["params"][n], one["params"][n], rtol=1e-3, atol=2e-5)


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision(TrainerConfig(precision="fp16"), torch.device("cpu"))
    assert resolve_precision(TrainerConfig(), torch.device("cpu")) == "fp32"


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch, caplog):
    """torch waits forever while an op's `lock` file exists; one left by a killed build (older than
    STALE_BUILD_S) is removed with a warning, and a fresh one (a build running now) is kept."""
    import os
    import time

    from polyfid.distributed.loop import engine

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - engine.STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    with caplog.at_level("WARNING", logger="polyfid.engine"):
        assert engine.ensure_extension_cache() == tmp_path
    assert not stale.exists() and fresh.exists()
    assert str(stale) in caplog.text and "killed" in caplog.text

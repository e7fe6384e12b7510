"""The masked multi-fidelity loss: masking, surrogate gradients, and the cross-rank mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import emt_frames
from helpers import batch_from_frames, tiny_model
from polyfid.data_shards.schema import concat_batches
from polyfid.distributed.config import LossConfig
from polyfid.distributed.modes.losses import Targets, multifidelity_loss, prior_pairs
from polyfid.models.graph import build_graph


def _loss_and_grads(model, batch, cfg=LossConfig()):
    model.zero_grad()
    graph = build_graph(batch, model.config.cutoff, dtype=torch.float64)
    t = Targets.from_batch(batch, torch.float64, "cpu")
    out = model(graph, force_heads=t.force_heads(prior_pairs(cfg, model.fidelity_names)), create_graph=True)
    loss, metrics = multifidelity_loss(out, t, cfg, model.fidelity_names)
    loss.backward()
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct_loss(model, batch):
    """RMSE+MAE of per-atom energies and forces of both heads by direct autograd, written independently of the
    surrogate: (total, model output, targets); the model's gradients are zeroed first."""
    model.zero_grad()
    graph = build_graph(batch, model.config.cutoff, dtype=torch.float64)
    t = Targets.from_batch(batch, torch.float64, "cpu")
    out = model(graph, force_heads=[0, 1], create_graph=True)
    total = 0.0
    for k in range(2):
        de = ((out["energy"][:, k] - t.energy[:, k]) / t.n_atoms)[t.energy_mask[:, k] > 0]
        df = (out["forces"][:, k] - t.forces[:, k])[t.forces_mask[:, k] > 0]
        total = total + de.pow(2).mean().sqrt() + de.abs().mean() + df.pow(2).mean().sqrt() + df.abs().mean()
    return total, out, t


def test_missing_labels_do_not_count():
    model = tiny_model().double()
    frames = emt_frames(6)
    b1 = batch_from_frames(frames, forces_for=("lo",))
    b2 = batch_from_frames(frames, forces_for=("lo",))
    # A "hi" force label that is missing in both batches; put garbage where it is NaN in b2 only
    # after turning NaN into a wild value: the mask must hide it.
    l1, m1, g1 = _loss_and_grads(model, b1)
    t2 = Targets.from_batch(b2, torch.float64, "cpu")
    assert float(t2.forces_mask[:, 1].sum()) == 0.0  # no hi forces in this batch
    b2["energy"][0, 1] = np.nan  # drop one hi energy: the hi energy term changes but stays finite
    l2, m2, g2 = _loss_and_grads(model, b2)
    assert np.isfinite(l2) and all(torch.isfinite(g).all() for g in g2.values())
    assert "forces_mae/hi" not in m1 and "forces_mae/lo" in m1
    assert m1["loss/lo"] == pytest.approx(m2["loss/lo"], rel=1e-12)  # lo untouched
    assert m1["loss/hi"] != pytest.approx(m2["loss/hi"], rel=1e-9)


def test_surrogate_gradient_equals_gradient_of_reported_loss():
    model = tiny_model().double()
    batch = batch_from_frames(emt_frames(5), forces_for=("lo", "hi"))
    _, metrics, g = _loss_and_grads(model, batch)
    # Direct autograd of RMSE+MAE, written independently of the surrogate.
    total, _, _ = _direct_loss(model, batch)
    total.backward()
    assert float(total) == pytest.approx(metrics["loss"], rel=1e-10)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-8, atol=1e-12)


def _two_rank_grads(rank, world, out, parts):
    torch.manual_seed(0)
    model = tiny_model().double()
    _, metrics, g = _loss_and_grads(model, parts[rank])
    for v in g.values():  # what data parallelism does: average gradients over ranks
        torch.distributed.all_reduce(v)
        v /= world
    if rank == 0:
        torch.save({"grads": g, "metrics": metrics}, f"{out}/two.pt")


def test_two_ranks_with_unequal_labels_equal_one_rank_on_the_union(tmp_path):
    from dist_utils import spawn

    frames = emt_frames(10)
    parts = [batch_from_frames(frames[:7], forces_for=("lo",)), batch_from_frames(frames[7:], forces_for=())]
    spawn(_two_rank_grads, 2, str(tmp_path), parts, tmp=tmp_path)
    two = torch.load(tmp_path / "two.pt")
    _, m1, g1 = _loss_and_grads(tiny_model().double(), concat_batches(parts))
    assert two["metrics"]["loss"] == pytest.approx(m1["loss"], rel=1e-10)
    for n in g1:
        torch.testing.assert_close(two["grads"][n], g1[n], rtol=1e-8, atol=1e-12)


def test_force_prior_term_fits_low_forces_with_the_high_head_where_high_has_none():
    """loss.force_prior={hi: lo}: head hi also fits lo's force labels on atoms without hi forces, with the
    prior's weight; the reported loss and its surrogate gradient equal a direct autograd of that formula."""
    model = tiny_model().double()
    frames = emt_frames(6)
    batch = batch_from_frames(frames, forces_for=("lo", "hi"))
    n_first = len(frames[0]) + len(frames[1])
    batch["forces"][:n_first, 1] = np.nan  # hi forces only on frames 2..5: the prior acts on frames 0 and 1
    cfg = LossConfig(force_prior={"hi": "lo"}, force_prior_weight=0.3)
    t = Targets.from_batch(batch, torch.float64, "cpu")
    assert t.force_heads() == [0, 1] and Targets.from_batch(
        batch_from_frames(frames, forces_for=("lo",)), torch.float64, "cpu").force_heads([(1, 0)]) == [0, 1]
    _, metrics, g = _loss_and_grads(model, batch, cfg)
    _, plain, _ = _loss_and_grads(model, batch)
    total, out, t = _direct_loss(model, batch)
    prior = (out["forces"][:n_first, 1] - t.forces[:n_first, 0])
    total = total + 0.3 * (prior.pow(2).mean().sqrt() + prior.abs().mean())
    total.backward()
    assert float(total) == pytest.approx(metrics["loss"], rel=1e-10)
    assert metrics["loss/hi"] > plain["loss/hi"] and metrics["loss/lo"] == pytest.approx(plain["loss/lo"])
    assert metrics["forces_mae/hi"] == pytest.approx(plain["forces_mae/hi"])  # the prior is not a hi label
    assert metrics["prior_forces_mae/hi"] == pytest.approx(float(prior.abs().mean()))
    assert "prior_forces_mae/lo" not in metrics and "prior_forces_mae/hi" not in plain
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-8, atol=1e-12)

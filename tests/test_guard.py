"""The step guard's verdict on sequences of global losses (the Trainer's use of it, with planted NaNs and spikes
on 2 gloo ranks, is tested in test_trainer.py)."""

from __future__ import annotations

import numpy as np

from polyfid.distributed.config import GuardConfig
from polyfid.distributed.loop.guard import Guard


def _skips(losses, **cfg) -> list[int]:
    g = Guard(GuardConfig(**cfg), rank=0)
    return [i for i, x in enumerate(losses) if g.verdict(float(x)) is not None]


def _heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    """A converging run on heavy-tailed data, like (a) of S1 at corpus scale: most batches fall from 1 to 0.03,
    every 25th to 40th holds a rattled structure and stays near 1.6 (up to 60x the median)."""
    rng = np.random.default_rng(seed)
    loss = np.exp(np.linspace(0, np.log(0.03), n)) * rng.lognormal(0, 0.2, n)
    hard = np.cumsum(rng.integers(25, 41, n // 25))
    loss[hard[hard < n]] = 1.6 * rng.lognormal(0, 0.2, int((hard < n).sum()))
    return loss


def test_the_data_own_tail_is_not_a_spike(monkeypatch):
    from polyfid.distributed.loop import guard

    loss = _heavy_tailed(1000)
    assert np.max(loss[500:]) / np.median(loss[500:]) > 30  # the tail is far above 10x the median ...
    assert len(_skips(loss)) <= 2  # ... yet (almost) never skipped
    monkeypatch.setattr(guard, "TAIL_MARGIN", 0.0)  # the median-only rule of before: enough skips to roll back
    assert len(_skips(loss)) >= 10


def test_a_bad_batch_and_a_divergence_are_spikes():
    loss = _heavy_tailed(600)
    loss[400] = 1e4  # a failed SCF 10 keV off
    loss[550:] = 40 * loss[550:] + 100  # the run diverges
    skips = _skips(loss)
    assert 400 in skips and set(range(550, 600)) <= set(skips)


def test_nan_is_skipped_unless_turned_off():
    assert _skips([1.0, float("nan"), 1.0]) == [1]
    assert _skips([1.0, float("nan"), 1.0], skip_nonfinite=False) == []


def test_spike_factor_zero_turns_spikes_off():
    assert _skips([1.0] * 30 + [1e6], spike_factor=0) == []
    assert _skips([1.0] * 30 + [1e6]) == [30]

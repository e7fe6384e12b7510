"""Shard planning: deterministic, every shard exactly once, balanced by atoms."""

from __future__ import annotations

import numpy as np
import pytest

from polyfid.data_shards.plan import imbalance, plan_shards


def _sizes(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1_000, 100_000, size=n).tolist()


def test_deterministic_and_epoch_dependent() -> None:
    sizes = _sizes(200)
    a = plan_shards(3, 7, 4, sizes)
    assert a == plan_shards(3, 7, 4, list(sizes))
    assert a != plan_shards(4, 7, 4, sizes)  # a new epoch reads in a new order
    assert a != plan_shards(3, 8, 4, sizes)


@pytest.mark.parametrize("world_size,n", [(1, 5), (4, 200), (3, 7), (8, 3), (5, 0)])
def test_every_shard_exactly_once(world_size: int, n: int) -> None:
    sizes = _sizes(n, seed=n)
    for epoch in range(3):
        plan = plan_shards(epoch, 0, world_size, sizes)
        assert len(plan) == world_size
        assert sorted(k for ks in plan for k in ks) == list(range(n))
        if n < world_size:
            assert sum(1 for ks in plan if not ks) == world_size - n


def test_balance_by_atoms() -> None:
    sizes = _sizes(200, seed=1)
    for epoch in range(5):
        plan = plan_shards(epoch, 0, 4, sizes)
        assert imbalance(plan, sizes) < 0.05
    equal = plan_shards(0, 0, 4, [10] * 12)
    assert [len(ks) for ks in equal] == [3, 3, 3, 3]


def test_read_order_follows_the_shuffle_not_the_size() -> None:
    sizes = list(range(100, 140))
    orders = {tuple(plan_shards(e, 0, 2, sizes)[0]) for e in range(4)}
    assert len(orders) == 4
    assert any(list(o) != sorted(o, key=lambda k: -sizes[k]) for o in orders)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        plan_shards(0, 0, 0, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        plan_shards(0, 0, 2, [1, -2])

"""Resuming the reader on another world size: the rest of the epoch is re-planned, nothing lost or repeated."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.store import Store
from polyfid.data_shards.synthetic import synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return synthetic_store(tmp_path_factory.mktemp("resume") / "s", n=100, shard_size=12)


def _cfg(loop: bool) -> ShardReader.Config:
    return ShardReader.Config(atom_budget=40, shuffle_buffer=10, seed=1, prefetch=0, loop=loop)


def _run(store: Store, world_size: int, steps: list[int], state: dict | None = None) -> tuple[list[int], dict]:
    """Each rank takes steps[rank] batches (loop=True); returns the structure ids taken per epoch 0 and states."""
    taken, states = [], []
    for rank in range(world_size):
        reader = ShardReader([store], _cfg(True), rank=rank, world_size=world_size)
        if state is not None:
            reader.load_state_dict(json.loads(json.dumps(state)))
        for b in itertools.islice(iter(reader), steps[rank]):
            taken.append((reader.epoch, b["structure_id"].tolist()))
        states.append(reader.state_dict())
    return taken, ShardReader.gather_states(states)


def _finish_epoch(store: Store, world_size: int, state: dict) -> list[int]:
    """Structure ids that a world of `world_size` reads from the restored cursor to the end of its epoch."""
    ids = []
    for rank in range(world_size):
        reader = ShardReader([store], _cfg(False), rank=rank, world_size=world_size)
        reader.load_state_dict(state)
        ids += [int(i) for b in reader for i in b["structure_id"]]
    return ids


def _ids_in(taken: list, epoch: int) -> list[int]:
    return [i for e, ids in taken if e == epoch for i in ids]


@pytest.mark.parametrize("old,new,steps", [(2, 3, [3, 5]), (2, 1, [4, 1]), (3, 2, [0, 2, 6]), (1, 4, [2])])
def test_rest_of_epoch_is_replanned(store: Store, old: int, new: int, steps: list[int]) -> None:
    taken, state = _run(store, old, steps)
    before = _ids_in(taken, 0)
    after = _finish_epoch(store, new, state)
    assert sorted(before + after) == list(range(store.n_structures))
    # the epochs after that use the new world's ordinary plan
    nxt = []
    for rank in range(new):
        reader = ShardReader([store], _cfg(False), rank=rank, world_size=new)
        reader.load_state_dict(state)
        list(reader)  # finish the re-planned epoch
        assert reader.epoch == 1
        nxt += [int(i) for b in reader for i in b["structure_id"]]
    assert sorted(nxt) == list(range(store.n_structures))


def test_ranks_in_different_epochs(store: Store) -> None:
    per_epoch = len(list(ShardReader([store], _cfg(False), rank=0, world_size=2)))
    taken, state = _run(store, 2, [per_epoch + 2, 3])  # rank 0 is already in epoch 1
    assert [r["epoch"] for r in state["ranks"]] == [1, 0]
    after = _finish_epoch(store, 3, state)
    assert sorted(_ids_in(taken, 0) + after) == list(range(store.n_structures))


def test_two_changes_within_one_epoch(store: Store) -> None:
    taken1, state1 = _run(store, 2, [2, 3])
    taken2, state2 = _run(store, 3, [1, 2, 2], state1)
    assert all(e == 0 for e, _ in taken2)
    after = _finish_epoch(store, 2, state2)
    ids = _ids_in(taken1, 0) + _ids_in(taken2, 0) + after
    assert sorted(ids) == list(range(store.n_structures))


def test_replanned_reader_resumes_exactly(store: Store) -> None:
    _, state = _run(store, 2, [2, 4])
    first = ShardReader([store], _cfg(True), rank=1, world_size=3)
    first.load_state_dict(state)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    own = json.loads(json.dumps(first.state_dict()))
    assert own["replan"] is not None and head
    tail = [next(it) for _ in range(6)]
    again = ShardReader([store], _cfg(True), rank=1, world_size=3)
    again.load_state_dict(own)
    for x, y in zip(tail, itertools.islice(iter(again), 6)):
        assert np.array_equal(x["structure_id"], y["structure_id"])
        assert np.array_equal(x["positions"], y["positions"])


def test_gather_states_needs_every_rank(store: Store) -> None:
    s0 = ShardReader([store], _cfg(True), rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank"):
        ShardReader.gather_states([s0])

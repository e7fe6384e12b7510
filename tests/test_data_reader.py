"""The streaming reader: atom budget, exact coverage across ranks, exact resume, small stores, multi-store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from polyfid.data_shards.reader import ShardReader, _Batcher, _swap_through, iter_all
from polyfid.data_shards.schema import BATCH_KEYS, Fidelity
from polyfid.data_shards.store import CorruptShardError, Store
from polyfid.data_shards.synthetic import synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return synthetic_store(tmp_path_factory.mktemp("r") / "s", n=120, shard_size=16)


def _cfg(**kw) -> ShardReader.Config:
    base = dict(atom_budget=40, shuffle_buffer=10, seed=3, prefetch=0)
    base.update(kw)
    return ShardReader.Config(**base)


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["structure_id"]]


def test_batches_respect_the_atom_budget(store: Store) -> None:
    batches = list(ShardReader([store], _cfg(loop=False, prefetch=2)))
    assert all(b["n_atoms"].sum() <= 40 for b in batches)
    assert np.mean([b["n_atoms"].sum() for b in batches]) > 25  # batches are filled, not one-per-structure
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        s, a, f = len(b["n_atoms"]), int(b["n_atoms"].sum()), 2
        assert b["atomic_numbers"].shape == (a,) and b["atomic_numbers"].dtype == np.int64
        assert b["positions"].shape == (a, 3) and b["cell"].shape == (s, 3, 3) and b["pbc"].shape == (s, 3)
        assert b["energy"].shape == (s, f) and b["forces"].shape == (a, f, 3)
        assert b["energy"].dtype == b["forces"].dtype == np.float64


def test_oversized_structure_is_a_batch_of_its_own(store: Store) -> None:
    with pytest.warns(UserWarning, match="atom_budget=10"):
        batches = list(ShardReader([store], _cfg(atom_budget=10, loop=False)))
    for b in batches:
        assert b["n_atoms"].sum() <= 10 or len(b["n_atoms"]) == 1
    assert any(b["n_atoms"].sum() > 10 for b in batches)
    assert sorted(_ids(batches)) == list(range(store.n_structures))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_structure_once_per_epoch_across_ranks(store: Store, world_size: int) -> None:
    orders = []
    for epoch in range(2):
        per_rank = []
        for rank in range(world_size):
            reader = ShardReader([store], _cfg(loop=False), rank=rank, world_size=world_size)
            reader.set_epoch(epoch)
            per_rank.append(_ids(reader))
            assert per_rank[-1], f"rank {rank} got nothing"
        union = [i for ids in per_rank for i in ids]
        assert sorted(union) == list(range(store.n_structures))
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_labels_follow_their_structures(store: Store) -> None:
    by_id = {}
    for k in range(len(store.shards)):
        d = store.read_shard(k)
        for j, sid in enumerate(d["structure_id"]):
            lo, hi = d["offsets"][j], d["offsets"][j + 1]
            by_id[int(sid)] = (d["positions"][lo:hi], d["energy"]["hi"][j], d["forces"]["lo"][lo:hi])
    reader = ShardReader([store], _cfg(loop=False), fidelities=["hi", "lo"])
    for b in reader:
        starts = np.concatenate([[0], np.cumsum(b["n_atoms"])])
        for j, sid in enumerate(b["structure_id"]):
            pos, e_hi, f_lo = by_id[int(sid)]
            np.testing.assert_array_equal(b["positions"][starts[j]:starts[j + 1]], pos)
            np.testing.assert_array_equal(b["energy"][j, 0], e_hi)
            np.testing.assert_array_equal(b["forces"][starts[j]:starts[j + 1], 1], f_lo)
            assert np.isnan(b["forces"][starts[j]:starts[j + 1], 0]).all()  # 'hi' has no forces


def _equal(a, b) -> bool:
    return all(np.array_equal(a[k], b[k], equal_nan=True) for k in BATCH_KEYS)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_stream(store: Store, prefetch: int) -> None:
    cfg = _cfg(prefetch=prefetch)
    reference = list(itertools.islice(iter(ShardReader([store], cfg, rank=1, world_size=2)), 60))
    per_epoch = len(list(ShardReader([store], _cfg(loop=False), rank=1, world_size=2)))
    assert per_epoch < 40  # so that 60 batches cross an epoch boundary
    for n in (0, 1, 7, per_epoch - 1, per_epoch, per_epoch + 3):
        first = ShardReader([store], cfg, rank=1, world_size=2)
        it = iter(first)
        got = [next(it) for _ in range(n)]
        state = json.loads(json.dumps(first.state_dict()))
        extra = next(it)  # the interrupted reader keeps going; the restored one must match it
        restored = ShardReader([store], cfg, rank=1, world_size=2)
        restored.load_state_dict(state)
        resumed = list(itertools.islice(iter(restored), 60 - n))
        assert all(_equal(x, y) for x, y in zip(got, reference[:n]))
        assert _equal(resumed[0], extra)
        assert len(resumed) == 60 - n and all(_equal(x, y) for x, y in zip(resumed, reference[n:])), n
    assert restored.epoch >= 1


def test_state_must_fit_the_reader(store: Store) -> None:
    state = ShardReader([store], _cfg()).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardReader([store], _cfg(seed=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardReader([store], _cfg(), rank=0, world_size=2).load_state_dict(state)


def test_one_shard_store_feeds_two_ranks(tmp_path: Path) -> None:
    small = synthetic_store(tmp_path / "small", n=9, shard_size=100)
    assert len(small.shards) == 1
    ids = []
    for rank in range(2):
        got = _ids(ShardReader([small], _cfg(loop=False), rank=rank, world_size=2))
        assert got, f"rank {rank} got nothing"
        ids += got
    assert sorted(ids) == list(range(9))


def test_a_rank_without_data_fails_loudly(tmp_path: Path) -> None:
    tiny = synthetic_store(tmp_path / "tiny", n=1)
    assert list(ShardReader([tiny], _cfg(loop=False), rank=1, world_size=2)) == []
    with pytest.raises(RuntimeError, match="no structures"):
        next(iter(ShardReader([tiny], _cfg(loop=True), rank=1, world_size=2)))


def test_two_stores_union_fidelities_and_datasets(tmp_path: Path, store: Store) -> None:
    other = synthetic_store(tmp_path / "o", n=20, shard_size=8, dataset="extra",
                            fidelities=[Fidelity("lo"), Fidelity("ccsd", rank=5)], force_fidelities=())
    reader = ShardReader([store, other], _cfg(loop=False))
    assert reader.fidelities == ["lo", "hi", "ccsd"]
    assert [f.rank for f in reader.fidelity_objects] == [0, 1, 5]
    assert reader.datasets == ["synthetic", "extra"] and reader.elements == sorted(set(store.elements)
                                                                                   | set(other.elements))
    seen = {0: 0, 1: 0}
    for b in reader:
        for s in (0, 1):
            mask = b["store"] == s
            seen[s] += int(mask.sum())
            assert (b["dataset"][mask] == s).all()
        assert np.isnan(b["energy"][b["store"] == 0, 2]).all()  # store 0 has no ccsd
        assert np.isnan(b["energy"][b["store"] == 1, 1]).all()  # store 1 has no hi
    assert seen == {0: 120, 1: 20}


def test_iter_all_is_in_order_and_complete(store: Store) -> None:
    batches = list(iter_all([store], atom_budget=64))
    assert _ids(batches) == list(range(store.n_structures))
    assert all(b["n_atoms"].sum() <= 64 for b in batches)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_reader_on_fsspec_urls_matches_the_local_path(tmp_path: Path, store: Store, scheme: str) -> None:
    url = f"file://{tmp_path / 's'}" if scheme == "file" else f"memory://polyfid-reader/{tmp_path.name}"
    remote = synthetic_store(url, n=120, shard_size=16)  # same seed and sizes as the `store` fixture
    assert remote.fingerprint == store.fingerprint and Store.open(url).verify() == []
    cfg = _cfg(loop=False, prefetch=2)
    want, got = list(ShardReader([store], cfg)), list(ShardReader([Store.open(url)], cfg))
    assert len(got) == len(want)
    for a, b in zip(want, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_vectorised_buffer_and_batch_cuts_match_the_sequential_definition(store: Store) -> None:
    rng = np.random.default_rng(0)
    for size, m in [(1, 5), (7, 60), (50, 20), (4096, 50_000)]:
        buf, incoming, picks = rng.integers(0, 1000, size), rng.integers(1000, 9000, m), rng.integers(0, size, m)
        seq, left = buf.copy(), []
        for x, k in zip(incoming, picks):  # the buffer as first written: one swap at a time
            left.append(seq[k])
            seq[k] = x
        got = _swap_through((buf,), picks, (incoming,))[0]
        assert got.tolist() == left and buf.tolist() == seq.tolist()
    reader = ShardReader([store], _cfg(atom_budget=40))
    n = rng.integers(1, 50, 500)  # some larger than the budget: batches of their own
    expect, batch = [], []
    for a in n.tolist():  # greedy, one structure at a time
        if a > 40 or sum(batch) + a > 40:
            expect += [batch] if batch else []
            batch = []
        if a > 40:
            expect.append([a])
        else:
            batch.append(a)
    expect += [batch] if batch else []
    batcher, got = _Batcher(reader), []
    with pytest.warns(UserWarning, match="atom_budget=40"):
        for lo in range(0, 500, 37):  # fed in pieces, as units arrive
            part = n[lo:lo + 37]
            got += batcher.feed((np.zeros_like(part), np.arange(lo, lo + len(part)), part))
        got += batcher.flush()
    assert [b[2].tolist() for b in got] == expect
    assert np.concatenate([b[1] for b in got]).tolist() == list(range(500))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reader_refuses_an_altered_shard_and_names_it(tmp_path: Path, prefetch: int) -> None:
    import zarr

    bad = synthetic_store(tmp_path / "s", n=64, shard_size=16)
    name = bad.shards[2].name  # with prefetch, read ahead in another thread while shard 1's batches are built
    arr = zarr.open_array(str(tmp_path / "s" / "shards" / name / "positions"), mode="r+")
    arr[3, 1] = arr[3, 1] + 1e-6
    with pytest.raises(CorruptShardError, match=f"{name}.*checksum"):
        list(ShardReader([bad], _cfg(loop=False, shuffle=False, prefetch=prefetch)))
    cfg = _cfg(loop=False, shuffle=False, prefetch=prefetch, verify=False)
    assert sum(len(b["n_atoms"]) for b in ShardReader([bad], cfg)) == 64

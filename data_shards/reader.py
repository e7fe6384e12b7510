"""The streaming reader: whole shards in a per-epoch plan, a bounded shuffle buffer, atom-budget batches.

The stream of one rank is a deterministic function of (stores, config, epoch, rank, world size), so
the cursor is just (epoch, batches consumed). Resuming replays the epoch's decisions from the shards'
`offsets` arrays alone (no positions are read) and loads only the shards still in the buffer. Resuming
on a different number of ranks re-plans the rest of the epoch (see resume.py): load the combined state
of every old rank, `ShardReader.gather_states([...])`, into each new reader.

Dataset indices in a batch refer to `ShardReader.datasets`: the union of the stores' dataset names, in
order of first appearance (store order, then each manifest's order); the same name in two stores is
taken to be the same dataset. `batch["store"]` says which store a structure came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from polyfid.data_shards import resume
from polyfid.data_shards.plan import Unit, plan_shards
from polyfid.data_shards.prefetch import prefetched
from polyfid.data_shards.schema import Batch, Fidelity, by_rank
from polyfid.data_shards.store import Store

STATE_VERSION = 1


class _ShardCache:
    """Shards in memory, kept while the shuffle buffer still holds structures of them.

    With `ahead` (a one-thread executor), the shard of the next unit is read (decoded, checked, laid out)
    while the batches of the current one are built, so decoding overlaps with batching. It is read ahead
    only while at most two shards are held (the current one and the one before it); while stragglers of an
    older shard are still in the buffer, it waits, so memory stays at what reading without it would hold.
    """

    def __init__(self, reader: "ShardReader", ahead: ThreadPoolExecutor | None = None) -> None:
        self._reader = reader
        self.loading = True  # False while replaying a resume: read offsets only
        self._data: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, int] = {}
        self._ahead = ahead
        self._future: tuple[int, Future] | None = None
        self._following: int | None = None  # the shard of the next unit, to read ahead
        # Object storage: the shards of the next `fetch_ahead` units are fetched (not laid out) several at once,
        # since one fetch waits out its round trips for longer than training takes to use a shard.
        n = reader.config.fetch_ahead if ahead is not None and any(st.remote for st in reader.stores) else 0
        self._fetch_pool = ThreadPoolExecutor(n, thread_name_prefix="polyfid-fetch") if n else None
        self._fetched: dict[int, Future] = {}
        self.upcoming: list[Unit] = []  # this epoch's units in read order (the stream sets it)

    def enter(self, position: int) -> np.ndarray:
        """Atoms per structure of the unit at `position` in `upcoming` entering the buffer (loads the shard unless
        replaying); the next unit's shard is read ahead, and the following shards of object storage fetched."""
        unit = self.upcoming[position]
        following = self.upcoming[position + 1] if position + 1 < len(self.upcoming) else None
        if unit.g in self._data:
            offsets = self._data[unit.g]["offsets"]
        elif self.loading:
            offsets = self.data(unit.g)["offsets"]
        else:
            offsets = self._reader.structure_offsets(unit.g)
        self._pending[unit.g] = self._pending.get(unit.g, 0) + unit.n
        self._following = following.g if following is not None and self.loading else None
        self._fetch_ahead(position)
        self._read_ahead()
        idx = unit.indices()
        return offsets[idx + 1] - offsets[idx]

    def _fetch_ahead(self, position: int) -> None:
        if self._fetch_pool is None or not self.loading:
            return
        for unit in self.upcoming[position + 1:position + 1 + self._reader.config.fetch_ahead]:
            g = unit.g
            s, k = self._reader.shard_keys[g]
            if (g in self._data or g in self._fetched or (self._future is not None and self._future[0] == g)
                    or not self._reader.stores[s].remote):
                continue
            self._fetched[g] = self._fetch_pool.submit(self._reader.stores[s].fetch, k)

    def _load(self, g: int) -> dict[str, Any]:
        """Shard g laid out, from its fetched arrays when they were fetched ahead."""
        fetched = self._fetched.pop(g, None)
        return self._reader._load(*self._reader.shard_keys[g], fetched=fetched.result() if fetched else None)

    def _read_ahead(self) -> None:
        g = self._following
        if self._ahead is None or g is None or g in self._data or self._future is not None or len(self._data) > 2:
            return
        self._future = (g, self._ahead.submit(self._load, g))

    def data(self, g: int) -> dict[str, Any]:
        """A shard's prepared arrays, loading it on a miss (after a resume)."""
        if g not in self._data:
            if self._future is not None and self._future[0] == g:
                self._data[g] = self._future[1].result()  # re-raises a CorruptShardError of that shard
                self._future = None
            else:
                self._data[g] = self._load(g)
        return self._data[g]

    def release(self, g: np.ndarray) -> None:
        """Forget structures that have left in a batch (their shards `g`); drop shards nobody waits on."""
        shards, counts = np.unique(g, return_counts=True)
        for s, c in zip(shards.tolist(), counts.tolist()):
            self._pending[s] -= c
            if self._pending[s] == 0:
                del self._pending[s]
                dropped = self._data.pop(s, None)
                if dropped is not None:
                    _release_freed_memory(2 * _nbytes(dropped))  # room for the next two shards
                    self._read_ahead()

    def close(self) -> None:
        """Stop reading ahead (a read in progress finishes in the background and is dropped)."""
        if self._ahead is not None:
            self._ahead.shutdown(wait=False, cancel_futures=True)
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._future = None
        self._fetched.clear()


class _Batcher:
    """Cuts a stream of structure refs (shard, index, atoms arrays) into atom-budget batches, greedily.

    A batch takes structures in stream order until the next one would exceed the budget; a structure
    larger than the budget forms a batch of its own. Cuts are found by searchsorted on the atom cumsum.
    """

    def __init__(self, reader: "ShardReader") -> None:
        self._reader = reader
        self._carry: tuple[np.ndarray, ...] = (_EMPTY,) * 3

    def feed(self, refs: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
        """The batches completed by these refs (the last, unfinished one is carried over)."""
        g, i, n = (np.concatenate([c, r]) for c, r in zip(self._carry, refs))
        budget = self._reader.config.atom_budget
        cum = np.concatenate([[0], np.cumsum(n)])
        ends = np.searchsorted(cum, cum[:-1] + budget, side="right") - 1  # batch from s holds s..ends[s]-1
        out, s, total = [], 0, len(n)
        while s < total:
            e = int(ends[s])
            if e == s:  # larger than the budget: a batch of its own
                self._reader._warn_oversized(int(n[s]))
                e = s + 1
            elif e == total:  # may still grow with the next refs
                break
            out.append((g[s:e], i[s:e], n[s:e]))
            s = e
        self._carry = (g[s:], i[s:], n[s:])
        return out

    def flush(self) -> list[tuple[np.ndarray, ...]]:
        """The last, unfinished batch (if any)."""
        carry, self._carry = self._carry, (_EMPTY,) * 3
        return [carry] if len(carry[0]) else []


def _swap_through(buf: tuple[np.ndarray, ...], picks: np.ndarray,
                  incoming: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Vectorised shuffle-buffer swaps: incoming[t] replaces buf[picks[t]], whose content leaves, for t = 0, 1, ….

    Equal to the sequential loop: stably sorted by slot, each incoming ref pushes out the one that came into
    its slot just before it (or the buffer's content, for the first in a slot). Updates `buf`; returns what
    left, in order.
    """
    order = np.argsort(picks, kind="stable")
    slots = picks[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = slots[1:] != slots[:-1]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = first[1:]
    prev = np.roll(order, 1)  # the previous arrival in the same slot (where not first)
    out = []
    for b, x in zip(buf, incoming):
        o = np.empty_like(x)
        o[order[first]] = b[slots[first]]
        o[order[~first]] = x[prev[~first]]
        b[slots[last]] = x[order[last]]
        out.append(o)
    return tuple(out)


def _release_freed_memory(slack: int) -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim), once RSS is `slack` bytes above where the last
    trim left it, so RSS stays flat over many shards.

    Trimming at every dropped shard would also keep it flat, but then each new shard's pages are mapped and
    zeroed again by the kernel, which cost about a quarter of the reader's CPU time; below the slack the
    freed pages are reused instead.
    """
    global _TRIM, _TRIMMED_AT
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if not _TRIM:
        return
    rss = _rss()
    if rss is None or _TRIMMED_AT is None or rss > _TRIMMED_AT + slack:
        _TRIM(0)
        _TRIMMED_AT = _rss()


def _rss() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _nbytes(shard: dict[str, Any]) -> int:
    return sum(a.nbytes for a in shard.values() if isinstance(a, np.ndarray)) + sum(
        f.nbytes for f in shard["forces"] if f is not None)


_TRIM: Any = None
_TRIMMED_AT: int | None = None
_EMPTY = np.zeros(0, dtype=np.int64)


class ShardReader:
    """Streams atom-budget batches of one rank's share of the stores, epoch after epoch, resumably."""

    @dataclasses.dataclass
    class Config:
        """How the reader batches, shuffles and reads ahead."""

        atom_budget: int = 4096
        """At most this many atoms per batch; a larger structure forms a batch of its own (with a warning)."""
        shuffle_buffer: int = 4096
        """Structures held in the shuffle buffer; bounds memory together with one or two shards."""
        shuffle: bool = True
        """Shuffle structures in the buffer (and the shard order each epoch); False reads in store order."""
        seed: int = 0
        """Seeds the shard plan and the buffer; the stream is a function of (seed, epoch, rank, world size)."""
        loop: bool = True
        """Cycle epochs forever; False stops after the current epoch."""
        prefetch: int = 2
        """Batches read ahead in a background thread, while a second one reads the next shard (0 = all in the
        caller's thread)."""
        fetch_ahead: int = 4
        """Stores on object storage: the shards of this many following units are fetched at once, ahead of their
        use (needs prefetch > 0; 0 = only the next shard, read ahead as from local disk)."""
        verify: bool = True
        """Check each shard's checksum as it is read."""

    def __init__(self, stores: Sequence[Store], config: "ShardReader.Config | None" = None, rank: int = 0,
                 world_size: int = 1, fidelities: Sequence[str] | None = None) -> None:
        if not stores:
            raise ValueError("ShardReader needs at least one store")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.stores = list(stores)
        self.config = config or ShardReader.Config()
        if self.config.atom_budget < 1 or self.config.shuffle_buffer < 1:
            raise ValueError("atom_budget and shuffle_buffer must be >= 1")
        if self.config.fetch_ahead < 0:
            raise ValueError(f"fetch_ahead must be >= 0, got {self.config.fetch_ahead}")
        self.rank, self.world_size = int(rank), int(world_size)
        known: dict[str, Fidelity] = {}
        for st in self.stores:
            for f in st.fidelities:
                known.setdefault(f.name, f)
        if fidelities is None:
            fidelities = [f.name for f in by_rank(known.values())]
        missing = [f for f in fidelities if f not in known]
        if missing:
            raise ValueError(f"fidelities {missing} are in none of the stores; known: {sorted(known)}")
        self.fidelities: list[str] = list(fidelities)
        self.fidelity_objects: list[Fidelity] = [known[f] for f in self.fidelities]
        self.datasets: list[str] = []
        for st in self.stores:
            self.datasets += [d for d in st.datasets if d not in self.datasets]
        self._dataset_maps = [np.array([self.datasets.index(d) for d in st.datasets], dtype=np.int64)
                              for st in self.stores]
        self.elements: list[int] = sorted({z for st in self.stores for z in st.elements})
        self.shard_keys: list[tuple[int, int]] = [(s, k) for s, st in enumerate(self.stores) for k in range(len(st.shards))]
        self._offsets_memo: dict[int, np.ndarray] | None = None  # shared while re-planning a resume
        self._units = self._make_units()
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` already handed to the caller
        self._replan: dict[str, Any] | None = None  # set when resumed from a different world size
        self._replan_units: list[Unit] = []
        self._warned = False

    # ---- planning ---------------------------------------------------------------------------------
    def _make_units(self) -> list[Unit]:
        """One unit per shard; with fewer than 2×world_size shards, shards are split into structure ranges."""
        shards = [(s, k, info) for s, st in enumerate(self.stores) for k, info in enumerate(st.shards)]
        units = [Unit(g, s, k, 0, info.n_structures, info.n_atoms) for g, (s, k, info) in enumerate(shards)]
        if len(units) >= 2 * self.world_size or not units:
            return units
        pieces = math.ceil(2 * self.world_size / len(units))
        split = []
        for g, (s, k, info) in enumerate(shards):
            offsets = self.stores[s].read_array(k, "offsets")
            for part in np.array_split(np.arange(info.n_structures), min(pieces, info.n_structures)):
                lo, hi = int(part[0]), int(part[-1]) + 1
                split.append(Unit(g, s, k, lo, hi, int(offsets[hi] - offsets[lo])))
        return split

    # ---- the resume interface (data_shards/resume.py): references and offsets, no structure data read ------
    def share_offsets(self, other: "ShardReader") -> None:
        """Read offsets through `other`'s memo while it re-plans a resume (one read per shard for all shadows)."""
        self._offsets_memo = other._offsets_memo

    def structure_offsets(self, g: int) -> np.ndarray:
        """The offsets array of global shard g (memoised only while re-planning)."""
        if self._offsets_memo is not None and g in self._offsets_memo:
            return self._offsets_memo[g]
        s, k = self.shard_keys[g]
        offsets = self.stores[s].read_array(k, "offsets")
        if self._offsets_memo is not None:
            self._offsets_memo[g] = offsets
        return offsets

    def _epoch_units(self, epoch: int) -> list[Unit]:
        """The units this rank reads in `epoch`, in read order."""
        units = self._units
        if self._replan is not None and epoch == self._replan["epoch"]:
            units = self._replan_units
        plan = plan_shards(epoch, self.config.seed, self.world_size, [u.atoms for u in units])[self.rank]
        return [units[u] for u in (plan if self.config.shuffle else sorted(plan))]

    # ---- the deterministic stream -----------------------------------------------------------------
    def _ref_batches(self, epoch: int, cache: _ShardCache) -> Iterator[tuple[np.ndarray, ...]]:
        """Batches as (global shard, structure index in shard, atoms) arrays; decisions use only atom counts.

        Each unit's structures pass through a buffer of `shuffle_buffer` slots: while it is filling they
        enter it; after that each arriving structure takes a random slot and the structure there leaves.
        At the end of the epoch the buffer empties in a random order.
        """
        cfg = self.config
        rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, epoch, self.rank])
        size = cfg.shuffle_buffer
        buf = tuple(np.empty(size, dtype=np.int64) for _ in range(3))
        held = 0
        batcher = _Batcher(self)
        units = self._epoch_units(epoch)
        cache.upcoming = units
        for u, unit in enumerate(units):
            counts = cache.enter(u)
            refs = (np.full(unit.n, unit.g, dtype=np.int64), unit.indices().astype(np.int64),
                    counts.astype(np.int64))
            if not cfg.shuffle:
                yield from batcher.feed(refs)
                continue
            fill = min(unit.n, size - held)
            for b, r in zip(buf, refs):
                b[held:held + fill] = r[:fill]
            held += fill
            picks = rng.integers(0, size, size=unit.n - fill)
            if len(picks):
                yield from batcher.feed(_swap_through(buf, picks, tuple(r[fill:] for r in refs)))
        if cfg.shuffle:
            last = rng.permutation(held)
            yield from batcher.feed(tuple(b[:held][last] for b in buf))
        yield from batcher.flush()

    def _warn_oversized(self, n: int) -> None:
        if not self._warned:
            warnings.warn(f"a structure of {n} atoms exceeds atom_budget={self.config.atom_budget}; such "
                          "structures form batches of their own (warned once per reader)", stacklevel=4)
            self._warned = True

    def _stream(self, epoch: int, skip: int) -> Iterator[tuple[int, Batch]]:
        """(batch index, batch) of `epoch`, starting after `skip` batches (replayed without reading data)."""
        ahead = ThreadPoolExecutor(1, thread_name_prefix="polyfid-read-ahead") if self.config.prefetch > 0 else None
        cache = _ShardCache(self, ahead)
        cache.loading = skip == 0
        try:
            for b, refs in enumerate(self._ref_batches(epoch, cache)):
                if b < skip:
                    cache.release(refs[0])
                    cache.loading = b + 1 >= skip
                    continue
                batch = self._assemble(refs, cache)
                cache.release(refs[0])
                yield b, batch
        finally:
            cache.close()

    # ---- data -------------------------------------------------------------------------------------
    def _load(self, s: int, k: int, fetched: tuple | None = None) -> dict[str, Any]:
        """Read shard k of store s (or use its `fetched` arrays) and lay its labels out in this reader's fidelity
        order."""
        raw = self.stores[s].read_shard(k, verify=self.config.verify, fill_missing=False, fetched=fetched)
        n_s = len(raw["structure_id"])
        energy = np.full((n_s, len(self.fidelities)), np.nan)
        forces: list[np.ndarray | None] = []
        for j, fid in enumerate(self.fidelities):
            if fid in raw["energy"]:
                energy[:, j] = raw["energy"][fid]
            forces.append(raw["forces"].get(fid))  # None: this shard has no forces at fid
        return {"z": raw["atomic_numbers"], "positions": raw["positions"], "offsets": raw["offsets"],
                "cell": raw["cell"], "pbc": raw["pbc"], "structure_id": raw["structure_id"],
                "dataset": self._dataset_maps[s][raw["dataset"].astype(np.int64)], "energy": energy,
                "forces": forces, "store": s}

    def _assemble(self, refs: tuple[np.ndarray, ...], cache: _ShardCache) -> Batch:
        """Gather a batch from the cached shards into preallocated arrays; ordered by (store, shard, index)."""
        order = np.lexsort((refs[1], refs[0]))
        g, idx, n_atoms = (r[order] for r in refs)
        n_s, n_f = len(g), len(self.fidelities)
        first = np.concatenate([[0], np.cumsum(n_atoms)])
        n_a = int(first[-1])
        out = Batch(atomic_numbers=np.empty(n_a, dtype=np.int64), positions=np.empty((n_a, 3)),
                    cell=np.empty((n_s, 3, 3)), pbc=np.empty((n_s, 3), dtype=bool), n_atoms=n_atoms,
                    structure_id=np.empty(n_s, dtype=np.int64), store=np.empty(n_s, dtype=np.int64),
                    dataset=np.empty(n_s, dtype=np.int64), energy=np.empty((n_s, n_f)),
                    forces=np.empty((n_a, n_f, 3)))
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(g)) + 1, [n_s]]).tolist()
        for s0, s1 in zip(cuts[:-1], cuts[1:]):  # one run per shard: one fancy index per field
            d = cache.data(int(g[s0]))
            i, a0, a1 = idx[s0:s1], int(first[s0]), int(first[s1])
            atom_idx = np.repeat(d["offsets"][i] - (first[s0:s1] - a0), n_atoms[s0:s1]) + np.arange(a1 - a0)
            # np.take(mode="clip") writes straight into `out`: several times faster than fancy indexing.
            # The indices come from offsets that read_shard checked to rise from 0 to the atom count.
            out["atomic_numbers"][a0:a1] = d["z"][atom_idx]
            np.take(d["positions"], atom_idx, axis=0, out=out["positions"][a0:a1], mode="clip")
            for key in ("cell", "pbc", "structure_id", "dataset", "energy"):
                np.take(d[key], i, axis=0, out=out[key][s0:s1], mode="clip")  # type: ignore[literal-required]
            out["store"][s0:s1] = d["store"]
            for j, f in enumerate(d["forces"]):
                out["forces"][a0:a1, j] = np.nan if f is None else np.take(f, atom_idx, axis=0, mode="clip")
        return out

    # ---- iteration and the cursor -----------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """Batches from the cursor on; with loop=False it stops at the end of the current epoch."""
        while True:
            epoch, skip = self.epoch, self._consumed
            got = skip
            for b, batch in prefetched(self._stream(epoch, skip), self.config.prefetch):
                self._consumed = b + 1
                got = b + 1
                yield batch
            replanned = self._replan is not None and self._replan["epoch"] == epoch
            if got == 0 and self.config.loop and not replanned:
                raise RuntimeError(f"rank {self.rank} of {self.world_size} got no structures in epoch {epoch}: "
                                   f"the stores hold fewer structures than there are ranks")
            self.epoch, self._consumed = epoch + 1, 0
            if not self.config.loop:
                return

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (with this world size's full plan)."""
        self.epoch, self._consumed, self._replan = int(epoch), 0, None

    def state_dict(self) -> dict[str, Any]:
        """The cursor (JSON-serialisable): the epoch, batches consumed in it, and what the stream depends on."""
        cfg = self.config
        replan = self._replan if self._replan is not None and self._replan["epoch"] == self.epoch else None
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": self._consumed,
                "rank": self.rank, "world_size": self.world_size, "seed": cfg.seed,
                "atom_budget": cfg.atom_budget, "shuffle_buffer": cfg.shuffle_buffer, "shuffle": cfg.shuffle,
                "fidelities": list(self.fidelities), "stores": [st.fingerprint for st in self.stores],
                "replan": replan}

    @staticmethod
    def gather_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's state in one (what a checkpoint keeps to allow a resume on another world size)."""
        return resume.gather_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor; the next batch is the one an uninterrupted reader would have yielded next.

        `state` is this rank's own state, or `gather_states` of all ranks; if that world had another
        size, the rest of its earliest unfinished epoch is re-planned over this world's ranks.
        """
        if "ranks" in state:
            ranks = resume.gather_states(state["ranks"])["ranks"]
            if ranks[0]["world_size"] != self.world_size:
                resume.check_settings(self, ranks)
                self.replan_rest_of_epoch({"epoch": min(r["epoch"] for r in ranks), "states": ranks})
                self.epoch, self._consumed = self._replan["epoch"], 0  # type: ignore[index]
                return
            state = ranks[self.rank]
        resume.check_settings(self, [state], own=True)
        self._replan = None
        if state.get("replan"):
            self.replan_rest_of_epoch(state["replan"])
        self.epoch, self._consumed = int(state["epoch"]), int(state["batches"])

    def replan_rest_of_epoch(self, replan: dict[str, Any], masks: dict[int, np.ndarray] | None = None) -> None:
        """Read the rest of epoch replan['epoch'] (what replan['states'] had not consumed) over this world."""
        outer = self._offsets_memo
        self._offsets_memo = {} if outer is None else outer
        try:
            if masks is None:
                masks = resume.consumed_masks(self, replan["states"])
            self._replan = replan
            self._replan_units = resume.remaining_units(self, masks)
        finally:
            self._offsets_memo = outer

    def consumed_refs(self, epoch: int, n_batches: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global shards, indices) of the structures of each of the first n_batches (None: all) of `epoch`."""
        cache = _ShardCache(self)
        cache.loading = False
        for b, refs in enumerate(self._ref_batches(epoch, cache)):
            if n_batches is not None and b >= n_batches:
                return
            cache.release(refs[0])
            yield refs[0], refs[1]


def iter_all(stores: Sequence[Store], fidelities: Sequence[str] | None = None,
             atom_budget: int = 4096) -> Iterator[Batch]:
    """Every structure of the stores once, in store order, unshuffled (for evaluation)."""
    cfg = ShardReader.Config(atom_budget=atom_budget, shuffle=False, loop=False, prefetch=2)
    yield from ShardReader(stores, cfg, fidelities=fidelities)

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
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from polyfid.data_shards import resume
from polyfid.data_shards.plan import plan_shards
from polyfid.data_shards.prefetch import prefetched
from polyfid.data_shards.schema import Batch, Fidelity, concat_batches
from polyfid.data_shards.store import Store

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class _Unit:
    """A unit of work: structures [start, stop) (or the listed `keep`) of one shard; g = global shard index."""

    g: int
    store: int
    shard: int
    start: int
    stop: int
    atoms: int
    keep: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.stop - self.start if self.keep is None else len(self.keep)

    def indices(self) -> np.ndarray:
        """Structure indices within the shard, in order."""
        return np.arange(self.start, self.stop) if self.keep is None else self.keep


class _ShardCache:
    """Shards in memory, kept while the shuffle buffer still holds structures of them."""

    def __init__(self, reader: "ShardReader") -> None:
        self._reader = reader
        self.loading = True  # False while replaying a resume: read offsets only
        self._data: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, int] = {}

    def enter(self, unit: _Unit) -> np.ndarray:
        """Atoms per structure of a unit entering the buffer (loads the shard unless replaying)."""
        if unit.g in self._data:
            offsets = self._data[unit.g]["offsets"]
        elif self.loading:
            offsets = self.data(unit.g)["offsets"]
        else:
            offsets = self._reader._offsets(unit.g)
        self._pending[unit.g] = self._pending.get(unit.g, 0) + unit.n
        idx = unit.indices()
        return offsets[idx + 1] - offsets[idx]

    def data(self, g: int) -> dict[str, Any]:
        """A shard's prepared arrays, loading it on a miss (after a resume)."""
        if g not in self._data:
            self._data[g] = self._reader._load(*self._reader._shard_keys[g])
        return self._data[g]

    def release(self, refs: list[tuple[int, int, int]]) -> None:
        """Forget structures that have left in a batch; drop shards nobody waits on."""
        for g, _, _ in refs:
            self._pending[g] -= 1
            if self._pending[g] == 0:
                del self._pending[g]
                if self._data.pop(g, None) is not None:
                    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand a dropped shard's freed heap back to the OS (glibc only), so RSS stays flat over many shards."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


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
        """Batches read ahead in a background thread (0 = read in the caller's thread)."""
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
        self.rank, self.world_size = int(rank), int(world_size)
        known: dict[str, Fidelity] = {}
        for st in self.stores:
            for f in st.fidelities:
                known.setdefault(f.name, f)
        if fidelities is None:
            fidelities = [f.name for f in sorted(known.values(), key=lambda f: (f.rank, f.name))]
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
        self._shard_keys = [(s, k) for s, st in enumerate(self.stores) for k in range(len(st.shards))]
        self._offsets_memo: dict[int, np.ndarray] | None = None  # shared while re-planning a resume
        self._units = self._make_units()
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` already handed to the caller
        self._replan: dict[str, Any] | None = None  # set when resumed from a different world size
        self._replan_units: list[_Unit] = []
        self._warned = False

    # ---- planning ---------------------------------------------------------------------------------
    def _make_units(self) -> list[_Unit]:
        """One unit per shard; with fewer than 2×world_size shards, shards are split into structure ranges."""
        shards = [(s, k, info) for s, st in enumerate(self.stores) for k, info in enumerate(st.shards)]
        units = [_Unit(g, s, k, 0, info.n_structures, info.n_atoms) for g, (s, k, info) in enumerate(shards)]
        if len(units) >= 2 * self.world_size or not units:
            return units
        pieces = math.ceil(2 * self.world_size / len(units))
        split = []
        for g, (s, k, info) in enumerate(shards):
            offsets = self.stores[s].read_array(k, "offsets")
            for part in np.array_split(np.arange(info.n_structures), min(pieces, info.n_structures)):
                lo, hi = int(part[0]), int(part[-1]) + 1
                split.append(_Unit(g, s, k, lo, hi, int(offsets[hi] - offsets[lo])))
        return split

    def _offsets(self, g: int) -> np.ndarray:
        """The offsets array of global shard g (memoised only while re-planning)."""
        if self._offsets_memo is not None and g in self._offsets_memo:
            return self._offsets_memo[g]
        s, k = self._shard_keys[g]
        offsets = self.stores[s].read_array(k, "offsets")
        if self._offsets_memo is not None:
            self._offsets_memo[g] = offsets
        return offsets

    def _epoch_units(self, epoch: int) -> list[_Unit]:
        """The units this rank reads in `epoch`, in read order."""
        units = self._units
        if self._replan is not None and epoch == self._replan["epoch"]:
            units = self._replan_units
        plan = plan_shards(epoch, self.config.seed, self.world_size, [u.atoms for u in units])[self.rank]
        return [units[u] for u in (plan if self.config.shuffle else sorted(plan))]

    # ---- the deterministic stream -----------------------------------------------------------------
    def _ref_batches(self, epoch: int, cache: _ShardCache) -> Iterator[list[tuple[int, int, int]]]:
        """Batches as (global shard, structure index in shard, atoms) refs; decisions use only atom counts."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, epoch, self.rank])
        buffer: list[tuple[int, int, int]] = []
        batch: list[tuple[int, int, int]] = []
        atoms = 0

        def feed(ref: tuple[int, int, int]) -> list[list[tuple[int, int, int]]]:
            nonlocal batch, atoms
            out, n = [], ref[2]
            if n > cfg.atom_budget:
                if not self._warned:
                    warnings.warn(f"a structure of {n} atoms exceeds atom_budget={cfg.atom_budget}; such "
                                  "structures form batches of their own (warned once per reader)", stacklevel=2)
                    self._warned = True
                out = ([batch] if batch else []) + [[ref]]
                batch, atoms = [], 0
                return out
            if atoms + n > cfg.atom_budget:
                out, batch, atoms = [batch], [], 0
            batch.append(ref)
            atoms += n
            return out

        for unit in self._epoch_units(epoch):
            counts = cache.enter(unit)
            refs = [(unit.g, int(i), int(n)) for i, n in zip(unit.indices(), counts)]
            if not cfg.shuffle:
                for ref in refs:
                    yield from feed(ref)
                continue
            fill = min(len(refs), cfg.shuffle_buffer - len(buffer))
            buffer.extend(refs[:fill])
            picks = rng.integers(0, cfg.shuffle_buffer, size=len(refs) - fill)
            for ref, k in zip(refs[fill:], picks):
                out, buffer[k] = buffer[k], ref
                yield from feed(out)
        for k in rng.permutation(len(buffer)):
            yield from feed(buffer[k])
        if batch:
            yield batch

    def _stream(self, epoch: int, skip: int) -> Iterator[tuple[int, Batch]]:
        """(batch index, batch) of `epoch`, starting after `skip` batches (replayed without reading data)."""
        cache = _ShardCache(self)
        cache.loading = skip == 0
        for b, refs in enumerate(self._ref_batches(epoch, cache)):
            if b < skip:
                cache.release(refs)
                cache.loading = b + 1 >= skip
                continue
            batch = self._assemble(refs, cache)
            cache.release(refs)
            yield b, batch

    # ---- data -------------------------------------------------------------------------------------
    def _load(self, s: int, k: int) -> dict[str, Any]:
        """Read shard k of store s and lay its labels out in this reader's fidelity order."""
        raw = self.stores[s].read_shard(k, verify=self.config.verify, fill_missing=False)
        n_s, n_a = len(raw["structure_id"]), len(raw["atomic_numbers"])
        energy = np.full((n_s, len(self.fidelities)), np.nan)
        forces: list[np.ndarray | None] = []
        for j, fid in enumerate(self.fidelities):
            if fid in raw["energy"]:
                energy[:, j] = raw["energy"][fid]
            forces.append(raw["forces"].get(fid))  # None: this shard has no forces at fid
        return {"z": raw["atomic_numbers"], "positions": raw["positions"], "offsets": raw["offsets"],
                "cell": raw["cell"], "pbc": raw["pbc"], "structure_id": raw["structure_id"],
                "dataset": self._dataset_maps[s][raw["dataset"].astype(np.int64)], "energy": energy,
                "forces": forces, "store": s, "n_atoms": n_a}

    def _assemble(self, refs: list[tuple[int, int, int]], cache: _ShardCache) -> Batch:
        """Gather a batch from the cached shards; structures are ordered by (store, shard, index)."""
        refs = sorted(refs)
        parts: list[Batch] = []
        i = 0
        while i < len(refs):
            j = i
            while j < len(refs) and refs[j][0] == refs[i][0]:
                j += 1
            parts.append(self._gather(cache.data(refs[i][0]), np.array([r[1] for r in refs[i:j]])))
            i = j
        return parts[0] if len(parts) == 1 else concat_batches(parts)

    def _gather(self, d: dict[str, Any], idx: np.ndarray) -> Batch:
        lo, hi = d["offsets"][idx], d["offsets"][idx + 1]
        n_atoms = (hi - lo).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        atom_idx = np.repeat(lo - first, n_atoms) + np.arange(int(n_atoms.sum()))
        forces = np.full((len(atom_idx), len(self.fidelities), 3), np.nan)
        for j, f in enumerate(d["forces"]):
            if f is not None:
                forces[:, j] = f[atom_idx]
        return Batch(atomic_numbers=d["z"][atom_idx].astype(np.int64), positions=d["positions"][atom_idx],
                     cell=d["cell"][idx], pbc=d["pbc"][idx], n_atoms=n_atoms,
                     structure_id=d["structure_id"][idx], store=np.full(len(idx), d["store"], dtype=np.int64),
                     dataset=d["dataset"][idx], energy=d["energy"][idx], forces=forces)

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
                self._set_replan({"epoch": min(r["epoch"] for r in ranks), "states": ranks})
                self.epoch, self._consumed = self._replan["epoch"], 0  # type: ignore[index]
                return
            state = ranks[self.rank]
        resume.check_settings(self, [state], own=True)
        self._replan = None
        if state.get("replan"):
            self._set_replan(state["replan"])
        self.epoch, self._consumed = int(state["epoch"]), int(state["batches"])

    def _set_replan(self, replan: dict[str, Any], masks: dict[int, np.ndarray] | None = None) -> None:
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

    def _consumed_refs(self, epoch: int, n_batches: int | None) -> Iterator[tuple[int, int]]:
        """(global shard, index) of the structures in the first n_batches (None: all) of `epoch`."""
        cache = _ShardCache(self)
        cache.loading = False
        for b, refs in enumerate(self._ref_batches(epoch, cache)):
            if n_batches is not None and b >= n_batches:
                return
            cache.release(refs)
            for g, i, _ in refs:
                yield g, i


def iter_all(stores: Sequence[Store], fidelities: Sequence[str] | None = None,
             atom_budget: int = 4096) -> Iterator[Batch]:
    """Every structure of the stores once, in store order, unshuffled (for evaluation)."""
    cfg = ShardReader.Config(atom_budget=atom_budget, shuffle=False, loop=False, prefetch=2)
    yield from ShardReader(stores, cfg, fidelities=fidelities)

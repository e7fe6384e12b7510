"""Deterministic shard planning: (epoch, seed, world size, shard sizes) -> one list of shards per rank."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import numpy as np


def plan_shards(epoch: int, seed: int, world_size: int, shard_atoms: Sequence[int]) -> list[list[int]]:
    """Assign every shard to exactly one rank, balanced by atom count; each rank's list is in read order.

    The shard order is shuffled by (seed, epoch); shards are then dealt largest first to the least
    loaded rank (ties: lower rank), and each rank reads its shards in the shuffled order. Ranks get
    empty lists when there are fewer shards than ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = np.asarray(shard_atoms, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("shard_atoms must be a flat list of non-negative atom counts")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(len(sizes))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    # Largest first; among equal sizes, the shuffled order decides (a stable sort keeps it).
    by_size = order[np.argsort(-sizes[order], kind="stable")]
    heap = [(0, r) for r in range(world_size)]
    plan: list[list[int]] = [[] for _ in range(world_size)]
    for k in by_size:
        load, r = heapq.heappop(heap)
        plan[r].append(int(k))
        heapq.heappush(heap, (load + int(sizes[k]), r))
    return [sorted(ks, key=lambda k: position[k]) for ks in plan]


def imbalance(plan: list[list[int]], shard_atoms: Sequence[int]) -> float:
    """(max - mean) / mean of the atoms per rank: 0 is perfect balance."""
    loads = np.array([sum(int(shard_atoms[k]) for k in ks) for ks in plan], dtype=np.float64)
    mean = loads.mean() if loads.size else 0.0
    return float((loads.max() - mean) / mean) if mean > 0 else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """A unit of work: structures [start, stop) (or the listed `keep`) of one shard; g = global shard index.

    What the reader plans and reads, and what a resume on another world size re-plans (resume.py).
    """

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

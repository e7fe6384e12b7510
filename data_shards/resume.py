"""Resuming on another number of ranks: re-plan the rest of an epoch so that no structure is lost or repeated.

Each old rank's cursor is replayed at the level of structure references (only `offsets` arrays are
read) to find what the old world consumed of its earliest unfinished epoch E. The rest of E is then
planned over the new ranks as usual (balanced by atoms, split into structure ranges when it is small).
Ranks that were already past E count as having finished it; what they had read of later epochs is read
again in those epochs, whose plans belong to the new world size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Iterator, Protocol

import numpy as np

from polyfid.data_shards.plan import Unit
from polyfid.data_shards.store import Store


class ShardReader(Protocol):
    """What a resume reads of a reader: its public resume interface (data_shards/reader.py implements it).
    Declared here, not imported, so that the reader, which imports this module, is not imported back."""

    stores: list[Store]
    config: Any
    fidelities: list[str] | None
    world_size: int
    shard_keys: list[tuple[int, int]]

    def __init__(self, stores: Sequence[Store], config: Any, rank: int, world_size: int,
                 fidelities: Sequence[str] | None) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def share_offsets(self, other: "ShardReader") -> None: ...
    def structure_offsets(self, g: int) -> np.ndarray: ...
    def replan_rest_of_epoch(self, replan: dict[str, Any], masks: dict[int, np.ndarray] | None = None) -> None: ...
    def consumed_refs(self, epoch: int, n_batches: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

STATE_VERSION = 1
SETTINGS = ("version", "seed", "atom_budget", "shuffle_buffer", "shuffle", "fidelities", "stores")


def gather_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state holding every rank's reader state, checked to be exactly the ranks 0..world_size-1."""
    ranks = sorted((dict(s) for s in states), key=lambda s: int(s["rank"]))
    if not ranks:
        raise ValueError("gather_states needs the reader state of every rank; got none")
    ws = int(ranks[0]["world_size"])
    got = [int(s["rank"]) for s in ranks]
    if got != list(range(ws)) or any(int(s["world_size"]) != ws for s in ranks):
        raise ValueError(f"gather_states needs one state for each rank 0..{ws - 1} of one world; got ranks {got}")
    return {"version": STATE_VERSION, "world_size": ws, "ranks": ranks}


def check_settings(reader: ShardReader, states: Sequence[dict[str, Any]], own: bool = False) -> None:
    """Refuse states from a reader with other stores or settings (its stream would not be this one)."""
    mine = reader.state_dict()
    keys = SETTINGS + (("rank", "world_size") if own else ())
    for state in states:
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(f"reader state does not fit this reader: {key} is {state.get(key)!r} in the "
                                 f"state and {mine[key]!r} here (a resume needs the same stores and settings)")


def consumed_masks(reader: ShardReader, states: Sequence[dict[str, Any]]) -> dict[int, np.ndarray]:
    """{global shard: bool mask of consumed structures} of the old world's earliest unfinished epoch."""
    epoch = min(int(s["epoch"]) for s in states)
    # All ranks of one world share the re-plan they were started with; ranks still in that epoch carry it.
    shared = next((s["replan"] for s in states if s.get("replan") and s["replan"]["epoch"] == epoch), None)
    masks: dict[int, np.ndarray] = {}
    shared_masks = None
    if shared is not None:
        shared_masks = consumed_masks(reader, shared["states"])
        masks = {g: m.copy() for g, m in shared_masks.items()}
    cfg = dataclasses.replace(reader.config, prefetch=0)
    for state in states:
        shadow = type(reader)(reader.stores, cfg, rank=int(state["rank"]), world_size=int(state["world_size"]),
                             fidelities=reader.fidelities)
        shadow.share_offsets(reader)
        if shared is not None:
            shadow.replan_rest_of_epoch(shared, shared_masks)
        n = int(state["batches"]) if int(state["epoch"]) == epoch else None  # past E: finished it
        for shards, idx in shadow.consumed_refs(epoch, n):
            for g in np.unique(shards).tolist():
                if g not in masks:
                    s, k = reader.shard_keys[g]
                    masks[g] = np.zeros(reader.stores[s].shards[k].n_structures, dtype=bool)
                masks[g][idx[shards == g]] = True
    return masks


def remaining_units(reader: ShardReader, masks: dict[int, np.ndarray]) -> list[Unit]:
    """Units over the structures not in `masks`, split into ranges if there are fewer than 2×world_size."""
    def atoms(g: int, idx: np.ndarray) -> int:
        off = reader.structure_offsets(g)
        return int((off[idx + 1] - off[idx]).sum())

    units = []
    for g, (s, k) in enumerate(reader.shard_keys):
        info = reader.stores[s].shards[k]
        if g not in masks:
            units.append(Unit(g, s, k, 0, info.n_structures, info.n_atoms))
            continue
        keep = np.flatnonzero(~masks[g])
        if keep.size:
            units.append(Unit(g, s, k, 0, info.n_structures, atoms(g, keep), keep))
    if not units or len(units) >= 2 * reader.world_size:
        return units
    pieces = math.ceil(2 * reader.world_size / len(units))
    return [Unit(u.g, u.store, u.shard, 0, 0, atoms(u.g, part), part)
            for u in units for part in np.array_split(u.indices(), min(pieces, u.n))]

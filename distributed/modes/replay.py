"""Replay against forgetting: each fine-tuning batch mixes target structures with pretraining structures.

The pretraining stores come from the parent package's lineage (or `finetune.replay_stores`). A fraction
`finetune.replay_fraction` of the atom budget goes to them, with labels for every head of the parent that
they hold, so the old heads keep being trained while the target head learns.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from polyfid.data_shards.named import is_named_store
from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.schema import Batch, concat_batches
from polyfid.data_shards.store import Store
from polyfid.data_shards.named import open_store

log = logging.getLogger("polyfid.replay")


def lineage_stores(metadata: dict | None) -> list[str]:
    """The pretraining stores recorded in a package's lineage: `corpus:` names, URLs, or paths relative to the
    working directory of the run that made it (older packages: absolute paths)."""
    lineage = (metadata or {}).get("lineage") or {}
    return [s["path"] for s in lineage.get("stores", []) if s.get("path")]


def _usable(ref: str) -> str:
    """A reference every worker can open: names and URLs as they are, local paths absolute."""
    return ref if is_named_store(ref) or "://" in ref else os.path.abspath(ref)


def open_replay_stores(paths: Sequence[str], fingerprints: dict[str, str] | None = None,
                       failures: list[str] | None = None) -> list[Store]:
    """Open the replay stores; a store that is gone or changed since pretraining is skipped with a warning
    (and its reason appended to `failures`, when given)."""
    out = []
    for p in paths:
        try:
            s = open_store(_usable(p))
        except (OSError, ValueError) as err:
            log.warning("replay: cannot open pretraining store %s (%s); training without it", p, err)
            if failures is not None:
                failures.append(f"{p} ({err})")
            continue
        want = (fingerprints or {}).get(p)
        if want and s.fingerprint != want:
            log.warning("replay: store %s changed since pretraining (fingerprint %s, lineage says %s); using it anyway",
                        p, s.fingerprint[:12], want[:12])
        out.append(s)
    return out


def openable_refs(paths: Sequence[str], fingerprints: dict[str, str] | None = None,
                  failures: list[str] | None = None) -> list[str]:
    """The references of the stores that open (as open_replay_stores), in a form every worker opens alike."""
    return [_usable(p) for p in paths if open_replay_stores([p], fingerprints, failures)]


def replay_refs(paths: Sequence[str], fingerprints: dict[str, str] | None = None) -> list[str]:
    """openable_refs, or an error that says how to get the data, and how to skip replay, when none opens."""
    failures: list[str] = []
    ok = openable_refs(paths, fingerprints, failures)
    if paths and not ok:
        raise FileNotFoundError(
            "replay: none of the parent's pretraining stores can be opened: " + "; ".join(failures) + ". "
            "Named corpus stores (corpus:NAME) are built on first use from the files committed in "
            "data_shards/corpus/extxyz/ (check that they are there, and that $POLYFID_CACHE is writable); a store "
            "recorded by a relative path is looked up from the working directory, so run from the folder the "
            "parent was trained in, or name the stores with --replay-stores PATH[,PATH]. "
            "To fine-tune without replay, pass --replay 0.")
    return ok


def split_budget(atom_budget: int, fraction: float) -> tuple[int, int]:
    """(target atoms, replay atoms) per batch; each side gets at least one atom's worth of budget."""
    replay = int(round(atom_budget * fraction))
    replay = min(max(replay, 1), atom_budget - 1)
    return atom_budget - replay, replay


def mixed_reader(stores, replay, reader_cfg, fraction: float, fidelities, rank: int, world: int,
                 store_index: Sequence[int] | None = None) -> "MixedReader":
    """Target and replay readers splitting the atom budget by `fraction` (replay seeded apart from target).
    The same mix serves `data.oversample`, with `store_index` giving each store's place in data.train."""
    import dataclasses

    n_target, n_replay = split_budget(reader_cfg.atom_budget, fraction)
    t_cfg = dataclasses.replace(reader_cfg, atom_budget=n_target)
    r_cfg = dataclasses.replace(reader_cfg, atom_budget=n_replay, seed=reader_cfg.seed + 1)
    def own(ss):  # each reader reads the mix's fidelities that its stores hold
        return [f for f in fidelities if any(f in {x.name for x in s.fidelities} for s in ss)]

    return MixedReader(ShardReader(stores, t_cfg, rank=rank, world_size=world, fidelities=own(stores)),
                       ShardReader(replay, r_cfg, rank=rank, world_size=world, fidelities=own(replay)),
                       len(stores), fidelities, store_index)


class MixedReader:
    """Two ShardReaders read in lockstep; every batch is a target batch followed by a replay batch.

    Both readers use the same fidelity columns. The replay reader's store indices are shifted past the
    target's so that (store, structure_id) stays unique, then mapped through `store_index` when it is given
    (data.oversample: the stores' places in data.train). Cursor state is the pair of cursors.
    """

    def __init__(self, target: ShardReader, replay: ShardReader, n_target_stores: int, fidelities: Sequence[str],
                 store_index: Sequence[int] | None = None) -> None:
        self.target, self.replay, self.shift = target, replay, n_target_stores
        self.fidelities = list(fidelities)
        self.store_index = None if store_index is None else np.asarray(store_index, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self.target.epoch

    def _widen(self, batch: Batch, own: Sequence[str]) -> dict:
        """The batch with label columns for every fidelity of the mix (NaN where this side has none)."""
        b = dict(batch)
        cols = [self.fidelities.index(f) for f in own]
        energy = np.full((len(b["n_atoms"]), len(self.fidelities)), np.nan)
        forces = np.full((len(b["atomic_numbers"]), len(self.fidelities), 3), np.nan)
        energy[:, cols], forces[:, cols] = b["energy"], b["forces"]
        b["energy"], b["forces"] = energy, forces
        return b

    def __iter__(self) -> Iterator[Batch]:
        for a, b in zip(self.target, self.replay):
            a, b = self._widen(a, self.target.fidelities), self._widen(b, self.replay.fidelities)
            b["store"] = b["store"] + self.shift
            mixed = concat_batches([a, b])  # type: ignore[list-item]
            if self.store_index is not None:
                mixed["store"] = self.store_index[np.asarray(mixed["store"])]
            yield mixed

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "replay": self.replay.state_dict()}

    @staticmethod
    def gather_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"target": ShardReader.gather_states([s["target"] for s in states]),
                "replay": ShardReader.gather_states([s["replay"] for s in states])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.replay.load_state_dict(state["replay"])


def replay_share(batch: Batch, n_target_stores: int) -> float:
    """Fraction of a mixed batch's atoms that came from the replay stores (for telemetry)."""
    per_structure = np.asarray(batch["store"]) >= n_target_stores
    return float(np.asarray(batch["n_atoms"])[per_structure].sum() / max(1, int(np.sum(batch["n_atoms"]))))

"""Forgetting: how much worse a fine-tuned package is than its parent on the parent's own data, and the hint to
replay when fine-tuning without replay forgot a level."""

from __future__ import annotations

import logging

import numpy as np

from polyfid.data_shards.reader import iter_all
from polyfid.models.package import load_package

log = logging.getLogger("polyfid.finetune")


def measure_forgetting(parent: str, child: str, parent_meta: dict, max_structures: int = 1000) -> dict | None:
    """Errors of the parent and of the fine-tuned package on the parent's own data, per fidelity.

    The data are the parent's validation stores from its lineage, else its training stores (at most
    `max_structures`, shared among the stores). `*_increase` = fine-tuned − parent: positive values are
    forgetting. None when the parent's stores cannot be read.
    """
    from polyfid.evaluation.metrics import evaluate_batches
    from polyfid.distributed.modes.replay import open_replay_stores

    lineage = parent_meta.get("lineage") or {}
    entries = lineage.get("valid_stores") or lineage.get("stores") or []
    stores = open_replay_stores([e["path"] for e in entries if e.get("path")])
    if not stores:
        log.warning("forgetting: none of the parent's stores can be read; not measured")
        return None
    old, new = load_package(parent), load_package(child)
    fids = [f for f in old.fidelity_names if any(f in {x.name for x in s.fidelities} for s in stores)]
    if not fids:
        return None

    share = max(1, max_structures // len(stores))  # each store its share: every level is measured

    def limited(model):
        def batches():  # in store order; a store's batches past its share are read, not evaluated
            seen = np.zeros(len(stores), dtype=np.int64)
            for b in iter_all(stores, fidelities=fids):
                if (seen >= share).all():
                    return
                if (seen[b["store"]] < share).any():
                    seen += np.bincount(b["store"], minlength=len(stores))
                    yield b
        return evaluate_batches(model, batches(), fids).results()

    before, after = limited(old), limited(new)
    out: dict[str, dict] = {}
    for fid in (f for f in fids if f in before and f in after):
        r: dict = {"n_structures": before[fid].get("n_structures")}
        for k in ("energy_mae_per_atom", "energy_mae", "forces_mae"):
            if k in before[fid] and k in after[fid]:
                r[f"{k}_parent"], r[f"{k}_finetuned"] = before[fid][k], after[fid][k]
                r[f"{k}_increase"] = after[fid][k] - before[fid][k]
        out[fid] = r
    return out


FORGETTING_RATIO = 3.0  # fine-tuned / parent error on the parent's data above which forgetting is "huge"


def forgetting_advice(forgetting: dict | None, replay_fraction: float) -> str | None:
    """A hint to replay when fine-tuning without replay made a parent head much worse on the parent's data."""
    if not forgetting or replay_fraction > 0:
        return None
    worst = []
    for fid, r in forgetting.items():
        for key, unit in (("energy_mae", "meV"), ("forces_mae", "meV/Å")):
            before, after = r.get(f"{key}_parent"), r.get(f"{key}_finetuned")
            if before is not None and after is not None and after > FORGETTING_RATIO * max(before, 1e-3):
                worst.append(f"{fid} {key.split('_')[0]} MAE {before * 1000:.0f} → {after * 1000:.0f} {unit}")
    if not worst:
        return None
    return ("fine-tuning without replay forgot the parent's levels (" + "; ".join(worst) + "). To keep them, "
            "fine-tune again with --replay 0.25 (a quarter of each batch from the pretraining stores).")

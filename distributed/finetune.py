"""Fine-tuning: start from a package, pick or add a head, refit its reference energies, freeze if asked."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.refs import composition_matrix, fit_reference_energies
from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import Store
from polyfid.distributed.config import RunConfig
from polyfid.distributed.evaluate import predict
from polyfid.models.package import load_package
from polyfid.models.potential import Potential

log = logging.getLogger("polyfid.finetune")


def choose_head(model: Potential, stores: Sequence[Store], requested: str | None) -> tuple[str, Fidelity | None]:
    """The head to train: requested, else the highest-rank fidelity of the target data.

    Returns (name, new_fidelity) where new_fidelity is set when the model has no such head yet.
    """
    target = {f.name: f for s in stores for f in s.fidelities}
    if requested is None:
        if not target:
            raise ValueError("the fine-tuning stores hold no fidelity")
        requested = max(target.values(), key=lambda f: (f.rank, f.name)).name
    if requested in model.fidelity_names:
        return requested, None
    if requested not in target:
        raise ValueError(
            f"finetune.head={requested!r} is neither a head of the model ({', '.join(model.fidelity_names)}) "
            f"nor a fidelity of the target data ({', '.join(target) or 'none'})"
        )
    return requested, target[requested]


def closest_fidelity(model: Potential, new: Fidelity) -> str:
    """The existing head whose rank is nearest the new fidelity's (ties go to the higher rank)."""
    return min(model.fidelities, key=lambda f: (abs(f.rank - new.rank), -f.rank, f.name)).name


def refit_references(model: Potential, head: str, stores: Sequence[Store], atom_budget: int = 4096) -> dict[int, float]:
    """Shift the head's reference energies by a least-squares fit of (label - prediction) per element.

    After this the step-0 energy error of the head on the target is as small as a per-element shift allows.
    """
    k = model.fidelity_index(head)
    elements = list(model.elements)
    numbers, resid = [], []
    for batch in iter_all(list(stores), fidelities=[head], atom_budget=atom_budget):
        e_label = batch["energy"][:, 0]
        ok = ~np.isnan(e_label)
        if not ok.any():
            continue
        e_pred, _ = predict(model, batch, model.config.cutoff, None, "cpu", forces=False)
        offsets = np.concatenate([[0], np.cumsum(batch["n_atoms"])])
        z = batch["atomic_numbers"]
        for s in np.nonzero(ok)[0]:
            numbers.append(z[offsets[s] : offsets[s + 1]])
            resid.append(e_label[s] - e_pred[s, k])
    if not resid:
        raise ValueError(f"the fine-tuning data has no energy labels for {head!r}; cannot refit references")
    shift = fit_reference_energies(composition_matrix(numbers, elements), np.asarray(resid, dtype=np.float64))
    old = {int(z): float(model.reference_energies[k, z]) for z in elements}
    new = {int(el): old.get(int(el), 0.0) + float(d) for el, d in zip(elements, shift)}
    model.set_reference_energies(head, new)
    return new


def prepare_finetune_model(cfg: RunConfig, stores: Sequence[Store]) -> Potential:
    """Load the parent package named in cfg.finetune.source and set it up for fine-tuning."""
    model = load_package(cfg.finetune.source)
    head, new_fid = choose_head(model, stores, cfg.finetune.head)
    if new_fid is not None:
        src = closest_fidelity(model, new_fid)
        model.add_fidelity(new_fid, init_from=src)
        log.warning("fine-tuning adds head %r, initialised from %r", head, src)
    if cfg.finetune.refit_references:
        refit_references(model, head, stores, cfg.data.atom_budget)
    if cfg.finetune.freeze == "backbone":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    # Other heads get no gradient from target data that lacks their labels; only `head` moves.
    model.finetune_head = head
    return model

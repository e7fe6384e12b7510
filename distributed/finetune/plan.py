"""Fine-tuning: start from a package, pick or add a head, refit its reference energies, freeze if asked."""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.refs import composition_matrix, fit_reference_energies
from polyfid.data_shards.schema import Fidelity, highest_rank
from polyfid.data_shards.store import Store
from polyfid.distributed.config import RunConfig
from polyfid.evaluation.metrics import predict
from polyfid.models.package import load_package
from polyfid.models.potential import Potential
from polyfid.data_shards.named import open_store

log = logging.getLogger("polyfid.finetune")


def choose_head(model: Potential, stores: Sequence[Store], requested: str | None) -> tuple[str, Fidelity | None]:
    """The head to train: requested, else the highest-rank fidelity of the target data.

    Returns (name, new_fidelity) where new_fidelity is set when the model has no such head yet.
    """
    target = {f.name: f for s in stores for f in s.fidelities}
    if requested is None:
        if not target:
            raise ValueError("the fine-tuning stores hold no fidelity")
        requested = highest_rank(list(target.values())).name
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


def _init_head(parent: Potential, new: Fidelity | None, asked: str | None) -> str | None:
    """The parent head a new head starts from: `asked` (finetune.init_from), else the closest by rank."""
    if new is None:
        return None
    if asked is None:
        return closest_fidelity(parent, new)
    if asked not in parent.fidelity_names:
        raise ValueError(f"finetune.init_from={asked!r} is not a head of the parent "
                         f"({', '.join(parent.fidelity_names)})")
    return asked


def _head_batches(stores: Sequence[Store], head: str, atom_budget: int, limit: int | None):
    """Batches of the stores that hold `head`, up to about `limit` structures."""
    stores = [s for s in stores if head in {f.name for f in s.fidelities}]
    seen = 0
    for batch in iter_all(list(stores), fidelities=[head], atom_budget=atom_budget) if stores else ():
        yield batch
        seen += len(batch["n_atoms"])
        if limit is not None and seen >= limit:
            return


def force_rms(stores: Sequence[Store], head: str, atom_budget: int = 4096, limit: int | None = 2048) -> float | None:
    """RMS force component (eV/Å) of `head`'s labels in the stores (the scale a fresh head gets), None without."""
    total, count = 0.0, 0
    for batch in _head_batches(stores, head, atom_budget, limit):
        f = batch["forces"][:, 0]
        ok = np.isfinite(f)
        total, count = total + float((f[ok] ** 2).sum()), count + int(ok.sum())
    return float(np.sqrt(total / count)) if count else None


def refit_references(model: Potential, head: str, stores: Sequence[Store], atom_budget: int = 4096,
                     anchors: Sequence[Store] = (), max_anchor_structures: int = 1000) -> dict[int, float]:
    """Shift the head's reference energies by a least-squares fit of (label - prediction) per element.

    After this the step-0 energy error of the head on the target is as small as a per-element shift allows.
    `anchors` (the pretraining data, for a head that already exists) join the fit: a target of one or two
    compositions cannot pin four elements' references, and without anchors the minimum-norm shift moves the
    head's energies on every other composition (by thousands of eV on the demo data).
    """
    k = model.fidelity_index(head)
    elements = list(model.elements)
    numbers, resid = [], []
    target = _head_batches(stores, head, atom_budget, None)
    anchored = _head_batches(anchors, head, atom_budget, max_anchor_structures)
    for batch in (b for source in (target, anchored) for b in source):
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


@dataclasses.dataclass
class FinetunePlan:
    """What a fine-tuning run does to its parent, decided once on the driver and passed to the workers as data.

    The run's config keeps what the user wrote (an MLflow URI stays a URI, an asked-for replay fraction stays
    asked for); the plan holds what was resolved from it: the local package, the head, the replay stores that
    could be read and the stores that anchor a reference refit.
    """

    source: str  # local package folder
    source_uri: str  # what the user gave (package path, runs:/ or models:/ URI), recorded in the lineage
    head: str
    new_fidelity: dict | None  # a head to add (Fidelity.to_dict()), initialised from `init_from`
    init_from: str | None
    freeze: str
    refit_references: bool
    anchors: list[str]  # stores whose structures join the refit of an existing head (the pretraining data)
    replay_fraction: float
    replay_stores: list[str]
    parent_lineage: dict | None
    references: dict[str, float] | None = None  # the head's refitted reference energies {Z: eV}, fitted once here
    head_scale: float | None = None  # a new head's scale (the target's force RMS), its readout rescaled to match

    @classmethod
    def build(cls, cfg: RunConfig, stores: Sequence[Store], source: str | None = None,
              source_uri: str | None = None) -> "FinetunePlan":
        """The plan of `cfg.finetune` on the target `stores`; `source`: the local copy of an MLflow URI."""
        from polyfid.distributed.modes.replay import lineage_stores, openable_refs, replay_refs

        ft = cfg.finetune
        source = source or ft.source
        parent = load_package(source)
        meta = getattr(parent, "package_metadata", None) or {}
        head, new_fid = choose_head(parent, stores, ft.head)
        replay_fraction, replay_paths = ft.replay_fraction, list(ft.replay_stores)
        if replay_fraction > 0:
            paths = replay_paths or lineage_stores(meta)
            prints = {s.get("path"): s.get("fingerprint") for s in (meta.get("lineage") or {}).get("stores", [])}
            if not paths:
                raise ValueError(f"finetune.replay_fraction={replay_fraction:g}, but the parent {source_uri or ft.source} "
                                 "records no pretraining stores; name them with --replay-stores, or pass --replay 0")
            replay_paths = replay_refs(paths, prints)
        anchors: list[str] = []
        if ft.refit_references and new_fid is None:  # an existing head keeps its energies on the pretraining data
            anchors = openable_refs(replay_paths or lineage_stores(meta))
        init = _init_head(parent, new_fid, ft.init_from)
        # A new head copies its parent head's scale, which was fit to that level's pretraining forces (11.8 eV/Å
        # for organic-mini's wB97X head, rattled structures included); on a target of MD frames (~1 eV/Å) every
        # Adam step would move its energies ~10x further than a scratch run's. Rescale it to the target's.
        head_scale = force_rms(stores, head, cfg.data.atom_budget) if new_fid is not None and ft.rescale_head else None
        references = None
        if ft.refit_references:  # once, on the driver; every worker sets the same values, the lineage keeps them
            if new_fid is not None:
                parent.add_fidelity(new_fid, init_from=init)
            fitted = refit_references(parent, head, stores, cfg.data.atom_budget,
                                      anchors=[open_store(p) for p in anchors])
            references = {str(z): float(e) for z, e in fitted.items()}
        return cls(source=str(source), source_uri=source_uri or str(ft.source), head=head,
                   new_fidelity=new_fid.to_dict() if new_fid is not None else None,
                   init_from=init, freeze=ft.freeze,
                   refit_references=ft.refit_references, anchors=anchors, replay_fraction=replay_fraction,
                   replay_stores=replay_paths, parent_lineage=meta.get("lineage"), references=references,
                   head_scale=head_scale)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetunePlan":
        return cls(**d)

    def apply(self, stores: Sequence[Store], atom_budget: int) -> Potential:
        """The parent, set up for fine-tuning: the head added, its references refitted, the backbone frozen if asked."""
        model = load_package(self.source)
        if self.new_fidelity is not None:
            model.add_fidelity(Fidelity.from_dict(self.new_fidelity), init_from=self.init_from)
            log.warning("fine-tuning adds head %r, initialised from %r", self.head, self.init_from)
        if self.head_scale is not None:
            old = model.rescale_head(self.head, self.head_scale)
            log.warning("head %r rescaled from %.3g to %.3g eV (the target's force RMS); its predictions are unchanged",
                        self.head, old, self.head_scale)
        if self.references is not None:
            model.set_reference_energies(self.head, {int(z): e for z, e in self.references.items()})
        elif self.refit_references:  # a plan written before the fit moved into build()
            refit_references(model, self.head, stores, atom_budget, anchors=[open_store(p) for p in self.anchors])
        if self.freeze == "backbone":
            for p in model.backbone_parameters():
                p.requires_grad_(False)
        # Other heads get no gradient from target data that lacks their labels; only `head` moves.
        return model


def prepare_finetune_model(cfg: RunConfig, stores: Sequence[Store]) -> Potential:
    """The parent package named in cfg.finetune.source, set up for fine-tuning (FinetunePlan in one call)."""
    return FinetunePlan.build(cfg, stores).apply(stores, cfg.data.atom_budget)

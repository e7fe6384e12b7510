"""Fine-tuning: start from a package, pick or add a head, refit its reference energies, freeze if asked."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
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
        from polyfid.distributed.replay import lineage_stores, openable_refs, replay_refs

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
                                      anchors=[Store.open(p) for p in anchors])
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
            refit_references(model, self.head, stores, atom_budget, anchors=[Store.open(p) for p in self.anchors])
        if self.freeze == "backbone":
            for p in model.backbone_parameters():
                p.requires_grad_(False)
        # Other heads get no gradient from target data that lacks their labels; only `head` moves.
        return model


def prepare_finetune_model(cfg: RunConfig, stores: Sequence[Store]) -> Potential:
    """The parent package named in cfg.finetune.source, set up for fine-tuning (FinetunePlan in one call)."""
    return FinetunePlan.build(cfg, stores).apply(stores, cfg.data.atom_budget)


class EarlyStopping:
    """Stop after `patience` validations without improvement; keep the best weights (config: `stopping:`).

    The score weighs the validation errors as the loss does: energy_weight × energy MAE per atom (eV) +
    forces_weight × force MAE (eV/Å) of `head`, or the mean of that over every head validated when `head` is
    None; smoothed over validations (an exponential average that keeps `smoothing` of the previous value),
    because a small validation set is noisy. Validations before `min_steps` never count against patience.
    Validation results are all-reduced, so every rank decides alike. `patience` 0: never stop.
    """

    def __init__(self, patience: int, head: str | None, energy_weight: float = 1.0, forces_weight: float = 1.0,
                 min_steps: int = 0, smoothing: float = 0.0) -> None:
        self.patience, self.head = patience, head
        self.weights = (energy_weight, forces_weight)
        self.min_steps, self.smoothing = min_steps, smoothing
        self.best_score, self.best_step, self.bad = float("inf"), -1, 0
        self.smoothed: float | None = None
        self.best_state: dict | None = None

    def _head_score(self, r: dict[str, float]) -> float:
        e, f = r.get("energy_mae_per_atom"), r.get("forces_mae")
        if e is None and f is None:
            return float("nan")
        return self.weights[0] * (e or 0.0) + self.weights[1] * (f or 0.0)

    def score(self, results: dict[str, dict[str, float]]) -> float:
        if self.head is not None:
            return self._head_score(results.get(self.head) or {})
        scores = [s for s in (self._head_score(r) for r in results.values()) if np.isfinite(s)]
        return float(np.mean(scores)) if scores else float("nan")

    def update(self, results: dict[str, dict[str, float]], module, step: int, keep: bool) -> bool:
        """Record a validation; returns True when training should stop. `keep`: hold a copy of the best weights."""
        s = self.score(results)
        if not np.isfinite(s):
            return False
        prev = self.smoothed
        self.smoothed = s if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * s
        if self.smoothed < self.best_score:
            self.best_score, self.best_step, self.bad = self.smoothed, step, 0
            if keep:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            return False
        if step >= self.min_steps:
            self.bad += 1
        return 0 < self.patience <= self.bad

    def restore_best(self, module) -> None:
        """Load the best weights seen (if any) into `module`."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


def measure_forgetting(parent: str, child: str, parent_meta: dict, max_structures: int = 1000) -> dict | None:
    """Errors of the parent and of the fine-tuned package on the parent's own data, per fidelity.

    The data are the parent's validation stores from its lineage, else its training stores (at most
    `max_structures`, shared among the stores). `*_increase` = fine-tuned − parent: positive values are
    forgetting. None when the parent's stores cannot be read.
    """
    from polyfid.evaluation.metrics import evaluate_batches
    from polyfid.distributed.replay import open_replay_stores

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


def scratch_config(cfg: RunConfig, parent_meta: dict) -> RunConfig:
    """The same run from a random init: the parent's architecture, the target data, the same step budget.

    The learning rate and warm-up are finetune.scratch_lr and finetune.scratch_warmup_steps (the fine-tuning
    recipe's, chosen for scratch by its own sweep), else the parent's pretraining ones (a random init needs
    larger steps), so that neither side is handicapped by the other's schedule. Validation, the energy refit,
    early stopping and best-weights selection are the fine-tuning run's. No head is frozen, nothing is registered.
    """
    import copy

    from polyfid.models.config import ModelConfig

    s = copy.deepcopy(cfg)
    s.model = ModelConfig(**{k: v for k, v in parent_meta["config"].items() if k in ModelConfig.__dataclass_fields__})
    parent_trainer = ((parent_meta.get("extra") or {}).get("config") or {}).get("trainer") or {}
    for key in ("lr", "warmup_steps"):
        mine = getattr(cfg.finetune, f"scratch_{key}")
        if mine is not None:
            setattr(s.trainer, key, mine)
        elif key in parent_trainer:
            setattr(s.trainer, key, parent_trainer[key])
    s.finetune = type(cfg.finetune)()
    s.name = f"{cfg.name}-scratch"
    s.output = str(Path(cfg.output) / "scratch")
    if cfg.trainer.trace_dir:
        s.trainer.trace_dir = str(Path(cfg.trainer.trace_dir) / "scratch")
    s.tracking.run_name = f"{cfg.tracking.run_name or cfg.name}-scratch"
    s.tracking.register_as = None
    return s


def compare_table(packages: dict[str, str], stores: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{label: {fidelity: errors}} of each package on the stores (the fidelities every package has)."""
    from polyfid.evaluation.metrics import evaluate_batches

    opened = [Store.open(p) for p in stores]
    present = {f.name for s in opened for f in s.fidelities}
    models = {k: load_package(v) for k, v in packages.items()}
    fids = [f for f in next(iter(models.values())).fidelity_names
            if f in present and all(f in m.fidelity_names for m in models.values())]
    return {k: evaluate_batches(m, iter_all(opened, fidelities=fids), fids).results() for k, m in models.items()}


def format_compare(table: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    """Rows (fidelity, label) with energy and force MAE in meV and meV/Å."""
    lines = [title, f"{'fidelity':<16}{'model':<14}{'n':>5}{'E MAE':>9}{'E/atom':>9}{'F MAE':>9}   (meV, meV/Å)"]
    fids = sorted({f for r in table.values() for f in r})
    for fid in fids:
        for label, res in table.items():
            r = res.get(fid, {})

            def g(k: str) -> str:
                return f"{r[k] * 1000:>9.1f}" if k in r else f"{'-':>9}"

            lines.append(f"{fid:<16}{label:<14}{r.get('n_structures', 0):>5}{g('energy_mae')}"
                         f"{g('energy_mae_per_atom')}{g('forces_mae')}")
    return "\n".join(lines)

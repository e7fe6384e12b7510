"""Where a trained model becomes a package: float32 weights (safetensors), config and lineage, at <output>/package."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from polyfid._version import __version__
from polyfid.data_shards.named import portable_ref
from polyfid.data_shards.reference_fit import ReferenceFit
from polyfid.data_shards.store import Store
from polyfid.distributed.config import RunConfig
from polyfid.distributed.finetune.plan import FinetunePlan
from polyfid.models.package import save_package


def _entry(s: Store) -> dict:
    return {"path": portable_ref(s.path), "fingerprint": s.fingerprint}


def portable_config(d: dict) -> dict:
    """The resolved config as a package records it: every path and URI in its portable form (data_shards/named.py),
    so that a package names no absolute path of the machine that made it."""
    d = copy.deepcopy(d)
    d["output"] = portable_ref(d.get("output"))
    data = d.get("data") or {}
    for key in ("train", "valid", "monitor", "oversample"):
        data[key] = [portable_ref(p) for p in data.get(key) or []]
    ft = d.get("finetune") or {}
    ft["source"] = portable_ref(ft.get("source"))
    ft["replay_stores"] = [portable_ref(p) for p in ft.get("replay_stores") or []]
    tr = d.get("trainer") or {}
    tr["trace_dir"] = portable_ref(tr.get("trace_dir"))
    tracking = d.get("tracking") or {}
    tracking["uri"] = portable_ref(tracking.get("uri"))
    return d


def lineage(cfg: RunConfig, stores: list[Store], valid: list[Store], run_id: str | None, plan: FinetunePlan | None,
            fit: ReferenceFit | None) -> dict:
    """Where the package came from: its stores (with fingerprints), run, parent, mode and reference fit."""
    out = {
        "stores": [_entry(s) for s in stores],
        "valid_stores": [_entry(s) for s in valid],
        "replay": {"fraction": plan.replay_fraction, "stores": [portable_ref(p) for p in plan.replay_stores]}
        if plan else None,
        "mlflow_run_id": run_id,
        "tracking_uri": portable_ref(cfg.tracking.uri),
        "polyfid_version": __version__,
        "parent": portable_ref(plan.source_uri) if plan else None,  # what the user gave, not the downloaded copy
        "mode": cfg.trainer.mode,
        "steps": cfg.trainer.steps,
        "reference_fit": fit.to_dict() if fit is not None else None,  # the joint fit over the training stores
    }
    if plan:
        out["parent_lineage"] = plan.parent_lineage
        if plan.references is not None:  # fine-tuning's one refit of the trained head, on the target (+ anchors)
            out["reference_refit"] = {"head": plan.head, "energies": dict(plan.references),
                                      "stores": [_entry(s)["path"] for s in stores],
                                      "anchors": [portable_ref(p) for p in plan.anchors]}
    return out


def write_package(module: torch.nn.Module, cfg: RunConfig, stores: list[Store], run_id: str | None,
                  plan: FinetunePlan | None = None, valid: list[Store] | None = None,
                  fit: ReferenceFit | None = None, output: str | None = None) -> Path:
    """Save the trained model (in float32) as a package with lineage, at <output>/package. `output`: the run's
    output to record, when cfg.output is a staging folder (an output on object storage)."""
    model = copy.deepcopy(module).float().cpu()
    out = Path(cfg.output) / "package"
    config = cfg.to_dict()
    if output is not None:
        config["output"] = output
    save_package(out, model, lineage=lineage(cfg, stores, valid or [], run_id, plan, fit),
                 extra={"config": portable_config(config)})
    return out

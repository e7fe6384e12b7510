"""Named models: `pretrained:NAME` wherever a package path is accepted.

polyfid ships its pretrained packages in `models/pretrained/<name>/` (weights, polyfid.json and a model card,
MODEL_CARD.md). A group can add its own named models without touching the installation: every folder listed in
the environment variable POLYFID_MODELS (separated like PATH) is searched too, one sub-folder per name, and a
name found there shadows a shipped one.

    polyfid models                                        # list them
    polyfid finetune --from pretrained:organic-mini ...   # fine-tune one
    polyfid.Calculator("pretrained:organic-mini")         # use one in ASE
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from polyfid.models.package import (ENV, PREFIX, SHIPPED, UnknownModel, is_named, named_folders, read_metadata,
                                    resolve_name, search_path)

__all__ = ["ENV", "PREFIX", "SHIPPED", "NamedModel", "UnknownModel", "available", "is_named", "resolve_name",
           "search_path"]
CARD_FILE = "MODEL_CARD.md"
FINETUNE_FILE = "FINETUNE.json"  # measured fine-tuning gain over scratch (benchmarks/bench_finetune.py)


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """One named package and what `polyfid models` shows of it."""

    name: str
    path: Path
    fidelities: tuple[str, ...]  # lowest to highest rank
    elements: tuple[int, ...]
    cutoff: float
    size_bytes: int
    card: Path | None
    shipped: bool
    finetune: dict | None = None  # FINETUNE.json: what fine-tuning gained over scratch, measured


def finetune_summary(gain: dict | None) -> str | None:
    """One line of what fine-tuning gained over a tuned scratch run, per target size, from FINETUNE.json."""
    if not gain or not gain.get("gain"):
        return None
    parts = []
    for mol, by_n in gain["gain"].items():
        ratios = ", ".join(f"{r['force_ratio']:.2f}x at {n}" for n, r in sorted(by_n.items(), key=lambda kv: int(kv[0])))
        parts.append(f"{mol}: {ratios}")
    return (f"fine-tuned / scratch test force MAE, {gain.get('level', 'a new level')}, by training structures: "
            + "; ".join(parts))


def available() -> dict[str, NamedModel]:
    """Every named model on the search path, by name (a sub-folder without polyfid.json is not a model)."""
    found: dict[str, NamedModel] = {}
    for name, folder in named_folders().items():
        meta = read_metadata(folder)
        fids = sorted(meta["fidelities"], key=lambda f: f.get("rank", 0))
        found[name] = NamedModel(
            name=name, path=folder, fidelities=tuple(f["name"] for f in fids),
            elements=tuple(int(z) for z in meta["elements"]), cutoff=float(meta["config"]["cutoff"]),
            size_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            card=folder / CARD_FILE if (folder / CARD_FILE).is_file() else None, shipped=folder.parent == SHIPPED,
            finetune=json.loads((folder / FINETUNE_FILE).read_text()) if (folder / FINETUNE_FILE).is_file() else None)
    return found

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
from pathlib import Path

from polyfid.models.package import (ENV, PREFIX, SHIPPED, UnknownModel, is_named, named_folders, read_metadata,
                                    resolve_name, search_path)

__all__ = ["ENV", "PREFIX", "SHIPPED", "NamedModel", "UnknownModel", "available", "is_named", "resolve_name",
           "search_path"]
CARD_FILE = "MODEL_CARD.md"


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
            card=folder / CARD_FILE if (folder / CARD_FILE).is_file() else None, shipped=folder.parent == SHIPPED)
    return found

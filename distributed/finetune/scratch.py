"""The from-scratch comparison of a fine-tuning: the same run from a random init, and both packages' errors side
by side. `polyfid finetune --compare-scratch` (driver/launcher.compare_with_scratch) and the benchmarks use it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from polyfid.data_shards.reader import iter_all
from polyfid.distributed.config import RunConfig
from polyfid.models.package import load_package
from polyfid.data_shards.named import open_store


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
    s.output = _child(cfg.output, "scratch")
    if cfg.trainer.trace_dir:
        s.trainer.trace_dir = _child(cfg.trainer.trace_dir, "scratch")
    s.tracking.run_name = f"{cfg.tracking.run_name or cfg.name}-scratch"
    s.tracking.register_as = None
    return s


def _child(path: str, name: str) -> str:
    """`name` inside a folder that is a local path or a URL (Path would fold s3:// into s3:/)."""
    return f"{path.rstrip('/')}/{name}" if "://" in path else str(Path(path) / name)


def compare_table(packages: dict[str, str], stores: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{label: {fidelity: errors}} of each package on the stores (the fidelities every package has)."""
    from polyfid.evaluation.metrics import evaluate_batches

    opened = [open_store(p) for p in stores]
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

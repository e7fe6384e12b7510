"""Checkpoints: DeepSpeed state plus every rank's reader cursor, RNG state, the step and the MLflow run id."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("polyfid.checkpoint")
KEEP = 2  # checkpoints kept on disk


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """The tag DeepSpeed wrote last, or None."""
    p = Path(ckpt_dir) / "latest"
    if not p.exists():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, reader, run_id: str | None, rank: int) -> str:
    """Collective: every rank must call it. Keeps the newest KEEP checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    state = {"reader": reader.state_dict(), "rng": torch.get_rng_state()}
    states = _gather(state)
    tag = f"step_{step:08d}"
    client = {
        "step": step,
        "world_size": len(states),
        "reader": type(reader).gather_states([s["reader"] for s in states]),  # resumable on any world size
        "rng": [s["rng"] for s in states],
        "mlflow_run_id": run_id,
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / "polyfid_meta.json").write_text(json.dumps({"step": step, "world_size": len(states)}))
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-KEEP]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    return tag


def load_checkpoint(engine, ckpt_dir: str | Path, reader, rank: int, world: int) -> dict[str, Any]:
    """Restore the engine and this rank's reader cursor and RNG; returns the client state."""
    tag = latest_checkpoint(ckpt_dir)
    meta_file = Path(ckpt_dir) / str(tag) / "polyfid_meta.json"
    saved_world = json.loads(meta_file.read_text())["world_size"] if meta_file.exists() else world
    same = saved_world == world
    # DeepSpeed cannot repartition ZeRO optimizer state over a new world size: then restore the weights only.
    path, client = engine.load_checkpoint(str(ckpt_dir), load_module_only=not same)
    if path is None or client is None:
        raise RuntimeError(f"could not load the checkpoint in {ckpt_dir}")
    reader.load_state_dict(client["reader"])
    if same:
        torch.set_rng_state(client["rng"][rank])
    else:
        sched = getattr(engine, "lr_scheduler", None)
        if sched is not None:  # continue the learning-rate schedule where it was
            sched.last_epoch = int(client["step"]) - 1
            sched.step()
        log.warning(
            "checkpoint in %s was written by %s workers, this run has %d: the rest of the epoch is re-planned "
            "over the new workers (no structure lost or seen twice); the weights and schedule carry over, the "
            "optimizer moments restart",
            ckpt_dir,
            saved_world,
            world,
        )
    return client

"""Checkpoints: DeepSpeed state plus every rank's reader cursor, RNG state, the step and the MLflow run id."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from polyfid.distributed.engine import all_reduce_host

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
        "reader": reader.gather_states([s["reader"] for s in states]),  # resumable on any world size
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


STOP_FILE = "STOP"  # the driver writes it on SIGTERM; workers checkpoint and leave at the next step


def stop_requested(path: Path) -> bool:
    """Whether any rank sees the stop file; one scalar all-reduce so that all ranks agree."""
    flag = all_reduce_host(torch.tensor([1.0 if path.exists() else 0.0]))
    return bool(flag.item() > 0)


class Checkpointer:
    """Where a run's checkpoints live, when they are written, and the stop file that asks for one now."""

    def __init__(self, output: str | Path, every: int, last_step: int, run_id: str | None, rank: int,
                 world: int) -> None:
        self.dir, self.stop_file = Path(output) / "checkpoints", Path(output) / STOP_FILE
        self.every, self.last_step = every, last_step
        self.run_id, self.rank, self.world = run_id, rank, world

    def resume(self, engine, stream) -> int:
        """Restore the newest checkpoint, if any, into the engine and the stream; returns its step (else 0)."""
        if latest_checkpoint(self.dir) is None:
            return 0
        step = int(load_checkpoint(engine, self.dir, stream, self.rank, self.world)["step"])
        log.warning("rank %d resumed from %s at step %d", self.rank, self.dir, step)
        return step

    def after_step(self, engine, stream, step: int) -> bool:
        """Write a checkpoint when one is due or a stop was asked for (collective); True: stop now."""
        stopped = stop_requested(self.stop_file)
        if stopped or step % self.every == 0 or step == self.last_step:
            save_checkpoint(engine, self.dir, step, stream, self.run_id, self.rank)
        if stopped:
            log.warning("rank %d: stop requested; checkpoint written at step %d", self.rank, step)
        return stopped

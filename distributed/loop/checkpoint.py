"""Checkpoints: DeepSpeed state plus every rank's reader cursor, RNG state, the step and the MLflow run id.

Each checkpoint ends with a manifest of its files' sizes and SHA-256, written last; resume takes the newest
checkpoint that verifies against its manifest.

With the output on object storage (a RunStorage), each rank writes its DeepSpeed files in its own staging folder
and uploads them; rank 0 writes the manifest of every rank's files to the bucket last. Resume (and a rollback)
downloads what a rank lacks of the newest checkpoint whose manifest is in the bucket, and verifies it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from polyfid.infra.comm import all_reduce_host

log = logging.getLogger("polyfid.checkpoint")
KEEP = 2  # checkpoints kept on disk


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


MANIFEST = "manifest.json"  # written last: every file of the checkpoint with its size and SHA-256
LEGACY_META = "polyfid_meta.json"  # the completion marker of checkpoints written before manifests


def file_entries(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {"bytes", "sha256"}} of every file of a checkpoint folder but its manifest."""
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
            with p.open("rb") as fh:
                files[str(p.relative_to(tag_dir))] = {"bytes": p.stat().st_size,
                                                      "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
    return files


def write_manifest(tag_dir: Path, step: int, world: int, files: dict[str, dict[str, Any]] | None = None) -> str:
    """Checksum every file of a finished checkpoint (or take `files`) and write the manifest atomically (temp
    file, rename); returns its text."""
    text = json.dumps({"step": step, "world_size": world,
                       "files": file_entries(tag_dir) if files is None else files}, indent=1)
    tmp = tag_dir / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, tag_dir / MANIFEST)
    return text


def verify_checkpoint(tag_dir: Path) -> str | None:
    """None if the checkpoint is whole; else why not (naming the file)."""
    manifest = tag_dir / MANIFEST
    if not manifest.exists():
        return None if (tag_dir / LEGACY_META).exists() else "it has no manifest (its write never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"its manifest is unreadable ({err})"
    for name, want in files.items():
        why = _file_mismatch(tag_dir / name, want)
        if why is not None:
            return f"{name} {why}"
    return None


def _file_mismatch(p: Path, want: dict[str, Any]) -> str | None:
    """None if the file has the manifest entry's size and SHA-256; else what is wrong with it."""
    if not p.is_file():
        return "is missing"
    if p.stat().st_size != want["bytes"]:
        return f"has {p.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
    with p.open("rb") as fh:
        if hashlib.file_digest(fh, "sha256").hexdigest() != want["sha256"]:
            return "does not match its SHA-256 in the manifest"
    return None


def newest_verified(ckpt_dir: str | Path) -> str | None:
    """The newest checkpoint tag that verifies; each newer one that does not is named in a warning."""
    ckpt_dir = Path(ckpt_dir)
    for tag_dir in sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True):
        why = verify_checkpoint(tag_dir)
        if why is None:
            return tag_dir.name
        log.warning("checkpoint %s is not usable: %s; trying the one before", tag_dir, why)
    return None


def checkpoint_meta(tag_dir: Path) -> dict[str, Any]:
    """{"step", "world_size"} of a verified checkpoint (from its manifest, or an older one's marker)."""
    for name in (MANIFEST, LEGACY_META):
        if (tag_dir / name).exists():
            return json.loads((tag_dir / name).read_text())
    raise FileNotFoundError(f"{tag_dir} has neither {MANIFEST} nor {LEGACY_META}")


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, reader, run_id: str | None, rank: int,
                    extra: dict[str, Any] | None = None, storage=None) -> str:
    """Collective: every rank must call it. Keeps the newest KEEP checkpoints (on object storage too)."""
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
        **(extra or {}),  # the EMA of the weights, when there is one
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if storage is not None:
        _upload(storage, ckpt_dir, tag, step, len(states), rank)
        return tag
    if rank == 0:  # the manifest is written last: a checkpoint without one never finished
        write_manifest(ckpt_dir / tag, step, len(states))
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-KEEP]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    return tag


def _upload(storage, ckpt_dir: Path, tag: str, step: int, world: int, rank: int) -> None:
    """Each rank uploads its own files of checkpoint `tag`; after all have, rank 0 writes the manifest of every
    rank's files to the bucket (last) and removes the bucket's checkpoints beyond KEEP. Every rank keeps the
    merged manifest in its staging folder, so that a later download of the files it lacks verifies."""
    mine = file_entries(ckpt_dir / tag)
    for name in mine:
        storage.fs.put_file(str(ckpt_dir / tag / name), storage.key(f"checkpoints/{tag}/{name}"))
    merged: dict[str, dict[str, Any]] = {}
    for r, files in enumerate(_gather(mine)):  # a collective: every rank's uploads are done
        for name, entry in files.items():
            if merged.get(name, entry) != entry:
                raise RuntimeError(f"checkpoint {tag}: rank {r}'s {name} differs from another rank's (each rank "
                                   "needs a staging folder of its own)")
            merged[name] = entry
    text = write_manifest(ckpt_dir / tag, step, world, merged)
    if rank == 0:
        storage.put_text(f"checkpoints/{tag}/{MANIFEST}", text)
        for old in [t for t in storage.listdir("checkpoints") if t.startswith("step_")][:-KEEP]:
            storage.remove(f"checkpoints/{old}")
    for old in sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def fetch_checkpoint(storage, ckpt_dir: Path, tag: str) -> str | None:
    """Download into ckpt_dir/tag what it lacks of checkpoint `tag` in the bucket (files already there with the
    manifest's size and SHA-256 are kept); None when it then verifies, else why not."""
    local = Path(ckpt_dir) / tag
    local.mkdir(parents=True, exist_ok=True)
    if not storage.pull(f"checkpoints/{tag}/{MANIFEST}", local / MANIFEST):
        return "it has no manifest in the bucket (its write never finished)"
    try:
        files = json.loads((local / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"its manifest is unreadable ({err})"
    for name, want in files.items():
        if _file_mismatch(local / name, want) is not None and not storage.pull(f"checkpoints/{tag}/{name}", local / name):
            return f"{name} is missing in the bucket"
    return verify_checkpoint(local)


def newest_fetched(storage, ckpt_dir: Path) -> str | None:
    """The newest checkpoint in the bucket that downloads and verifies; each newer one that does not is named."""
    for tag in sorted((t for t in storage.listdir("checkpoints") if t.startswith("step_")), reverse=True):
        why = fetch_checkpoint(storage, ckpt_dir, tag)
        if why is None:
            return tag
        log.warning("checkpoint %s/checkpoints/%s is not usable: %s; trying the one before", storage.url, tag, why)
    return None


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, reader, rank: int, world: int) -> dict[str, Any]:
    """Restore the engine and this rank's reader cursor and RNG from checkpoint `tag`; returns the client state."""
    saved_world = int(checkpoint_meta(Path(ckpt_dir) / tag)["world_size"])
    same = saved_world == world
    # DeepSpeed cannot repartition ZeRO optimizer state over a new world size: then restore the weights only.
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=not same)
    if path is None or client is None:
        raise RuntimeError(f"could not load the checkpoint {tag} in {ckpt_dir}")
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


STOP_FILE = "STOP"  # the driver writes it on SIGTERM; workers checkpoint and leave within a log window


def stop_requested(path: Path, storage=None, rank: int = 0) -> bool:
    """Whether any rank sees the stop file (rank 0 also looks in the bucket); one scalar all-reduce so that all
    ranks agree."""
    seen = path.exists() or (storage is not None and rank == 0 and storage.exists(STOP_FILE))
    flag = all_reduce_host(torch.tensor([1.0 if seen else 0.0]))
    return bool(flag.item() > 0)


class Checkpointer:
    """Where a run's checkpoints live, when they are written, and the stop file that asks for one now."""

    def __init__(self, output: str | Path, every: int, last_step: int, run_id: str | None, rank: int,
                 world: int, stop_check_every: int = 1, storage=None) -> None:
        self.storage = storage  # a RunStorage: `output` is then this rank's staging folder
        self.dir, self.stop_file = Path(output) / "checkpoints", Path(output) / STOP_FILE
        self.every, self.last_step = every, last_step
        self.stop_check_every = max(1, stop_check_every)  # the check is a collective read on the host: not every step
        self.run_id, self.rank, self.world = run_id, rank, world
        self.ema = None  # an ema.EMA to save and restore with the weights (the Trainer sets it)
        self.on_saved = None  # called on every rank after each checkpoint (the Trainer uploads its records)

    def resume(self, engine, stream) -> int:
        """Restore the newest checkpoint that verifies, if any, into the engine and the stream; returns its step
        (else 0). Newer ones that do not verify (truncated, half-written) are named in a warning and skipped."""
        tag = self._newest()
        if tag is None:
            if self.storage is not None and self.rank == 0 and self.storage.listdir("checkpoints"):
                log.warning("no checkpoint in %s/checkpoints verifies: starting from step 0", self.storage.url)
            elif self.storage is None and any(self.dir.glob("step_*")):
                log.warning("no checkpoint in %s verifies: starting from step 0", self.dir)
            return 0
        client = load_checkpoint(engine, self.dir, tag, stream, self.rank, self.world)
        self._restore_ema(client, engine.module)
        step = int(client["step"])
        log.warning("rank %d resumed from %s at step %d", self.rank,
                    f"{self.storage.url}/checkpoints/{tag}" if self.storage else self.dir / tag, step)
        return step

    def _newest(self) -> str | None:
        """Collective: the newest checkpoint that verifies, chosen by rank 0 (in the bucket, with the output on
        object storage: every rank then downloads what it lacks of it)."""
        if self.storage is None:
            return _gather(newest_verified(self.dir) if self.rank == 0 else None)[0]
        tag = _gather(newest_fetched(self.storage, self.dir) if self.rank == 0 else None)[0]
        if tag is not None and self.rank != 0:
            why = fetch_checkpoint(self.storage, self.dir, tag)
            if why is not None:
                raise RuntimeError(f"rank {self.rank}: checkpoint {self.storage.url}/checkpoints/{tag}: {why}")
        return tag

    def after_step(self, engine, stream, step: int) -> bool:
        """Write a checkpoint when one is due or a stop was asked for (collective); True: stop now."""
        stopped = step % self.stop_check_every == 0 and stop_requested(self.stop_file, self.storage, self.rank)
        if stopped or step % self.every == 0 or step == self.last_step:
            save_checkpoint(engine, self.dir, step, stream, self.run_id, self.rank,
                            {"ema": self.ema.state_dict()} if self.ema is not None else None, self.storage)
            if self.on_saved is not None:
                self.on_saved()
        if stopped:
            log.warning("rank %d: stop requested; checkpoint written at step %d", self.rank, step)
        return stopped

    def rollback(self, engine, step: int, lr_factor: float) -> str | None:
        """Collective: restore the weights and optimizer state of the newest checkpoint that verifies, keep the
        data cursor and the schedule where they are (the batches since are not replayed), and multiply the
        learning rate by lr_factor from now on. Returns the tag rolled back to (None: none; the lr still drops)."""
        tag = self._newest()
        if tag is not None:
            _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            self._restore_ema(client, engine.module)
        self.rolled_back_to = tag
        sched = engine.lr_scheduler
        sched.base_lrs = [b * lr_factor for b in sched.base_lrs]
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        if self.rank == 0:
            log.warning("step %d: repeated skipped steps; rolled back to %s and multiplied the learning rate by %g",
                        step, self.dir / tag if tag else "(no checkpoint yet: the weights stay)", lr_factor)
        return tag

    def _restore_ema(self, client: dict[str, Any] | None, module) -> None:
        if self.ema is not None and client and client.get("ema") is not None:
            self.ema.load_state_dict(client["ema"])
        elif self.ema is not None:
            log.warning("the checkpoint has no EMA of the weights: the average restarts from the restored weights")
            self.ema.reset(module)


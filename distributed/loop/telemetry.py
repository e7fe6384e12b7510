"""Telemetry of the training loop: atoms/s, step time, data wait, budget fill, communication; and the trace.

Numbers are summed on the host over a log window and all-gathered once per window, not once per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from polyfid.infra.comm import all_gather_host
from polyfid.distributed.loop.engine import drain_comm_time
from polyfid.distributed.modes.stream import ResumableStream, TaskBatches, batches_of


def trace_name(rank: int) -> str:
    """The file of a rank's trace inside trainer.trace_dir."""
    return f"rank{rank}.jsonl"


class Trace:
    """Optional per-rank JSON lines of what each step consumed: for exactness checks and debugging."""

    def __init__(self, trace_dir: str | None, rank: int) -> None:
        self.file = None
        if trace_dir:
            import ray

            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(trace_dir) / trace_name(rank), "a")
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
            self.base = {"rank": rank, "pid": os.getpid(), "node": node}

    def write(self, step: int, stream: ResumableStream, item: dict | TaskBatches) -> None:
        if self.file is None:
            return
        ids = [[int(s), int(i)] for b in batches_of(item) for s, i in zip(b["store"], b["structure_id"])]
        rec = dict(self.base, step=step, epoch=stream.epoch, ids=ids)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()


class Telemetry:
    """One log window of host-side counters; `flush` turns them into metrics (a collective)."""

    def __init__(self, atom_budget: int, trace_dir: str | None, rank: int) -> None:
        self.atom_budget = atom_budget
        self.trace = Trace(trace_dir, rank)
        self.window = new_window()

    def record(self, step: int, stream: ResumableStream, item: dict | TaskBatches, wait_s: float, busy_s: float) -> None:
        """Count what step `step` consumed and how long it waited for data and took in all."""
        self.trace.write(step, stream, item)
        batches = batches_of(item)
        w = self.window
        w["atoms"] += float(sum(b["n_atoms"].sum() for b in batches))
        w["budget"] += self.atom_budget * len(batches)
        w["wait"] += wait_s
        w["time"] += busy_s
        w["steps"] += 1

    def flush(self, engine) -> dict[str, float]:
        """Metrics of the window that ends now (every rank must call it), and a new window."""
        out = throughput(self.window, engine)
        self.window = new_window()
        return out


def new_window() -> dict[str, float]:
    return {"atoms": 0.0, "budget": 0.0, "wait": 0.0, "time": 0.0, "steps": 0}


def throughput(window: dict[str, float], engine) -> dict[str, float]:
    """Telemetry over the last window: global and per-worker atoms/s, step time, data wait, budget fill."""
    comm_s, comm_bytes = drain_comm_time()
    mine = torch.tensor([window["atoms"], window["wait"], window["time"], window["budget"], comm_s, comm_bytes],
                        dtype=torch.float64)
    table = all_gather_host(mine)
    atoms, wait, busy, budget, comm, comm_bytes = table.sum(0).tolist()
    wall = float(table[:, 2].max())  # the slowest rank sets the pace
    out = {
        "atoms_per_s": atoms / max(wall, 1e-9),
        "step_time_s": wall / max(window["steps"], 1),
        "data_wait_fraction": wait / max(busy, 1e-9),
        "atom_budget_fill": atoms / max(budget, 1e-9),  # 1 - padding waste of atom-budget batching
        "comm_time_fraction": comm / max(busy, 1e-9),  # DeepSpeed collectives, waits for slower ranks included
        "comm_mb_per_step": comm_bytes / table.shape[0] / max(window["steps"], 1) / 1e6,
        "lr": float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else float("nan"),
    }
    for r, row in enumerate(table.tolist()):
        out[f"atoms_per_s/worker{r}"] = row[0] / max(row[2], 1e-9)
    return out

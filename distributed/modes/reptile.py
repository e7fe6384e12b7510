"""Meta-learning by Reptile (S3) across tasks, where a task is one (store, fidelity) pair.

One outer step on every rank:
  1. sample a task, seeded by (seed, step, rank);
  2. copy θ to φ and take k steps on that task with a fresh Adam, with no communication;
  3. hand θ − φ to the engine as the gradient (through a linear surrogate, so DeepSpeed averages it
     across ranks in its usual all-reduce) and step a plain SGD with lr ε, annealed linearly to 0:
        θ ← θ − ε · mean_r(θ − φ_r) = θ + ε · mean_r(φ_r − θ).
So Reptile talks to the network once every k inner steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.store import Store
from polyfid.distributed.config import ReptileConfig, RunConfig
from polyfid.distributed.modes.losses import multifidelity_loss
from polyfid.distributed.modes.multifidelity import StepContext, StreamSpec, prepare
from polyfid.distributed.modes.stream import TaskBatches
from polyfid.models.layout import LabelLayout


@dataclasses.dataclass(frozen=True)
class Task:
    """One dataset at one level of theory: a store index and a fidelity name."""

    store: int
    fidelity: str

    @property
    def key(self) -> str:
        return f"{self.store}:{self.fidelity}"


def list_tasks(stores: Sequence[Store], model_fidelities: Sequence[str]) -> list[Task]:
    """Every (store, fidelity) pair whose fidelity the store holds and the model has a head for."""
    return [Task(i, f.name) for i, s in enumerate(stores) for f in s.fidelities if f.name in model_fidelities]


def task_weights(tasks: Sequence[Task], stores: Sequence[Store], kind: str) -> np.ndarray:
    """Sampling probabilities: uniform, or proportional to the store's structure count."""
    if kind == "uniform":
        w = np.ones(len(tasks))
    else:
        w = np.array([stores[t.store].n_structures for t in tasks], dtype=np.float64)
    return w / w.sum()


def sample_task(weights: np.ndarray, seed: int, step: int, rank: int) -> int:
    """A task index drawn from a generator seeded by (seed, step, rank): reproducible on resume."""
    return int(np.random.default_rng([seed, step, rank]).choice(len(weights), p=weights))


@dataclasses.dataclass(frozen=True)
class ReptileExtra:
    """What a Reptile step needs besides its batches (StepContext.extra)."""

    tasks: list[Task]
    inner_lr: float


class TaskStreams:
    """One streaming reader per task; yields TaskBatches(task index, k batches) for each outer step."""

    def __init__(self, stores: Sequence[Store], tasks: Sequence[Task], weights: np.ndarray, cfg: ReptileConfig,
                 reader_cfg: ShardReader.Config, rank: int, world: int, seed: int) -> None:
        self.tasks, self.weights, self.cfg = list(tasks), weights, cfg
        self.rank, self.seed = rank, seed
        self.readers = {
            t.key: ShardReader([stores[t.store]], reader_cfg, rank=rank, world_size=world, fidelities=[t.fidelity])
            for t in self.tasks
        }
        self._iters: dict[str, Any] = {}
        self.step = 0

    @property
    def epoch(self) -> None:
        """None: every task's reader has an epoch of its own."""
        return None

    def __iter__(self) -> "TaskStreams":
        return self

    def __next__(self) -> TaskBatches:
        i = sample_task(self.weights, self.seed, self.step, self.rank)
        key = self.tasks[i].key
        if key not in self._iters:
            self._iters[key] = iter(self.readers[key])
        self.step += 1
        return TaskBatches(i, [next(self._iters[key]) for _ in range(self.cfg.inner_steps)])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tasks": {k: r.state_dict() for k, r in self.readers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for k, r in self.readers.items():
            r.load_state_dict(state["tasks"][k])
        self._iters.clear()

    @staticmethod
    def gather_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's state in one, so that a resume on another world size re-plans each task's epoch."""
        keys = states[0]["tasks"].keys()
        return {
            "step": max(int(s["step"]) for s in states),
            "tasks": {k: ShardReader.gather_states([s["tasks"][k] for s in states]) for k in keys},
        }


def inner_loop(theta: torch.nn.Module, batches: Sequence[dict], ctx: StepContext, head: int,
               lr: float) -> tuple[torch.nn.Module, dict[str, float]]:
    """φ = θ after len(batches) Adam steps on one task; local only (the loss is not all-reduced)."""
    phi = copy.deepcopy(theta)
    params = [p for p in phi.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    metrics: dict[str, float] = {}
    layout = LabelLayout(tuple(ctx.fidelity_names), (head,))  # the task's one label column trains `head`
    for batch in batches:
        graph, targets = prepare(batch, ctx)
        out = layout.select(phi(graph, force_heads=layout.heads_of(targets.force_heads()) or None, create_graph=True))
        loss, metrics = multifidelity_loss(out, targets, ctx.loss, ctx.fidelity_names, reduce=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return phi, metrics


def reptile_step(item: TaskBatches, ctx: StepContext) -> dict[str, float]:
    """One outer Reptile step; `item` is (task index, k batches) from TaskStreams; ctx.extra a ReptileExtra."""
    task_idx, batches = item
    extra: ReptileExtra = ctx.extra
    task = extra.tasks[task_idx]
    theta = ctx.engine.module
    head = theta.fidelity_index(task.fidelity)
    inner_ctx = dataclasses.replace(ctx, fidelity_names=[task.fidelity])
    phi, inner = inner_loop(theta, batches, inner_ctx, head, extra.inner_lr)
    pairs = [(p, q) for p, q in zip(theta.parameters(), phi.parameters()) if p.requires_grad]
    if ctx.guard is not None and ctx.guard.check_local(math.isfinite(inner.get("loss", 0.0)) and all(
            bool(torch.isfinite(q).all()) for _, q in pairs), item):
        return {"loss": inner.get("loss", float("nan")), "reptile/task": float(task_idx)}
    # d/dθ Σ θ·(θ−φ) with (θ−φ) held constant is (θ−φ): the engine averages it over ranks and SGD steps.
    surrogate = sum((p * (p.detach() - q.detach().to(p.dtype))).sum() for p, q in pairs)
    ctx.engine.backward(surrogate)
    ctx.engine.step()
    delta = torch.sqrt(sum(((q.detach().float() - p.detach().float()) ** 2).sum() for p, q in pairs))
    metrics = {"loss": inner.get("loss", float("nan")), f"loss/{task.fidelity}": inner.get("loss", float("nan")),
               "reptile/delta_norm": float(delta), "reptile/task": float(task_idx)}
    return metrics


class ReptileMode:
    """Each outer step draws one task (a store at one fidelity), takes k local steps on it, and moves θ towards φ."""

    name = "reptile"

    def engine_options(self, cfg: RunConfig) -> dict:
        return {"reptile_epsilon": cfg.reptile.epsilon}

    def stream(self, spec: StreamSpec, cfg: RunConfig) -> TaskStreams:
        # One reader per task, read in the caller's thread: with read-ahead every task would keep a thread and
        # its buffered batches, while an outer step reads a single task.
        reader = dataclasses.replace(spec.reader, prefetch=0)
        tasks = list_tasks(spec.stores, spec.model_fidelities)
        weights = task_weights(tasks, spec.stores, cfg.reptile.task_weights)
        return TaskStreams(spec.stores, tasks, weights, cfg.reptile, reader, spec.rank, spec.world, cfg.trainer.seed)

    def extra(self, spec: StreamSpec, cfg: RunConfig) -> ReptileExtra:
        return ReptileExtra(list_tasks(spec.stores, spec.model_fidelities), cfg.reptile.inner_lr)

    def step(self, item: TaskBatches, ctx: StepContext) -> dict[str, float]:
        return reptile_step(item, ctx)

"""Step functions: one training step of a given mode, behind one loop (see worker.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from polyfid.distributed.config import LossConfig
from polyfid.distributed.losses import Targets, multifidelity_loss
from polyfid.models.graph import build_graph


@dataclasses.dataclass
class StepContext:
    """What a step function needs besides the batch."""

    engine: object  # a DeepSpeed engine (or anything with __call__, backward, step)
    loss: LossConfig
    fidelity_names: list[str]
    cutoff: float
    dtype: torch.dtype
    device: torch.device
    heads: list[int] | None = None  # model head of each label column; None: the same order
    extra: dict = dataclasses.field(default_factory=dict)  # what a mode's step needs besides (Reptile: tasks, lr)


def prepare(batch: dict, ctx: StepContext):
    """Batch -> (graph on device, targets in float32 on device)."""
    graph = build_graph(batch, ctx.cutoff, dtype=ctx.dtype, device=ctx.device)
    targets = Targets.from_batch(batch, torch.float32, ctx.device)
    return graph, targets


def multifidelity_step(batch: dict, ctx: StepContext) -> dict[str, float]:
    """One optimiser step on a batch that mixes fidelities; the loss is masked and globally normalised."""
    graph, targets = prepare(batch, ctx)
    cols = ctx.heads if ctx.heads is not None else list(range(len(ctx.fidelity_names)))
    out = ctx.engine(graph, force_heads=[cols[k] for k in targets.force_heads()], create_graph=True)
    out = {k: v[:, cols].float() for k, v in out.items()}
    loss, metrics = multifidelity_loss(out, targets, ctx.loss, ctx.fidelity_names)
    ctx.engine.backward(loss)
    ctx.engine.step()
    return metrics


def get_step_function(mode: str) -> Callable[[object, StepContext], dict[str, float]]:
    """The step function of a training mode."""
    if mode == "multifidelity":
        return multifidelity_step
    if mode == "reptile":
        from polyfid.distributed.reptile import reptile_step

        return reptile_step
    raise NotImplementedError(f"trainer.mode={mode!r} has no step function; available: multifidelity, reptile")

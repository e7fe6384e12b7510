"""The multi-fidelity mode: one optimiser step on a batch that mixes fidelities; and what every mode's step gets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.store import Store
from polyfid.distributed.config import LossConfig, RunConfig
from polyfid.distributed.modes.losses import Targets, multifidelity_loss, prior_pairs
from polyfid.distributed.modes.replay import mixed_reader
from polyfid.distributed.modes.stream import Prepared, ResumableStream, TaskBatches
from polyfid.models.graph import build_graph
from polyfid.models.layout import LabelLayout


@dataclasses.dataclass
class StreamSpec:
    """What a mode needs to build its stream on one rank."""

    stores: list[Store]  # training stores
    mixed_in: list[Store]  # stores given a fixed share of every batch (empty: none): the pretraining stores
    # replayed during a fine-tuning, or data.oversample's stores (loop/trainer.split_streams chooses)
    mixed_fraction: float  # their share of each batch's atoms
    fidelities: list[str]  # label columns: the model's heads that the training data has
    model_fidelities: list[str]  # every head of the model
    reader: ShardReader.Config
    rank: int
    world: int
    store_index: list[int] | None = None  # with data.oversample: the data.train index of each of stores + replay


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
    extra: Any = None  # the mode's own state: reptile.ReptileExtra for Reptile, None for multi-fidelity
    guard: Any = None  # guard.Guard: skips a step whose loss is non-finite or spikes; None: no guard

    def force_heads(self, targets: Targets) -> list[int]:
        """Model heads whose forces this batch needs: those with force labels, and loss.force_prior's."""
        return self.layout.heads_of(targets.force_heads(prior_pairs(self.loss, self.fidelity_names)))

    @property
    def layout(self) -> LabelLayout:
        """Label column k (named fidelity_names[k]) trains head heads[k]."""
        heads = self.heads if self.heads is not None else range(len(self.fidelity_names))
        return LabelLayout(tuple(self.fidelity_names), tuple(heads))


def prepare(batch: dict | Prepared, ctx: StepContext):
    """Batch -> (graph on device, targets in float32 on device); a Prepared batch has them already."""
    if isinstance(batch, Prepared):
        return batch.graph, batch.targets
    graph = build_graph(batch, ctx.cutoff, dtype=ctx.dtype, device=ctx.device)
    targets = Targets.from_batch(batch, torch.float32, ctx.device)
    return graph, targets


def collate(item: dict | TaskBatches, ctx: StepContext) -> Prepared | TaskBatches:
    """The step input with its graphs built (run on the read-ahead thread by stream.Collated)."""
    if isinstance(item, TaskBatches):
        return TaskBatches(item.task, [collate(b, ctx) for b in item.batches])
    return Prepared(item, *prepare(item, ctx))


def multifidelity_step(batch: dict | Prepared, ctx: StepContext) -> Mapping[str, float]:
    """One optimiser step on a batch that mixes fidelities; the loss is masked and globally normalised."""
    graph, targets = prepare(batch, ctx)
    layout = ctx.layout
    out = layout.select(ctx.engine(graph, force_heads=ctx.force_heads(targets), create_graph=True))
    loss, metrics = multifidelity_loss(out, targets, ctx.loss, ctx.fidelity_names, lazy=True)
    if ctx.guard is not None and ctx.guard.check(loss, metrics, batch):
        return metrics  # skipped on every rank alike: no backward, no optimiser step
    ctx.engine.backward(loss)
    ctx.engine.step()
    return metrics


class MultiFidelityMode:
    """Every step reads one batch from all training stores (and the mixed-in stores: replay or oversampling)."""

    name = "multifidelity"

    def engine_options(self, cfg: RunConfig) -> dict:
        return {}

    def stream(self, spec: StreamSpec, cfg: RunConfig) -> ResumableStream:
        if spec.mixed_in:
            return mixed_reader(spec.stores, spec.mixed_in, spec.reader, spec.mixed_fraction, spec.fidelities,
                                spec.rank, spec.world, spec.store_index)
        return ShardReader(spec.stores, spec.reader, rank=spec.rank, world_size=spec.world, fidelities=spec.fidelities)

    def extra(self, spec: StreamSpec, cfg: RunConfig) -> None:
        return None

    def step(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        return multifidelity_step(batch, ctx)

"""What the training loop consumes: a resumable stream of step inputs.

ShardReader (data_shards/reader.py), MixedReader (replay.py) and TaskStreams (reptile.py) all satisfy
`ResumableStream`; the checkpointer saves and restores any of them through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

from polyfid.data_shards.prefetch import prefetched


@runtime_checkable
class ResumableStream(Protocol):
    """An endless iterator of step inputs whose cursor can be saved on every rank and restored on any world size."""

    @property
    def epoch(self) -> int | None:
        """The current epoch (None for a stream of several readers each with its own, like Reptile's)."""
        ...

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor, JSON-serialisable."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state made by `gather_states`."""
        ...

    @staticmethod
    def gather_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's state in one, so that a resume on another world size re-plans the epoch."""
        ...


class TaskBatches(NamedTuple):
    """Reptile's step input: the task drawn for this outer step and its k inner batches."""

    task: int
    batches: list[dict]


@dataclasses.dataclass
class Prepared:
    """A batch made ready for the model: its graph and label tensors on the device, beside the batch itself."""

    batch: dict
    graph: Any  # models.graph.Graph
    targets: Any  # losses.Targets


def batches_of(item: dict | Prepared | TaskBatches) -> list[dict]:
    """The batches one step consumed (as read from the stores): one batch, or Reptile's inner batches."""
    items = item.batches if isinstance(item, TaskBatches) else [item]
    return [b.batch if isinstance(b, Prepared) else b for b in items]


class Collated:
    """A stream whose items are collated (graphs built, labels made tensors) on a background thread, `depth`
    items ahead of the training loop, so the loop's thread only runs the model.

    The cursor stays exact: each item carries the inner stream's state as it was right after the item was
    read, and `state_dict()` is that of the last item the loop took (not of the items read ahead).
    """

    def __init__(self, stream: ResumableStream, collate: Callable[[Any], Any], depth: int) -> None:
        self.stream, self.collate, self.depth = stream, collate, depth
        self._state: dict[str, Any] | None = None
        self._epoch = stream.epoch

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def __iter__(self) -> Iterator[Any]:
        def produce():
            for item in self.stream:
                yield self.collate(item), self.stream.state_dict(), self.stream.epoch

        for item, state, epoch in prefetched(produce(), self.depth):
            self._state, self._epoch = state, epoch
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self._state if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._state, self._epoch = None, self.stream.epoch

    def gather_states(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.stream.gather_states(states)


"""What the training loop consumes: a resumable stream of step inputs.

ShardReader (data_shards/reader.py), MixedReader (replay.py) and TaskStreams (reptile.py) all satisfy
`ResumableStream`; the checkpointer saves and restores any of them through it.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable


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


def batches_of(item: dict | TaskBatches) -> list[dict]:
    """The batches one step consumed: a multi-fidelity batch, or Reptile's inner batches."""
    return item.batches if isinstance(item, TaskBatches) else [item]


"""The registry of training modes. A mode's code stays in its module; the Trainer asks it for four things:
its engine options, its stream, its step's own state (StepContext.extra) and its step."""

from __future__ import annotations

from typing import Any, Protocol

from polyfid.distributed.config import ConfigError, RunConfig
from polyfid.distributed.modes.reptile import ReptileMode
from polyfid.distributed.modes.multifidelity import MultiFidelityMode, StepContext, StreamSpec
from polyfid.distributed.modes.stream import ResumableStream


class Mode(Protocol):
    name: str

    def engine_options(self, cfg: RunConfig) -> dict: ...

    def stream(self, spec: StreamSpec, cfg: RunConfig) -> ResumableStream: ...

    def extra(self, spec: StreamSpec, cfg: RunConfig) -> Any: ...

    def step(self, item: Any, ctx: StepContext) -> dict[str, float]: ...


MODES: dict[str, Mode] = {m.name: m for m in (MultiFidelityMode(), ReptileMode())}


def get_mode(name: str) -> Mode:
    """The mode called `name` (trainer.mode)."""
    if name not in MODES:
        raise ConfigError(f"trainer.mode={name!r} is not a training mode; available: {', '.join(MODES)}")
    return MODES[name]

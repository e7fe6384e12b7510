"""An exponential moving average of the trainable weights, the average that MACE and nequip validate and ship.

Every rank keeps the same average without communication: after a data-parallel step the replicas' weights
are equal, so their averages are too. Checkpoints carry it, so a resume continues it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class EMA:
    """`update(module)` after each optimiser step; `with ema.applied(module):` swaps the average in and back out."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.reset(module)

    def reset(self, module: torch.nn.Module) -> None:
        """Start the average afresh from the module's current weights."""
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self._params(module)]

    def _params(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Move the average towards the weights; the decay ramps up over the first steps ((1+n)/(10+n))."""
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        current = [p.detach().float() for p in self._params(module)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module with the averaged weights inside the block, its own weights again after it."""
        params = self._params(module)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "names": self.names,
                "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("the checkpoint's EMA holds other parameters than this model")
        self.updates = int(state["updates"])
        self.shadow = [s.to(device=t.device, dtype=t.dtype) for s, t in zip(state["shadow"], self.shadow)]

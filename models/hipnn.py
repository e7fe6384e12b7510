"""The HIP-NN backbone: species embedding, atom layers and interaction blocks; no energy heads."""

from __future__ import annotations

import torch

from polyfid.models.config import ModelConfig
from polyfid.models.interaction import Interaction, Pairs
from polyfid.models.invariants import TensorAlgebra

_ACTIVATIONS = {
    "silu": torch.nn.SiLU,
    "softplus": torch.nn.Softplus,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "celu": torch.nn.CELU,
}
_INVARIANTS = {"hipnn": "scalar", "hipnn_ts": "norms", "hiphop": "hop"}


class AtomLayer(torch.nn.Module):
    """A residual atom-wise layer: h + act(W h + b)."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Residual update of atom features [A, width]."""
        return h + self.act(self.linear(h))


class Block(torch.nn.Module):
    """One interaction, its activation, then residual atom layers."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.interaction = Interaction(
            c.width, c.width, c.n_sensitivities, c.soft_min, c.soft_max, c.cutoff,
            invariants=_INVARIANTS[c.kind], l_max=c.l_max, n_max=c.n_max,
        )
        self.act = _ACTIVATIONS[c.activation]()
        self.atom_layers = torch.nn.ModuleList(AtomLayer(c.width, c.activation) for _ in range(c.n_atom_layers))

    def forward(self, h: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Features of the next layer [A, width]."""
        h = self.act(self.interaction(h, pairs))
        for layer in self.atom_layers:
            h = layer(h)
        return h


class Backbone(torch.nn.Module):
    """Shared by all fidelities: returns the features of layer 0 and of every interaction block."""

    def __init__(self, config: ModelConfig, n_elements: int) -> None:
        super().__init__()
        self.config = config
        self.l_max = 0 if config.kind == "hipnn" else config.l_max
        self.embed = torch.nn.Linear(n_elements, config.width)
        self.embed_act = _ACTIVATIONS[config.activation]()
        self.atom_layers = torch.nn.ModuleList(
            AtomLayer(config.width, config.activation) for _ in range(config.n_atom_layers - 1)
        )
        self.blocks = torch.nn.ModuleList(Block(config) for _ in range(config.n_interactions))
        self.algebra = TensorAlgebra()

    def pairs(self, r_vec: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor) -> Pairs:
        """Distances and direction tensors of the pairs from their displacement vectors [P, 3]."""
        r = torch.linalg.vector_norm(r_vec, dim=1)
        tensors = self.algebra.direction_tensors(r_vec / r.unsqueeze(1), self.l_max)
        return Pairs(i=pair_i, j=pair_j, r=r, tensors=tensors)

    def forward(self, onehot: torch.Tensor, pairs: Pairs) -> list[torch.Tensor]:
        """Features [A, width] of layer 0 and of each interaction block, for the hierarchical readout."""
        h = self.embed_act(self.embed(onehot))
        for layer in self.atom_layers:
            h = layer(h)
        features = [h]
        for block in self.blocks:
            h = block(h, pairs)
            features.append(h)
        return features

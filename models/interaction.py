"""One HIP-NN interaction layer: environment sums over neighbours, a learned mix, invariants, a self term."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from polyfid.models.invariants import TensorAlgebra, invariant_names, n_components
from polyfid.models.pair_ops import gather_contract, scatter_outer
from polyfid.models.sensitivity import InverseSensitivity


class Pairs(NamedTuple):
    """Geometry of the directed neighbour pairs shared by every interaction layer (a NamedTuple: TorchScript compiles it)."""

    i: torch.Tensor  # int64 [P], the atom that receives the sum
    j: torch.Tensor  # int64 [P], the neighbour
    r: torch.Tensor  # [P] distances, Å
    tensors: torch.Tensor  # [P, C] compact direction tensors up to the model's l_max


class Interaction(torch.nn.Module):
    """Environment sums Σ_j s_ν(r_ij) T_c(r̂_ij) z_j, mixed over (ν, feature), made invariant, plus W·z + b.

    invariants: "scalar" (HIP-NN, l=0 only), "norms" (HIP-NN-TS) or "hop" (HIP-HOP-NN). The mixing
    weights are shared by all tensor components. "norms" and "hop" pass the invariants through a
    GroupNorm with one group per invariant and mix them with a full weight tensor.
    """

    def __init__(
        self,
        width_in: int,
        width_out: int,
        n_sensitivities: int,
        soft_min: float,
        soft_max: float,
        cutoff: float,
        invariants: str = "scalar",
        l_max: int = 0,
        n_max: int = 1,
    ) -> None:
        super().__init__()
        if invariants not in ("scalar", "norms", "hop"):
            raise ValueError(f"invariants={invariants!r}; allowed values: scalar, norms, hop")
        self.invariants = invariants
        self.l_max = 0 if invariants == "scalar" else l_max
        self.n_max = n_max
        self.width_out = width_out
        self.n_components = n_components(self.l_max)
        self.algebra = TensorAlgebra()
        self.sensitivity = InverseSensitivity(n_sensitivities, soft_min, soft_max, cutoff)
        # Mixing weights over (ν, input feature) → output feature, as one [ν, in, out] tensor.
        std = math.sqrt(2.0 / (n_sensitivities * width_in + width_out))
        self.weight = torch.nn.Parameter(torch.randn(n_sensitivities, width_in, width_out) * std)
        self.self_term = torch.nn.Linear(width_in, width_out)
        self.names = ["s"]
        if invariants == "norms":
            self.names = ["s"] + [f"|t{l}|" for l in range(1, self.l_max + 1)]
        elif invariants == "hop":
            self.names = invariant_names(n_max, self.l_max)
        n_inv = len(self.names)
        if invariants == "scalar":
            self.group_norm = None
            self.mix = None
        else:
            self.group_norm = torch.nn.GroupNorm(n_inv, n_inv * width_out)
            std = math.sqrt(2.0 / (n_inv * width_out + width_out))
            self.mix = torch.nn.Parameter(torch.randn(n_inv * width_out, width_out) * std)

    def environment(self, h: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Mixed environment sums [C, A, width_out]: Σ_p T_c(p) Σ_ν s_ν(r_p) Σ_f W[ν, f, o] h[j_p, f]."""
        n_atoms, width_in = h.shape
        n_sens = self.weight.shape[0]
        c = self.n_components
        # Mixing first and summing after is the same linear map, with a [P, ν, out] intermediate
        # instead of [P, C·ν, in].
        w = self.weight.permute(1, 0, 2).reshape(width_in, n_sens * self.width_out)
        y = (h @ w).view(n_atoms, n_sens, self.width_out)
        s = self.sensitivity(pairs.r)
        u = gather_contract(s, y, pairs.j)  # [P, out], chunked: no [P, ν, out] tensor is kept
        if c == 1:
            env = torch.zeros(n_atoms, self.width_out, dtype=u.dtype, device=u.device)
            return env.index_add(0, pairs.i, u).unsqueeze(0)
        # Σ_p T_c(p) u[p] into atom i_p, without a [C, P, out] message tensor.
        return scatter_outer(pairs.tensors[:, :c], u, pairs.i, n_atoms).transpose(0, 1)

    def forward(self, h: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """New features [A, width_out] (before the activation) from features h [A, width_in]."""
        env = self.environment(h, pairs)
        n_atoms = h.shape[0]
        if self.group_norm is None or self.mix is None:  # "scalar"
            out = env[0]
        else:
            flat = env.reshape(env.shape[0], -1)
            if self.invariants == "norms":
                inv = self.algebra.norms(flat, self.l_max)
            else:
                inv = self.algebra.hop(flat, self.names, self.l_max)
            # [n_inv, A, out] → [A, n_inv·out]: channels grouped by invariant, so GroupNorm
            # normalises each invariant over the features of one atom.
            inv = inv.view(-1, n_atoms, self.width_out).transpose(0, 1).reshape(n_atoms, -1)
            out = self.group_norm(inv) @ self.mix
        return out + self.self_term(h)

    def extra_repr(self) -> str:
        return f"invariants={self.invariants}, names={self.names}"

"""Distance sensitivities: an inverse-distance Gaussian basis times a cos² cutoff (S2, hippynn semantics)."""

from __future__ import annotations

import math

import torch


def cos_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """cos²(πr / 2r_c) inside the cutoff and 0 beyond; value and slope vanish at r_c."""
    envelope = torch.cos((0.5 * math.pi / cutoff) * r) ** 2
    return torch.where(r < cutoff, envelope, torch.zeros_like(envelope))


class InverseSensitivity(torch.nn.Module):
    """s_ν(r) = exp(−(1/r − 1/μ_ν)² σ_ν² / 2) · cos²(πr / 2r_c), with learnable μ and σ."""

    def __init__(self, n: int, soft_min: float, soft_max: float, cutoff: float) -> None:
        super().__init__()
        inverse = torch.linspace(1.0 / soft_max, 1.0 / soft_min, n, dtype=torch.float64)
        self.mu = torch.nn.Parameter((1.0 / inverse).to(torch.get_default_dtype()))
        # Width in 1/r: σ = 2·n·soft_min, so neighbouring centres overlap at initialisation.
        self.sigma = torch.nn.Parameter(torch.full((n,), 2.0 * n * soft_min))
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """Sensitivities of pair distances r [P] → [P, n]."""
        x = (r.unsqueeze(1).reciprocal() - self.mu.reciprocal()) * self.sigma
        return torch.exp(-0.5 * x * x) * cos_cutoff(r, self.cutoff).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"n={self.mu.numel()}, cutoff={self.cutoff}"

"""The masked multi-fidelity loss, normalised over the global batch.

For every fidelity k there is an energy term and, where labels exist, a force term. Each term is a mean
over all labels in the *global* batch (all ranks), not a mean of per-rank means: the sums of errors and
the label counts are all-reduced in one call. The value each rank backpropagates is a surrogate whose
gradients, summed over ranks, equal the gradient of the global loss; DeepSpeed averages gradients over
ranks, so the surrogate is multiplied by the world size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Sequence

import torch
import torch.distributed as dist

from polyfid.distributed.config import LossConfig

EPS = 1e-12


@dataclasses.dataclass
class Targets:
    """Labels of one batch as tensors, NaN replaced by 0 and a mask beside them."""

    energy: torch.Tensor  # [S, F]
    energy_mask: torch.Tensor  # [S, F] float 0/1
    forces: torch.Tensor  # [A, F, 3]
    forces_mask: torch.Tensor  # [A, F] float 0/1
    n_atoms: torch.Tensor  # [S] float
    with_forces: tuple[int, ...] | None = None  # fidelities with a force label, found on the host (no device sync)

    @classmethod
    def from_batch(cls, batch: dict, dtype: torch.dtype, device: torch.device | str) -> "Targets":
        e = torch.as_tensor(batch["energy"], dtype=torch.float64)
        f = torch.as_tensor(batch["forces"], dtype=torch.float64)
        fmask = ~torch.isnan(f).any(dim=-1)
        return cls(
            energy=torch.nan_to_num(e, nan=0.0).to(device=device, dtype=dtype),
            energy_mask=(~torch.isnan(e)).to(device=device, dtype=dtype),
            forces=torch.nan_to_num(f, nan=0.0).to(device=device, dtype=dtype),
            forces_mask=fmask.to(device=device, dtype=dtype),
            n_atoms=torch.as_tensor(batch["n_atoms"]).to(device=device, dtype=dtype),
            with_forces=tuple(int(k) for k in torch.nonzero(fmask.any(0)).flatten()),
        )

    def force_heads(self, prior: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Fidelities that have at least one force label in this (local) batch, and the `high` of each force-prior
        pair (high, low) whose `low` has one."""
        if self.with_forces is not None:
            have = list(self.with_forces)
        else:
            have = [int(k) for k in torch.nonzero(self.forces_mask.sum(0) > 0).flatten()]
        return sorted(set(have) | {high for high, low in prior if low in have})


def _world() -> tuple[bool, int]:
    on = dist.is_available() and dist.is_initialized()
    return on, dist.get_world_size() if on else 1


def error_sums(pred: dict[str, torch.Tensor], t: Targets, per_atom_energy: bool) -> torch.Tensor:
    """Per-fidelity [F, 2, 3] sums: (energy, forces) x (squared error, absolute error, count). Graph kept."""
    de = pred["energy"] - t.energy
    if per_atom_energy:
        de = de / t.n_atoms[:, None]
    de = de * t.energy_mask
    rows = [torch.stack([(de**2).sum(0), de.abs().sum(0), t.energy_mask.sum(0)], dim=-1)]
    if "forces" in pred:
        df = (pred["forces"] - t.forces) * t.forces_mask[..., None]  # [A, F, 3]
        count = t.forces_mask.sum(0) * 3.0
        rows.append(torch.stack([(df**2).sum((0, 2)), df.abs().sum((0, 2)), count], dim=-1))
    else:
        rows.append(torch.zeros_like(rows[0]))
    return torch.stack(rows, dim=1)


def prior_pairs(cfg: LossConfig, fidelity_names: Sequence[str]) -> list[tuple[int, int]]:
    """loss.force_prior as (high, low) label columns; pairs whose levels are not both columns are left out."""
    if isinstance(cfg.force_prior, str):
        raise ValueError(f"loss.force_prior={cfg.force_prior} is resolved on the driver (launcher.prepare), "
                         "not in the loss")
    col = {name: k for k, name in enumerate(fidelity_names)}
    return [(col[h], col[lo]) for h, lo in cfg.force_prior.items() if h in col and lo in col]


def prior_sums(pred: dict[str, torch.Tensor], t: Targets, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per fidelity [F, 3]: (squared error, absolute error, count) of head `high`'s forces against `low`'s force
    labels on the atoms that have `low` forces and no `high` forces, in the row of each pair's `high`; zeros in
    the other rows."""
    rows = [pred["forces"].new_zeros(3)] * t.forces_mask.shape[1]
    for high, low in pairs:
        mask = t.forces_mask[:, low] * (1.0 - t.forces_mask[:, high])
        df = (pred["forces"][:, high] - t.forces[:, low]) * mask[:, None]
        rows[high] = torch.stack([(df**2).sum(), df.abs().sum(), mask.sum() * 3.0])
    return torch.stack(rows)


def multifidelity_loss(
    pred: dict[str, torch.Tensor],
    targets: Targets,
    cfg: LossConfig,
    fidelity_names: Sequence[str],
    reduce: bool = True,
    lazy: bool = False,
) -> tuple[torch.Tensor, Mapping[str, float]]:
    """Return (surrogate to backpropagate, metrics of the global batch): a dict of floats, or with `lazy` a
    StepMetrics that stays on the device until read (what the training loop uses). With loss.force_prior, each
    pair's term (weighted by loss.force_prior_weight) counts in the loss of its `high` fidelity."""
    local = error_sums(pred, targets, cfg.per_atom_energy)  # [F, 2, 3]
    pairs = prior_pairs(cfg, fidelity_names) if "forces" in pred else []
    if pairs:  # the prior's sums ride in the same all-reduce as a third term: [F, 3, 3]
        local = torch.cat([local, prior_sums(pred, targets, pairs).to(local.dtype)[:, None]], dim=1)
    glob = local.detach().clone()
    on, world = _world()
    if reduce and on:
        dist.all_reduce(glob)  # one all-reduce per step for all fidelities and terms
    else:
        world = 1
    sse_l, sae_l = local[..., 0], local[..., 1]
    sse_g, sae_g, n_g = glob[..., 0], glob[..., 1], glob[..., 2]
    n = n_g.clamp(min=1.0)
    has = (n_g > 0).to(local.dtype)
    rmse_g = torch.sqrt(sse_g / n + EPS)
    # Surrogates: d/dθ sqrt(SSE/N) = dSSE / (2 N sqrt(SSE/N)); the global SSE is a constant here.
    if cfg.kind == "rmse+mae":
        term = sse_l / (2.0 * n * rmse_g) + sae_l / n
        value = rmse_g + sae_g / n
    elif cfg.kind == "mse":
        term, value = sse_l / n, sse_g / n
    else:
        term, value = sae_l / n, sae_g / n
    w = [cfg.energy_weight, cfg.forces_weight] + ([cfg.force_prior_weight] if pairs else [])
    w = torch.tensor(w, dtype=local.dtype, device=local.device)
    fw = torch.tensor(
        [cfg.fidelity_weights.get(name, 1.0) for name in fidelity_names], dtype=local.dtype, device=local.device
    )
    weights = fw[:, None] * w[None, :] * has
    surrogate = (term * weights).sum() * world
    per_fid = (value * weights).sum(dim=1)
    metrics = StepMetrics(per_fid, sse_g, sae_g, n_g, fidelity_names)
    return surrogate, metrics if lazy else dict(metrics)


class StepMetrics(Mapping[str, float]):
    """A step's metrics, kept on the device until read: the first read copies them to the host in one transfer,
    so a loop that reads them once per log window syncs with the GPU once per window, not per fidelity per step.

    Keys: `loss`, and for each fidelity `loss/<k>` and, where the global batch has such labels,
    `energy_rmse/<k>`, `energy_mae/<k>`, `forces_rmse/<k>`, `forces_mae/<k>`; with loss.force_prior also
    `prior_forces_rmse/<k>` and `prior_forces_mae/<k>` (head k against the lender's force labels).
    """

    TERMS = ("energy", "forces", "prior_forces")

    def __init__(self, per_fid: torch.Tensor, sse: torch.Tensor, sae: torch.Tensor, n: torch.Tensor,
                 fidelity_names: Sequence[str]) -> None:
        self._device = torch.cat([per_fid.detach().flatten(), sse.detach().flatten(), sae.detach().flatten(),
                                  n.detach().flatten()])
        self._names, self._rows, self._terms = list(fidelity_names), per_fid.numel(), sse.shape[-1]
        self._host: dict[str, float] | None = None

    def _values(self) -> dict[str, float]:
        if self._host is None:
            f, t = self._rows, self._terms
            per_fid, sse, sae, n = self._device.cpu().split([f, t * f, t * f, t * f])
            sse, sae, n = sse.view(f, t), sae.view(f, t), n.view(f, t)
            out = {"loss": float(per_fid.sum())}
            for k, name in enumerate(self._names):
                out[f"loss/{name}"] = float(per_fid[k])
                for j, what in enumerate(self.TERMS[:t]):
                    if n[k, j] > 0:
                        out[f"{what}_rmse/{name}"] = float(torch.sqrt(sse[k, j] / n[k, j]))
                        out[f"{what}_mae/{name}"] = float(sae[k, j] / n[k, j])
            self._host, self._device = out, None
        return self._host

    def total(self) -> torch.Tensor:
        """The global loss as a tensor, without reading it to the host (the step guard reads it with another)."""
        if self._device is not None:
            return self._device[: self._rows].sum()
        return torch.tensor(self._host["loss"])

    def __getitem__(self, key: str) -> float:
        return self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

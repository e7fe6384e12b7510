"""Energy and force MAE/RMSE per fidelity: running sums across ranks, a table, JSON and metric names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from polyfid.models.graph import build_graph
from polyfid.models.layout import MISSING, LabelLayout


class ErrorStats:
    """Running sums of energy and force errors per fidelity; all-reducible across ranks."""

    # columns: e_abs, e_sq, e_abs_per_atom, e_n, f_abs, f_sq, f_n
    def __init__(self, fidelities: Sequence[str], keep_points: bool = False) -> None:
        self.fidelities = list(fidelities)
        self.sums = torch.zeros(len(self.fidelities), 7, dtype=torch.float64)
        self.keep_points = keep_points
        self.points: dict[str, dict[str, list[np.ndarray]]] = {
            f: {"e_ref": [], "e_pred": [], "f_ref": [], "f_pred": [], "n_atoms": []} for f in self.fidelities
        }

    def add(self, energy: np.ndarray, forces: np.ndarray | None, batch: dict, columns: Sequence[int]) -> None:
        """energy [S, F_model], forces [A, F_model, 3]; batch labels [S, F_data]; columns maps data->model."""
        n_atoms = batch["n_atoms"].astype(np.float64)
        for k, col in enumerate(columns):
            if col == MISSING:
                continue
            e_ref = batch["energy"][:, k]
            ok = ~np.isnan(e_ref)
            de = energy[ok, col] - e_ref[ok]
            self.sums[k, 0] += float(np.abs(de).sum())
            self.sums[k, 1] += float((de**2).sum())
            self.sums[k, 2] += float((np.abs(de) / n_atoms[ok]).sum())
            self.sums[k, 3] += float(ok.sum())
            name = self.fidelities[k]
            if self.keep_points and ok.any():
                self.points[name]["e_ref"].append(e_ref[ok] / n_atoms[ok])
                self.points[name]["e_pred"].append(energy[ok, col] / n_atoms[ok])
            if forces is None:
                continue
            f_ref = batch["forces"][:, k, :]
            okf = ~np.isnan(f_ref).any(axis=1)
            df = forces[okf, col, :] - f_ref[okf]
            self.sums[k, 4] += float(np.abs(df).sum())
            self.sums[k, 5] += float((df**2).sum())
            self.sums[k, 6] += float(okf.sum() * 3)
            if self.keep_points and okf.any():
                self.points[name]["f_ref"].append(f_ref[okf].ravel())
                self.points[name]["f_pred"].append(forces[okf, col, :].ravel())

    def all_reduce(self) -> None:
        from polyfid.infra.comm import all_reduce_host

        all_reduce_host(self.sums)

    def results(self) -> dict[str, dict[str, float]]:
        """fidelity -> energy_mae, energy_rmse, energy_mae_per_atom, forces_mae, forces_rmse, n_structures."""
        out: dict[str, dict[str, float]] = {}
        for k, name in enumerate(self.fidelities):
            s = self.sums[k].tolist()
            if s[3] == 0 and s[6] == 0:
                continue
            r: dict[str, float] = {"n_structures": int(s[3])}
            if s[3] > 0:
                r.update(energy_mae=s[0] / s[3], energy_rmse=(s[1] / s[3]) ** 0.5, energy_mae_per_atom=s[2] / s[3])
            if s[6] > 0:
                r.update(forces_mae=s[4] / s[6], forces_rmse=(s[5] / s[6]) ** 0.5)
            out[name] = r
        return out


def predict(model, batch: dict, cutoff: float, dtype: torch.dtype | None, device, forces: bool = True):
    """Model energies [S, F] and forces [A, F, 3] (float64 numpy) for one batch; dtype None: the model's."""
    graph = build_graph(batch, cutoff, dtype=dtype or model.dtype, device=device)
    heads = list(range(len(model.fidelity_names))) if forces else None
    with torch.set_grad_enabled(forces):
        out = model(graph, force_heads=heads, create_graph=False)
    e = out["energy"].detach().double().cpu().numpy()
    f = out["forces"].detach().double().cpu().numpy() if forces else None
    return e, f


def evaluate_batches(
    model,
    batches: Iterable[dict],
    data_fidelities: Sequence[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keep_points: bool = False,
    progress=None,
) -> ErrorStats:
    """Accumulate errors of `model` on batches whose label columns are `data_fidelities`."""
    columns = list(LabelLayout.of(model.fidelity_names, data_fidelities, allow_missing=True).heads)
    stats = ErrorStats(data_fidelities, keep_points=keep_points)
    was_training = model.training
    model.eval()
    for batch in batches:
        want_forces = bool(np.isfinite(batch["forces"]).any())
        e, f = predict(model, batch, model.config.cutoff, dtype, device, forces=want_forces)
        stats.add(e, f, batch, columns)
        if progress is not None:
            progress.update(len(batch["n_atoms"]))
    model.train(was_training)
    return stats


def evaluate_stores(model, stores: Sequence, fidelities: Sequence[str], keep_points: bool = False,
                    progress=None) -> ErrorStats:
    """Errors of `model` on every structure of the opened stores, label columns `fidelities`."""
    from polyfid.data_shards.reader import iter_all

    return evaluate_batches(model, iter_all(stores, fidelities=fidelities), fidelities, keep_points=keep_points,
                            progress=progress)


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table of errors per fidelity (meV and meV/Å)."""
    head = f"{'fidelity':<16}{'n':>6}{'E MAE':>10}{'E RMSE':>10}{'E MAE/atom':>12}{'F MAE':>10}{'F RMSE':>10}"
    unit = f"{'':<16}{'':>6}{'meV':>10}{'meV':>10}{'meV/atom':>12}{'meV/Å':>10}{'meV/Å':>10}"
    lines = ([title] if title else []) + [head, unit, "-" * len(head)]
    for name, r in results.items():
        def g(k: str, width: int) -> str:
            return f"{r[k] * 1000:>{width}.1f}" if k in r else f"{'-':>{width}}"

        lines.append(
            f"{name:<16}{r['n_structures']:>6}{g('energy_mae', 10)}{g('energy_rmse', 10)}"
            f"{g('energy_mae_per_atom', 12)}{g('forces_mae', 10)}{g('forces_rmse', 10)}"
        )
    return "\n".join(lines)


def write_json(results: dict, path: str | os.PathLike) -> Path:
    """Write results as indented JSON, creating the folder; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(results, indent=2))
    return p


def store_fidelities(stores: Sequence, only: str | None = None) -> list[str]:
    """Label columns to evaluate: one store's fidelities in its order, several stores' sorted union, or `only`."""
    fids = [f.name for f in stores[0].fidelities] if len(stores) == 1 else sorted(
        {f.name for s in stores for f in s.fidelities})
    if only is not None:
        if only not in fids:
            raise ValueError(f"fidelity {only} is not in the data (it has {', '.join(fids)})")
        fids = [only]
    return fids


def flatten(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """{fid: {metric: v}} -> {prefix/metric/fid: v}, n_structures left out (the layout of valid/... metrics)."""
    return {f"{prefix}/{k}/{fid}": v for fid, r in results.items() for k, v in r.items() if k != "n_structures"}

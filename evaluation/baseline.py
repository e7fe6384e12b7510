"""The linear baseline (S4): ridge regression on the network's invariant features, summed per element.

Features. For atom i and each channel (radial function ν, neighbour element e), the environment sums
    M_c[i, ν, e] = Σ_{j in N(i), Z_j = e} s_ν(r_ij) T_c(r̂_ij),   T_c: Cartesian direction tensors, l <= l_max,
are made rotation-invariant with the S2 invariant set, channel by channel. All of it is the network's own
code: `InverseSensitivity` (models/sensitivity.py) supplies the radial basis, `direction_tensors` and
`hop_invariants` (models/invariants.py) the tensors and invariants, and `scatter_outer`
(models/pair_ops.py) sums over pairs. The radial basis is `InverseSensitivity` at its initial values,
and that initialisation draws no random numbers: centres are evenly spaced in 1/r between soft_min and
soft_max, with one shared width. So the basis is fixed, untrained and the same in every run.

Model. E = Σ_e [ w_e · Σ_{i: Z_i = e} φ_i + a_e n_e ]: for each element, its own weights on the sum of
its atoms' feature vectors (a linear ACE/SOAP-sum baseline), plus a count term per element (the
reference energies).

Fit. Each fidelity gets one ridge regression on energies. The count columns are not penalised: they are
projected out first (Frisch–Waugh–Lovell). The other columns are standardised one block at a time, a
block being one (central element, invariant) pair, so that a nearly empty radial channel is not blown
up to unit variance. The ridge strength minimises a seeded 5-fold cross-validation error over a fixed
grid, so the fit is deterministic. Forces are −∂E/∂R, by autograd through the features.

Memory. The fit holds the summed features of every training structure: S × E·D float64 numbers
(240 × 1664, 3 MB, on the demo data; 100,000 structures of 4 elements would take 1.3 GB).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.store import Store
from polyfid.evaluation.metrics import ErrorStats, evaluate_batches
from polyfid.models.graph import Graph, build_graph
from polyfid.models.invariants import direction_tensors, hop_invariants, invariant_names, n_components
from polyfid.models.pair_ops import scatter_outer
from polyfid.models.sensitivity import InverseSensitivity

LINEAR, REFS, NETWORK = "linear baseline", "element refs only", "network"
_PER_ATOM = ("atomic_numbers", "positions", "forces")


@dataclasses.dataclass
class BaselineConfig:
    """The fixed features, the ridge search and the split of the linear baseline."""

    n_radial: int = 8
    """Radial functions: InverseSensitivity centres evenly spaced in 1/r, at their initial values."""
    cutoff: float = 5.0
    """Neighbour cutoff in Å (the cos² envelope reaches zero here)."""
    soft_min: float = 0.75
    """Innermost radial centre, Å."""
    soft_max: float = 4.5
    """Outermost radial centre, Å."""
    l_max: int = 3
    """Highest rank of the direction tensors."""
    n_max: int = 4
    """Invariants of products of up to n_max tensors: the S2 set (13 for n_max=4, l_max=3)."""
    ridge_grid: tuple[float, float, int] = (-12.0, 0.0, 49)
    """log10 of the ridge strength relative to the largest squared singular value: (low, high, points)."""
    test_fraction: float = 0.2
    """Without a test store: the share of structures held out, drawn by a seeded permutation."""
    seed: int = 0
    """Seeds that permutation and the cross-validation folds."""


class InvariantFeatures(torch.nn.Module):
    """Per-atom invariant features [A, n_invariants · n_radial · n_elements] from a fixed radial basis."""

    def __init__(self, elements: Sequence[int], config: BaselineConfig) -> None:
        super().__init__()
        self.elements = sorted({int(z) for z in elements})
        self.config = config
        self.names = invariant_names(config.n_max, config.l_max)
        radial = InverseSensitivity(config.n_radial, config.soft_min, config.soft_max, config.cutoff)
        self.radial = radial.double().requires_grad_(False)
        lookup = torch.full((self.elements[-1] + 1,), -1, dtype=torch.int64)
        lookup[self.elements] = torch.arange(len(self.elements))
        self.register_buffer("lookup", lookup, persistent=False)

    @property
    def n_per_atom(self) -> int:
        """Length of one atom's feature vector."""
        return len(self.names) * self.config.n_radial * len(self.elements)

    def column_groups(self) -> np.ndarray:
        """For each column of the per-element sums [E · D], its (central element, invariant) block."""
        return np.arange(len(self.elements) * self.n_per_atom) // (self.config.n_radial * len(self.elements))

    def species(self, z: torch.Tensor) -> torch.Tensor:
        """Index of each atom's element; an element outside the fitted ones raises, naming it."""
        known = (z >= 0) & (z < self.lookup.numel())
        idx = torch.where(known, self.lookup[z.clamp(0, self.lookup.numel() - 1)], -1)
        if bool((idx < 0).any()):
            bad = sorted({int(x) for x in z[idx < 0].tolist()})
            raise ValueError(f"atomic number(s) {bad} are not among the baseline's elements {self.elements}")
        return idx

    def forward(self, graph: Graph, pos: torch.Tensor) -> torch.Tensor:
        """Features [A, D] of every atom; differentiable with respect to pos [A, 3]."""
        n_atoms, n_el = graph.n_atoms, len(self.elements)
        r_vec = pos.index_select(0, graph.pair_j) - pos.index_select(0, graph.pair_i) + graph.pair_shift
        r = torch.linalg.vector_norm(r_vec, dim=1)
        tensors = direction_tensors(r_vec / r.unsqueeze(1), self.config.l_max)  # [P, C]
        onehot = torch.nn.functional.one_hot(self.species(graph.z), n_el).to(pos.dtype)
        radial = self.radial(r)  # [P, ν]
        channels = (radial.unsqueeze(2) * onehot.index_select(0, graph.pair_j).unsqueeze(1)).reshape(len(r), -1)
        env = scatter_outer(tensors, channels, graph.pair_i, n_atoms)  # [A, C, ν·E]
        c = n_components(self.config.l_max)
        inv = hop_invariants(env.transpose(0, 1).reshape(c, -1), self.names, self.config.l_max)
        return inv.view(len(self.names), n_atoms, -1).transpose(0, 1).reshape(n_atoms, -1)


def per_element_sums(values: torch.Tensor, species: torch.Tensor, batch: torch.Tensor, n_structures: int,
                     n_elements: int) -> torch.Tensor:
    """Σ over each structure's atoms of each element: values [A, D] → [S, n_elements · D]."""
    out = values.new_zeros(n_structures * n_elements, values.shape[1])
    return out.index_add(0, batch * n_elements + species, values).view(n_structures, -1)


@dataclasses.dataclass
class RidgeFit:
    """One fidelity's linear model: E = X · weights + counts · references."""

    weights: np.ndarray
    """[n_elements · D] on the raw (unscaled) summed features."""
    references: np.ndarray
    """[n_elements] eV per atom of each element."""
    ridge: float
    """The chosen strength, relative to the largest squared singular value (0: no features)."""
    cv_rmse: float
    """K-fold cross-validated RMSE of the energy at that strength, eV (NaN: no features)."""
    n_train: int
    train_rmse: float

    def predict(self, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Energies [S] of summed features x [S, D] and element counts [S, E]."""
        return x @ self.weights + counts @ self.references


def _ridge_path(x: np.ndarray, counts: np.ndarray, y: np.ndarray, ridges: np.ndarray,
                groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Weights [D, L] and references [E, L] for each relative ridge strength; counts unpenalised."""
    uc, sc, _ = np.linalg.svd(counts, full_matrices=False)
    basis = uc[:, sc > 1e-10 * sc.max()] if sc.size and sc.max() > 0 else uc[:, :0]
    xp = x - basis @ (basis.T @ x)  # Frisch–Waugh–Lovell: the counts' span projected out
    yp = y - basis @ (basis.T @ y)
    scale = np.sqrt((xp**2).mean(axis=0))
    if groups is not None:  # one scale per group, so that a near-empty column is not blown up
        for g in np.unique(groups):
            scale[groups == g] = np.sqrt((scale[groups == g] ** 2).mean())
    keep = scale > 1e-10 * max(float(scale.max(initial=0.0)), 1e-300)
    weights = np.zeros((x.shape[1], len(ridges)))
    if keep.any():
        u, d, vt = np.linalg.svd(xp[:, keep] / scale[keep], full_matrices=False)
        d2 = d[:, None] ** 2
        shrink = d[:, None] / (d2 + ridges[None, :] * d2.max())  # [r, L]
        weights[keep] = (vt.T @ (shrink * (u.T @ yp)[:, None])) / scale[keep, None]
    references = np.linalg.lstsq(counts, y[:, None] - x @ weights, rcond=None)[0]
    return weights, references


def fit_ridge(x: np.ndarray, counts: np.ndarray, y: np.ndarray, grid: tuple[float, float, int] = (-12.0, 0.0, 49),
              groups: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> RidgeFit:
    """Ridge on x [S, D] with unpenalised counts [S, E], strength by seeded K-fold CV; x with 0 columns: references only.

    GCV was tried first: with about as many features as structures its curve has a spurious minimum at
    vanishing ridge, and that model fails badly on held-out data. K-fold CV does not.
    """
    n = len(y)
    if not x.shape[1] or n < 2 * folds:  # no features, or too few structures to choose a strength
        references = np.linalg.lstsq(counts, y, rcond=None)[0]
        rmse = float(np.sqrt(np.mean((y - counts @ references) ** 2)))
        return RidgeFit(np.zeros(x.shape[1]), references, 0.0, float("nan"), n, rmse)
    ridges = 10.0 ** np.linspace(*grid)
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    sse = np.zeros(len(ridges))
    for k in range(folds):
        fit = fold != k
        w, a = _ridge_path(x[fit], counts[fit], y[fit], ridges, groups)
        sse += ((x[~fit] @ w + counts[~fit] @ a - y[~fit, None]) ** 2).sum(axis=0)
    best = len(ridges) - 1 - int(np.argmin(sse[::-1]))  # ties: the stronger ridge
    w, a = _ridge_path(x, counts, y, ridges[best : best + 1], groups)
    rmse = float(np.sqrt(np.mean((y - x @ w[:, 0] - counts @ a[:, 0]) ** 2)))
    return RidgeFit(w[:, 0], a[:, 0], float(ridges[best]), float(np.sqrt(sse[best] / n)), n, rmse)


class LinearBaseline:
    """Per-fidelity ridge fits over InvariantFeatures: energies and forces of reader batches."""

    def __init__(self, features: InvariantFeatures, fits: dict[str, RidgeFit]) -> None:
        self.features = features
        self.fits = fits
        self.fidelity_names = list(fits)
        n_el, d = len(features.elements), features.n_per_atom
        self._w = torch.tensor(np.stack([f.weights for f in fits.values()]), dtype=torch.float64).view(-1, n_el, d)
        self._a = torch.tensor(np.stack([f.references for f in fits.values()]), dtype=torch.float64)

    def predict(self, batch: dict, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies [S, F] and, if asked, forces [A, F, 3] = −∂E/∂R (float64 numpy)."""
        graph = build_graph(batch, self.features.config.cutoff, dtype=torch.float64)
        pos = graph.pos.requires_grad_(forces)
        with torch.set_grad_enabled(forces):
            phi = self.features(graph, pos)
            species = self.features.species(graph.z)
            e_atom = (self._w[:, species] * phi).sum(-1) + self._a[:, species]  # [F, A]
            energy = torch.zeros(graph.n_structures, len(self.fits), dtype=torch.float64)
            energy = energy.index_add(0, graph.batch, e_atom.T)
            f = None
            if forces:
                cols = [torch.autograd.grad(energy[:, k].sum(), pos, retain_graph=k < len(self.fits) - 1)[0]
                        for k in range(len(self.fits))]
                f = -torch.stack(cols, dim=1).numpy()
        return energy.detach().numpy(), f


def design(features: InvariantFeatures, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Summed features x [S, E·D], element counts [S, E], energies [S, F] and n_atoms [S] of all batches."""
    n_el = len(features.elements)
    parts: dict[str, list[np.ndarray]] = {"x": [], "counts": [], "energy": [], "n_atoms": []}
    for batch in batches:
        graph = build_graph(batch, features.config.cutoff, dtype=torch.float64)
        with torch.no_grad():
            phi = features(graph, graph.pos)
            species = features.species(graph.z)
            ones = torch.ones(graph.n_atoms, 1, dtype=torch.float64)
            parts["x"].append(per_element_sums(phi, species, graph.batch, graph.n_structures, n_el).numpy())
            parts["counts"].append(per_element_sums(ones, species, graph.batch, graph.n_structures, n_el).numpy())
        parts["energy"].append(batch["energy"])
        parts["n_atoms"].append(batch["n_atoms"])
    return {k: np.concatenate(v) for k, v in parts.items()}


def select(batch: dict, keep: np.ndarray) -> dict:
    """The structures of a reader batch where keep [S] is true."""
    atoms = np.repeat(keep, batch["n_atoms"])
    return {k: v[atoms] if k in _PER_ATOM else v[keep] for k, v in batch.items()}


def _fidelities(stores: Sequence[Store]) -> list[str]:
    """Fidelity names of the stores, lowest rank first (the reader's default order)."""
    known = {f.name: f for s in stores for f in reversed(s.fidelities)}
    return [f.name for f in sorted(known.values(), key=lambda f: (f.rank, f.name))]


def run_baseline(data: Sequence[Store], test: Sequence[Store] | None = None, fidelities: Sequence[str] | None = None,
                 config: BaselineConfig | None = None, model=None, forces: bool = True) -> dict:
    """Fit the baseline on `data`; errors on `test` (or a held-out split) beside the network's if given."""
    config = config or BaselineConfig()
    fids = list(fidelities or _fidelities(data))
    elements = sorted({z for s in data for z in s.elements})
    features = InvariantFeatures(elements, config)
    d = design(features, iter_all(data, fidelities=fids))
    n = len(d["n_atoms"])
    held_out = np.zeros(n, dtype=bool)
    if test:
        unseen = sorted({z for s in test for z in s.elements} - set(elements))
        if unseen:
            raise ValueError(f"the test data hold element(s) {unseen} that the training data lack")
        test_fids = [f for f in fids if f in _fidelities(test)]
        split = f"trained on {', '.join(s.path for s in data)}; tested on {', '.join(s.path for s in test)}"
    else:
        n_test = int(round(config.test_fraction * n))
        held_out[np.random.default_rng(config.seed).permutation(n)[:n_test]] = True
        test_fids = fids
        pct = int(round(100 * config.test_fraction))
        split = (f"no --test store: a seeded {100 - pct}/{pct} split (seed {config.seed}) of "
                 f"{', '.join(s.path for s in data)}: {n - n_test} structures to fit, {n_test} held out")
    if not test_fids:
        raise ValueError(f"the test data share no fidelity with {fids}")
    fits, refs, report_fits = {}, {}, {}
    for k, fid in enumerate(fids):
        rows = ~held_out & np.isfinite(d["energy"][:, k])
        if rows.sum() < 2:
            continue
        x, counts, y = d["x"][rows], d["counts"][rows], d["energy"][rows, k]
        fits[fid] = fit_ridge(x, counts, y, config.ridge_grid, groups=features.column_groups(), seed=config.seed)
        refs[fid] = fit_ridge(x[:, :0], counts, y)
        f = fits[fid]
        report_fits[fid] = {"n_train": f.n_train, "ridge": f.ridge, "cv_rmse": f.cv_rmse,
                            "train_rmse": f.train_rmse, "refs_only_train_rmse": refs[fid].train_rmse}
    if not fits:
        raise ValueError(f"no fidelity of {fids} has two or more labelled energies to fit")

    def test_batches() -> Iterator[dict]:
        if test:
            yield from iter_all(test, fidelities=test_fids)
            return
        start = 0
        for batch in iter_all(data, fidelities=fids):
            keep = held_out[start : start + len(batch["n_atoms"])]
            start += len(keep)
            if keep.any():
                yield select(batch, keep)

    linear = LinearBaseline(features, fits)
    reference = LinearBaseline(features, {f: dataclasses.replace(r, weights=np.zeros_like(fits[f].weights))
                                          for f, r in refs.items()})
    columns = [linear.fidelity_names.index(f) if f in fits else -1 for f in test_fids]
    stats = {LINEAR: ErrorStats(test_fids), REFS: ErrorStats(test_fids)}
    for batch in test_batches():
        want = forces and bool(np.isfinite(batch["forces"]).any())
        stats[LINEAR].add(*linear.predict(batch, forces=want), batch, columns)
        zero = np.zeros((len(batch["atomic_numbers"]), len(fits), 3)) if want else None  # refs: no forces
        stats[REFS].add(reference.predict(batch, forces=False)[0], zero, batch, columns)
    if model is not None:
        stats[NETWORK] = evaluate_batches(model, test_batches(), test_fids)
    results = {label: s.results() for label, s in stats.items()}
    table = {f: {label: results[label][f] for label in results if f in results[label]} for f in test_fids}
    return {
        "split": split,
        "features": dataclasses.asdict(config) | {"invariants": features.names, "elements": features.elements,
                                                  "per_atom": features.n_per_atom,
                                                  "per_structure": features.n_per_atom * len(elements)},
        "fits": report_fits,
        "results": table,
    }


def format_comparison(report: dict, title: str = "") -> str:
    """One table: rows fidelity × model, columns E MAE, E RMSE, E MAE/atom, F MAE (meV, meV/Å)."""
    head = f"{'fidelity':<16}{'model':<20}{'n':>6}{'E MAE':>10}{'E RMSE':>10}{'E MAE/atom':>12}{'F MAE':>10}"
    unit = f"{'':<42}{'meV':>10}{'meV':>10}{'meV/atom':>12}{'meV/Å':>10}"
    lines = ([title] if title else []) + [head, unit, "-" * len(head)]

    def cell(r: dict, key: str, width: int) -> str:
        return f"{r[key] * 1000:>{width}.1f}" if key in r else f"{'-':>{width}}"

    for fid, rows in report["results"].items():
        for label in (REFS, LINEAR, NETWORK):
            if label not in rows:
                continue
            r = rows[label]
            lines.append(f"{fid:<16}{label:<20}{r['n_structures']:>6}{cell(r, 'energy_mae', 10)}"
                         f"{cell(r, 'energy_rmse', 10)}{cell(r, 'energy_mae_per_atom', 12)}{cell(r, 'forces_mae', 10)}")
    return "\n".join(lines)

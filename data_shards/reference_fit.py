"""One reference fit per run: per-element reference energies and each head's per-atom shift and scale,
fitted jointly over every training store that carries a fidelity.

Each store fits its own references at ingest, but a store of one molecule cannot determine them: its
least-squares solution is one of infinitely many, and two such stores disagree by thousands of eV. So a
run adds the stores' sums (`ReferenceAccumulator`, kept in each manifest) and solves once per fidelity,
over every composition together. The result cannot depend on how the data was split into stores.

Where the compositions of a fidelity leave directions of the per-element energies undetermined (for
example one molecule, or elements always seen in the same ratio), those directions are taken from a
*donor*: the most determined fidelity solved before it (ties: the nearest level rank). Only the
directions the data determine move away from the donor. The most determined fidelity itself has no
donor; its undetermined directions get the minimum-norm solution.

An element that no energy of a fidelity contains is the worst case: its reference is the donor's, which at
another level of theory is off by the difference of the atomic energies (core electrons: ~1,400 eV for N
between ωB97X and GFN2-xTB). Where no level can lend it (the most determined fidelity lacks the element), the
reference is 0 eV, off by the atom's whole energy. In both cases the fit warns, naming the fidelity and elements,
and reports them (`absent_elements`) in the package lineage.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Sequence

import numpy as np

from polyfid.data_shards.refs import ReferenceAccumulator
from polyfid.data_shards.schema import Fidelity

log = logging.getLogger("polyfid.refs")

PINV_RTOL = 1e-9  # eigenvalues of XᵀX below this × the largest are undetermined directions
MIN_SCALE = 1e-3


@dataclasses.dataclass
class ReferenceFit:
    """References {fid: {Z: eV}}, per-atom residual shift (eV/atom) and head scale per fidelity, and how."""

    energies: dict[str, dict[int, float]]
    shift: dict[str, float]
    scale: dict[str, float]
    report: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the package lineage and the run's reference_fit.json."""
        return {"energies": {f: {str(z): e for z, e in r.items()} for f, r in self.energies.items()},
                "shift": dict(self.shift), "scale": dict(self.scale), "report": self.report}


def _eig(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors, mask of the determined ones) of a symmetric matrix."""
    w, v = np.linalg.eigh(a)
    top = float(w[-1]) if w.size else 0.0
    return w, v, w > PINV_RTOL * top if top > 0 else np.zeros_like(w, dtype=bool)


def _solve_towards(a: np.ndarray, b: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The least-squares solution of (a e = b) nearest `prior`: prior + pinv(a) (b − a prior)."""
    w, v, ok = _eig(a)
    r = v.T @ (b - a @ prior)
    step = np.zeros_like(r)
    step[ok] = r[ok] / w[ok]
    return prior + v @ step


def _absent_elements(s: dict[str, np.ndarray] | None, idx: list[int]) -> list[int]:
    """The elements of `idx` that no structure with this fidelity's energy contains."""
    if s is None:
        return list(idx)
    return [z for z in idx if float(s["xtx"][z, z]) <= 0.0]


def _warn_absent(name: str, absent: list[int], donor: str | None) -> None:
    elements = ", ".join(f"Z={z}" for z in absent)
    if donor is None:
        log.warning("%s: no training energy has %s, and no other level can lend their reference energies, so "
                    "they are 0 eV: %s energies of structures with them will be off by those atoms' whole "
                    "energies. Add %s energies of structures with them.", name, elements, name, name)
    else:
        log.warning("%s: no training energy has %s; their reference energies at %s are %s's, and %s energies of "
                    "structures with them will be off by the two levels' atomic-energy difference (at DFT "
                    "against xTB, hundreds of eV per atom). Add %s energies of structures with them.",
                    name, elements, name, donor, name, name)


def _residual_stats(s: dict[str, np.ndarray], e: np.ndarray, idx: list[int]) -> tuple[float, float]:
    """(mean, std) of the per-atom energy residual y/n − (x/n)·e, from the accumulated sums."""
    n = float(s["n"])
    if n <= 0:
        return 0.0, 0.0
    px, pxx, pxy = s["px"][idx], s["pxx"][np.ix_(idx, idx)], s["pxy"][idx]
    mean = (float(s["py"]) - px @ e) / n
    ms = (float(s["pyy"]) - 2.0 * pxy @ e + e @ pxx @ e) / n
    return float(mean), float(np.sqrt(max(ms - mean * mean, 0.0)))


def joint_reference_fit(acc: ReferenceAccumulator, fidelities: Sequence[Fidelity],
                        elements: Sequence[int]) -> ReferenceFit:
    """Solve every fidelity's references over all the accumulated compositions, borrowing undetermined
    directions from a donor fidelity; then the per-atom shift and the head scale of each fidelity.

    The scale is the RMS force component of the fidelity (MACE's choice), else of the nearest-rank fidelity
    that has forces, else the spread of its per-atom energy residual, else 1.
    """
    idx = sorted(int(z) for z in elements)
    levels = {f.name: f for f in fidelities}
    info: dict[str, tuple[int, float]] = {}
    for name in levels:
        s = acc.sums(name)
        a = s["xtx"][np.ix_(idx, idx)] if s is not None else np.zeros((len(idx), len(idx)))
        info[name] = (int(_eig(a)[2].sum()), float(s["n"]) if s is not None else 0.0)
    order = sorted(levels, key=lambda f: (-info[f][0], -info[f][1], -levels[f].rank, f))
    solved: dict[str, np.ndarray] = {}
    report: dict[str, dict[str, Any]] = {}
    for name in order:
        s = acc.sums(name)
        donors = [d for d in solved if info[d][0] > 0]
        donor = min(donors, key=lambda d: (-info[d][0], abs(levels[d].rank - levels[name].rank), d)) if donors else None
        prior = solved[donor] if donor is not None else np.zeros(len(idx))
        if s is None or info[name][0] == 0:
            e = prior.copy()
        else:
            e = _solve_towards(s["xtx"][np.ix_(idx, idx)], s["xty"][idx], prior)
        solved[name] = e
        absent = _absent_elements(s, idx) if s is not None or donor is not None else []
        report[name] = {"n_structures": int(info[name][1]), "determined_directions": info[name][0],
                        "n_elements": len(idx), "donor": donor if info[name][0] < len(idx) else None,
                        "absent_elements": absent}
        if absent and s is not None:
            _warn_absent(name, absent, donor)
    shift, scale, spread = {}, {}, {}
    for name in levels:
        s = acc.sums(name)
        shift[name], spread[name] = _residual_stats(s, solved[name], idx) if s is not None else (0.0, 0.0)
    force_rms = {f: float(np.sqrt(acc.sums(f)["f2"] / acc.sums(f)["fn"]))
                 for f in levels if acc.sums(f) is not None and float(acc.sums(f)["fn"]) > 0}
    for name in levels:
        with_forces = sorted(force_rms, key=lambda f: (abs(levels[f].rank - levels[name].rank), -levels[f].rank, f))
        if name in force_rms:
            scale[name], how = force_rms[name], "force_rms"
        elif with_forces:
            scale[name], how = force_rms[with_forces[0]], f"force_rms of {with_forces[0]}"
        elif spread[name] > 0:
            scale[name], how = spread[name], "per-atom energy residual std"
        else:
            scale[name], how = 1.0, "default"
        scale[name] = max(scale[name], MIN_SCALE)
        report[name].update({"shift_ev_per_atom": shift[name], "residual_std_ev_per_atom": spread[name],
                             "scale": scale[name], "scale_from": how})
    energies = {name: {z: float(v) for z, v in zip(idx, solved[name])} for name in levels}
    return ReferenceFit(energies, shift, scale, report)


def store_sums(store) -> ReferenceAccumulator:
    """A store's accumulated sums: from its manifest, or (stores written before they were kept there) by
    reading its atomic numbers, offsets and labels once."""
    kept = store.manifest.get("reference_sums")
    if kept is not None:
        return ReferenceAccumulator.from_dict(kept)
    log.warning("%s has no reference sums in its manifest (written by an older polyfid); reading its labels "
                "once to compute them", store.path)
    acc = ReferenceAccumulator()
    for k in range(len(store.shards)):
        shard = store.read_shard(k, verify=False, fill_missing=False)
        acc.add_ragged(shard["atomic_numbers"], shard["offsets"], shard["energy"])
        acc.add_forces(shard["forces"])
    return acc


def fit_stores(stores: Iterable, fidelities: Sequence[Fidelity], elements: Sequence[int]) -> ReferenceFit:
    """The joint fit over the sums of all `stores`."""
    total = ReferenceAccumulator()
    for s in stores:
        total.merge(store_sums(s))
    return joint_reference_fit(total, fidelities, elements)

"""Label outliers caught at ingest: a failed SCF in a public dataset can put a structure 20 eV off.

After the store's reference fit, each new structure's per-atom energy residual (E − Σ references, over the atom
count) is compared, per fidelity and dataset, with the robust spread of its group: median ± k·MAD (MAD scaled
to a standard deviation, 1.4826·median|r − median|, with a floor of 1 meV/atom). A high energy is not flagged
when the structure's forces show it is strained on purpose (its largest |F| beyond median + k·MAD of the
store's): rattled and compressed geometries are high in energy and are what a potential needs to see. Force
labels above a cap on any atom's |F| are flagged too. `--outliers` decides what happens: `warn` (the default) names them, `drop`
masks the flagged labels (the structure keeps its other labels; readers see NaN, i.e. a missing label, and
the reference sums leave them out), `error` refuses the ingest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.refs import MAX_Z, ReferenceAccumulator, counts_by_z

log = logging.getLogger("polyfid.outliers")
POLICIES = ("warn", "drop", "error")
MAD_SIGMA = 1.4826  # MAD → standard deviation for a normal distribution
MAD_FLOOR = 1e-3  # eV/atom: a group of near-identical structures must not flag every small difference


@dataclasses.dataclass(frozen=True)
class OutlierCheck:
    """`--outliers`, `--outlier-mad` and `--outlier-force-cap` of `polyfid ingest`."""

    policy: str = "warn"
    k_mad: float = 20.0  # energy: beyond median ± k·MAD of the per-atom residual of its fidelity and dataset
    force_cap: float = 1000.0  # eV/Å: any atom's |F| above this
    k_strain: float = 5.0  # an energy outlier whose largest |F| is beyond median + this x MAD is a strained geometry

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"outliers must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclasses.dataclass
class Outlier:
    structure_id: int
    dataset: str
    fidelity: str
    kind: str  # "energy" (value: per-atom residual, eV/atom) | "forces" (value: largest |F|, eV/Å)
    value: float
    limit: str
    source: str = ""  # file@frame, when ingest knows it

    def describe(self) -> str:
        where = self.source or f"structure {self.structure_id}"
        unit = "eV/atom from the median" if self.kind == "energy" else "eV/Å"
        return f"{where} (dataset {self.dataset}, {self.fidelity} {self.kind}): {self.value:+.4g} {unit}, {self.limit}"


def _groups(shards: Sequence[dict[str, np.ndarray]], refs: dict[str, dict[int, float]]) -> dict:
    """{(fidelity, dataset index): (structure ids, per-atom residuals)} over the given raw shards."""
    acc: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for raw in shards:
        counts = counts_by_z(raw["atomic_numbers"], raw["offsets"])
        n_atoms = np.diff(raw["offsets"]).astype(np.float64)
        for key in (k for k in raw if k.startswith("energy/")):
            fid = key.split("/", 1)[1]
            ref = np.zeros(MAX_Z + 1)
            for z, e in refs.get(fid, {}).items():
                ref[int(z)] = e
            e = np.asarray(raw[key], dtype=np.float64)
            ok = np.isfinite(e)
            resid = (e - counts @ ref) / n_atoms
            for d in np.unique(raw["dataset"][ok]):
                sel = ok & (raw["dataset"] == d)
                acc.setdefault((fid, int(d)), []).append((raw["structure_id"][sel], resid[sel]))
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in acc.items()}


def _worst_force(raw: dict[str, np.ndarray], key: str) -> np.ndarray:
    """The largest |F| of each structure in a raw shard's force array `key` (-inf where no atom has a label)."""
    norm = np.linalg.norm(np.asarray(raw[key], dtype=np.float64), axis=1)
    return np.maximum.reduceat(np.where(np.isfinite(norm), norm, -np.inf), raw["offsets"][:-1])


def _strained(shards: Sequence[dict[str, np.ndarray]], k: float) -> set[int]:
    """Structures whose largest |F| (any fidelity with force labels) lies beyond median + k·MAD of the store's:
    far from equilibrium on purpose (rattled, compressed). A high energy is what such a geometry has, so it is
    not taken for a bad label. Structures without force labels are never in the set."""
    ids, worst = [], []
    for raw in shards:
        per = [_worst_force(raw, key) for key in raw if key.startswith("forces/") and len(raw[key])]
        if per:
            ids.append(raw["structure_id"])
            worst.append(np.max(per, axis=0))
    if not ids:
        return set()
    ids_, w = np.concatenate(ids), np.concatenate(worst)
    ok = np.isfinite(w)
    if not ok.any():
        return set()
    med = float(np.median(w[ok]))
    mad = MAD_SIGMA * float(np.median(np.abs(w[ok] - med)))
    return {int(i) for i in ids_[ok & (w > med + k * max(mad, 1e-3))]}


def find_outliers(shards: Sequence[dict[str, np.ndarray]], refs: dict[str, dict[int, float]],
                  datasets: Sequence[str], check: OutlierCheck,
                  source: Callable[[int], str] | None = None) -> list[Outlier]:
    """The flagged labels of the given raw shards (as StoreWriter.raw_shard returns them)."""
    found: list[Outlier] = []
    strained = _strained(shards, check.k_strain)
    for (fid, d), (ids, r) in sorted(_groups(shards, refs).items()):
        med = float(np.median(r))
        mad = max(MAD_SIGMA * float(np.median(np.abs(r - med))), MAD_FLOOR)
        for i in np.nonzero(np.abs(r - med) > check.k_mad * mad)[0]:
            if int(ids[i]) in strained:  # a distorted or compressed geometry: its forces explain its energy
                continue
            found.append(Outlier(int(ids[i]), datasets[d], fid, "energy", float(r[i] - med),
                                 f"beyond {check.k_mad:g} x MAD ({mad * 1000:.1f} meV/atom) of {len(r)} structures"))
    for raw in shards:
        for key in (k for k in raw if k.startswith("forces/")):
            worst = _worst_force(raw, key) if len(raw[key]) else np.zeros(0)
            for i in np.nonzero(worst > check.force_cap)[0]:
                found.append(Outlier(int(raw["structure_id"][i]), datasets[int(raw["dataset"][i])],
                                     key.split("/", 1)[1], "forces", float(worst[i]),
                                     f"above the cap of {check.force_cap:g} eV/Å"))
    if source is not None:
        for o in found:
            o.source = source(o.structure_id)
    return found


def masked_sums(shards: Sequence[dict[str, np.ndarray]], outliers: Sequence[Outlier]) -> ReferenceAccumulator:
    """The reference sums of the flagged energy and force labels (to take out of the store's sums on drop)."""
    acc = ReferenceAccumulator()
    flagged = mask_record(outliers)
    for raw in shards:
        counts = counts_by_z(raw["atomic_numbers"], raw["offsets"])
        for key in (k for k in raw if "/" in k and k.split("/")[0] in ("energy", "forces")):
            kind, fid = key.split("/", 1)
            rows = np.isin(raw["structure_id"], flagged.get(fid, {}).get(kind, []))
            if not rows.any():
                continue
            if kind == "energy":
                acc.add(counts[rows], {fid: np.asarray(raw[key], dtype=np.float64)[rows]})
            else:
                atoms = np.repeat(rows, np.diff(raw["offsets"]))
                acc.add_forces({fid: np.asarray(raw[key])[atoms]})
    return acc


def mask_record(outliers: Sequence[Outlier]) -> dict[str, dict[str, list[int]]]:
    """{fidelity: {"energy": [structure ids], "forces": [...]}}: the labels a reader treats as missing."""
    out: dict[str, dict[str, list[int]]] = {}
    for o in outliers:
        out.setdefault(o.fidelity, {}).setdefault(o.kind, []).append(o.structure_id)
    return {f: {k: sorted(set(v)) for k, v in d.items()} for f, d in out.items()}


def report(outliers: Sequence[Outlier], policy: str, limit: int = 1000) -> dict[str, Any]:
    """What the manifest's provenance keeps: the policy, the count and the first `limit` flagged labels."""
    return {"policy": policy, "n": len(outliers),
            "flagged": [dataclasses.asdict(o) for o in outliers[:limit]]}

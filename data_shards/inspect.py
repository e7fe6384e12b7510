"""`polyfid inspect` and `polyfid verify`: what a store holds, and whether every shard is intact.

`summarize` streams the store shard by shard (atomic numbers, offsets, datasets and labels; never
positions), so it runs in memory bounded by one shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polyfid.data_shards.refs import MAX_Z, counts_by_z
from polyfid.data_shards.store import Store
from polyfid.data_shards.named import open_store


def summarize(store: Store) -> dict[str, Any]:
    """Counts, label coverage and per-fidelity residual energy statistics (E minus Σ reference energies)."""
    fids = [f.name for f in store.fidelities]
    refs = store.reference_energies
    ref_vec = {f: np.zeros(MAX_Z + 1) for f in fids}
    for f in fids:
        for z, e in refs.get(f, {}).items():
            ref_vec[f][z] = e
    n_e = dict.fromkeys(fids, 0)
    n_f = dict.fromkeys(fids, 0)
    res: dict[str, list[np.ndarray]] = {f: [] for f in fids}
    per_dataset = np.zeros(len(store.datasets), dtype=np.int64)
    for k, info in enumerate(store.shards):
        z, off = store.read_array(k, "atomic_numbers"), store.read_array(k, "offsets")
        per_dataset += np.bincount(store.read_array(k, "dataset"), minlength=len(per_dataset))
        counts = None
        for f in info.energy:
            e = store.read_array(k, f"energy/{f}")
            ok = np.isfinite(e)
            n_e[f] += int(ok.sum())
            if ok.any():
                counts = counts_by_z(z, off) if counts is None else counts
                res[f].append(e[ok] - counts[ok] @ ref_vec[f])
        for f in info.forces:
            frc = store.read_array(k, f"forces/{f}")
            has = np.isfinite(frc).all(axis=1)
            n_f[f] += int(np.add.reduceat(has, off[:-1]).astype(bool).sum()) if len(has) else 0
    spread = {}
    for f in fids:
        r = np.concatenate(res[f]) if res[f] else np.zeros(0)
        spread[f] = ({"n": int(r.size), "mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()),
                      "max": float(r.max())} if r.size else {"n": 0})
    return {"path": store.path, "fidelities": [f.to_dict() for f in store.fidelities],
            "datasets": dict(zip(store.datasets, per_dataset.tolist())), "n_structures": store.n_structures,
            "n_atoms": store.n_atoms, "n_shards": len(store.shards), "elements": store.elements,
            "coverage": {f: {"energy": n_e[f], "forces": n_f[f]} for f in fids},
            "reference_energies": refs, "residual_energy": spread, "fingerprint": store.fingerprint,
            "outliers": {"flagged": sum(int((p.get("outliers") or {}).get("n", 0)) for p in
                                        store.manifest.get("provenance", [])),
                         "masked": sum(len(ids) for kinds in (store.manifest.get("masked_labels") or {}).values()
                                       for ids in kinds.values())}}


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text for the terminal."""
    from ase.data import chemical_symbols

    n = max(s["n_structures"], 1)
    lines = [f"store {s['path']}", f"  {s['n_structures']} structures, {s['n_atoms']} atoms, "
             f"{s['n_shards']} shards; fingerprint {s['fingerprint'][:23]}…",
             "  elements: " + " ".join(chemical_symbols[z] for z in s["elements"]),
             "  datasets: " + ", ".join(f"{d} ({c})" for d, c in s["datasets"].items()),
             "  fidelities (rank, level of theory, source unit; coverage energies / forces):"]
    for f in sorted(s["fidelities"], key=lambda f: (f["rank"], f["name"])):
        level = " ".join(x for x in (f["method"], f["basis"], f["dispersion"], f["code"]) if x) or "-"
        cov = s["coverage"][f["name"]]
        lines.append(f"    {f['name']:<16} rank {f['rank']:<3} {level:<28} {f['source_unit']:<9} "
                     f"E {cov['energy']}/{s['n_structures']} ({100 * cov['energy'] / n:.1f}%)  "
                     f"F {cov['forces']}/{s['n_structures']} ({100 * cov['forces'] / n:.1f}%)")
    lines.append("  reference energies (eV):")
    for fid, refs in s["reference_energies"].items():
        lines.append(f"    {fid:<16} " + "  ".join(f"{chemical_symbols[z]} {e:.4f}" for z, e in sorted(refs.items())))
    lines.append("  energy after subtracting the references (eV): n, mean, std, min, max")
    for fid, r in s["residual_energy"].items():
        lines.append(f"    {fid:<16} n {r['n']}" + ("" if not r["n"] else f"  mean {r['mean']:.4f}  std "
                     f"{r['std']:.4f}  min {r['min']:.4f}  max {r['max']:.4f}"))
    o = s.get("outliers", {})
    lines.append(f"  label outliers: {o.get('flagged', 0)} flagged at ingest, {o.get('masked', 0)} labels masked "
                 "(read as missing)")
    return "\n".join(lines)


def verify_store(path: str) -> tuple[Store, list[str]]:
    """Open a store and check every shard's checksum; returns the store and the names of bad shards."""
    store = open_store(path)
    return store, store.verify()

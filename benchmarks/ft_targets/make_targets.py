"""Fine-tuning targets at a level of theory the shipped model never saw: B3LYP/6-31G* E+F (PySCF).

    python -m polyfid.benchmarks.ft_targets.make_targets            # sample, label (resumable), export
    python benchmarks/ft_targets/make_targets.py --export-only       # rewrite the extxyz files from what is stored

Molecules are held out of the pretraining corpus (`data_shards/corpus/molecules.csv`, role `heldout`), so
`pretrained:organic-mini` has seen neither the molecule nor the level. Structures come from GFN2-xTB Langevin
MD at 300, 600 and 1000 K (the corpus's sampler, `datasets/corpus/sample.py`). Each B3LYP result is
appended to `<molecule>.labels.jsonl` as soon as it is computed, so a killed run resumes where it stopped.

Split (seeded permutation of each molecule's labelled structures): the first 50 are `test`, the next 20
`valid`, the rest `train` (a pool; a benchmark takes its first N as the N-structure training set).

The low level, free beside the target level (`--gfn2 N`): GFN2-xTB (tblite) energies and forces of every sampled
structure (`energy_gfn2_xtb`, `forces_gfn2_xtb` in the same file: the "do nothing" baseline on the test split),
and a pool of N more GFN2-xTB MD structures from trajectories of their own seed, labelled at GFN2-xTB only
(`<molecule>.gfn2pool.extxyz.gz`, split `train`). A GFN2 label costs ~0.02 CPU s against B3LYP's ~11.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LEVEL = "b3lyp_631gs"
LOW = "gfn2_xtb"
SEED_POOL = 20261207  # the GFN2-only pool's MD trajectories
LEVEL_META = {"rank": 3, "method": "B3LYP", "basis": "6-31G*", "code": "pyscf", "dispersion": "none"}
# name: (SMILES, structures). 300 for the first (N up to 200 training structures), 150 for the others.
MOLECULES = {"propionitrile": ("CCC#N", 300), "1-propanol": ("CCCO", 150), "N-methylacetamide": ("CNC(C)=O", 150)}
# B3LYP/6-31G* costs ~11 CPU s per 9-atom structure here; a partial run labels a random subset (split_order).
TEMPERATURES = (300.0, 600.0, 1000.0)
SEED = 20261206
N_TEST, N_VALID = 50, 20


def sample(name: str, smiles: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(atomic numbers, positions [n, A, 3]) from GFN2-xTB MD at the three temperatures; cached on disk."""
    path = HERE / f"{name}.structures.npz"
    if path.exists():
        d = np.load(path)
        return d["numbers"], d["positions"]
    from polyfid.datasets.corpus.sample import md_frames, optimise, rdkit_start

    atoms, _ = rdkit_start(smiles, SEED)
    start = optimise(atoms)
    counts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    frames = [md_frames(start, t, c, np.random.default_rng([SEED, i]), 0.5, 200, 20, 0.01)
              for i, (t, c) in enumerate(zip(TEMPERATURES, counts))]
    pos = np.round(np.concatenate(frames), 6)
    np.savez(path, numbers=start.numbers, positions=pos,
             temperature=np.repeat(TEMPERATURES, counts))
    return start.numbers, pos


def label(name: str, numbers: np.ndarray, positions: np.ndarray) -> None:
    """B3LYP/6-31G* energy and forces of every structure not yet in `<name>.labels.jsonl`."""
    from polyfid.data_shards.corpus.levels import LabelError, pyscf_scf

    fn = pyscf_scf("b3lyp", "6-31g*")
    path = HERE / f"{name}.labels.jsonl"
    done = {json.loads(line)["index"] for line in path.read_text().splitlines()} if path.exists() else set()
    # in the split's order (test, valid, then train): a partial run is a random subset, its splits filled first
    todo = [int(i) for i in split_order(len(positions)) if int(i) not in done]
    t_start = time.time()
    for k, i in enumerate(todo):
        t0 = time.process_time()
        try:
            e, f = fn(numbers, positions[i], True, False)
        except LabelError:
            try:
                e, f = fn(numbers, positions[i], True, True)
            except LabelError as err:
                print(f"{name} #{i}: failed twice ({err}); skipped", flush=True)
                continue
        rec = {"index": i, "energy_eV": e, "forces_eV_A": np.round(f, 8).tolist(),
               "cpu_s": round(time.process_time() - t0, 2)}
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if k % 10 == 0:
            el = time.time() - t_start
            print(f"{name}: {k + 1}/{len(todo)} labelled, {el / (k + 1):.1f} s each", flush=True)


def gfn2_labels(positions: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GFN2-xTB (energies [n], forces [n, A, 3]) of every structure."""
    from polyfid.data_shards.corpus.levels import level_by_name

    fn = level_by_name(LOW).fn
    out = [fn(numbers, x, True, False) for x in positions]
    return np.array([e for e, _ in out]), np.stack([f for _, f in out])


def low_level(name: str, numbers: np.ndarray, positions: np.ndarray, n_pool: int) -> None:
    """`<name>.gfn2.npz`: GFN2-xTB labels of the sampled structures and of a pool of `n_pool` more MD structures."""
    path = HERE / f"{name}.gfn2.npz"
    if path.exists() and len(np.load(path)["pool_positions"]) >= n_pool:
        return
    from polyfid.datasets.corpus.sample import md_frames, optimise, rdkit_start

    e, f = gfn2_labels(positions, numbers)
    start = optimise(rdkit_start(MOLECULES[name][0], SEED)[0])
    counts = [n_pool // 3 + (1 if i < n_pool % 3 else 0) for i in range(3)]
    pool = np.round(np.concatenate([md_frames(start, t, c, np.random.default_rng([SEED_POOL, i]), 0.5, 200, 20, 0.01)
                                    for i, (t, c) in enumerate(zip(TEMPERATURES, counts))]), 6)
    pe, pf = gfn2_labels(pool, numbers)
    np.savez(path, energy=e, forces=f, pool_positions=pool, pool_energy=pe, pool_forces=pf,
             pool_temperature=np.repeat(TEMPERATURES, counts))
    print(f"{path}: GFN2-xTB labels of {len(e)} structures and a pool of {len(pool)}", flush=True)


def split_order(n: int) -> np.ndarray:
    """The seeded permutation of a molecule's structures: the first N_TEST are test, the next N_VALID valid."""
    return np.random.default_rng(SEED).permutation(n)


def export(name: str) -> Path | None:
    """`<name>.extxyz.gz`: every labelled structure with its split (info `split`), energy and forces."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator  # noqa: F401  (ase.io needs the module)
    import ase.io

    s, lab = HERE / f"{name}.structures.npz", HERE / f"{name}.labels.jsonl"
    if not (s.exists() and lab.exists()):
        return None
    d = np.load(s)
    recs = {r["index"]: r for r in map(json.loads, lab.read_text().splitlines())}
    n_total = len(d["positions"])
    order = split_order(n_total)  # fixed before labelling ends: splits stay put
    split = {}
    for rank, i in enumerate(order):
        split[int(i)] = "test" if rank < N_TEST else "valid" if rank < N_TEST + N_VALID else "train"
    low = np.load(HERE / f"{name}.gfn2.npz") if (HERE / f"{name}.gfn2.npz").exists() else None
    frames = []
    for rank, i in enumerate(order):
        r = recs.get(int(i))
        if r is None:
            continue
        a = Atoms(d["numbers"], positions=d["positions"][i])
        a.info.update({f"energy_{LEVEL}": r["energy_eV"], "molecule": name, "split": split[int(i)],
                       "index": int(i), "temperature_K": float(d["temperature"][i])})
        a.arrays[f"forces_{LEVEL}"] = np.asarray(r["forces_eV_A"])
        if low is not None:
            a.info[f"energy_{LOW}"] = float(low["energy"][i])
            a.arrays[f"forces_{LOW}"] = low["forces"][i]
        frames.append(a)
    if low is not None:
        pool = []
        for k, x in enumerate(low["pool_positions"]):
            a = Atoms(d["numbers"], positions=x)
            a.info.update({f"energy_{LOW}": float(low["pool_energy"][k]), "molecule": name, "split": "train",
                           "index": k, "temperature_K": float(low["pool_temperature"][k])})
            a.arrays[f"forces_{LOW}"] = low["pool_forces"][k]
            pool.append(a)
        with gzip.open(HERE / f"{name}.gfn2pool.extxyz.gz", "wt") as fh:
            ase.io.write(fh, pool, format="extxyz")
    out = HERE / f"{name}.extxyz.gz"
    with gzip.open(out, "wt") as fh:
        ase.io.write(fh, frames, format="extxyz")
    print(f"{out}: {len(frames)} of {n_total} structures labelled", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecules", default=",".join(MOLECULES), help="comma-separated names of MOLECULES")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--gfn2", type=int, default=0, metavar="N",
                    help="also GFN2-xTB labels of every structure and of a pool of N more MD structures")
    ap.add_argument("--skip-b3lyp", action="store_true", help="do not label more structures at B3LYP")
    a = ap.parse_args()
    os.nice(a.nice)
    names = [m for m in a.molecules.split(",") if m]
    for name in names:
        if not a.export_only:
            smiles, n = MOLECULES[name]
            numbers, pos = sample(name, smiles, n)
            if not a.skip_b3lyp:
                label(name, numbers, pos)
            if a.gfn2:
                low_level(name, numbers, pos, a.gfn2)
        export(name)


if __name__ == "__main__":
    main()

"""Data-layer benchmark: store build and ingest throughput, one reader epoch, peers, and reader RSS at 1M/4M.

    python benchmarks/bench_data.py --n 1000000 --n-big 4000000 --subset 20000 --ingest-big 200000 \
        --workdir /tmp/polyfid-bench

Geometries are synthetic (5-60 atoms on a jittered 1.5 Å grid, H/C/N/O; 'lo' energies and forces on
every structure, 'hi' energies on a quarter): fine for I/O figures, meaningless for physics. The slow peers
(ase.db, h5py per structure, ase.io extxyz) are timed on the first `--subset` structures of the same store.
Reader RSS: peak (VmHWM, and ru_maxrss) of a fresh subprocess that runs one epoch (`--repeats` times). Each read also records
its CPU seconds (process time), a figure less sensitive than wall time to other jobs on a shared machine.
Writes the figures as JSON (`--results`); RESULTS_data.md is written from them by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from polyfid.data_shards.layout import shard_checksum
from polyfid.data_shards.refs import ReferenceAccumulator
from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import ShardInfo, Store
from polyfid.data_shards.writer import StoreWriter, write_group
from polyfid.data_shards.named import open_store

FIDS = [Fidelity("lo", rank=0, method="synthetic-lo"), Fidelity("hi", rank=1, method="synthetic-hi")]
Z_CHOICES = np.array([1, 1, 1, 6, 6, 7, 8], dtype=np.uint8)
REF = {1: -13.6, 6: -1027.0, 7: -1484.0, 8: -2040.0}


def synthetic_shard(n: int, seed: int, first_id: int) -> dict[str, np.ndarray]:
    """Arrays of one shard of n synthetic molecules, built vectorised (no per-structure Python)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 61, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    a = int(offsets[-1])
    local = np.arange(a) - np.repeat(offsets[:-1], counts)
    grid = np.stack([local % 4, (local // 4) % 4, local // 16], axis=1) * 1.5
    z = Z_CHOICES[rng.integers(0, len(Z_CHOICES), size=a)]
    ref = np.zeros(9)
    for k, v in REF.items():
        ref[k] = v
    e_lo = np.add.reduceat(ref[z], offsets[:-1]) + rng.normal(scale=0.5, size=n)
    e_hi = np.where(rng.random(n) < 0.25, e_lo * 1.001, np.nan)
    return {"atomic_numbers": z, "positions": grid + rng.normal(scale=0.1, size=(a, 3)), "offsets": offsets,
            "cell": np.zeros((n, 3, 3)), "pbc": np.zeros((n, 3), dtype=bool), "dataset": np.zeros(n, np.int16),
            "structure_id": first_id + np.arange(n, dtype=np.int64), "energy/lo": e_lo, "energy/hi": e_hi,
            "forces/lo": rng.normal(size=(a, 3)).astype(np.float32)}


def build_store(path: str, n: int, shard_size: int, seed: int = 0) -> dict:
    """Write a synthetic store through StoreWriter (temporary shard, rename, manifest last)."""
    t0 = time.perf_counter()
    gen = 0.0
    with StoreWriter(path, FIDS, shard_size=shard_size) as w:
        w.add_dataset("synthetic")
        for k, lo in enumerate(range(0, n, shard_size)):
            g0 = time.perf_counter()
            arrays = synthetic_shard(min(shard_size, n - lo), seed * 100_000 + k, w.next_id)
            gen += time.perf_counter() - g0
            tmp = w.new_tmp_name()
            write_group(w.location.open_group("a", path="shards").create_group(tmp), arrays)
            refs = ReferenceAccumulator()
            refs.add_ragged(arrays["atomic_numbers"], arrays["offsets"],
                            {"lo": arrays["energy/lo"], "hi": arrays["energy/hi"]})
            w.adopt(tmp, ShardInfo("", len(arrays["cell"]), len(arrays["atomic_numbers"]), shard_checksum(arrays),
                                   ("lo", "hi"), ("lo",)), refs, np.unique(arrays["atomic_numbers"]))
    wall = time.perf_counter() - t0
    store = open_store(path)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"n_structures": store.n_structures, "n_atoms": store.n_atoms, "shards": len(store.shards),
            "wall_s": wall, "generate_s": gen, "write_s": wall - gen, "bytes": size}


def read_epoch(path: str) -> dict:
    """One epoch of the polyfid reader (shuffle, verify, prefetch) in this process; with ru_maxrss."""
    from polyfid.data_shards.reader import ShardReader

    store = open_store(path)
    cfg = ShardReader.Config(atom_budget=8192, shuffle_buffer=4096, loop=False, prefetch=2, verify=True)
    t0, c0 = time.perf_counter(), time.process_time()
    n_s = n_a = 0
    for b in ShardReader([store], cfg):
        n_s += len(b["n_atoms"])
        n_a += int(b["n_atoms"].sum())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert n_s == store.n_structures, (n_s, store.n_structures)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"n_structures": n_s, "n_atoms": n_a, "wall_s": wall, "structures_per_s": n_s / wall,
            "atoms_per_s": n_a / wall, "cpu_s": cpu, "cpu_us_per_structure": cpu / n_s * 1e6,
            "vmhwm_mib": hwm / 1024,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def read_epoch_subprocess(path: str, **env: str) -> dict:
    """`read_epoch` in a fresh interpreter. Linux carries the parent's RSS high-water mark into ru_maxrss
    across fork+exec, so the child also reports VmHWM (the peak of its own address space)."""
    out = subprocess.run([sys.executable, __file__, "--read-epoch", path], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def epochs(path: str, repeats: int, **env: str) -> dict:
    """`repeats` epochs, each in a fresh subprocess (peak RSS varies by ±10% from run to run with thread
    timing); the per-key median of the runs, and the runs."""
    runs = [read_epoch_subprocess(path, **env) for _ in range(repeats)]
    return {"median": {k: float(np.median([r[k] for r in runs])) for k in runs[0]}, "runs": runs}


def iter_atoms(store: Store, n: int):
    """The first n structures of the store as ASE Atoms with their labels (for the peers and ingest)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    for k in range(len(store.shards)):
        d = store.read_shard(k)
        off = d["offsets"]
        for i in range(len(off) - 1):
            if n <= 0:
                return
            n -= 1
            a, b = off[i], off[i + 1]
            atoms = Atoms(numbers=d["atomic_numbers"][a:b], positions=d["positions"][a:b])
            atoms.calc = SinglePointCalculator(atoms, energy=float(d["energy"]["lo"][i]),
                                               forces=d["forces"]["lo"][a:b].astype(np.float64))
            yield atoms


def _timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return time.perf_counter() - t0, time.process_time() - c0, r


def peers(store: Store, n: int, work: Path) -> dict:
    """Read rates of ase.db, h5py per structure and ase.io extxyz on the first n structures."""
    import ase.db
    import ase.io
    import h5py

    atoms = list(iter_atoms(store, n))
    n_atoms = sum(len(a) for a in atoms)
    res: dict = {"n": n, "n_atoms": n_atoms}
    db_path = work / "peer.db"
    with ase.db.connect(db_path) as db:
        res["ase_db_write_s"], _, _ = _timed(lambda: [db.write(a) for a in atoms])

    def read_db():
        with ase.db.connect(db_path) as db:
            return sum(len(row.toatoms()) + 0 * row.forces.size for row in db.select())
    res["ase_db_read_s"], res["ase_db_read_cpu_s"], got = _timed(read_db)
    assert got == n_atoms
    d = store.read_shard(0)
    off = d["offsets"][: n + 1]
    for name, opts in (("h5py", {}), ("h5py_gzip", {"chunks": True, "compression": "gzip"})):
        with h5py.File(work / f"{name}.h5", "w") as f:  # ragged arrays, one slice per structure and field
            for key, arr in (("atomic_numbers", d["atomic_numbers"][: off[-1]]),
                             ("positions", d["positions"][: off[-1]]), ("forces", d["forces"]["lo"][: off[-1]]),
                             ("offsets", off), ("energy", d["energy"]["lo"][:n])):
                f.create_dataset(key, data=arr, **opts)
        res[f"{name}_read_s"], res[f"{name}_read_cpu_s"], got = _timed(lambda: read_h5(work / f"{name}.h5", n))
        assert got == n_atoms
    ase.io.write(work / "peer.extxyz", atoms)
    res["extxyz_parse_s"], res["extxyz_parse_cpu_s"], got = _timed(
        lambda: sum(len(a) for a in ase.io.iread(work / "peer.extxyz", ":")))
    assert got == n_atoms
    return res


def read_h5(path: Path, n: int) -> int:
    """Read every structure of a ragged HDF5 file one by one (four dataset slices each)."""
    import h5py

    total = 0
    with h5py.File(path, "r") as f:
        o = f["offsets"][...]
        z, r, frc, e = f["atomic_numbers"], f["positions"], f["forces"], f["energy"]
        for i in range(n):
            a, b = int(o[i]), int(o[i + 1])
            total += len(z[a:b]) + 0 * r[a:b].size + 0 * frc[a:b].size + 0 * float(e[i])
    return total


def ingest_rates(store: Store, n: int, work: Path, shard_size: int, name: str = "peer") -> dict:
    """The real `ingest` (parse, validate, convert, write) from extxyz: serial, then `--workers 2`.

    With workers=2 this process writes shards itself and starts Ray only when the work left would save
    RAY_MIN_SAVING_S (data_shards/parallel.py); `parallel` says how many shards Ray wrote.
    """
    import ase.io

    from polyfid.data_shards.ingest import ingest

    path = work / f"{name}.extxyz"
    if not path.exists():
        ase.io.write(path, iter_atoms(store, n), format="extxyz")
    out: dict = {"n": n, "shard_size": shard_size}
    for workers in (1, 2):
        dst = work / f"ingest-{name}-{workers}"
        t, _, s = _timed(lambda: ingest([str(path)], str(dst), "bench", {"lo": "energy"}, {"lo": "forces"},
                                     shard_size=shard_size, workers=workers, progress=False))
        out[f"workers_{workers}"] = {"wall_s": t, "structures_per_s": s.n_structures / t,
                                     "parallel": s.manifest["provenance"][0].get("parallel")}
        shutil.rmtree(dst)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--n-big", type=int, default=4_000_000)
    p.add_argument("--subset", type=int, default=20_000)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3, help="reader epochs per store and setting (median kept)")
    p.add_argument("--ingest-big", type=int, default=0,
                   help="also time serial vs --workers 2 ingest of this many structures (10 shards), large "
                        "enough for Ray to pay off (e.g. 200000; 0 = skip)")
    p.add_argument("--workdir", default="/tmp/polyfid-bench")
    p.add_argument("--results", default="/tmp/polyfid-bench-results.json")
    p.add_argument("--read-epoch", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.read_epoch:
        print(json.dumps(read_epoch(a.read_epoch)))
        return
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    try:
        print("building the 1M store…", flush=True)
        res["build"] = build_store(str(work / "s1"), a.n, a.shard_size, seed=1)
        print(res["build"], flush=True)
        res["epoch"] = epochs(str(work / "s1"), a.repeats)
        res["epoch_arena1"] = epochs(str(work / "s1"), a.repeats, MALLOC_ARENA_MAX="1")
        print("epoch", res["epoch"]["median"], res["epoch_arena1"]["median"], flush=True)
        store = open_store(work / "s1")
        res["peers"] = peers(store, a.subset, work)
        print("peers", res["peers"], flush=True)
        res["ingest"] = ingest_rates(store, a.subset, work, max(1, a.subset // 4))
        print("ingest", res["ingest"], flush=True)
        if a.ingest_big:
            res["ingest_big"] = ingest_rates(store, a.ingest_big, work, max(1, a.ingest_big // 10), "big")
            print("ingest big", res["ingest_big"], flush=True)
            (work / "big.extxyz").unlink()
        if a.n_big:
            print("building the big store…", flush=True)
            res["build_big"] = build_store(str(work / "s4"), a.n_big, a.shard_size, seed=4)
            print(res["build_big"], flush=True)
            res["epoch_big"] = epochs(str(work / "s4"), a.repeats)
            res["epoch_big_arena1"] = epochs(str(work / "s4"), a.repeats, MALLOC_ARENA_MAX="1")
            print("epoch big", res["epoch_big"]["median"], res["epoch_big_arena1"]["median"], flush=True)
    finally:
        Path(a.results).write_text(json.dumps(res, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Generate the pretraining corpus on Ray: sample every molecule, then label it at every level, resumably.

One Ray task samples one molecule; one Ray task labels one chunk of one molecule's structures at one
level. Work runs cheapest first: the xTB levels of the molecules sampled so far, sampling of the next
molecule, and once all are sampled HF, then the S3 target's wB97X labels, then the main wB97X labels
(within a level, chunks go round-robin over the molecules, and each molecule's structures in order of
their hash fraction, so a partial level is an even random subset). Finished labels
are kept in the result store (``store.py``) under their content key; a restarted run skips them.

    python -m polyfid.datasets.corpus.generate [--root DIR] [--address HOST:PORT] [--set key=value ...]
    python -m polyfid.datasets.corpus.generate --export-only
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # a loaded machine starts Ray slowly

import argparse
import dataclasses
import fcntl
import heapq
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from polyfid.datasets.corpus.config import CorpusConfig
from polyfid.data_shards.corpus.levels import LEVELS, LabelError, Level
from polyfid.datasets.corpus.sample import Molecule, load_molecules, sample_structures, target_molecule, wanted
from polyfid.datasets.corpus.store import LabelStore, Record, Structures, dequantise, fractions, label_key, quantise
from polyfid.data_shards.corpus import DATA_DIR

CORPUS_ROOT = DATA_DIR
THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _renice(level: int) -> None:
    """Set this process's CPU niceness to ``level`` (the Ray control processes keep theirs). Ray starts its
    workers at niceness 15 (RAY_worker_niceness), which would let any other work on the machine starve the
    labelling; moving back up needs privileges, so without them a worker keeps the niceness it has."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if level == current:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, level)
    except PermissionError:
        if level > current:
            raise


def _log_call(call_log: str, kind: str, name: str, key: str) -> None:
    if call_log:
        with open(call_log, "a") as fh:
            fh.write(f"{kind} {name} {key}\n")


def label_structures(level: Level, numbers: np.ndarray, positions: np.ndarray, keys: Sequence[str],
                     want_forces: Sequence[bool], call_log: str = "", nice: int = 0) -> list[Record]:
    """Label structures at one level; a failure is retried once with safe settings, then recorded as failed."""
    _renice(nice)
    out = []
    for x, key, wf in zip(positions, keys, want_forces):
        _log_call(call_log, "label", level.name, key)
        t0, error, retried = time.process_time(), "", False
        for safe in (False, True):
            try:
                energy, forces = level.fn(numbers, x, bool(wf), safe)
                break
            except LabelError as err:
                error, retried = str(err), True
        else:
            energy, forces = float("nan"), None
        ok = bool(np.isfinite(energy))
        out.append(Record(key, ok, energy, forces, time.process_time() - t0, retried, "" if ok else error))
    return out


def sample_molecule(mol: Molecule, index: int, cfg: CorpusConfig) -> Structures:
    """Sample one molecule and quantise its positions (see ``sample.sample_structures``)."""
    _renice(cfg.nice)
    _log_call(cfg.call_log, "sample", mol.name, "-")
    t0 = time.process_time()
    start, x, kinds, temps, scans = sample_structures(mol, index, cfg)
    return Structures(mol.name, start.numbers.astype(np.int64), quantise(x), np.array(kinds), temps, scans,
                      time.process_time() - t0)


@dataclasses.dataclass(order=True)
class Job:
    """One Ray task to run: sampling (level None) or labelling a chunk; ordered by priority."""

    priority: tuple
    mol: Molecule = dataclasses.field(compare=False)
    level: Optional[Level] = dataclasses.field(compare=False, default=None)
    rows: list[int] = dataclasses.field(compare=False, default_factory=list)
    keys: list[str] = dataclasses.field(compare=False, default_factory=list)
    forces: list[bool] = dataclasses.field(compare=False, default_factory=list)


def label_jobs(mol: Molecule, mol_index: int, st: Structures, levels: Sequence[Level],
               stores: dict[str, LabelStore], label_all: bool) -> list[Job]:
    """The label chunks still to compute for one molecule, at every level."""
    hashes = st.hashes()
    if mol.role == "target":  # scans first, then MD frames
        order = sorted(range(len(hashes)), key=lambda i: (not st.sampler[i].startswith("scan"), i))
    else:
        order = sorted(range(len(hashes)), key=lambda i: fractions(hashes[i])[0])
    jobs = []
    for li, level in enumerate(levels):
        rows, keys, forces = [], [], []
        for i in order:
            e, f = wanted(level, mol, hashes[i], label_all)
            key = label_key(hashes[i], level.name)
            rec = stores[level.name].get(key)
            done = rec is not None and (not rec.ok or not f or rec.forces is not None)
            if e and not done:
                rows.append(i), keys.append(key), forces.append(f)
        for c, s in enumerate(range(0, len(rows), level.chunk)):
            sl = slice(s, s + level.chunk)
            group = 0 if level.chunk > 1 else 2  # cheap levels before sampling more molecules, DFT after
            prio = (group, li, 0 if mol.role == "target" else 1, c, mol_index)
            jobs.append(Job(prio, mol, level, rows[sl], keys[sl], forces[sl]))
    return jobs


def selected_molecules(cfg: CorpusConfig) -> list[Molecule]:
    """The list molecules named in ``cfg.molecules`` (all when empty), then the target if enabled."""
    mols = load_molecules()
    if cfg.molecules:
        known = {m.name for m in mols}
        unknown = sorted(set(cfg.molecules) - known)
        if unknown:
            raise ValueError(f"unknown molecules {unknown}; allowed: {sorted(known)}")
        mols = [m for m in mols if m.name in cfg.molecules]
    return mols + ([target_molecule()] if cfg.target else [])


def selected_levels(cfg: CorpusConfig, levels: Sequence[Level] = LEVELS) -> list[Level]:
    """The table's levels named in ``cfg.levels`` (all when empty), in table order."""
    names = [lv.name for lv in levels]
    unknown = sorted(set(cfg.levels) - set(names))
    if unknown:
        raise ValueError(f"unknown levels {unknown}; allowed: {names}")
    return [lv for lv in levels if not cfg.levels or lv.name in cfg.levels]


def _lock(root: Path) -> Any:
    """Hold an exclusive lock on the corpus root for this run; a second generator is refused."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / ".generate.lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another generator is running on {root}") from None
    return fh


class Run:
    """One run of the generator: a priority queue of jobs, Ray tasks in flight, stores and progress bars."""

    def __init__(self, cfg: CorpusConfig, root: Path, levels: Sequence[Level]):
        self.cfg, self.root, self.levels = cfg, root, list(levels)
        self.stores = {lv.name: LabelStore(root, lv.name) for lv in self.levels}
        self.queue: list[Job] = []
        self.finished = 0
        tty = sys.stderr.isatty()
        kw = dict(mininterval=0.5 if tty else 60.0, file=sys.stderr, dynamic_ncols=tty)
        self.bars = {"sample": tqdm(total=0, desc="sampling", unit="mol", position=0, **kw)}
        for i, lv in enumerate(self.levels):
            self.bars[lv.name] = tqdm(total=0, desc=lv.name, unit="struct", position=i + 1, **kw)
        self.structures: dict[str, Structures] = {}

    def push(self, job: Job) -> None:
        """Queue a job and add its structures to its level's bar."""
        heapq.heappush(self.queue, job)
        if job.level is not None:
            self.bars[job.level.name].total += len(job.keys)
            self.bars[job.level.name].refresh()

    def plan(self, mols: Sequence[Molecule]) -> None:
        """Queue sampling for unsampled molecules and labels for sampled ones."""
        for i, mol in enumerate(mols):
            st = Structures.load(self.root, mol.name)
            if st is None:
                self.push(Job((1, 0, 0, 0, i), mol))
                self.bars["sample"].total += 1
            else:
                self.structures[mol.name] = st
                for job in label_jobs(mol, i, st, self.levels, self.stores, self.cfg.label_all):
                    self.push(job)

    def submit(self, job: Job) -> Any:
        """Start a job's Ray task; returns its object ref."""
        if job.level is None:
            return self.sample_fn.remote(job.mol, job.priority[-1], self.cfg)
        st = self.structures[job.mol.name]
        x = dequantise(st.qpos[job.rows])
        return self.label_fn.remote(job.level, st.numbers, x, job.keys, job.forces, self.cfg.call_log,
                                   self.cfg.nice)

    def finish(self, job: Job, result: Any) -> None:
        """Store a finished task's result (sampling queues the molecule's label jobs)."""
        if job.level is None:
            result.save(self.root)
            self.structures[job.mol.name] = result
            self.bars["sample"].update(1)
            for lj in label_jobs(job.mol, job.priority[-1], result, self.levels, self.stores,
                                 self.cfg.label_all):
                self.push(lj)
        else:
            self.stores[job.level.name].add(result)
            self.bars[job.level.name].update(len(result))

    def loop(self) -> None:
        """Keep the cluster busy until the queue is empty; write results as they come."""
        import ray

        self.sample_fn = ray.remote(num_cpus=1)(sample_molecule)
        self.label_fn = ray.remote(num_cpus=1)(label_structures)
        cap = max(1, int(ray.cluster_resources().get("CPU", 1)) * self.cfg.inflight_per_cpu)
        inflight: dict[Any, Job] = {}
        last_flush = time.monotonic()
        while self.queue or inflight:
            while self.queue and len(inflight) < cap:
                job = heapq.heappop(self.queue)
                inflight[self.submit(job)] = job
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.cfg.flush_s)
            urgent = False
            for ref in ready:
                job = inflight.pop(ref)
                try:
                    self.finish(job, ray.get(ref))
                except Exception as err:  # a crashed task: report it; a rerun tries again
                    tqdm.write(f"task failed: {job.mol.name} {job.level and job.level.name}: {err!r}")
                urgent |= job.level is None or job.level.chunk == 1
                self.finished += 1
            if urgent or time.monotonic() - last_flush > self.cfg.flush_s:
                self.flush()
                last_flush = time.monotonic()
            if self.cfg.kill_after_tasks and self.finished >= self.cfg.kill_after_tasks:
                self.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        self.flush()

    def flush(self) -> None:
        """Write every level's open segment."""
        for store in self.stores.values():
            store.flush()

    def close(self) -> None:
        """Close the progress bars."""
        for bar in self.bars.values():
            bar.close()


def _start_ray(cfg: CorpusConfig, address: Optional[str], tries: int = 3) -> None:
    """ray.init, retried: on a heavily loaded machine the local node can miss Ray's 30 s start deadline."""
    import ray

    env = {"env_vars": THREAD_ENV}
    for attempt in range(tries):
        try:
            if address:
                ray.init(address=address, runtime_env=env)
            else:
                ray.init(num_cpus=cfg.num_cpus, runtime_env=env, include_dashboard=False)
            return
        except Exception as err:
            ray.shutdown()
            if attempt == tries - 1:
                raise
            tqdm.write(f"ray.init failed ({err}); retrying")


def run(cfg: CorpusConfig, root: Path = CORPUS_ROOT, address: Optional[str] = None,
        levels: Sequence[Level] = LEVELS) -> dict[str, LabelStore]:
    """Sample and label everything ``cfg`` selects under ``root``; returns the label stores."""
    import ray

    root = Path(root)
    lock = _lock(root)
    try:
        r = Run(cfg, root, selected_levels(cfg, levels))
        r.plan(selected_molecules(cfg))
        if r.queue:  # start Ray only when there is work
            started = not ray.is_initialized()
            if started:
                _start_ray(cfg, address)
            _renice(cfg.nice)  # the driver too, once Ray's control processes have started
            try:
                r.loop()
            finally:
                if started:
                    ray.shutdown()
        r.close()
    finally:
        lock.close()
    if cfg.export:
        from polyfid.datasets.corpus.provenance import export_all
        export_all(root, cfg, levels)
    return r.stores


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: run (or resume) the generator, or only export the files and PROVENANCE.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=CORPUS_ROOT, help="corpus directory (default: this package)")
    ap.add_argument("--address", default=None, help="an existing Ray cluster (HOST:PORT or auto)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a CorpusConfig field (tuples comma-separated)")
    ap.add_argument("--export-only", action="store_true",
                    help="write the extxyz files and PROVENANCE.md from the store; compute nothing")
    args = ap.parse_args(argv)
    cfg = CorpusConfig().override(args.set)
    if args.export_only:
        from polyfid.datasets.corpus.provenance import export_all
        export_all(args.root, cfg, LEVELS)
        return
    run(cfg, args.root, args.address)


if __name__ == "__main__":
    main()

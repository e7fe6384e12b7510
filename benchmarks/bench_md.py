"""ASE MD step time of polyfid.Calculator against MACE, idle and on a busy machine (issue 29, part 5).

Run: python benchmarks/bench_md.py --out benchmarks/RESULTS_md.md

Velocity Verlet NVE (0.5 fs, 300 K start) on ethanol (9 atoms), aspirin (21) and the peptide Ala20 (203), float64.
Each code runs with its default settings ("default": torch's own thread count, which polyfid's Calculator
overrides by system size) and on 1 torch thread, first idle and then with 2 busy processes
(`python -c 'while True: pass'`) loading the cores. "polyfid, old path" is the Calculator before issue 29
(torch's threads, a vesin list every step, eager). Every figure is the median of single-step wall times,
all from one run. MACE is mace-torch 0.3.16 (the `bench` extra) with random weights: 64x0e+64x1o (L=1),
max_ell 3, correlation 3, 2 interactions, r_max 5 Å, 8 Bessel functions, radial MLP [64, 64, 64].
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from polyfid.models import Calculator, load_package

warnings.filterwarnings("ignore")
POLYFID_MODEL = "pretrained:organic-mini"
ELEMENTS = [1, 6, 7, 8, 9]  # organic-mini's
N_BUSY = 2


# ---- systems and models -----------------------------------------------------------------------------
def embedded(smiles: str | None = None, sequence: str | None = None, seed: int = 0) -> Atoms:
    """An RDKit conformer (ETKDG, then MMFF) of a SMILES string or a peptide sequence, hydrogens included."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles) if smiles else Chem.MolFromSequence(sequence))
    if AllChem.EmbedMolecule(mol, randomSeed=seed, useRandomCoords=True) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles or sequence}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=500)
    return Atoms([a.GetAtomicNum() for a in mol.GetAtoms()], mol.GetConformer().GetPositions())


SYSTEMS: dict[str, Callable[[], Atoms]] = {
    "ethanol": lambda: molecule("CH3CH2OH"),
    "aspirin": lambda: embedded(smiles="CC(=O)OC1=CC=CC=C1C(=O)O"),
    "Ala20": lambda: embedded(sequence="A" * 20),
}


def mace_model() -> torch.nn.Module:
    """A float64 ScaleShiftMACE with random weights, the size described in the module docstring."""
    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 torch.loads its own constants.pt
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    with _default_dtype(torch.float64):
        return modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=len(ELEMENTS), hidden_irreps=o3.Irreps("64x0e+64x1o"),
            MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu, atomic_energies=np.zeros(len(ELEMENTS)),
            avg_num_neighbors=15.0, atomic_numbers=ELEMENTS, correlation=3, radial_type="bessel",
            radial_MLP=[64, 64, 64], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# ---- what is timed ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Setting:
    """One row: a calculator factory and the process-wide torch threads it runs under (None: torch's default)."""

    name: str
    make: Callable[[], object]
    torch_threads: int | None
    warmup: int = 2  # steps before timing


def settings(potential, mace) -> list[Setting]:
    from mace.calculators import MACECalculator

    def mace_calc():
        return MACECalculator(models=mace, device="cpu", default_dtype="float64")

    return [
        # 12 warm-up steps: polyfid's TorchScript path starts on the 10th evaluation
        Setting("polyfid, default", lambda: Calculator(potential), None, warmup=12),
        Setting("polyfid, 1 thread", lambda: Calculator(potential), 1, warmup=12),
        Setting("polyfid, old path", lambda: Calculator(potential, threads=torch.get_num_threads(), skin=0.0,
                                                         script=False), None),
        Setting("MACE, default", mace_calc, None),
        Setting("MACE, 1 thread", mace_calc, 1),
    ]


class StepTimeout(Exception):
    """A row ran past its cap."""


@dataclasses.dataclass
class Row:
    """The single-step times of one setting on one system under one load, over every round."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)  # this process's CPU seconds, every thread
    capped: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("inf")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("inf")

    def text(self) -> str:
        if not self.wall:
            return "> cap"
        ms = self.median * 1e3
        return (">= " if self.capped else "") + (f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms")


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_steps(dyn: VelocityVerlet, row: Row, budget_s: float, cap_s: float, min_steps: int = 3,
               max_steps: int = 300) -> None:
    """Add single MD steps to `row` until budget_s has passed (and min_steps are done), or cap_s."""
    def alarm(*_):
        raise StepTimeout

    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, cap_s)
    try:
        for n in range(max_steps):
            if time.perf_counter() - start >= budget_s and n >= min_steps:
                break
            t, c = time.perf_counter(), time.process_time()
            dyn.run(1)
            row.wall.append(time.perf_counter() - t)
            row.cpu.append(time.process_time() - c)
    except StepTimeout:
        row.capped = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def busy(n: int):
    """n processes spinning on a core each; stopped (by their own pids) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


# ---- the run ----------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__} "
            f"(default {torch.get_num_threads()} threads), mace-torch {_version('mace-torch')}, "
            f"ase {_version('ase')}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "models", "benchmarks/bench_md.py"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + (" + uncommitted changes to models/ or this script" if dirty else "")


def run(systems: list[str], rounds: int, budget_s: float, cap_s: float) -> tuple[dict, list[str]]:
    """{(system, n_atoms, setting, load): Row} and notes. Each round times every setting idle, then busy."""
    potential = load_package(POLYFID_MODEL)
    mace = mace_model()
    rows: dict[tuple, Row] = {}
    notes: list[str] = []
    loads = ("idle", f"{N_BUSY} busy")
    for name in systems:
        start = SYSTEMS[name]()
        trials = []
        for s in settings(potential, mace):
            atoms = start.copy()
            atoms.calc = s.make()
            rng = np.random.default_rng(0)  # 300 K momenta, the same for every setting
            atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 300))
            dyn = VelocityVerlet(atoms, 0.5 * units.fs)
            threads = s.torch_threads or torch.get_num_threads()
            with torch_threads(threads):
                dyn.run(s.warmup)
            trials.append((s, atoms, dyn, threads))
        averages = {load: [] for load in loads}
        for _ in range(rounds):
            for load in loads:
                with busy(N_BUSY) if load != "idle" else contextlib.nullcontext():
                    averages[load].append(os.getloadavg()[0])
                    for s, atoms, dyn, threads in trials:
                        row = rows.setdefault((name, len(start), s.name, load), Row())
                        with torch_threads(threads):
                            time_steps(dyn, row, budget_s, cap_s)
                        print(f"{name:8s} {len(start):4d} {s.name:20s} {load:7s} {row.text():>10s} "
                              f"({len(row.wall)} steps so far)", flush=True)
        notes += [f"{name}, {load}: 1-minute load average {', '.join(f'{x:.1f}' for x in v)} as each round's rows "
                  "started" for load, v in averages.items()]
        for s, atoms, _, _ in trials:  # the random MACE must not have blown the molecule apart
            span = np.ptp(atoms.positions, axis=0).max()
            if span > 2 * np.ptp(start.positions, axis=0).max() + 5:
                notes.append(f"{name}, {s.name}: the molecule spread to {span:.0f} Å")
    return rows, notes


def report(rows: dict, notes: list[str], systems: list[str], rounds: int, cap_s: float, command: str) -> str:
    busy_load = f"{N_BUSY} busy"
    names = list(dict.fromkeys(k[2] for k in rows))
    keys = sorted({(k[0], k[1]) for k in rows}, key=lambda k: systems.index(k[0]))
    lines = [
        "# ASE MD step time: polyfid against MACE, idle and busy",
        "",
        f"Machine: {machine()}.",
        f"Commit: `{commit()}`. Command: `{command}`.",
        "",
        f"Median wall time of one Velocity Verlet step (float64), over {rounds} rounds that each time every setting "
        f"idle and then busy. `{busy_load}`: {N_BUSY} other processes spin on the cores. A row's steps in a round "
        f"were cut off after {cap_s:.0f} s: `>=` gives the median of the steps that finished, `> cap` means none did. "
        "CPU: the median CPU time of this process per step, idle (every thread counted).",
        "",
        f"| system | atoms | setting | idle | {busy_load} | busy / idle | CPU, idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, n in keys:
        for s in names:
            idle, hot = rows[(name, n, s, "idle")], rows[(name, n, s, busy_load)]
            ratio = "n/a" if not idle.wall else ((">= " if hot.capped else "") + f"{hot.median / idle.median:.2f}x")
            lines.append(f"| {name} | {n} | {s} | {idle.text()} | {hot.text()} | {ratio} | "
                         f"{idle.cpu_median * 1e3:.1f} ms |")
    lines += ["", "**Goals** (issue 29): polyfid's default step <= 0.1x MACE's default step (idle), and "
              "polyfid's default step busy <= 1.5x its idle step.", "",
              "| system | polyfid / MACE, default, idle | default, busy | 1 thread, idle | 1 thread, busy "
              "| polyfid default, busy / idle | met |", "|---|---|---|---|---|---|---|"]
    for name, n in keys:
        def t(s: str, load: str) -> float:
            return rows[(name, n, s, load)].median

        ratios = [t("polyfid, " + s, load) / t("MACE, " + s, load) for s in ("default", "1 thread")
                  for load in ("idle", busy_load)]
        slow = t("polyfid, default", busy_load) / t("polyfid, default", "idle")
        met = "yes" if ratios[0] <= 0.1 and slow <= 1.5 else "no"
        lines.append(f"| {name} ({n}) | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {slow:.2f}x | {met} |")
    lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of idle-then-busy timing")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of steps per row and round (at least 3 steps)")
    parser.add_argument("--cap", type=float, default=12.0, help="seconds after which a row's steps in a round are cut off")
    parser.add_argument("--out", type=Path, help="write the report here (markdown)")
    args = parser.parse_args()
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {unknown}; known: {list(SYSTEMS)}")
    command = "python benchmarks/bench_md.py " + " ".join(sys.argv[1:])
    rows, notes = run(systems, args.rounds, args.budget, args.cap)
    text = report(rows, notes, systems, args.rounds, args.cap, command)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

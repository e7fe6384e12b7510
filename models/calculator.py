"""An ASE calculator for a polyfid model package (or an in-memory Potential) at one fidelity.

Made for many small MD jobs side by side, one per core:
- **Threads.** torch's default (one intra-op thread per core) made an ethanol step 40x slower, and a 1,029-atom
  step 50x slower, when other processes kept the cores busy. The calculator runs on `threads` torch threads:
  the argument, else $POLYFID_THREADS, else "auto" (AutoThreads: 1 thread below 2,000 atoms; more only for a
  larger system and only on cores that other processes leave idle). torch.set_num_threads is process-wide:
  the calculator sets it only while it computes and puts the old value back (0.4 µs a step). Two calculators
  computing at once in two Python threads of one process would share that setting.
- **Neighbour list with a skin** (neighbors.SkinNeighborList), rebuilt only when an atom has moved more than
  skin/2, or the cell, pbc or atom count changed.
- **TorchScript** for small systems (`script`), which removes Python's per-op cost; eager above
  SCRIPT_MAX_PAIRS pairs, where the eager model's chunked pair kernels are faster.
"""

from __future__ import annotations

import numbers
import os
import time

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from polyfid.data_shards.schema import highest_rank
from polyfid.models.graph import Graph
from polyfid.models.neighbors import SkinNeighborList
from polyfid.models.package import load_package
from polyfid.models.potential import Potential

THREADS_ENV = "POLYFID_THREADS"
AUTO_ATOMS_PER_THREAD = 1000  # auto: a system gets a 2nd thread from 2,000 atoms, a 3rd from 3,000... (on idle cores only)
IDLE_WINDOW_S = 2.0  # auto: how often, at most, the idle cores are measured again (/proc/stat)
DEFAULT_SKIN = 1.0  # Å; an MD atom moves ~0.01 Å a step, so the list lasts tens of steps
SCRIPT_AFTER = 10  # auto: the TorchScript path starts on this evaluation (scripting takes 0.2-4 s; single points skip it)
SCRIPT_MAX_PAIRS = 2000  # auto: above this many pairs the eager model is faster (measured: models/README.md)


def auto_threads(n_atoms: int, limit: int | None = None) -> int:
    """Threads the size of `n_atoms` atoms could use: 1 per AUTO_ATOMS_PER_THREAD, at least 1, at most `limit`
    (default: torch's setting, which follows OMP_NUM_THREADS)."""
    limit = torch.get_num_threads() if limit is None else limit
    return max(1, min(limit, n_atoms // AUTO_ATOMS_PER_THREAD))


def resolve_threads(threads: int | str | None) -> int | None:
    """The thread setting as a positive int, or None for "auto"; `threads` (the argument) wins over $POLYFID_THREADS."""
    where = f"Calculator(threads={threads!r})"
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "")
        threads, where = raw.strip() or "auto", f"${THREADS_ENV}={raw!r}"
    if threads == "auto":
        return None
    value = int(threads) if isinstance(threads, str) and threads.isdigit() else threads
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: the number of torch threads must be a positive integer or 'auto'")
    return int(value)


def _busy_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


class AutoThreads:
    """The "auto" setting: 1 thread below 2 * AUTO_ATOMS_PER_THREAD atoms; a larger system gets up to one thread
    per AUTO_ATOMS_PER_THREAD atoms, but only as many as the cores that other processes left idle over the last
    measurement (the machine's busy time in /proc/stat less this process's own). On a busy machine, or where that
    cannot be measured, it stays at 1: a second thread on a busy machine made a 1,029-atom step 40-50x slower."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or os.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None
        self.idle_cores = 0.0  # unknown until two readings IDLE_WINDOW_S apart

    def __call__(self, n_atoms: int) -> int:
        wanted = auto_threads(n_atoms)
        if wanted == 1:
            return 1
        self.observe(_busy_seconds())
        return max(1, min(wanted, int(self.idle_cores + 0.2)))

    def observe(self, reading: tuple[float, float, float] | None) -> None:
        """Update idle_cores from a (wall, machine busy, own CPU) reading, at most once per IDLE_WINDOW_S."""
        if reading is None:
            return
        if self._last is not None:
            wall = reading[0] - self._last[0]
            if wall < IDLE_WINDOW_S:
                return
            others = (reading[1] - self._last[1]) - (reading[2] - self._last[2])
            self.idle_cores = self.cores - max(0.0, others) / wall
        self._last = reading


class _Threads:
    """Run a block on `n` torch intra-op threads and restore the process's setting after it."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


class _EagerPath:
    """One head's energy and forces through Potential.forward (the model's chunked pair kernels)."""

    def __init__(self, potential: Potential, head: int) -> None:
        self.potential, self.head = potential, head

    def __call__(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # forces are still taken by autograd inside; outputs come back detached
            out = self.potential(graph, force_heads=[self.head])
        return out["energy"][0, self.head], out["forces"][:, self.head]


class _EnergyForces(torch.nn.Module):
    """One head's energy and forces from atomic numbers, positions and pairs; compiles with torch.jit.script."""

    def __init__(self, potential: Potential, head: int) -> None:
        super().__init__()
        self.potential = potential
        self.head = head

    def forward(self, z: torch.Tensor, pos: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor,
                shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = pos.detach().requires_grad_(True)
        r_vec = pos.index_select(0, pair_j) - pos.index_select(0, pair_i) + shift
        energy = self.potential.total_atom_energies(z, r_vec, pair_i, pair_j)[:, self.head].sum()
        grad = torch.autograd.grad([energy], [pos])[0]
        assert grad is not None
        return energy.detach(), -grad.detach()


class _ScriptedPath:
    """The same through TorchScript (scripted once, 1-4 s), run without the profiling optimiser: it re-specialises
    whenever the pair count changes and has no CPU fuser to gain from, so it only slows an MD step down."""

    def __init__(self, potential: Potential, head: int) -> None:
        self.module = torch.jit.script(_EnergyForces(potential, head))

    def __call__(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.jit.optimized_execution(False):
            return self.module(graph.z, graph.pos, graph.pair_i, graph.pair_j, graph.pair_shift)


class Calculator(AseCalculator):
    """Energy (eV) and forces (eV/Å) from one fidelity head; by default the fidelity of highest rank.

    threads: torch intra-op threads while computing (int >= 1 or "auto"; None: $POLYFID_THREADS, else "auto").
    skin: Å added to the cutoff for the kept neighbour list (0 rebuilds it every step).
    script: TorchScript path; None (auto) from the SCRIPT_AFTER-th evaluation on systems of at most
    SCRIPT_MAX_PAIRS pairs, True always, False never. Both paths give the same results to rounding.
    A Potential passed in is moved to `device` and `dtype` in place and put in eval mode.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        model: str | os.PathLike | Potential,
        fidelity: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        threads: int | str | None = None,
        skin: float = DEFAULT_SKIN,
        script: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if script not in (None, True, False):
            raise ValueError(f"Calculator(script={script!r}): expected None (auto), True or False")
        self.threads = resolve_threads(threads)
        if not isinstance(model, Potential):
            model = load_package(model, device=device)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.fidelity = fidelity if fidelity is not None else highest_rank(self.model.fidelities).name
        self.head = self.model.fidelity_index(self.fidelity)
        self.neighbors = SkinNeighborList(self.model.config.cutoff, skin)
        self.script = script
        self.evaluations = 0
        self._auto_threads = AutoThreads()
        self._eager = _EagerPath(self.model, self.head)
        self._scripted: _ScriptedPath | None = None  # built on first use
        self._z: tuple[np.ndarray, torch.Tensor] | None = None  # atomic numbers and their tensor, kept between steps

    def threads_for(self, n_atoms: int) -> int:
        """The torch threads a system of `n_atoms` atoms runs on."""
        return self.threads if self.threads is not None else self._auto_threads(n_atoms)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        """Evaluate the model on `atoms` (periodic cells included)."""
        super().calculate(atoms, properties, system_changes)
        graph = self._graph(self.atoms)
        with _Threads(self.threads_for(graph.n_atoms)):
            energy, forces = self._path(graph)(graph)
        self.evaluations += 1
        self.results["energy"] = float(energy)
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = forces.to("cpu", torch.float64).numpy()

    def _graph(self, atoms) -> Graph:
        """The model's input for one structure, from the kept neighbour list."""
        i, j, shift = self.neighbors.pairs(atoms.positions, atoms.cell.array, atoms.pbc)
        if self._z is None or not np.array_equal(self._z[0], atoms.numbers):
            self._z = (atoms.numbers.copy(), torch.as_tensor(atoms.numbers.astype(np.int64), device=self.device))
        z = self._z[1]
        return Graph(
            z=z, pos=torch.as_tensor(atoms.positions, dtype=self.dtype, device=self.device),
            batch=torch.zeros_like(z), n_structures=1,
            pair_i=torch.as_tensor(i, device=self.device), pair_j=torch.as_tensor(j, device=self.device),
            pair_shift=torch.as_tensor(shift, dtype=self.dtype, device=self.device),
        )

    def _path(self, graph: Graph) -> _EagerPath | _ScriptedPath:
        """The scripted path where `script` asks for it (auto: small systems, after SCRIPT_AFTER - 1 evaluations)."""
        use = self.script
        if use is None:
            use = self.evaluations >= SCRIPT_AFTER - 1 and graph.pair_i.numel() <= SCRIPT_MAX_PAIRS
        if not use:
            return self._eager
        if self._scripted is None:
            self._scripted = _ScriptedPath(self.model, self.head)
        return self._scripted

"""polyfid HIP-HOP-NN against hippynn 0.1.3's HipHopnn: same configuration, accuracy, speed; NVE drift.

Run: python benchmarks/bench_models.py --out benchmarks/RESULTS_models.md
One CPU thread; every timing is the median of repeats. Both models see the same vesin pair list.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HIPPYNN_USE_CUSTOM_KERNELS", "False")
os.environ.setdefault("HIPPYNN_WARN_LOW_DISTANCES", "False")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from polyfid.data_shards.schema import Fidelity  # noqa: E402
from polyfid.models import Calculator, ModelConfig, Potential, graph_from_atoms, invariant_count  # noqa: E402
from polyfid.models.graph import Graph  # noqa: E402
from polyfid.models.testing import nve_drift, tiny_potential  # noqa: E402

warnings.filterwarnings("ignore")
ELEMENTS = (1, 6, 7, 8)
FID = Fidelity("b3lyp_631gs", rank=1, method="B3LYP", basis="6-31G*")
CONFIG = dict(kind="hiphop", width=64, n_interactions=2, n_atom_layers=2, n_sensitivities=16, cutoff=5.0,
              soft_min=0.75, soft_max=4.5, l_max=3, n_max=4, activation="silu")
MOLECULES = ["C3H9C", "CH3CH2OCH3", "C4H4NH", "C2H6CHOH", "isobutene", "bicyclobutane", "trans-butane",
             "C6H6", "cyclobutane", "C5H5N", "isobutane", "C3H8", "C3H9N", "C5H8", "CH3COCH3", "CH3CH2NH2"]


# ---- the two models behind one interface: (graph) -> per-structure energies [S] -------------------
class HippynnModel(torch.nn.Module):
    """hippynn's HipHopNNModule with a hierarchical energy readout (a Linear per layer, as HEnergy)."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        from hippynn.networks.hiphop import HipHopNNModule

        self.net = HipHopNNModule(
            n_features=c["width"], n_sensitivities=c["n_sensitivities"], dist_soft_min=c["soft_min"],
            dist_soft_max=c["soft_max"], dist_hard_max=c["cutoff"], n_atom_layers=c["n_atom_layers"],
            n_interaction_layers=c["n_interactions"], possible_species=[0, *ELEMENTS],
            activation=torch.nn.SiLU, l_max=c["l_max"], n_max=c["n_max"],
        )
        sizes = self.net.feature_sizes
        self.readouts = torch.nn.ModuleList(torch.nn.Linear(n, 1) for n in sizes)
        lookup = torch.full((max(ELEMENTS) + 1,), -1, dtype=torch.int64)
        lookup[list(ELEMENTS)] = torch.arange(len(ELEMENTS))
        self.register_buffer("lookup", lookup)

    def forward(self, g: Graph, pos: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(self.lookup[g.z], len(ELEMENTS)).to(pos.dtype)
        coord = pos[g.pair_j] - pos[g.pair_i] + g.pair_shift
        dist = torch.linalg.vector_norm(coord, dim=1)
        feats = self.net(onehot, g.pair_i, g.pair_j, dist, coord)
        e_atom = sum(r(f) for r, f in zip(self.readouts, feats))[:, 0]
        return torch.zeros(g.n_structures, dtype=e_atom.dtype, device=pos.device).index_add(0, g.batch, e_atom)


class HippynnKernels(torch.nn.Module):
    """The same hippynn model, run with one of hippynn's message-passing kernel implementations."""

    def __init__(self, model: HippynnModel, kernels: str) -> None:
        super().__init__()
        self.model, self.kernels = model, kernels

    def forward(self, g: Graph, pos: torch.Tensor) -> torch.Tensor:
        from hippynn import custom_kernels

        if custom_kernels.CUSTOM_KERNELS_ACTIVE != self.kernels:
            custom_kernels.set_custom_kernels(self.kernels)
        return self.model(g, pos)


class PolyfidModel(torch.nn.Module):
    """polyfid's Potential, one head, through the same interface."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        self.potential = Potential(ModelConfig(**c), ELEMENTS, [FID])

    def forward(self, g: Graph, pos: torch.Tensor) -> torch.Tensor:
        e_atom = self.potential.atom_energies(g, pos)[:, 0]
        return torch.zeros(g.n_structures, dtype=e_atom.dtype, device=pos.device).index_add(0, g.batch, e_atom)


def energy_forces(model, g: Graph, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies [S] and forces −∂E/∂R [A, 3]."""
    pos = g.pos.detach().requires_grad_(True)
    e = model(g, pos)
    (grad,) = torch.autograd.grad(e.sum(), pos, create_graph=create_graph)
    return e, -grad


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- data -------------------------------------------------------------------------------------------
def demo_data() -> tuple[list, list]:
    """Train (frames :80) and test (frames 80:) of every demo molecule, with b3lyp_631gs labels."""
    import ase.io

    from polyfid.data_shards.demo import HIGH, demo_files

    train, test = [], []
    for path in demo_files():
        frames = ase.io.read(path, ":")
        for a in frames:
            a.info["E"] = float(a.info[f"energy_{HIGH}"])
            a.arrays["F"] = np.asarray(a.arrays[f"forces_{HIGH}"], dtype=np.float64)
        train += frames[:80]
        test += frames[80:]
    return train, test


def fit_references(frames) -> dict[int, float]:
    """Per-element reference energies by least squares on the training energies (S4)."""
    counts = np.array([[np.sum(a.numbers == z) for z in ELEMENTS] for a in frames], dtype=np.float64)
    energies = np.array([a.info["E"] for a in frames])
    coef, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return dict(zip(ELEMENTS, coef))


def labelled_batch(frames, refs: dict[int, float], cutoff: float):
    """Graph (float32), residual energies E − Σ ref (computed in float64, then cast) and forces."""
    g = graph_from_atoms(frames, cutoff, dtype=torch.float32)
    e = torch.tensor([a.info["E"] - sum(refs[int(z)] for z in a.numbers) for a in frames], dtype=torch.float32)
    f = torch.tensor(np.concatenate([a.arrays["F"] for a in frames]), dtype=torch.float32)
    return g, e, f


def train_and_test(model, train, test, refs, steps: int, batch: int, lr: float, seed: int) -> dict:
    """Adam on loss = mse(E) + mse(F) for `steps` steps; energy and force MAE on the test frames."""
    cutoff = CONFIG["cutoff"]
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(train), batch, replace=False)
        g, e, f = labelled_batch([train[i] for i in idx], refs, cutoff)
        pe, pf = energy_forces(model, g, create_graph=True)
        loss = torch.mean((pe - e) ** 2) + torch.mean((pf - f) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    g, e, f = labelled_batch(test, refs, cutoff)
    pe, pf = energy_forces(model, g, create_graph=False)
    return {"energy_mae_mev": 1000 * float((pe - e).abs().mean()), "force_mae_mev_a": 1000 * float((pf - f).abs().mean()),
            "train_seconds": seconds}


# ---- speed ------------------------------------------------------------------------------------------
def molecule_batch(seed: int = 0, count: int = 16) -> list:
    """`count` structures of 10–50 atoms: g2 molecules alone (half), and clusters of 2–3 of them 6 Å apart, rattled."""
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        parts = 1 if n < count // 2 else (2 if n < 3 * count // 4 else 3)
        atoms = None
        for k in range(parts):
            m = molecule(MOLECULES[rng.integers(len(MOLECULES))])
            m.positions += np.array([6.0 * k, 0.0, 0.0]) + rng.normal(0, 0.05, m.positions.shape)
            atoms = m if atoms is None else atoms + m
        out.append(atoms)
    return out


def water_box(n_side: int = 7, seed: int = 0):
    """n_side³ water molecules, randomly oriented on a grid in a periodic cube at about 1 g/cm³."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    spacing = (29.9) ** (1 / 3)  # Å per molecule at 1 g/cm³
    water = molecule("H2O")
    water.positions -= water.positions[0]
    pos, sym = [], []
    for ix in np.ndindex(n_side, n_side, n_side):
        rot = Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix()
        pos.append(water.positions @ rot.T + spacing * (np.array(ix) + 0.5))
        sym += water.get_chemical_symbols()
    return Atoms(sym, positions=np.concatenate(pos), cell=np.eye(3) * spacing * n_side, pbc=True)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in seconds of each fn, with the repeats of the fns interleaved.

    The machine is shared, so its load drifts; interleaving gives every model the same drift. On a GPU
    every call is bracketed by a synchronize, so the time is the kernels' and not the launch queue's.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(models: dict, systems, repeats: int, device: str = "cpu") -> dict:
    """Training-step and inference throughput (atoms/s) of each model on one batch; pairs built once."""
    g = graph_from_atoms(systems, CONFIG["cutoff"], dtype=torch.float32).to(device)
    e_ref, f_ref = torch.zeros(g.n_structures, device=device), torch.zeros(g.n_atoms, 3, device=device)

    def train_step(model, opt):
        e, f = energy_forces(model, g, create_graph=True)
        loss = torch.mean((e - e_ref) ** 2) + torch.mean((f - f_ref) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    trains, infers = {}, {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-6)
        trains[name] = lambda m=model, o=opt: train_step(m, o)
        infers[name] = lambda m=model: energy_forces(m, g, create_graph=False)
    t_train = timed_interleaved(trains, repeats)
    t_infer = timed_interleaved(infers, repeats)
    return {"atoms": g.n_atoms, "pairs": int(g.pair_i.numel()),
            **{name: (g.n_atoms / t_train[name], g.n_atoms / t_infer[name]) for name in models}}


# ---- NVE --------------------------------------------------------------------------------------------
def nve_rows(trained: PolyfidModel, ethanol, steps: int) -> list[str]:
    rows = []
    models = {"hiphop (trained above, width 64)": trained.potential}
    for kind in ("hipnn", "hipnn_ts", "hiphop"):
        models[f"{kind} (tiny test model, width 8)"] = tiny_potential(kind, readout_std=0.01, elements=ELEMENTS)
    for name, pot in models.items():
        calc = Calculator(pot, dtype=torch.float64)
        t0 = time.perf_counter()
        d = nve_drift(calc, ethanol, steps=steps, timestep_fs=0.5, temperature_k=300.0)
        rows.append(f"| {name} | {steps * 0.5 / 1000:g} ps | 0.5 fs | {d['mean_kinetic_ev']:.3f} | "
                    f"{1000 * d['end_drift_ev']:+.3f} | {1000 * d['max_deviation_ev']:.3f} | {time.perf_counter() - t0:.0f} s |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=300, help="training steps per model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--nve-steps", type=int, default=4000, help="0.5 fs steps; 4000 = 2 ps")
    ap.add_argument("--hippynn-kernels", default="pytorch,_pytorch_raw_wrapped,sparse",
                    help="hippynn message-passing implementations to time; the first one also trains")
    ap.add_argument("--seeds", default="0", help="comma list of model-init seeds for the accuracy section "
                    "(the batch order uses seed + 1); seed 0's trained model is the one the NVE section runs")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: accuracy,speed,nve")
    ap.add_argument("--device", default="cpu", help="device of the speed section: cpu or cuda")
    ap.add_argument("--molecules", type=int, default=16, help="structures in the speed section's molecule batch")
    ap.add_argument("--water-side", type=int, default=7, help="the periodic water box has this³ molecules")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.device == "cpu":
        torch.set_num_threads(1)
    import hippynn
    from hippynn import custom_kernels

    kernels = args.hippynn_kernels.split(",")
    custom_kernels.set_custom_kernels(kernels[0])

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    where = "1 thread" if args.device == "cpu" else f"{args.device}: {torch.cuda.get_device_name(0)}"
    lines = ["## models: polyfid HIP-HOP-NN vs hippynn HipHopnn", "",
             f"Machine: {platform.machine()}, `nproc` = {os.cpu_count()}, CPU `{cpu}`; torch {torch.__version__} "
             f"({where}); hippynn {hippynn.__version__}, message-passing kernels timed: "
             f"{', '.join(f'`{k}`' for k in kernels)} (`pytorch` wraps hippynn's torch kernels in torch.compile).", "",
             f"Command: `python benchmarks/bench_models.py {' '.join(sys.argv[1:])}`", ""]

    torch.manual_seed(0)
    pf, hp = PolyfidModel(CONFIG), HippynnModel(CONFIG)
    n_inv = invariant_count(CONFIG["n_max"], CONFIG["l_max"])
    lines += ["### Same configuration", "",
              "width {width}, {n_interactions} interactions, {n_atom_layers} atom layers, {n_sensitivities} "
              "sensitivities, cutoff {cutoff} Å, soft range {soft_min}–{soft_max} Å, (n_max, l_max) = ({n_max}, "
              "{l_max}), SiLU.".format(**CONFIG), "",
              "| | polyfid | hippynn |", "|---|---|---|",
              f"| parameters | {n_params(pf)} | {n_params(hp)} |",
              f"| invariants per interaction | {n_inv} | {hp.net.blocks[0][0].base_layer.n_invariants} |", ""]

    if "accuracy" not in skip:
        train, test = demo_data()
        refs = fit_references(train)
        per_seed = []
        for sd in [int(x) for x in args.seeds.split(",")]:
            if sd == 0:
                models = (("polyfid", pf), ("hippynn", hp))
            else:
                torch.manual_seed(sd)
                models = (("polyfid", PolyfidModel(CONFIG)), ("hippynn", HippynnModel(CONFIG)))
            res = {}
            for name, model in models:
                res[name] = train_and_test(model, train, test, refs, args.steps, args.batch, args.lr, seed=sd + 1)
                print(sd, name, res[name], flush=True)
            per_seed.append((sd, res))
        lines += ["### Accuracy (demo data, b3lyp_631gs)", "",
                  f"Train on frames :80 of each of the 4 molecules (320), test on frames 80: (80). Both: float32, Adam "
                  f"lr {args.lr} with cosine decay, {args.steps} steps of {args.batch} structures, loss = mse(E) + "
                  "mse(F), targets E − Σ ref(Z) with the references fitted by least squares on the training set. "
                  "Seed: model initialisation (the batch order uses seed + 1).", "",
                  "| seed | model | energy MAE (meV) | force MAE (meV/Å) | training time (s) |", "|---|---|---|---|---|"]
        for sd, res in per_seed:
            lines += [f"| {sd} | {n} | {r['energy_mae_mev']:.1f} | {r['force_mae_mev_a']:.1f} | {r['train_seconds']:.0f} |"
                      for n, r in res.items()]
        if len(per_seed) > 1:
            for n in ("polyfid", "hippynn"):
                e = sum(r[n]["energy_mae_mev"] for _, r in per_seed) / len(per_seed)
                f = sum(r[n]["force_mae_mev_a"] for _, r in per_seed) / len(per_seed)
                lines.append(f"| mean | {n} | {e:.1f} | {f:.1f} | |")
        lines.append("")

    if "speed" not in skip:
        lines += ["### Speed (atoms/s, median of {} repeats, float32)".format(args.repeats), "",
                  "| system | atoms | pairs | model | train step | inference |", "|---|---|---|---|---|---|"]
        pf.to(args.device), hp.to(args.device)
        for label, systems in ((f"{args.molecules} molecules, 10–50 atoms", molecule_batch(count=args.molecules)),
                               ("water box, periodic", [water_box(args.water_side)])):
            models = {"polyfid": pf}
            for k in kernels:
                models[f"hippynn `{k}`"] = HippynnKernels(hp, k)
            s = speed(models, systems, args.repeats, args.device)
            print(label, s, flush=True)
            for name in models:
                lines.append(f"| {label} | {s['atoms']} | {s['pairs']} | {name} | {s[name][0]:.0f} | {s[name][1]:.0f} |")
            best = [max(s[n][i] for n in models if n != "polyfid") for i in (0, 1)]
            lines.append(f"| {label} | | | **polyfid / best hippynn** | **{s['polyfid'][0] / best[0]:.2f}×** | "
                         f"**{s['polyfid'][1] / best[1]:.2f}×** |")
        lines.append("")

    if "nve" not in skip:
        import ase.io

        from polyfid.data_shards.demo import demo_files

        ethanol = ase.io.read(next(p for p in demo_files() if p.name.startswith("ethanol")), 0)
        lines += ["### NVE through the ASE Calculator (float64, ethanol frame 0, 300 K Maxwell–Boltzmann start)", "",
                  "| model | length | step | mean KE (eV) | end drift (meV) | max abs deviation (meV) | wall |",
                  "|---|---|---|---|---|---|---|"]
        lines += nve_rows(pf, ethanol, args.nve_steps)
        lines.append("")

    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_between_markers(args.out, text)


START, END = "<!-- bench_models: generated, start -->", "<!-- bench_models: generated, end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Replace the generated part of `path`, keeping any hand-written notes around it."""
    old = path.read_text() if path.exists() else ""
    head, tail = old, ""
    if START in old and END in old:
        head, tail = old.split(START, 1)[0], old.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{text}{END}{tail or chr(10)}")


if __name__ == "__main__":
    main()

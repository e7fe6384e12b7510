"""A polyfid potential as a TorchSim model: batched MD and relaxations of many systems on one device.

    import torch_sim as ts
    from polyfid.models.torchsim import TorchSimModel

    model = TorchSimModel("runs/demo/package", device="cuda")
    state = ts.io.atoms_to_state(list_of_atoms, model.device, model.dtype)
    final = ts.optimize(state, model, optimizer=ts.Optimizer.fire)

TorchSim hands the model a SimState that holds every system at once; the neighbour pairs of each system
come from vesin (on the CPU, as in TorchSim's own MACE wrapper), and the energies of all systems come from
one forward pass. Forces are −∂E/∂R and the stress is (1/V) ∂E/∂ε under a homogeneous strain ε, both by
autograd. Needs `torch-sim-atomistic` (the `export` extra).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from polyfid.data_shards.schema import highest_rank
from polyfid.models.graph import neighbor_cells
from polyfid.models.package import load_package
from polyfid.models.potential import Potential


class TorchSimModel(ModelInterface):
    """Energy [S], forces [A, 3] and, if asked, stress [S, 3, 3] of one fidelity head (default: highest rank).

    A Potential passed in is moved to `device` and `dtype` in place and put in eval mode, as the ASE
    Calculator does. The stress is defined for periodic systems only.
    """

    def __init__(
        self,
        model: Potential | str | os.PathLike,
        fidelity: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ) -> None:
        super().__init__()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not isinstance(model, Potential):
            model = load_package(model, device=device)
        self.potential = model.to(device=device, dtype=dtype).eval()
        self.fidelity = fidelity if fidelity is not None else highest_rank(self.potential.fidelities).name
        self.head = self.potential.fidelity_index(self.fidelity)
        self._device = device
        self._dtype = dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff

    def forward(self, state: SimState | dict, **kwargs) -> dict[str, torch.Tensor]:
        """{"energy": [S] eV, "forces": [A, 3] eV/Å, "stress": [S, 3, 3] eV/Å³} for every system in `state`."""
        get = state.get if isinstance(state, dict) else lambda k, d=None: getattr(state, k, d)
        pos = get("positions").to(device=self._device, dtype=self._dtype)
        z = get("atomic_numbers").to(device=self._device, dtype=torch.int64)
        system_idx = get("system_idx")
        system_idx = torch.zeros_like(z) if system_idx is None else system_idx.to(device=self._device, dtype=torch.int64)
        n_systems = int(system_idx.max()) + 1 if system_idx.numel() else 0
        cell = get("cell").to(device=self._device, dtype=self._dtype).reshape(-1, 3, 3).mT  # rows are cell vectors
        pbc = self._pbc(get("pbc"), n_systems)
        if self._compute_stress and not bool(pbc.any(dim=1).all()):
            raise ValueError("TorchSimModel: the stress needs a periodic cell in every system; "
                             "build the model with compute_stress=False for molecules")
        pair_i, pair_j, shifts, pair_system = self._pairs(pos, cell, pbc, system_idx, n_systems)
        with torch.enable_grad():
            pos_leaf = pos.detach().requires_grad_(self._compute_forces)
            strain = torch.zeros(n_systems, 3, 3, dtype=self._dtype, device=self._device,
                                 requires_grad=self._compute_stress)
            deform = torch.eye(3, dtype=self._dtype, device=self._device) + 0.5 * (strain + strain.mT)
            x = torch.einsum("ai,aij->aj", pos_leaf, deform[system_idx])
            strained_cell = cell @ deform
            r_vec = x[pair_j] - x[pair_i] + torch.einsum("pi,pij->pj", shifts, strained_cell[pair_system])
            e_atom = self.potential.total_atom_energies(z, r_vec, pair_i, pair_j)[:, self.head]
            energy = torch.zeros(n_systems, dtype=e_atom.dtype, device=self._device).index_add(0, system_idx, e_atom)
            wanted = [t for t, on in ((pos_leaf, self._compute_forces), (strain, self._compute_stress)) if on]
            grads = torch.autograd.grad(energy.sum(), wanted) if wanted else ()
        out = {"energy": energy.detach().to(self._dtype)}
        if self._compute_forces:
            out["forces"] = -grads[0].to(self._dtype)
        if self._compute_stress:
            volume = torch.linalg.det(cell).abs().reshape(-1, 1, 1)
            out["stress"] = (grads[-1] / volume).to(self._dtype)
        return out

    @staticmethod
    def _pbc(pbc, n_systems: int) -> torch.Tensor:
        """Periodic flags as bool [S, 3], from TorchSim's one flag, three flags, or one row per system."""
        flags = torch.as_tensor(pbc, dtype=torch.bool).cpu()
        if flags.dim() == 0:
            flags = flags.repeat(3)
        return flags.reshape(-1, 3).expand(n_systems, 3)

    def _pairs(self, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, system_idx: torch.Tensor,
               n_systems: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Directed pairs of every system: i, j (global atom indices), integer cell shifts, the pair's system."""
        pos_np = pos.detach().to("cpu", torch.float64).numpy()
        cell_np = cell.detach().to("cpu", torch.float64).numpy()
        counts = torch.bincount(system_idx, minlength=n_systems).cpu().numpy()
        starts = np.concatenate([[0], np.cumsum(counts)])
        ii, jj, ss, owner = [], [], [], []
        for s in range(n_systems):
            a, b = starts[s], starts[s + 1]
            i, j, shift = neighbor_cells(pos_np[a:b], cell_np[s], pbc[s].numpy(), self.potential.config.cutoff)
            ii.append(i + a)
            jj.append(j + a)
            ss.append(shift)
            owner.append(np.full(len(i), s, dtype=np.int64))
        cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, dtype=np.int64)  # noqa: E731
        to = lambda a, dtype=torch.int64: torch.as_tensor(a, device=self._device).to(dtype)  # noqa: E731
        return to(cat(ii, (0,))), to(cat(jj, (0,))), to(cat(ss, (0, 3)), self._dtype), to(cat(owner, (0,)))

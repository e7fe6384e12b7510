"""The potential: a HIP-NN backbone with one hierarchical energy head per fidelity; forces by autograd."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import torch

from polyfid.data_shards.schema import Fidelity
from polyfid.models.config import ModelConfig
from polyfid.models.graph import Graph
from polyfid.models.hipnn import Backbone

READOUT_INIT_STD = 0.01  # small, so that a fresh model's energies start near the reference energies


def _energy_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of energies and forces for weights of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Potential(torch.nn.Module):
    """Energies [S, F] in eV for every fidelity, and forces −∂E_k/∂R for the requested heads.

    E_k(structure) = Σ_atoms (scale_k · Σ_layers readout_layer(h)[k] + shift_k + ref_k[Z]). Reference
    energies are a float64 buffer [F, max_Z+1] that stays float64 when the model is cast, because bfloat16
    cannot hold a molecule's total energy to better than several eV. scale_k and shift_k (eV/atom) are set
    from the training data (data_shards/reference_fit.py), so that every head's readout works in units
    of its own level's spread, whatever the levels' absolute energies.

    With `config.head_design == "delta"` a head's readout is a correction on its base head's:
    E_k − Σ ref_k = scale_k·readout[k] + (E_base(k) − Σ ref_base(k)) + the shift difference, recursively down the chain (head_sum [F, F]
    holds, for each head, 1 on itself and its ancestors). Reference energies stay per fidelity.
    """

    def __init__(
        self,
        config: ModelConfig,
        elements: Sequence[int],
        fidelities: Sequence[Fidelity],
        reference_energies: Mapping[str, Mapping[int, float]] | None = None,
    ) -> None:
        super().__init__()
        self.elements: list[int] = sorted({int(z) for z in elements})
        if not self.elements or self.elements[0] < 1 or self.elements[-1] > 118:
            raise ValueError(f"elements must be atomic numbers 1..118, got {list(elements)}")
        self.fidelities: list[Fidelity] = list(fidelities)
        if not self.fidelities:
            raise ValueError("a Potential needs at least one fidelity")
        names = [f.name for f in self.fidelities]
        if len(set(names)) != len(names):
            raise ValueError(f"fidelity names must be unique, got {names}")
        self.config = self._resolve_bases(config)
        self.delta_heads = config.head_design == "delta"
        max_z = self.elements[-1]
        lookup = torch.full((max_z + 1,), -1, dtype=torch.int64)
        lookup[self.elements] = torch.arange(len(self.elements))
        self.register_buffer("species_index", lookup, persistent=False)
        self.register_buffer("reference_energies", torch.zeros(len(names), max_z + 1, dtype=torch.float64))
        self.register_buffer("head_sum", self._head_sum_matrix(), persistent=False)
        # Per-head scale and per-atom shift (MACE's scale/shift): E_k = scale_k·readout_k + shift_k·n + Σ ref_k.
        self.register_buffer("head_scale", torch.ones(len(names), dtype=torch.float64))
        self.register_buffer("head_shift", torch.zeros(len(names), dtype=torch.float64))
        self.backbone = Backbone(config, len(self.elements))
        self.readouts = torch.nn.ModuleList(
            self._new_readout(len(names)) for _ in range(config.n_interactions + 1)
        )
        for name, mapping in (reference_energies or {}).items():
            self.set_reference_energies(name, mapping)

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def fidelity_names(self) -> list[str]:
        """Names of the heads, in column order."""
        return [f.name for f in self.fidelities]

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights."""
        return self.backbone.embed.weight.dtype

    @property
    def energy_dtype(self) -> torch.dtype:
        """Dtype of the returned energies and forces: float64 for a float64 model, else float32."""
        return _energy_dtype(self.dtype)

    def fidelity_index(self, name: str) -> int:
        """Column of the head named `name`."""
        names = self.fidelity_names
        if name not in names:
            raise KeyError(f"unknown fidelity {name!r}; this model has {names}")
        return names.index(name)

    def set_reference_energies(self, name: str, mapping: Mapping[int | str, float]) -> None:
        """Set the per-element reference energies (eV) of one fidelity; elements left out keep theirs."""
        k = self.fidelity_index(name)
        with torch.no_grad():
            for z, value in mapping.items():
                z = int(z)
                if z not in self.elements:
                    raise ValueError(f"reference energy for atomic number {z}, which is not among the model's elements {self.elements}")
                self.reference_energies[k, z] = float(value)

    def set_scale_shift(self, name: str, scale: float, shift: float) -> None:
        """Set head `name`'s scale (its readout is multiplied by it) and per-atom energy shift (eV/atom)."""
        if not scale > 0:
            raise ValueError(f"the scale of head {name!r} must be positive, got {scale}")
        k = self.fidelity_index(name)
        with torch.no_grad():
            self.head_scale[k] = float(scale)
            self.head_shift[k] = float(shift)

    def rescale_head(self, name: str, scale: float) -> float:
        """Give head `name` the scale `scale` without changing what it predicts: its readout rows (weights and
        bias, in every layer) are multiplied by old/new. Adam's step on those rows then moves the head's energies
        in units of `scale`. Returns the old scale."""
        if not scale > 0:
            raise ValueError(f"the scale of head {name!r} must be positive, got {scale}")
        k = self.fidelity_index(name)
        old = float(self.head_scale[k])
        with torch.no_grad():
            for readout in self.readouts:
                readout.weight[k] *= old / scale
                readout.bias[k] *= old / scale
            self.head_scale[k] = float(scale)
        return old

    def scale_shift_dict(self) -> dict[str, dict[str, float]]:
        """{fidelity: {"scale": ..., "shift": eV/atom}}."""
        sc, sh = self.head_scale.detach().cpu().tolist(), self.head_shift.detach().cpu().tolist()
        return {f: {"scale": sc[k], "shift": sh[k]} for k, f in enumerate(self.fidelity_names)}

    def reference_energy_dict(self) -> dict[str, dict[int, float]]:
        """Reference energies as {fidelity: {Z: eV}} over the model's elements."""
        ref = self.reference_energies.detach().cpu()
        return {f: {z: float(ref[k, z]) for z in self.elements} for k, f in enumerate(self.fidelity_names)}

    def _new_readout(self, n_out: int) -> torch.nn.Linear:
        """A Linear(width → n_out) with small weights and zero bias."""
        linear = torch.nn.Linear(self.config.width, n_out)
        torch.nn.init.normal_(linear.weight, std=READOUT_INIT_STD)
        torch.nn.init.zeros_(linear.bias)
        return linear

    # ---- head design ---------------------------------------------------------------------------
    @staticmethod
    def _next_lower(fidelity: Fidelity, candidates: Sequence[Fidelity]) -> str | None:
        """The candidate of highest rank below `fidelity`'s (ties: the first in head order), or None."""
        lower = [f for f in candidates if f.rank < fidelity.rank]
        return max(lower, key=lambda f: f.rank).name if lower else None

    def _resolve_bases(self, config: ModelConfig) -> ModelConfig:
        """A copy of `config` whose head_base names a base for every head that has a lower-rank one (delta)."""
        if config.head_design != "delta":
            return config
        names = self.fidelity_names
        bases = dict(config.head_base)
        unknown = sorted((set(bases) | set(bases.values())) - set(names))
        if unknown:
            raise ValueError(f"ModelConfig.head_base names {unknown}, which are not among the heads {names}")
        for f in self.fidelities:
            if f.name not in bases:
                base = self._next_lower(f, self.fidelities)
                if base is not None:
                    bases[f.name] = base
        for name in names:  # a chain must end
            seen, node = {name}, bases.get(name)
            while node is not None:
                if node in seen:
                    raise ValueError(f"ModelConfig.head_base has a cycle through {node!r}: {bases}")
                seen.add(node)
                node = bases.get(node)
        return dataclasses.replace(config, head_base=bases)

    def head_chain(self, name: str) -> list[str]:
        """The heads whose readouts sum to head `name`'s energy: itself, then its base, its base's base..."""
        chain = [name]
        while self.config.head_design == "delta" and chain[-1] in self.config.head_base:
            chain.append(self.config.head_base[chain[-1]])
        return chain

    def _head_sum_matrix(self) -> torch.Tensor:
        """[F, F] float64: row k has 1 at the columns of head k's chain (the identity for independent heads)."""
        names = self.fidelity_names
        m = torch.zeros(len(names), len(names), dtype=torch.float64)
        for k, name in enumerate(names):
            for j in self.head_chain(name):
                m[k, names.index(j)] = 1.0
        return m

    def add_fidelity(self, fidelity: Fidelity, init_from: str | None = None) -> int:
        """Append a head for `fidelity`, copying the readouts and references of `init_from` if given.

        With delta heads the new head corrects the existing head of next-lower rank; its readout is set so
        that its energy minus references equals `init_from`'s (zero when `init_from` is that base).
        Returns its column. Optimisers built before this call do not see the new head's parameters.
        """
        if fidelity.name in self.fidelity_names:
            raise ValueError(f"fidelity {fidelity.name!r} already has a head; heads: {self.fidelity_names}")
        src = None if init_from is None else self.fidelity_index(init_from)
        n_old = len(self.fidelities)
        delta = self.config.head_design == "delta"
        base = self._next_lower(fidelity, self.fidelities) if delta else None
        # the new readout row = coef @ old rows: src's effective (summed-over-chain) readout, minus its base's
        coef = None
        if src is not None:  # in units of the new head's readout, which takes src's scale
            coef = self.head_sum[src].double()
            if base is not None:
                coef = coef - self.head_sum[self.fidelity_index(base)].double()
            coef = coef * self.head_scale.to(coef.device) / float(self.head_scale[src])
        with torch.no_grad():
            for n, old in enumerate(self.readouts):
                new = self._new_readout(n_old + 1).to(device=old.weight.device, dtype=old.weight.dtype)
                new.weight[:n_old] = old.weight
                new.bias[:n_old] = old.bias
                if coef is not None:
                    c = coef.to(old.weight.device)
                    new.weight[n_old] = (c @ old.weight.double()).to(old.weight.dtype)
                    new.bias[n_old] = (c @ old.bias.double()).to(old.bias.dtype)
                new.weight.requires_grad_(old.weight.requires_grad)
                new.bias.requires_grad_(old.bias.requires_grad)
                self.readouts[n] = new
            ref = self.reference_energies
            row = ref[src] if src is not None else torch.zeros_like(ref[0])
            self.reference_energies = torch.cat([ref, row.unsqueeze(0)], dim=0)
            for key, default in (("head_scale", 1.0), ("head_shift", 0.0)):
                old_v = getattr(self, key)
                new_v = old_v[src : src + 1] if src is not None else torch.full_like(old_v[:1], default)
                setattr(self, key, torch.cat([old_v, new_v.clone()]))
        self.fidelities.append(fidelity)
        if base is not None:
            self.config.head_base[fidelity.name] = base
        self.head_sum = self._head_sum_matrix().to(self.head_sum.device)
        return n_old

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters shared by all fidelities (freeze these to fine-tune heads only)."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the per-fidelity readouts."""
        return list(self.readouts.parameters())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Keep the reference energies, scales and shifts in float64 through .to(dtype), .half(), .bfloat16(); move devices only.
        keep = ("reference_energies", "head_scale", "head_shift")
        before = {k: self._buffers[k] for k in keep}
        out = super()._apply(fn, recurse)
        for k, ref in before.items():
            self._buffers[k] = ref.to(device=self._buffers[k].device, dtype=torch.float64)
        return out

    # ---- forward ----------------------------------------------------------------------------------
    # The methods from `_species` to `total_atom_energies` compile with TorchScript (models/metatomic.py);
    # `forward` takes a Graph, which does not, and is left out of a scripted model.
    __jit_unused_properties__ = ["fidelity_names", "dtype", "energy_dtype"]

    def _species(self, z: torch.Tensor) -> torch.Tensor:
        """Index of each atom's element in the model's element list; unknown elements raise."""
        lookup = self.species_index
        if z.numel() == 0:
            return z
        known = (z >= 0) & (z < lookup.numel())
        idx = lookup[z.clamp(0, lookup.numel() - 1)]
        bad = ~known | (idx < 0)
        if bool(bad.any()):
            unknown: list[int] = torch.unique(z[bad]).tolist()
            raise ValueError(f"atomic number(s) {unknown} not among the model's elements {self.elements}")
        return idx

    def _check_heads(self, force_heads: Iterable[int] | None) -> list[int] | None:
        """Validated, de-duplicated list of head columns that need forces."""
        if force_heads is None:
            return None
        heads = sorted({int(k) for k in force_heads})
        n = len(self.fidelities)
        if any(not 0 <= k < n for k in heads):
            raise IndexError(f"force_heads {heads} out of range for {n} fidelities {self.fidelity_names}")
        return heads

    @staticmethod
    def displacements(graph: Graph, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pair vectors r_p = pos[j] − pos[i] + shift [P, 3] in `dtype`."""
        x = pos.to(dtype)
        return x.index_select(0, graph.pair_j) - x.index_select(0, graph.pair_i) + graph.pair_shift.to(dtype)

    def atom_energies(self, graph: Graph, pos: torch.Tensor) -> torch.Tensor:
        """Per-atom energy contributions [A, F] without the reference energies (delta heads: summed over the chain)."""
        r_vec = self.displacements(graph, pos, self.dtype)
        return self.pair_atom_energies(graph.z, r_vec, graph.pair_i, graph.pair_j)

    def pair_atom_energies(
        self, z: torch.Tensor, r_vec: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor
    ) -> torch.Tensor:
        """atom_energies from atomic numbers [A] and the pairs' vectors [P, 3] (pos[j] − pos[i] + shift)."""
        species = self._species(z)
        dtype = self.backbone.embed.weight.dtype
        pairs = self.backbone.pairs(r_vec.to(dtype), pair_i, pair_j)
        onehot = torch.nn.functional.one_hot(species, len(self.elements)).to(dtype)
        features = self.backbone(onehot, pairs)
        total = features[0]
        for n, readout in enumerate(self.readouts):
            out = readout(features[n])
            total = out if n == 0 else total + out
        acc = _energy_dtype(dtype)  # scale, shift and the delta sum in the energy dtype (float32 under bf16)
        shift = self.head_shift.to(total.device)
        head_sum = self.head_sum.to(device=total.device, dtype=torch.float64)
        if self.delta_heads:  # column shifts whose sums along each chain are the heads' shifts
            shift = torch.linalg.solve(head_sum, shift)
        total = total.to(acc) * self.head_scale.to(device=total.device, dtype=acc) + shift.to(acc)
        if self.delta_heads:
            total = total @ head_sum.to(acc).T
        return total

    def total_atom_energies(
        self, z: torch.Tensor, r_vec: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor
    ) -> torch.Tensor:
        """Per-atom energies [A, F] with the reference energies, in the energy dtype; they sum to E_k."""
        e_atom = self.pair_atom_energies(z, r_vec, pair_i, pair_j)
        return e_atom + self.reference_energies[:, z].T.to(e_atom.dtype)

    @torch.jit.unused
    def forward(
        self, graph: Graph, force_heads: Sequence[int] | None = None, create_graph: bool = False
    ) -> dict[str, torch.Tensor]:
        """{"energy": [S, F] eV} and, if force_heads is given, {"forces": [A, F, 3] eV/Å} (zeros elsewhere)."""
        heads = self._check_heads(force_heads)
        grad_was_enabled = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_was_enabled or bool(heads)):
            pos = graph.pos
            if heads and not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            r_vec = self.displacements(graph, pos, self.dtype)
            e_atom = self.total_atom_energies(graph.z, r_vec, graph.pair_i, graph.pair_j)
            energy = torch.zeros(graph.n_structures, e_atom.shape[1], dtype=e_atom.dtype, device=e_atom.device)
            energy = energy.index_add(0, graph.batch, e_atom)
            out = {"energy": energy}
            if heads is not None:
                out["forces"] = self._forces(energy, pos, heads, create_graph, keep=grad_was_enabled)
        if not grad_was_enabled:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def _forces(
        self, energy: torch.Tensor, pos: torch.Tensor, heads: list[int], create_graph: bool, keep: bool
    ) -> torch.Tensor:
        """−∂E_k/∂pos for k in heads, stacked to [A, F, 3]."""
        zeros = torch.zeros(pos.shape[0], 3, dtype=energy.dtype, device=energy.device)
        columns = {}
        for n, k in enumerate(heads):
            retain = create_graph or keep or n < len(heads) - 1
            (grad,) = torch.autograd.grad(
                energy[:, k].sum(), pos, create_graph=create_graph, retain_graph=retain, allow_unused=True
            )
            columns[k] = zeros if grad is None else -grad.to(energy.dtype)
        return torch.stack([columns.get(k, zeros) for k in range(energy.shape[1])], dim=1)

    def extra_repr(self) -> str:
        return (f"kind={self.config.kind}, elements={self.elements}, fidelities={self.fidelity_names}, "
                f"head_design={self.config.head_design}")

"""Export a polyfid potential as a metatomic model: one TorchScript file that LAMMPS, i-PI, ASE and TorchSim load.

`export_metatomic(package, out)` wraps the Potential in `MetatomicPotential`, which reads the engine's
neighbour list (full, strict, at the model's cutoff) and returns energies; the engine takes forces and
stress by autograd through the pair vectors, as it does for every metatomic model.

Outputs: `energy` is the default head (the fidelity of highest rank unless one is named), and every head
is also offered as the variant `energy/<fidelity>`. Per-atom energies (sample kind "atom") and
`selected_atoms` (LAMMPS domain decomposition) are supported. The interaction range is
n_interactions × cutoff, because every interaction passes messages one cutoff further.

Needs `metatomic-torch` (the `export` extra). The engines need a metatomic build of the same major torch.
This module does not use `from __future__ import annotations`: metatomic checks the real types of
`forward`'s annotations.
"""

import copy
import os
import pathlib
from typing import Dict, List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from polyfid.data_shards.schema import highest_rank
from polyfid.models.package import load_package
from polyfid.models.potential import Potential

DTYPES = {"float32": torch.float32, "float64": torch.float64}
REFERENCES = {
    "architecture": [
        "HIP-NN: Lubbers, Smith, Barros, J. Chem. Phys. 148, 241715 (2018)",
        "HIP-NN-TS: Chigaev et al., J. Chem. Phys. (2023), arXiv:2212.03195",
        "HIP-HOP-NN: Allen, Shinkle, Bujack, Lubbers, arXiv:2503.23515 (2025)",
    ],
}


class MetatomicPotential(torch.nn.Module):
    """A Potential behind metatomic's model interface: systems with neighbour lists in, energies out."""

    def __init__(self, potential: Potential, heads: Dict[str, int]) -> None:
        super().__init__()
        self.potential = potential
        self.heads = heads  # output name ("energy" or "energy/<fidelity>") -> head column
        self.neighbors = NeighborListOptions(cutoff=potential.config.cutoff, full_list=True, strict=True)

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        """The one list the model reads: full (i→j and j→i), strict, at the cutoff."""
        return [self.neighbors]

    def forward(
        self, systems: List[System], outputs: Dict[str, ModelOutput], selected_atoms: Optional[Labels] = None
    ) -> Dict[str, TensorMap]:
        """Energies of the requested heads, per system or per atom, over the selected atoms."""
        results: Dict[str, TensorMap] = {}
        if len(outputs) == 0 or len(systems) == 0:
            return results
        z, r_vec, pair_i, pair_j, system_of, atom_of = self._batch(systems)
        e_atom = self.potential.total_atom_energies(z, r_vec, pair_i, pair_j)
        dtype = systems[0].positions.dtype
        keep = self._selected(systems, selected_atoms, z.shape[0], z.device)
        for name, request in outputs.items():
            if name not in self.heads:
                raise ValueError("this model has no output named " + name)
            energy = e_atom[:, self.heads[name]]
            if request.sample_kind == "atom":
                values = energy[keep].unsqueeze(1).to(dtype)
                samples = Labels(["system", "atom"], torch.stack([system_of[keep], atom_of[keep]], dim=1))
            else:
                totals = torch.zeros(len(systems), dtype=energy.dtype, device=energy.device)
                values = totals.index_add(0, system_of[keep], energy[keep]).unsqueeze(1).to(dtype)
                samples = Labels(["system"], torch.arange(len(systems), device=z.device, dtype=torch.int32).unsqueeze(1))
            block = TensorBlock(
                values=values,
                samples=samples,
                components=torch.jit.annotate(List[Labels], []),
                properties=Labels(["energy"], torch.zeros(1, 1, dtype=torch.int32, device=z.device)),
            )
            keys = Labels(["_"], torch.zeros(1, 1, dtype=torch.int32, device=z.device))
            results[name] = TensorMap(keys, [block])
        return results

    def _batch(
        self, systems: List[System]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated atoms and pairs of all systems, with each atom's system and index in it (int32)."""
        zs, vectors, firsts, seconds, system_of, atom_of = [], [], [], [], [], []
        offset = 0
        for s, system in enumerate(systems):
            n = len(system)
            pairs = system.get_neighbor_list(self.neighbors)
            vectors.append(pairs.values.reshape(-1, 3))
            firsts.append(pairs.samples.column("first_atom").to(torch.int64) + offset)
            seconds.append(pairs.samples.column("second_atom").to(torch.int64) + offset)
            zs.append(system.types.to(torch.int64))
            system_of.append(torch.full((n,), s, dtype=torch.int32, device=system.types.device))
            atom_of.append(torch.arange(n, dtype=torch.int32, device=system.types.device))
            offset += n
        return (torch.cat(zs), torch.cat(vectors), torch.cat(firsts), torch.cat(seconds),
                torch.cat(system_of), torch.cat(atom_of))

    def _selected(
        self, systems: List[System], selected_atoms: Optional[Labels], n_atoms: int, device: torch.device
    ) -> torch.Tensor:
        """Indices of the atoms whose energies count: all, or those in `selected_atoms` (system, atom)."""
        if selected_atoms is None:
            return torch.arange(n_atoms, device=device)
        starts = [0]
        for system in systems:
            starts.append(starts[-1] + len(system))
        offsets = torch.tensor(starts[:-1], dtype=torch.int64, device=device)
        system = selected_atoms.column("system").to(device=device, dtype=torch.int64)
        atom = selected_atoms.column("atom").to(device=device, dtype=torch.int64)
        index = offsets[system] + atom
        return torch.sort(index).values


def _outputs(potential: Potential, default: str) -> Tuple[Dict[str, int], Dict[str, ModelOutput]]:
    """Output name -> head column, and the declared outputs: `energy` and `energy/<fidelity>` for every head."""
    heads = {"energy": potential.fidelity_index(default)}
    declared = {"energy": ModelOutput(unit="eV", sample_kind="atom",
                                      description=f"energy of the {default!r} head (the default)")}
    for k, fid in enumerate(potential.fidelities):
        heads[f"energy/{fid.name}"] = k
        what = " ".join(str(x) for x in (fid.method, fid.basis, fid.code, fid.dispersion) if x)
        declared[f"energy/{fid.name}"] = ModelOutput(
            unit="eV", sample_kind="atom", description=f"energy of the {fid.name!r} head ({what or 'rank ' + str(fid.rank)})")
    return heads, declared


def atomistic_model(
    model: Potential | str | os.PathLike, fidelity: str | None = None, dtype: str = "float32"
) -> AtomisticModel:
    """The metatomic AtomisticModel of a package or Potential (a copy: the caller's model is left alone)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed values: {', '.join(DTYPES)}")
    potential = model if isinstance(model, Potential) else load_package(model)
    meta = getattr(potential, "package_metadata", {})
    potential = copy.deepcopy(potential).to(device="cpu", dtype=DTYPES[dtype]).eval()
    default = fidelity if fidelity is not None else highest_rank(potential.fidelities).name
    heads, declared = _outputs(potential, default)
    capabilities = ModelCapabilities(
        outputs=declared,
        atomic_types=list(potential.elements),
        interaction_range=potential.config.cutoff * potential.config.n_interactions,
        length_unit="angstrom",
        supported_devices=["cuda", "cpu"],
        dtype=dtype,
    )
    lineage = meta.get("lineage", {}) if isinstance(meta, dict) else {}
    metadata = ModelMetadata(
        name=f"polyfid-{potential.config.kind}",
        description=(f"polyfid {potential.config.kind} potential; heads {', '.join(potential.fidelity_names)}; "
                     f"default {default}; cutoff {potential.config.cutoff} Å"),
        references=REFERENCES,
        extra={str(k): str(v) for k, v in lineage.items()},
    )
    return AtomisticModel(MetatomicPotential(potential, heads).eval(), metadata, capabilities)


def export_metatomic(
    package: Potential | str | os.PathLike,
    out: str | os.PathLike,
    fidelity: str | None = None,
    dtype: str = "float32",
) -> pathlib.Path:
    """Write `package` (a package folder or a Potential) as a metatomic TorchScript file at `out`."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = atomistic_model(package, fidelity=fidelity, dtype=dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        model.save(str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

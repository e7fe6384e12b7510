"""Small builders shared by tests: batches straight from ASE frames, and tiny models."""

from __future__ import annotations

import numpy as np

from polyfid.data_shards.schema import Fidelity


def batch_from_frames(frames, fids=("lo", "hi"), forces_for=("lo",), energy_for=("lo", "hi")) -> dict:
    """A reader-style Batch from labelled ASE frames; labels not listed are NaN (missing)."""
    S, A, F = len(frames), sum(len(a) for a in frames), len(fids)
    energy = np.full((S, F), np.nan)
    forces = np.full((A, F, 3), np.nan)
    off = 0
    for s, a in enumerate(frames):
        for k, f in enumerate(fids):
            if f in energy_for:
                energy[s, k] = a.info[f"energy_{f}"]
            if f in forces_for:
                forces[off : off + len(a), k] = a.arrays[f"forces_{f}"]
        off += len(a)
    return {
        "atomic_numbers": np.concatenate([a.numbers for a in frames]).astype(np.int64),
        "positions": np.concatenate([a.positions for a in frames]),
        "cell": np.zeros((S, 3, 3)),
        "pbc": np.zeros((S, 3), bool),
        "n_atoms": np.array([len(a) for a in frames], np.int64),
        "structure_id": np.arange(S, dtype=np.int64),
        "store": np.zeros(S, np.int64),
        "dataset": np.zeros(S, np.int64),
        "energy": energy,
        "forces": forces,
    }


def tiny_model(kind: str = "hipnn_ts", seed: int = 0, width: int = 8):
    import torch

    from polyfid.models.config import ModelConfig
    from polyfid.models.potential import Potential

    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, width=width, n_interactions=1, n_atom_layers=1, n_sensitivities=6, cutoff=4.0)
    fids = [Fidelity("lo", rank=0), Fidelity("hi", rank=1)]
    refs = {"lo": {1: -13.0, 6: -1000.0, 7: -1400.0, 8: -2000.0}, "hi": {1: -13.5, 6: -1001.0, 7: -1401.0, 8: -2001.0}}
    return Potential(cfg, [1, 6, 7, 8], fids, refs)


# Element references (eV) for the export tests' tiny models: H, C, N, O, Na, Si, Cl.
EXPORT_REFS = {1: -13.6, 6: -1029.8, 7: -1484.2, 8: -2041.5, 11: -4418.0, 14: -7871.0, 17: -12522.0}


def one_torch_thread():
    """Generator for an autouse fixture: small tensors run faster on one thread, and OpenMP threads stall on a
    loaded machine (an NVE test took 70 s with two threads, 3 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared fixtures: small labelled molecules, and a shared cache for DeepSpeed's compiled CPU ops."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for dist_utils in spawned ranks
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "polyfid" / "torch_extensions"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def emt_frames(n: int, seed: int = 0, names=("CH4", "H2O", "NH3", "CH3OH")):
    """Perturbed small molecules labelled with ASE's EMT potential (a classical potential, not QM):
    real, smooth energies and forces for numerical tests of the training machinery."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = molecule(names[i % len(names)])
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["energy_lo"] = e
        a.info["energy_hi"] = 1.1 * e + 0.3 * len(a)
        a.arrays["forces_lo"] = f
        a.arrays["forces_hi"] = 1.1 * f
        out.append(a)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a shared 2-core machine, on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def frames():
    return emt_frames(24)


@pytest.fixture(scope="module")
def shared_ray():
    """The module's in-process trainings share one local Ray cluster (launcher.one_ray_cluster): each run then
    skips Ray's start-up and shut-down. Not for a module that starts a cluster of its own (cluster.address)."""
    from polyfid.distributed.driver.launcher import one_ray_cluster

    with one_ray_cluster():
        yield

"""HIP-NN-family potentials with per-fidelity heads, the model package and the ASE calculator.

This package never imports ray, deepspeed or mlflow.
"""

from __future__ import annotations

from polyfid.models.config import ModelConfig
from polyfid.models.graph import Graph, build_graph, graph_from_atoms
from polyfid.models.invariants import invariant_count, invariant_names
from polyfid.models.package import load_package, save_package
from polyfid.models.potential import Potential

__all__ = [
    "ModelConfig",
    "Potential",
    "Graph",
    "build_graph",
    "graph_from_atoms",
    "save_package",
    "load_package",
    "Calculator",
    "TorchSimModel",
    "export_metatomic",
    "invariant_count",
    "invariant_names",
]


def __getattr__(name: str):
    # The calculator pulls in ase.calculators, and the exporters need the `export` extra (torch-sim-atomistic,
    # metatomic-torch); import them only when asked for.
    if name == "Calculator":
        from polyfid.models.calculator import Calculator

        return Calculator
    if name == "TorchSimModel":
        from polyfid.models.torchsim import TorchSimModel

        return TorchSimModel
    if name == "export_metatomic":
        from polyfid.models.metatomic import export_metatomic

        return export_metatomic
    raise AttributeError(f"module 'polyfid.models' has no attribute {name!r}")

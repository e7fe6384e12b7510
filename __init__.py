"""polyfid: multi-fidelity and meta-learned pretraining of HIP-NN interatomic potentials."""

from __future__ import annotations

from polyfid._version import __version__

__all__ = ["__version__", "load_package", "Calculator"]


def __getattr__(name: str):
    # Lazy, so that `import polyfid` stays cheap and pulls in torch only when a model is needed.
    if name == "load_package":
        from polyfid.models.package import load_package

        return load_package
    if name == "Calculator":
        from polyfid.models.calculator import Calculator

        return Calculator
    raise AttributeError(f"module 'polyfid' has no attribute {name!r}")

"""The architecture of a HIP-NN-family potential, as a typed, validated dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KINDS = ("hipnn", "hipnn_ts", "hiphop")
ACTIVATIONS = ("silu", "softplus", "tanh", "gelu", "celu")
HEAD_DESIGNS = ("independent", "delta")


@dataclasses.dataclass
class ModelConfig:
    """Architecture of the backbone; `Potential(config, elements, fidelities)` makes a model from it."""

    kind: str = "hipnn_ts"
    """Network family: "hipnn" (l=0), "hipnn_ts" (adds norms of l=1..l_max sums), "hiphop" (S2 invariants)."""
    width: int = 64
    """Features per atom in every layer."""
    n_interactions: int = 2
    """Number of interaction blocks (message-passing steps)."""
    n_atom_layers: int = 2
    """Atom layers after the species embedding and after each interaction."""
    n_sensitivities: int = 16
    """Number of inverse-distance Gaussian sensitivities."""
    cutoff: float = 5.0
    """Hard cutoff radius in Å; the cos² envelope reaches zero here."""
    soft_min: float = 0.75
    """Smallest sensitivity centre at initialisation, Å."""
    soft_max: float = 4.5
    """Largest sensitivity centre at initialisation, Å."""
    l_max: int = 2
    """Highest rank of the Cartesian direction tensors (hipnn_ts: 1..3, hiphop: 0..3; hipnn ignores it)."""
    n_max: int = 4
    """Most tensors multiplied in one invariant (hiphop only; 1..4)."""
    activation: str = "silu"
    """Nonlinearity of atom and interaction layers."""
    head_design: str = "independent"
    """How fidelity heads relate: "independent" (S1: one readout per fidelity on the shared backbone) or
    "delta" (a head's energy is its base head's energy plus a learned correction: E_high = E_low + ΔE)."""
    head_base: dict[str, str] = dataclasses.field(default_factory=dict)
    """delta only: fidelity -> the head it corrects. Fidelities left out take the head of the next-lower
    rank; the Potential fills this in, so a saved package keeps its chain when heads are added later."""
    scale_shift: bool = True
    """Give each head a scale and a per-atom energy shift fitted on the training data (as MACE does), so that
    every head's readout works in units of its own level; False: scale 1 and shift 0."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModelConfig.kind={self.kind!r} is not allowed; allowed values: {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.activation={self.activation!r} is not allowed; allowed values: {', '.join(ACTIVATIONS)}"
            )
        if self.head_design not in HEAD_DESIGNS:
            raise ValueError(
                f"ModelConfig.head_design={self.head_design!r} is not allowed; allowed values: {', '.join(HEAD_DESIGNS)}"
            )
        if not isinstance(self.head_base, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.head_base.items()
        ):
            raise ValueError(f"ModelConfig.head_base must map fidelity names to fidelity names, got {self.head_base!r}")
        self.head_base = dict(self.head_base)
        if self.head_base and self.head_design != "delta":
            raise ValueError("ModelConfig.head_base is only used with head_design='delta'")
        for name in ("width", "n_interactions", "n_atom_layers", "n_sensitivities", "l_max", "n_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ModelConfig.{name} must be an integer, got {value!r}")
        for name in ("width", "n_interactions", "n_atom_layers", "n_sensitivities"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cutoff", "soft_min", "soft_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if not self.soft_min < self.soft_max:
            raise ValueError(f"ModelConfig.soft_min ({self.soft_min}) must be below soft_max ({self.soft_max})")
        if self.kind == "hipnn_ts" and not 1 <= self.l_max <= 3:
            raise ValueError(f"ModelConfig.l_max={self.l_max} is not allowed for hipnn_ts; allowed values: 1, 2, 3")
        if self.kind == "hiphop":
            if not 0 <= self.l_max <= 3:
                raise ValueError(f"ModelConfig.l_max={self.l_max} is not allowed for hiphop; allowed values: 0..3")
            if not 1 <= self.n_max <= 4:
                raise ValueError(f"ModelConfig.n_max={self.n_max} is not allowed for hiphop; allowed values: 1..4")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/YAML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))

"""Early stopping and best-weights selection, the same for every run (config section `stopping:`).

The score weighs validation errors as the loss does and is smoothed over validations; `Validator`
(validation.py) feeds it and restores the best weights at the end.
"""

from __future__ import annotations

import numpy as np


class EarlyStopping:
    """Stop after `patience` validations without improvement; keep the best weights (config: `stopping:`).

    The score weighs the validation errors as the loss does: energy_weight × energy MAE per atom (eV) +
    forces_weight × force MAE (eV/Å) of `head`, or the mean of that over every head validated when `head` is
    None; smoothed over validations (an exponential average that keeps `smoothing` of the previous value),
    because a small validation set is noisy. Validations before `min_steps` never count against patience.
    Validation results are all-reduced, so every rank decides alike. `patience` 0: never stop.
    """

    def __init__(self, patience: int, head: str | None, energy_weight: float = 1.0, forces_weight: float = 1.0,
                 min_steps: int = 0, smoothing: float = 0.0) -> None:
        self.patience, self.head = patience, head
        self.weights = (energy_weight, forces_weight)
        self.min_steps, self.smoothing = min_steps, smoothing
        self.best_score, self.best_step, self.bad = float("inf"), -1, 0
        self.smoothed: float | None = None
        self.best_state: dict | None = None

    def _head_score(self, r: dict[str, float]) -> float:
        e, f = r.get("energy_mae_per_atom"), r.get("forces_mae")
        if e is None and f is None:
            return float("nan")
        return self.weights[0] * (e or 0.0) + self.weights[1] * (f or 0.0)

    def score(self, results: dict[str, dict[str, float]]) -> float:
        if self.head is not None:
            return self._head_score(results.get(self.head) or {})
        scores = [s for s in (self._head_score(r) for r in results.values()) if np.isfinite(s)]
        return float(np.mean(scores)) if scores else float("nan")

    def update(self, results: dict[str, dict[str, float]], module, step: int, keep: bool) -> bool:
        """Record a validation; returns True when training should stop. `keep`: hold a copy of the best weights."""
        s = self.score(results)
        if not np.isfinite(s):
            return False
        prev = self.smoothed
        self.smoothed = s if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * s
        if self.smoothed < self.best_score:
            self.best_score, self.best_step, self.bad = self.smoothed, step, 0
            if keep:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            return False
        if step >= self.min_steps:
            self.bad += 1
        return 0 < self.patience <= self.bad

    def restore_best(self, module) -> None:
        """Load the best weights seen (if any) into `module`."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


def convergence(curve: list[tuple[int, float]], last_step: int, window: float = 0.2,
                threshold: float = 0.03) -> dict:
    """Has a run converged? `curve`: (step, validation force MAE) pairs. The best force MAE reached by
    (1 - window) x last_step is set against the best reached by last_step: the relative fall, (early - best) / best,
    under `threshold` is converged (config `stopping.converged_fall` and `converged_window`). `converged` is None
    when no validation came before the window, or none had forces."""
    pts = [(int(st), float(v)) for st, v in curve if v is not None and np.isfinite(v)]
    early = [v for st, v in pts if st <= (1.0 - window) * last_step]
    out = {"window": window, "threshold": threshold, "last_step": int(last_step), "fall": None, "converged": None}
    if not early:
        return out
    best = min(v for _, v in pts)
    fall = (min(early) - best) / max(best, 1e-12)
    out.update(fall=float(fall), converged=bool(fall < threshold))
    return out


def convergence_words(c: dict | None) -> str:
    """One line for logs and the summary: whether the run converged, by the criterion above."""
    if not c or c.get("converged") is None:
        return "convergence not measured (no validation with forces before the last {:.0%} of the steps)".format(
            (c or {}).get("window", 0.2))
    how = (f"the best validation force MAE fell {c['fall']:.1%} over the last {c['window']:.0%} of "
           f"{c['last_step']} steps (converged below {c['threshold']:.0%})")
    return ("converged: " if c["converged"] else "NOT converged: ") + how + (
        "" if c["converged"] else "; more trainer.steps would still pay")

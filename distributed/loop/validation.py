"""Validation during training: errors on the validation stores, the step-0 check of a fine-tuning, early stopping."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.store import Store
from polyfid.distributed.config import RunConfig
from polyfid.evaluation.metrics import evaluate_batches, flatten
from polyfid.distributed.loop.stopping import EarlyStopping, convergence, convergence_words
from polyfid.infra.tracking import Tracker

log = logging.getLogger("polyfid.validation")


def validate(model, cfg: RunConfig, valid: list[Store], fidelities: list[str], dtype, device, rank, world):
    """Errors on the validation stores; every rank takes its share and the sums are all-reduced."""
    reader = ShardReader(
        valid,
        ShardReader.Config(atom_budget=cfg.data.atom_budget, shuffle=False, loop=False, prefetch=0),
        rank=rank,
        world_size=world,
        fidelities=fidelities,
    )
    stats = evaluate_batches(model, reader, fidelities, dtype=dtype, device=device)
    stats.all_reduce()
    return stats.results()


def short(res: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{fid} E {r.get('energy_mae', float('nan')) * 1000:.1f} meV F {r.get('forces_mae', float('nan')) * 1000:.1f} meV/Å"
        for fid, r in res.items()
    )


class Validator:
    """Validates every `trainer.valid_every` steps (and at step 0 when fine-tuning a head), keeps the best weights
    and stops early by the `stopping:` config, the same way for every run.

    Every rank validates its share and gets the all-reduced errors, so every rank decides alike; rank 0 logs,
    appends each validation to <output>/validation.jsonl and writes best.json with why the run stopped.
    """

    def __init__(self, cfg: RunConfig, valid: list[Store], fidelities: list[str], head: str | None, dtype: torch.dtype,
                 device: torch.device, rank: int, world: int, tracker: Tracker,
                 monitor: tuple[list[Store], list[str]] = ([], [])) -> None:
        self.cfg, self.valid, self.fidelities, self.head = cfg, valid, fidelities, head
        self.monitor, self.monitor_fidelities = monitor  # data.monitor: evaluated and logged, never scored
        self.t0 = time.perf_counter()  # the Trainer resets it when its loop starts; validation.jsonl's wall_s
        self.time_capped = False  # the Trainer sets it when trainer.max_wall_s ended the run
        self.dtype, self.device, self.rank, self.world, self.tracker = dtype, device, rank, world, tracker
        st = cfg.stopping
        scored = st.head or head  # None: every validated head
        if scored is not None and valid and scored not in fidelities:
            raise ValueError(f"stopping.head={scored!r} is not a fidelity of the validation stores "
                             f"({', '.join(fidelities) or 'none'})")
        self.stopper = EarlyStopping(st.patience, scored, cfg.loss.energy_weight, cfg.loss.forces_weight,
                                     st.min_steps, st.smoothing)
        self.stopped_early = False
        self.keep = st.keep_best and rank == 0
        self.force_curve: list[tuple[int, float]] = []  # (step, validation force MAE of the scored heads)

    def _errors(self, module, step: int) -> dict[str, dict[str, float]]:
        res = validate(module, self.cfg, self.valid, self.fidelities, self.dtype, self.device, self.rank, self.world)
        heads = [self.stopper.head] if self.stopper.head else list(res)
        f = [res[h]["forces_mae"] for h in heads if h in res and res[h].get("forces_mae") is not None]
        if f:
            self.force_curve.append((step, sum(f) / len(f)))
        record = {"step": step, "time": round(time.time(), 3), "wall_s": round(time.perf_counter() - self.t0, 3),
                  "errors": res}
        if self.monitor:
            mon = validate(module, self.cfg, self.monitor, self.monitor_fidelities, self.dtype, self.device,
                           self.rank, self.world)
            record["monitor"] = mon
        if self.rank == 0:
            self.tracker.log_metrics(flatten(res, "valid"), step)
            if self.monitor:
                self.tracker.log_metrics(flatten(mon, "monitor"), step)
            with open(Path(self.cfg.output) / "validation.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return res

    def at_start(self, module, step: int) -> None:
        """The step-0 error of a fine-tuning, after the reference refit: logged and written to step0_validation.json."""
        if not (self.valid and self.head and step == 0):
            return
        res = self._errors(module, 0)
        self.stopper.update(res, module, 0, keep=self.keep)
        if self.rank == 0:
            (Path(self.cfg.output) / "step0_validation.json").write_text(json.dumps(res, indent=2))
            log.warning("step 0 (after the reference refit) validation: %s", short(res))

    def due(self, step: int) -> bool:
        return bool(self.valid) and (step % self.cfg.trainer.valid_every == 0 or step == self.cfg.trainer.steps)

    def __call__(self, module, step: int) -> bool:
        """Validate at `step`; True when early stopping ends the run."""
        res = self._errors(module, step)
        if self.rank == 0:
            log.warning("step %d validation: %s", step, short(res))
        self.stopped_early = self.stopper.update(res, module, step, keep=self.keep)
        if self.stopped_early:
            log.warning("early stopping at step %d: %s", step, self.stop_reason(step))
        return self.stopped_early

    def stop_reason(self, last_step: int) -> str:
        """Why the run ended where it did, in words (best.json, MLflow tag stop_reason, the summary)."""
        s, what = self.stopper, repr(self.stopper.head) if self.stopper.head else "the validated heads"
        if self.time_capped:
            return (f"time cap: trainer.max_wall_s={self.cfg.trainer.max_wall_s:g} s reached at step {last_step} of "
                    f"{self.cfg.trainer.steps}; best validation of {what} at step {s.best_step}")
        if self.stopped_early:
            return (f"early stopping: no improvement of {what} in {s.bad} validations (stopping.patience="
                    f"{s.patience}); best at step {s.best_step}")
        return f"ran all {last_step} steps; best validation of {what} at step {s.best_step}"

    def convergence(self, last_step: int) -> dict:
        """Whether the run converged (stopping.converged_fall over stopping.converged_window of its steps)."""
        st = self.cfg.stopping
        return convergence(self.force_curve, last_step, st.converged_window, st.converged_fall)

    def best(self, module, last_step: int):
        """The weights to package: the best validated ones when stopping.keep_best kept them (best.json says which)."""
        s = self.stopper
        if self.rank == 0 and self.valid and s.best_step >= 0:
            reason = self.stop_reason(last_step)
            conv = self.convergence(last_step)
            metrics = {"best_step": s.best_step, "stopped_early": float(self.stopped_early)}
            if conv["converged"] is not None:
                metrics.update(converged=float(conv["converged"]), valid_forces_fall_last=conv["fall"])
            self.tracker.log_metrics(metrics, last_step)
            self.tracker.set_tags({"stop_reason": reason, "converged": str(conv["converged"]).lower()})
            (Path(self.cfg.output) / "best.json").write_text(json.dumps(
                {"best_step": s.best_step, "best_score": s.best_score, "last_step": last_step,
                 "stopped_early": self.stopped_early, "kept": "best" if s.best_state is not None else "last",
                 "stop_reason": reason, "convergence": conv}, indent=2))
            log.warning("%s; the package holds the %s weights", reason,
                        "best" if s.best_state is not None else "last")
            log.warning("%s", convergence_words(conv))
        if s.best_state is None:
            return module
        best = copy.deepcopy(module)
        s.restore_best(best)
        return best

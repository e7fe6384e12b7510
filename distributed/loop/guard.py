"""The step guard: a step whose loss is non-finite, or spikes (above k x its running median and above twice the
largest loss accepted within the window), is skipped on every rank; repeated skips roll the run back to the last
good checkpoint with a lower learning rate.

Every rank decides alone and all decide alike: the decision reads the *global* loss, which the loss's one
all-reduce already gives every rank (a NaN on any rank makes the global sums NaN everywhere). So the guard adds
no collective, only one read of two scalars to the host per step (the step's own loss and the global loss).
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from collections.abc import Mapping

import torch

from polyfid.distributed.config import GuardConfig
from polyfid.infra.comm import all_reduce_host
from polyfid.distributed.modes.stream import batches_of

log = logging.getLogger("polyfid.guard")
# A loss is a spike only when it is also this many times the largest loss accepted within the window. Real data
# are heavy-tailed: at corpus scale, batches holding a rattled or compressed structure (+3 to +14 eV/atom above
# the references) recur every few dozen steps at 10-60x the median once the rest is learned. Judged by the
# median alone they were skipped again and again, and the skips rolled the run back 7 times in 1,000 steps
# (learning rate / 128). Such batches keep their own kind in the window; a failed SCF or a divergence does not.
TAIL_MARGIN = 2.0


class Guard:
    """Judges each step's loss; counts skips and rollbacks (logged to MLflow as skipped_steps and rollbacks)."""

    def __init__(self, cfg: GuardConfig, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self.history: collections.deque[float] = collections.deque(maxlen=cfg.median_window)
        self.recent: collections.deque[int] = collections.deque()  # steps skipped since the last rollback
        self.skipped = self.rollbacks = 0
        self.step, self.last_skipped = 0, False  # the step being taken (see begin) and whether it was skipped

    def begin(self, step: int) -> None:
        """The Trainer calls this before each step."""
        self.step, self.last_skipped = step, False

    def verdict(self, global_loss: float) -> str | None:
        """Why this step must be skipped, or None (then its loss joins the running median)."""
        if not math.isfinite(global_loss):
            return "non-finite loss" if self.cfg.skip_nonfinite else None
        k = self.cfg.spike_factor
        if k and len(self.history) >= self.cfg.spike_warmup:
            median, top = statistics.median(self.history), max(self.history)
            if global_loss > k * median and global_loss > TAIL_MARGIN * top:
                return (f"loss spike: {global_loss:.4g} > {k:g} x running median {median:.4g} and > "
                        f"{TAIL_MARGIN:g} x the largest accepted loss of the window {top:.4g}")
        self.history.append(global_loss)
        return None

    def check(self, loss: torch.Tensor, metrics: Mapping[str, float], item) -> bool:
        """True: skip this step (on every rank alike). `loss` is this rank's surrogate, `metrics` the global ones."""
        step = self.step
        total = metrics.total() if hasattr(metrics, "total") else torch.tensor(float(metrics["loss"]))
        local, glob = (float(x) for x in torch.stack([loss.detach().float().reshape(()).cpu(),
                                                      total.detach().float().reshape(()).cpu()]))
        return self._skip(self.verdict(glob), math.isfinite(local), item)

    def check_local(self, finite: bool, item) -> bool:
        """For a step without a global loss (Reptile's local inner loop): every rank skips if any rank's result is
        non-finite. This costs one scalar all-reduce per outer step, that is once per k inner steps."""
        if not self.cfg.skip_nonfinite:
            return False
        bad = all_reduce_host(torch.tensor([0.0 if finite else 1.0]))
        return self._skip("non-finite loss" if float(bad) > 0 else None, finite, item)

    def _skip(self, why: str | None, local_finite: bool, item) -> bool:
        if why is None:
            return False
        step, self.last_skipped = self.step, True
        self.skipped += 1
        self.recent.append(step)
        if not local_finite or why.startswith("loss spike"):
            ids = [(int(s), int(i)) for b in batches_of(item) for s, i in zip(b["store"], b["structure_id"])]
            log.warning("step %d skipped on every rank (%s); rank %d's batch (store, structure): %s", step, why,
                        self.rank, ids)
        elif self.rank == 0:
            log.warning("step %d skipped on every rank (%s on another rank)", step, why)
        return True

    def rollback_due(self, step: int) -> bool:
        """Whether the skips within the last rollback_window steps reached rollback_after (then they are reset)."""
        while self.recent and self.recent[0] <= step - self.cfg.rollback_window:
            self.recent.popleft()
        if len(self.recent) < self.cfg.rollback_after:
            return False
        self.recent.clear()
        self.rollbacks += 1
        return True

    def metrics(self) -> dict[str, float]:
        return {"skipped_steps": float(self.skipped), "rollbacks": float(self.rollbacks)}

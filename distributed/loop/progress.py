"""Progress and log verbosity, for a person reading the output.

On a terminal a training run shows a live bar (Ray's bar under Ray, tqdm otherwise). Redirected to a file, a
bar writes one cursor-code line per update, hundreds in all; there rank 0 prints one plain line every
`trainer.progress_every_s` seconds instead, with the step, loss, atoms/s, elapsed time and ETA:

    train step 400/1200 (33%) | loss 0.4171 | 591 atoms/s | elapsed 5m52s | ETA 11m44s

Two environment variables:
- `POLYFID_PROGRESS=bar|lines` forces one kind (default: `bar` when stdout or stderr is a terminal);
- `POLYFID_LOG_LEVEL=debug|info|warning` (default `info`). Below `debug`, Ray's own start-up, scheduling
  and clean-up chatter, MLflow's and DeepSpeed's, stays out of the output; it is always in Ray's session
  logs (`/tmp/ray/session_latest/logs`).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, TextIO

PROGRESS_ENV = "POLYFID_PROGRESS"
LOG_LEVEL_ENV = "POLYFID_LOG_LEVEL"


def log_level() -> int:
    """The level that POLYFID_LOG_LEVEL asks for (default INFO); an unknown name is INFO."""
    level = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "info").upper())
    return level if isinstance(level, int) else logging.INFO


def verbose() -> bool:
    """True when the user asked for debug output: then the libraries' own logs are shown too."""
    return log_level() <= logging.DEBUG


def interactive() -> bool:
    """Whether progress should be a live bar: POLYFID_PROGRESS, else whether the output is a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    return any(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def quiet_libraries() -> None:
    """Keep MLflow's, DeepSpeed's and Ray's INFO chatter out of this process's output unless debugging."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    if not interactive():  # MLflow's artifact download bar writes \r updates into a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "DeepSpeed", "deepspeed", "ray", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what a library prints to stdout inside the block, unless debugging. Ray Train workers
    replace `print` by one that also logs each message, so `print` is diverted too, not only sys.stdout."""
    if verbose():
        yield
        return
    sink, real_print = io.StringIO(), builtins.print

    def print_to_sink(*args: Any, file: Any = None, **kw: Any) -> None:
        if file is not None and file is not sys.stdout:  # stderr and files still get theirs
            real_print(*args, file=file, **kw)

    builtins.print = print_to_sink
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        builtins.print = real_print


def duration(seconds: float) -> str:
    """A short human duration: 42s, 5m52s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LineProgress:
    """Plain progress lines: one every `every_s` seconds, and one at the end."""

    def __init__(self, total: int, initial: int = 0, every_s: float = 30.0, desc: str = "train",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.start_n = int(total), int(initial), int(initial)
        self.every_s, self.desc, self.stream, self.clock = float(every_s), desc, stream, clock
        self.t0 = self.last = clock()
        self.shown = initial
        self.metrics: dict[str, float] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.emit(now)

    def set_metrics(self, **metrics: float) -> None:
        self.metrics.update(metrics)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        done = self.n - self.start_n
        parts = [f"{self.desc} step {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%)"]
        if "loss" in self.metrics:
            parts.append(f"loss {self.metrics['loss']:.4g}")
        if "atoms_per_s" in self.metrics:
            parts.append(f"{self.metrics['atoms_per_s']:,.0f} atoms/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if 0 < done and self.n < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - self.n))}")
        return " | ".join(parts)

    def emit(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        stream = self.stream or sys.stderr
        stream.write(self.line(now) + "\n")  # not print(): Ray Train's print also logs each message, twice in all
        stream.flush()
        self.last, self.shown = now, self.n

    def close(self) -> None:
        if self.n != self.shown:
            self.emit()


class BarProgress:
    """A live bar (tqdm, or Ray's bar that the driver draws) with the same interface as LineProgress."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_metrics(self, **metrics: float) -> None:
        if "loss" in metrics and "atoms_per_s" in metrics:
            self.bar.set_description(f"train loss {metrics['loss']:.4f} {metrics['atoms_per_s']:.0f} atoms/s")

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int, initial: int, rank: int, live: bool | None = None,
                  every_s: float = 30.0) -> LineProgress | BarProgress | None:
    """Rank 0's progress: a live bar when `live` (default: interactive()), else plain lines."""
    if rank != 0:
        return None
    if not (interactive() if live is None else live):
        return LineProgress(total, initial, every_s)
    try:
        import ray

        if ray.is_initialized():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            bar = ray_tqdm(total=total, desc="train")
            bar.update(initial)
            return BarProgress(bar)
    except Exception:  # noqa: BLE001 - a progress bar is never worth a crash
        pass
    from tqdm import tqdm

    return BarProgress(tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True))

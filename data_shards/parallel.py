"""Parallel ingest: one task per output shard, run by this process and by Ray workers side by side.

The plan cuts each input's selected frames into runs of `shard_size`; a task reads its run, validates and
converts every frame, and writes one temporary shard group straight into the store being built. For a
plain extxyz file the plan also records where each run starts and ends in the file, so a task reads just
those bytes instead of scanning the file from its start (ASE indexes frames from the top); for every other
format a task reads its `path@start:stop:step` range (SPICE: just the molecule groups it covers; ASE-LMDB and
ASE db: just those rows). A per-frame dataset template (`'{subset}'`) is resolved to names before the
tasks start (`sources.dataset_names`), registered in the order a serial run would meet them.

Starting Ray takes seconds of CPU (tens of seconds of wall time on a small, busy host), and each Ray
worker then imports zarr and ASE. So this process does not wait for Ray: it takes tasks from the shared
queue itself, and a helper thread keeps up to `workers - 1` Ray tasks in flight beside it, so `workers`
shards are written at once. If Ray is already running, the helper starts at once. Otherwise it starts Ray
only when, after a task, the work left (timed on the tasks done so far) spread over `workers` would save
at least RAY_MIN_SAVING_S; a smaller job finishes in this process, about as fast as the serial path,
instead of paying for Ray's start. The driver renames finished shards into place in plan order (so structure ids
and shard contents match a serial run), and `StoreWriter.close` writes the manifest last. A bad frame in
any task stops the queue: running tasks are drained, every temporary shard is removed, and the task's
`IngestError` is raised. Ray is imported only here.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.layout import SHARDS, Location, shard_checksum
from polyfid.data_shards.refs import shard_sums
from polyfid.data_shards.sources import (IngestError, _selection, dataset_name, dataset_names, read_frames,
                                         scan_frames, split_spec)
from polyfid.data_shards.store import ShardInfo
from polyfid.data_shards.writer import StoreWriter, shard_arrays, write_group

TASK_CPUS = 0.5  # Ray CPUs per task: on 2-core machines a whole CPU per task starves the rest of Ray
RAY_MIN_SAVING_S = 30.0  # start Ray only if it would save this much wall time (see ingest_parallel)
Task = tuple[str, int, "tuple[int, int, int] | None"]  # (spec 'path@a:b:step', frames, (first, byte lo, hi))


def plan_tasks(inputs: Sequence[str], shard_size: int) -> list[Task] | None:
    """One task per output shard; None if the plan needs a serial read (a negative slice step).

    The last run of a selection that reaches the end of its file reads on to the end, so that a truncated
    or malformed tail is parsed (and refused) as in a serial read, not silently left out.
    """
    tasks: list[Task] = []
    for spec in inputs:
        path, index = split_spec(spec)
        n, offsets = scan_frames(path)
        if n == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames)")
        sel = _selection(index, n)
        if sel.step < 0:
            return None
        if len(sel) == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames selected)")
        for lo in range(0, len(sel), shard_size):
            r = sel[lo:lo + shard_size]
            to_end = lo + shard_size >= len(sel) and sel.stop >= n
            stop = "" if to_end else str(r.stop)
            span = None
            if offsets is not None and r.step == 1:
                span = (r.start, int(offsets[r.start]), -1 if to_end else int(offsets[r.stop]))
            tasks.append((f"{path}@{r.start}:{stop}:{r.step}", len(r), span))
    return tasks


def write_task(url: str, tmp: str, task: Task, dataset: int | tuple[str, dict[str, int]], first_id: int,
               fids: list[str], conv: Any) -> dict[str, Any]:
    """Read, convert and write one shard as `shards/<tmp>`; returns its manifest entry parts or the error.

    `dataset` is the dataset's index, or (template, index of each name it gives) for a per-frame dataset.
    """
    spec, expect, span = task
    original = spec.rsplit("@", 1)[0]

    def index(i: int, frame: Any) -> int:
        return dataset if isinstance(dataset, int) else dataset[1][dataset_name(dataset[0], original, i, frame)]

    try:
        items = [(conv(original, i, frame), index(i, frame)) for i, frame in read_frames(spec, span)]
        if len(items) != expect:
            raise IngestError(original, None, "frames", f"read {len(items)} frames where {expect} were "
                              f"counted ({spec}); the file is truncated or malformed")
        arrays, energy, forces, ids = shard_arrays(items, fids, first_id)
        write_group(Location(url).open_group("a", path=SHARDS).create_group(tmp), arrays)
        refs = shard_sums(arrays, energy, forces)
        info = ShardInfo("", len(items), int(arrays["offsets"][-1]), shard_checksum(arrays), tuple(energy),
                         tuple(forces), tuple(ids))
        return {"info": info, "refs": refs, "elements": np.unique(arrays["atomic_numbers"]).tolist()}
    except IngestError as err:  # named by the input file, not the task's slice of it
        file = original + err.file[len(spec):] if err.file.startswith(spec) else err.file
        return {"error": IngestError(file, err.index, err.field, err.message)}


class _Queue:
    """The tasks in plan order, taken by the driver and the Ray helper; the first error stops it."""

    def __init__(self, n: int, bar: Any, sizes: list[int]) -> None:
        self._lock = threading.Lock()
        self._next, self._n, self._bar, self._sizes = 0, n, bar, sizes
        self.results: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.by_ray = 0

    def take(self) -> int | None:
        with self._lock:
            if self.error is not None or self._next >= self._n:
                return None
            self._next += 1
            return self._next - 1

    def done(self, t: int, result: dict[str, Any]) -> None:
        with self._lock:
            self.results[t] = result
            if "error" in result and self.error is None:
                self.error = result["error"]
            self._bar.update(self._sizes[t])

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = self.error or error


def _ray_helper(queue: _Queue, slots: int, run: Callable[[int], tuple]) -> None:
    """Start Ray if needed and keep up to `slots` Ray tasks in flight until the queue is empty.

    Runs in its own thread, which must outlive the Ray session it starts: Ray's child processes die with
    the thread that spawned them.
    """
    import ray

    started = False
    try:
        if not ray.is_initialized():
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            cpus = max(1, min(os.cpu_count() or 1, math.ceil(slots * TASK_CPUS)))  # Ray prestarts one worker each
            # Ray runs workers at nice 15 by default; these do this process's own work, at its priority
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     _system_config={"worker_niceness": 0})
            started = True
        remote = ray.remote(num_cpus=TASK_CPUS, max_retries=0)(write_task)
        running: dict[Any, int] = {}
        while True:
            while len(running) < slots and (t := queue.take()) is not None:
                running[remote.remote(*run(t))] = t
                queue.by_ray += 1
            if not running:
                return
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                t = running.pop(ref)
                try:
                    queue.done(t, ray.get(ref))
                except Exception as err:  # a task that crashed (not a bad frame): stop everything
                    queue.fail(err)
    except Exception as err:  # Ray could not start: the driver carries on alone
        if not started and not ray.is_initialized():
            warnings.warn(f"parallel ingest: Ray did not start ({type(err).__name__}: {err}); "
                          "continuing in this process", stacklevel=1)
        else:
            queue.fail(err)
    finally:
        if started:
            ray.shutdown()


def ingest_serial(writer: StoreWriter, inputs: Sequence[str], conv: Any, dataset: str, bar: Any) -> int:
    """Ingest in this process, frame by frame (the path without `workers`); returns the structures written."""
    total = 0
    for spec in inputs:
        count = 0
        for i, frame in read_frames(spec):
            writer.add([conv(spec, i, frame)], dataset_name(dataset, spec, i, frame))
            count += 1
            bar.update(1)
        if count == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames selected)")
        total += count
    return total


def ingest_parallel(writer: StoreWriter, inputs: Sequence[str], conv: Any, dataset: str, workers: int,
                    bar: Any) -> tuple[int, dict[str, int]]:
    """Ingest with this process and up to `workers - 1` Ray tasks writing shards.

    Returns the number of structures and {"tasks": shards planned, "ray_tasks": shards Ray wrote} (empty
    when the serial path ran).
    """
    tasks = plan_tasks(inputs, writer.shard_size)
    if importlib.util.find_spec("ray") is None or tasks is None or len(tasks) < 2:
        return ingest_serial(writer, inputs, conv, dataset, bar), {}
    if "{" in dataset or "}" in dataset:  # per-frame datasets: registered in the order a serial run meets them
        names = dict.fromkeys(name for spec in inputs for name in dataset_names(spec, dataset))
        d: int | tuple[str, dict[str, int]] = (dataset, {name: writer.add_dataset(name) for name in names})
    else:
        d = writer.add_dataset(dataset)
    fids = [f.name for f in writer.fidelities]
    sizes = [n for _, n, _ in tasks]
    starts = writer.next_id + np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    tmps = [writer.new_tmp_name() for _ in tasks]
    url = writer.location.url

    def run(t: int) -> tuple:
        return url, tmps[t], tasks[t], d, int(starts[t]), fids, conv

    queue = _Queue(len(tasks), bar, sizes)
    helper = threading.Thread(target=_ray_helper, args=(queue, workers - 1, run), daemon=True,
                              name="polyfid-ingest-ray")
    # Ray is imported (a second of CPU) only to be used: one already running helps from the first task on
    helping = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if helping:
        helper.start()
    try:
        done, t0 = 0, time.perf_counter()
        while (t := queue.take()) is not None:
            queue.done(t, write_task(*run(t)))
            done += sizes[t]
            left = (time.perf_counter() - t0) / done * (sum(sizes) - done)  # seconds of serial work left
            if not helping and left * (1 - 1 / workers) >= RAY_MIN_SAVING_S:
                helping = True
                helper.start()
    except BaseException as err:
        queue.fail(err)
        raise
    finally:
        if helping:
            helper.join()  # running Ray tasks finish first, so none writes after an abort
    if queue.error is not None:
        raise queue.error
    for t in range(len(tasks)):
        r = queue.results[t]
        writer.adopt(tmps[t], r["info"], r["refs"], r["elements"])
    return int(starts[-1] - starts[0]), {"tasks": len(tasks), "ray_tasks": queue.by_ray}

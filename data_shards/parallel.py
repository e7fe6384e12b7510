"""Parallel ingest on Ray: one task per output shard, a progress bar, shards renamed into place in order.

The plan cuts each input's selected frames into runs of `shard_size`; a task reads its run
(`path@start:stop:step`), validates and converts every frame, and writes one temporary shard group
straight into the store being built. The driver renames finished shards into place in plan order (so
structure ids follow the input order) and `StoreWriter.close` writes the manifest last. A bad frame in any
task aborts the whole ingest: remaining tasks are drained, every temporary shard is removed, and the
task's `IngestError` is raised. Ray is imported only here; without it (or for one shard) ingest is serial.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.layout import SHARDS, Location, shard_checksum
from polyfid.data_shards.refs import ReferenceAccumulator
from polyfid.data_shards.sources import IngestError, _selection, count_frames, read_frames, split_spec
from polyfid.data_shards.store import ShardInfo
from polyfid.data_shards.writer import StoreWriter, shard_arrays, write_group

TASK_CPUS = 0.5  # on the 2-core machines a whole CPU per task starves the rest of Ray (DESIGN.md)


def plan_tasks(inputs: Sequence[str], shard_size: int) -> list[tuple[str, int]] | None:
    """(task spec 'path@a:b:step', frames) for every output shard; None if the plan needs a serial read."""
    tasks = []
    for spec in inputs:
        path, index = split_spec(spec)
        n = count_frames(path)
        if n == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames)")
        sel = _selection(index, n)
        if sel.step < 0:
            return None
        if len(sel) == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames selected)")
        for lo in range(0, len(sel), shard_size):
            r = sel[lo:lo + shard_size]
            tasks.append((f"{path}@{r.start}:{r.stop}:{r.step}", len(r)))
    return tasks


def write_task(url: str, tmp: str, spec: str, expect: int, dataset: int, first_id: int,
               fids: list[str], conv: Any) -> dict[str, Any]:
    """Read, convert and write one shard as `shards/<tmp>`; returns its manifest entry parts or the error."""
    try:
        original = spec.rsplit("@", 1)[0]
        items = [(conv(original, i, frame), dataset) for i, frame in read_frames(spec)]
        if len(items) != expect:
            raise IngestError(original, None, "frames", f"read {len(items)} frames where {expect} were "
                              f"counted ({spec}); the file is truncated or malformed")
        arrays, energy, forces, ids = shard_arrays(items, fids, first_id)
        write_group(Location(url).open_group("a", path=SHARDS).create_group(tmp), arrays)
        refs = ReferenceAccumulator()
        refs.add_ragged(arrays["atomic_numbers"], arrays["offsets"], {f: arrays[f"energy/{f}"] for f in energy})
        info = ShardInfo("", len(items), int(arrays["offsets"][-1]), shard_checksum(arrays), tuple(energy),
                         tuple(forces), tuple(ids))
        return {"info": info, "refs": refs, "elements": np.unique(arrays["atomic_numbers"]).tolist()}
    except IngestError as err:
        return {"error": err}


def ingest_parallel(writer: StoreWriter, inputs: Sequence[str], conv: Any, dataset: str, workers: int,
                    bar: Any) -> int:
    """Ingest with up to `workers` Ray tasks in flight; returns the number of structures."""
    try:
        import ray
    except ImportError:
        ray = None
    tasks = plan_tasks(inputs, writer.shard_size)
    if ray is None or tasks is None or len(tasks) < 2:
        from polyfid.data_shards.ingest import _serial

        return _serial(writer, inputs, conv, dataset, bar)
    d = writer.add_dataset(dataset)
    fids = [f.name for f in writer.fidelities]
    starts = writer.next_id + np.concatenate([[0], np.cumsum([n for _, n in tasks])]).astype(int)
    tmps = [writer.new_tmp_name() for _ in tasks]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    remote = ray.remote(num_cpus=TASK_CPUS, max_retries=0)(write_task)
    url = writer.location.url
    results: dict[int, dict[str, Any]] = {}
    running: dict[Any, int] = {}
    try:
        queue = list(range(len(tasks)))
        while queue or running:
            while queue and len(running) < workers:
                t = queue.pop(0)
                spec, n = tasks[t]
                running[remote.remote(url, tmps[t], spec, n, d, int(starts[t]), fids, conv)] = t
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                t = running.pop(ref)
                results[t] = ray.get(ref)
                if "error" in results[t]:
                    if running:  # let running tasks finish so none writes after the abort
                        ray.wait(list(running), num_returns=len(running))
                    raise results[t]["error"]
                bar.update(tasks[t][1])
    finally:
        if started:
            ray.shutdown()
    for t in range(len(tasks)):
        r = results[t]
        writer.adopt(tmps[t], r["info"], r["refs"], r["elements"])
    return int(starts[-1] - starts[0])

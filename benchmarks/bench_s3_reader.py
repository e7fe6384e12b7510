"""Keeping the loop fed from object storage: the reader's data wait on a real S3 endpoint with injected latency.

    python benchmarks/bench_s3_reader.py --structures 3000 --step-ms 50 --latency-ms 0,20 --out benchmarks/RESULTS_s3_reader.md

One store (GFN2-xTB structures of the corpus, `--shard-size` structures a shard) is ingested to local disk and
to an S3 endpoint on loopback (moto's server, in a process of its own) whose every request waits `--latency-ms` more
before it is answered. A ShardReader then streams one shuffled epoch of batches as training does (prefetch 2,
the next shard read ahead), while the caller spends `--step-ms` on each batch in place of a training step. The
data wait is the time the caller waited for its next batch over the whole time; the goal (issue 32) is under 3%
at 20 ms. With `data.cache_dir`, a second epoch reads the shards from the node-local cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data_shards" / "corpus" / "extxyz" / "gfn2_xtb_train.extxyz.gz"
BUCKET = "bench"


SERVER = """
import logging, sys, time
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = DomainDispatcherApplication(create_backend_app)
latency = float(sys.argv[2])
def slow(environ, start_response):
    time.sleep(latency)
    return app(environ, start_response)
make_server("127.0.0.1", int(sys.argv[1]), slow, threaded=True).serve_forever()
"""


def serve_s3(latency_s: float) -> tuple[str, subprocess.Popen]:
    """A moto S3 server on 127.0.0.1, in a process of its own (not competing with the reader for the GIL),
    whose every answer comes `latency_s` later; returns (endpoint, process)."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(latency_s)])
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError as err:
            if getattr(err, "code", None):  # an HTTP answer: it is up
                break
            time.sleep(0.1)
    return f"http://127.0.0.1:{port}", proc


def epoch_wait(store, step_s: float, seed: int = 0, fetch_ahead: int = 4) -> dict:
    """Stream one shuffled epoch; the caller 'trains' step_s per batch. Returns wait fraction, batches, time."""
    from polyfid.data_shards.reader import ShardReader

    cfg = ShardReader.Config(atom_budget=1024, shuffle_buffer=2048, shuffle=True, seed=seed, loop=False, prefetch=2,
                             fetch_ahead=fetch_ahead)
    it = iter(ShardReader([store], cfg))
    wait = n = 0
    t0 = time.perf_counter()
    while True:
        a = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - a
        n += 1
        time.sleep(step_s)
    total = time.perf_counter() - t0
    return {"wait_fraction": wait / total, "batches": n, "total_s": total, "wait_s": wait}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structures", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=50.0, help="time the caller spends on each batch")
    ap.add_argument("--latency-ms", default="0,20", help="added latency per S3 request, comma-separated")
    ap.add_argument("--fetch-ahead", default="2,4,8", help="data.fetch_ahead values to measure without the cache")
    ap.add_argument("--obstore", action="store_true", help="also read through obstore ($POLYFID_OBJECT_STORE)")
    ap.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    a = ap.parse_args(argv)
    from polyfid.data_shards.store import Store, set_shard_cache
    from polyfid.launch.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="bench_s3_"))
    common = ["--dataset", "corpus", "--energy", "gfn2_xtb=energy_gfn2_xtb", "--forces", "gfn2_xtb=forces_gfn2_xtb",
              "--rank", "gfn2_xtb=1", "--shard-size", str(a.shard_size), "--quiet"]
    spec = f"{SOURCE}@:{a.structures}"
    assert cli(["ingest", spec, "--out", str(work / "local.zarr"), *common]) == 0
    local = Store.open(work / "local.zarr")
    step = a.step_ms / 1000
    rows = [("local disk", "-", "-", epoch_wait(local, step))]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    import s3fs

    for ms in [float(x) for x in a.latency_ms.split(",")]:
        endpoint, server = serve_s3(ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/store.zarr"
        assert cli(["ingest", spec, "--out", url, *common]) == 0
        s3fs.S3FileSystem.clear_instance_cache()
        os.environ["POLYFID_OBJECT_STORE"] = "fsspec"  # s3fs first; obstore (the default for reads) below
        remote = Store.open(url)
        where = f"S3, +{ms:g} ms a request"
        rows.append((where, "none", "0 (the next shard only)", epoch_wait(remote, step, fetch_ahead=0)))
        for n in [int(x) for x in a.fetch_ahead.split(",")]:
            rows.append((where, "none", str(n), epoch_wait(remote, step, fetch_ahead=n)))
        if a.obstore:  # the same store and reader, requests through obstore instead of s3fs
            os.environ["POLYFID_OBJECT_STORE"] = "obstore"
            via = Store.open(url)
            rows.append((f"{where}, obstore", "none", "0 (the next shard only)", epoch_wait(via, step, fetch_ahead=0)))
            rows.append((f"{where}, obstore", "none", "4", epoch_wait(via, step, fetch_ahead=4)))
        os.environ.pop("POLYFID_OBJECT_STORE")
        set_shard_cache(work / f"cache{ms:g}")
        rows.append((where, "first epoch", "4", epoch_wait(remote, step, seed=1)))
        rows.append((where, "second epoch", "4", epoch_wait(remote, step, seed=2)))
        set_shard_cache(None)
        server.terminate()
        server.wait()
    n_atoms, n_shards = local.n_atoms, len(local.shards)
    lines = ["# The reader on object storage: data wait with injected latency", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}. "
             f"Command: `python benchmarks/bench_s3_reader.py --structures {a.structures} --shard-size "
             f"{a.shard_size} --step-ms {a.step_ms:g} --latency-ms {a.latency_ms} --fetch-ahead {a.fetch_ahead}`. One store of {a.structures} "
             f"GFN2-xTB corpus structures ({n_atoms} atoms, {n_shards} shards); one shuffled epoch of 1,024-atom "
             f"batches, {a.step_ms:g} ms of 'training' per batch; S3 is moto's server on loopback in its own process, every request "
             "delayed by the latency given. Data wait: the time spent waiting for the next batch over the epoch's "
             "time (goal: under 3% at 20 ms).", "",
             "| storage | shard cache (data.cache_dir) | shards fetched ahead (data.fetch_ahead) | batches | epoch (s) "
             "| waited (s) | data wait |",
             "|---|---|---|---|---|---|---|"]
    for where, cache, ahead, r in rows:
        lines.append(f"| {where} | {cache} | {ahead} | {r['batches']} | {r['total_s']:.1f} | {r['wait_s']:.2f} | "
                     f"{r['wait_fraction']:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()

"""Stores on S3-compatible object storage, against a real S3 endpoint on loopback (moto's server mode).

Credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as on a cloud
cluster; the test checks that the secret is written nowhere: not in the store, the run's config, its summary,
its package or MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pytest

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.distributed.driver.launcher import one_ray_cluster
from polyfid.launch.cli import main

SECRET = "polyfid-test-secret-7f3a9c"
BUCKET = "polyfid-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer) with one bucket; AWS_* set for this module
    (before its Ray cluster starts, so that Ray's workers inherit them)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "polyfid-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _objects(client, prefix: str = "") -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def _ingest(out: str, rows: str, *extra: str) -> int:
    eth = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    return main(["ingest", f"{eth}@{rows}", "--out", out, "--dataset", "ethanol", "--quiet",
                 "--energy", f"{LOW}=energy_{LOW}", "--energy", f"{HIGH}=energy_{HIGH}",
                 "--forces", f"{LOW}=forces_{LOW}", "--rank", f"{LOW}=0", "--rank", f"{HIGH}=1",
                 "--shard-size", "16", *extra])


def _read_all(path: str) -> dict[str, np.ndarray]:
    from polyfid.data_shards.reader import iter_all
    from polyfid.data_shards.store import Store

    batches = list(iter_all([Store.open(path)], atom_budget=10_000))
    return {k: np.concatenate([b[k] for b in batches]) for k in ("positions", "atomic_numbers", "energy", "forces")}


def test_ingest_inspect_verify_and_append_on_s3_read_as_the_local_store(s3, tmp_path, capsys):
    url = f"s3://{BUCKET}/eth.zarr"
    assert _ingest(url, ":40") == 0
    assert _ingest(url, "40:48", "--append") == 0
    assert _ingest(str(tmp_path / "local.zarr"), ":40") == 0
    assert _ingest(str(tmp_path / "local.zarr"), "40:48", "--append") == 0
    capsys.readouterr()
    assert main(["inspect", url]) == 0
    assert "48 structures" in capsys.readouterr().out
    assert main(["verify", url]) == 0
    assert "all 4 shards match their checksums (48 structures)" in capsys.readouterr().out
    remote, local = _read_all(url), _read_all(str(tmp_path / "local.zarr"))
    assert len(remote["energy"]) == 48 and all(np.array_equal(remote[k], local[k], equal_nan=True) for k in local)
    objects = _objects(s3, "eth.zarr/")
    assert not any("tmp-" in k for k in objects)  # no temporary shard is left behind
    assert not any(SECRET.encode() in body for body in objects.values())
    # a corrupted object is found by verify, which names the shard
    key = next(k for k in objects if k.startswith("eth.zarr/shards/shard-000001/positions/c/"))
    s3.put_object(Bucket=BUCKET, Key=key, Body=objects[key][:-8] + b"\0" * 8)
    assert main(["verify", url]) != 0
    assert "shard-000001" in capsys.readouterr().err + capsys.readouterr().out


def test_a_store_on_s3_reads_the_same_through_obstore_and_s3fs(s3, monkeypatch):
    """Reads go through obstore by default (written through s3fs); $POLYFID_OBJECT_STORE=fsspec reads through
    s3fs: the same shards either way."""
    from polyfid.data_shards.store import Store

    url = f"s3://{BUCKET}/obstore.zarr"
    assert _ingest(url, ":40") == 0
    assert type(Store.open(url)._root.store).__name__ == "ObjectStore"
    via_obstore = _read_all(url)
    monkeypatch.setenv("POLYFID_OBJECT_STORE", "fsspec")
    assert type(Store.open(url)._root.store).__name__ == "FsspecStore"
    via_fsspec = _read_all(url)
    assert all(np.array_equal(via_fsspec[k], via_obstore[k], equal_nan=True) for k in via_fsspec)
    assert Store.open(url).verify() == []


def test_moving_a_folder_on_object_storage_copies_every_object_and_removes_the_source(s3):
    """Object storage has no rename: a parallel ingest's temporary shards are moved object by object."""
    from polyfid.data_shards.layout import Location

    for name in ("a/zarr.json", "a/x/c/0", "a/x/zarr.json"):
        s3.put_object(Bucket=BUCKET, Key=f"mv.zarr/shards/tmp-1/{name}", Body=name.encode())
    loc = Location(f"s3://{BUCKET}/mv.zarr")
    loc.rename("shards/tmp-1", "shards/shard-000000")
    got = _objects(s3, "mv.zarr/")
    assert got == {f"mv.zarr/shards/shard-000000/{n}": n.encode() for n in ("a/zarr.json", "a/x/c/0", "a/x/zarr.json")}
    with pytest.raises(FileNotFoundError, match="nothing under 'shards/tmp-2'"):
        loc.rename("shards/tmp-2", "shards/shard-000001")


@pytest.mark.timeout(900)
def test_evaluate_a_package_on_s3_against_a_store_on_s3(s3, tmp_path):
    """`polyfid evaluate --model s3://.../package --data s3://...`: the package is fetched, and the errors equal
    those of the same package and store on local disk."""
    import fsspec

    from polyfid.models import save_package
    from polyfid.models.testing import tiny_potential

    pkg = tmp_path / "package"
    from polyfid.data_shards.schema import Fidelity

    levels = (Fidelity(LOW, rank=0), Fidelity(HIGH, rank=1))
    save_package(pkg, tiny_potential("hipnn_ts", seed=2, elements=(1, 6, 8), fidelities=levels, width=16))
    fsspec.filesystem("s3").put(str(pkg), f"{BUCKET}/runs/x/package", recursive=True)
    assert _ingest(f"s3://{BUCKET}/eval.zarr", ":16") == 0 and _ingest(str(tmp_path / "eval.zarr"), ":16") == 0
    assert main(["evaluate", "--model", f"s3://{BUCKET}/runs/x/package", "--data", f"s3://{BUCKET}/eval.zarr",
                 "--json", str(tmp_path / "remote.json")]) == 0
    assert main(["evaluate", "--model", str(pkg), "--data", str(tmp_path / "eval.zarr"),
                 "--json", str(tmp_path / "local.json")]) == 0
    remote, local = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("remote", "local"))
    assert remote == local and remote[LOW]["forces_mae"] > 0 and remote[HIGH]["n_structures"] == 16
    with pytest.raises(FileNotFoundError, match="no polyfid.json"):
        from polyfid.infra.resolve import resolve_package

        resolve_package(f"s3://{BUCKET}/runs/none/package", None)


def test_the_shard_cache_serves_later_reads_locally_and_refetches_a_damaged_copy(s3, tmp_path):
    """data.cache_dir: a shard read from object storage is kept in a node-local file named by its checksum; a
    later read needs no object of it, and a cache file that no longer matches the checksum is fetched again."""
    from polyfid.data_shards.store import Store, set_shard_cache

    url = f"s3://{BUCKET}/cached.zarr"
    assert _ingest(url, ":32") == 0
    store = Store.open(url)
    first = [store.read_shard(k) for k in range(len(store.shards))]  # no cache: nothing written
    set_shard_cache(tmp_path / "cache")
    try:
        assert [store.read_shard(k)["positions"].tolist() for k in range(2)] == [s["positions"].tolist() for s in first]
        files = sorted((tmp_path / "cache").glob("*.npz"))
        assert [f.stem for f in files] == sorted(s.checksum.replace(":", "-") for s in store.shards)
        for key in _objects(s3, "cached.zarr/shards/"):  # the shards are gone from the bucket: the cache serves
            s3.delete_object(Bucket=BUCKET, Key=key)
        again = store.read_shard(1)
        assert np.array_equal(again["positions"], first[1]["positions"])
        with np.load(files[0]) as npz:  # a damaged cache file is not used: it is fetched again (and fails here,
            bad = {k: npz[k] for k in npz.files}  # since the bucket no longer has the shard)
        bad["positions"] = bad["positions"] + 1.0
        name = next(f for f in files if f.stem == store.shards[0].checksum.replace(":", "-"))
        np.savez(name, **bad)
        with pytest.raises(Exception, match="shard-000000"):
            store.read_shard(0)
        assert not name.exists()
    finally:
        set_shard_cache(None)


def test_the_reader_fetches_following_shards_from_object_storage_several_at_once(s3, tmp_path):
    """data.fetch_ahead: the shards of the next units are fetched concurrently (a fetch waits out round trips for
    longer than a step uses a shard), and the batches are exactly those of a reader that fetches one at a time."""
    import threading
    import time

    from polyfid.data_shards.reader import ShardReader
    from polyfid.data_shards.store import Store

    url = f"s3://{BUCKET}/fetch-ahead.zarr"
    assert _ingest(url, ":96", "--shard-size", "8") == 0  # 12 shards
    live, most = [0], [0]
    lock = threading.Lock()
    real = Store.fetch

    def slow_fetch(self, k):  # counts the fetches in flight at once; each waits as a far endpoint would
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        try:
            time.sleep(0.05)
            return real(self, k)
        finally:
            with lock:
                live[0] -= 1

    def batches(fetch_ahead: int) -> list:
        cfg = ShardReader.Config(atom_budget=64, shuffle_buffer=32, seed=3, loop=False, prefetch=2,
                                 fetch_ahead=fetch_ahead)
        return [(b["structure_id"].tolist(), b["positions"].copy()) for b in ShardReader([Store.open(url)], cfg)]

    Store.fetch = slow_fetch
    try:
        ahead = batches(4)
        assert most[0] >= 3  # several shards in flight at once
        most[0] = 0
        one = batches(0)
        assert most[0] == 0  # fetch_ahead=0: no fetches ahead, each shard read when its turn comes
    finally:
        Store.fetch = real
    assert len(ahead) == len(one) > 0
    for (ids_a, pos_a), (ids_b, pos_b) in zip(ahead, one):
        assert ids_a == ids_b and np.array_equal(pos_a, pos_b)


def test_a_lease_on_the_bucket_refuses_a_second_run_and_is_taken_over_once_it_expires(s3, monkeypatch, caplog):
    """The lock of an output on object storage: a conditional put creates it, a live lease refuses a second
    holder (naming the first), a lease that stopped being renewed is taken over, and release removes it."""
    from polyfid.infra.run_storage import LOCK_KEY, FolderInUse, LeaseLock

    url = f"s3://{BUCKET}/runs/locked"
    first = LeaseLock(url, lease_s=30).acquire()
    held = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/locked/{LOCK_KEY}")["Body"].read())
    assert held["pid"] == os.getpid() and held["expires"] > held.get("lease_s", 0)
    with pytest.raises(FolderInUse, match=f"in use by another run: pid {os.getpid()}"):
        LeaseLock(url, lease_s=30).acquire()
    first.release()
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/locked/{LOCK_KEY}")
    # a holder on another host that stopped renewing: refused while its lease runs, taken over once it has expired
    import time

    gone = {"pid": 1, "host": "node-that-died", "started": "then", "expires": time.time() + 1.5, "lease_s": 1.5}
    s3.put_object(Bucket=BUCKET, Key=f"runs/locked/{LOCK_KEY}", Body=json.dumps(gone).encode())
    with pytest.raises(FolderInUse, match="node-that-died"):
        LeaseLock(url, lease_s=30).acquire()
    time.sleep(1.6)
    with caplog.at_level(logging.WARNING, logger="polyfid.run_storage"):
        second = LeaseLock(url, lease_s=0.6).acquire()
    assert "taking over" in caplog.text and "node-that-died" in caplog.text
    time.sleep(1.0)  # renewed every lease/3: still held after its first lease would have run out
    now = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/locked/{LOCK_KEY}")["Body"].read())
    assert now["pid"] == os.getpid() and now["expires"] > time.time() and not second.lost
    second.release()


def test_a_run_whose_output_is_on_s3_resumes_from_the_bucket_alone_on_another_worker_count(s3, tmp_path,
                                                                                           monkeypatch, capsys):
    """A real Ray + DeepSpeed training whose workers stream both stores from the S3 endpoint (through a shard
    cache) and whose output is s3://...: 2 ranks write their checkpoint files from their own staging folders,
    rank 0 the manifest last; the package, config and records land in the bucket, and no secret anywhere. With
    every local folder deleted, the same command with 1 worker and more steps resumes from the bucket's newest
    checkpoint and finishes there. Then `polyfid finetune --from s3://.../package` on data from S3."""
    monkeypatch.setenv("POLYFID_STAGE_DIR", str(tmp_path / "stage"))
    monkeypatch.setenv("POLYFID_LOCK_LEASE_S", "10")
    train, valid = f"s3://{BUCKET}/out_train.zarr", f"s3://{BUCKET}/out_valid.zarr"
    assert _ingest(train, ":40") == 0 and _ingest(valid, "40:48") == 0
    url = f"s3://{BUCKET}/runs/remote"
    db = tmp_path / "m.db"

    def pretrain(steps: int, workers: int) -> int:
        return main(["pretrain", "--config", "launch/recipes/demo.yaml", "--set", f"data.train={train}",
                     "--set", f"data.valid={valid}", "--set", f"output={url}", "--set", f"cluster.workers={workers}",
                     "--set", f"trainer.steps={steps}", "--set", "trainer.valid_every=2",
                     "--set", "trainer.checkpoint_every=2", "--set", "model.width=16", "--set", "model.n_sensitivities=8",
                     "--set", f"tracking.uri=sqlite:///{db}", "--set", "tracking.register_as=null",
                     "--set", f"data.cache_dir={tmp_path / 'cache'}"])

    with one_ray_cluster():  # the three runs share one local Ray cluster, started after the env above is set
        _output_on_s3_resumes(s3, tmp_path, train, valid, url, db, pretrain, capsys)


def _output_on_s3_resumes(s3, tmp_path, train, valid, url, db, pretrain, capsys):
    import shutil

    assert pretrain(4, 2) == 0
    # the workers kept what they read in data.cache_dir: every validation shard (both ranks validate their share)
    from polyfid.data_shards.store import Store

    cached = {f.stem for f in (tmp_path / "cache").glob("*.npz")}
    assert {s.checksum.replace(":", "-") for s in Store.open(valid).shards} <= cached
    keys = _objects(s3, "runs/remote/")
    tags = sorted({k.split("/")[3] for k in keys if k.startswith("runs/remote/checkpoints/")})
    assert tags == ["step_00000002", "step_00000004"]
    manifest = json.loads(keys["runs/remote/checkpoints/step_00000004/manifest.json"])
    assert manifest["world_size"] == 2
    for name, entry in manifest["files"].items():  # every rank's files, each uploaded whole
        assert len(keys[f"runs/remote/checkpoints/step_00000004/{name}"]) == entry["bytes"]
    assert any("zero_pp_rank_1" in name for name in manifest["files"])  # rank 1's optimizer shard is there
    assert "runs/remote/package/polyfid.json" in keys and "runs/remote/config.yaml" in keys
    assert [json.loads(line)["step"] for line in keys["runs/remote/validation.jsonl"].decode().splitlines()] == [2, 4]
    assert "runs/remote/.polyfid.lock" not in keys  # released
    assert not any(SECRET.encode() in v or b"polyfid-test-key" in v for v in keys.values())
    assert json.loads(keys["runs/remote/best.json"])["best_step"] == 4
    first = json.loads(keys["runs/remote/summary.json"])
    assert first["package"] == f"{url}/package"
    meta = json.loads(keys["runs/remote/package/polyfid.json"])
    assert [s["path"] for s in meta["lineage"]["stores"]] == [train]  # the URL, as the user gave it
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{db}").get_run(first["mlflow_run_id"])
    assert run.data.params["data.train"] == str([train])
    assert not any(SECRET in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])

    shutil.rmtree(tmp_path / "stage")  # nothing local carries state to the next command
    capsys.readouterr()
    assert pretrain(6, 1) == 0
    keys = _objects(s3, "runs/remote/")
    assert sorted({k.split("/")[3] for k in keys if k.startswith("runs/remote/checkpoints/")}) == \
        ["step_00000004", "step_00000006"]
    assert [json.loads(line)["step"] for line in keys["runs/remote/validation.jsonl"].decode().splitlines()] == [2, 4, 6]
    best = json.loads(keys["runs/remote/best.json"])
    assert best["last_step"] == 6
    assert json.loads(keys["runs/remote/summary.json"])["mlflow_run_id"] == first["mlflow_run_id"]  # the same run
    meta = json.loads(keys["runs/remote/package/polyfid.json"])
    assert meta["extra"]["config"]["output"] == url
    assert main(["evaluate", "--model", f"{url}/package", "--data", valid]) == 0
    # `polyfid finetune --from s3://.../package`, on data from S3: the parent is fetched, and the lineage names its URL
    parent = f"{url}/package"
    assert main(["finetune", "--from", parent, "--data", valid, "--out", str(tmp_path / "ft" / "package"),
                 "--set", "trainer.steps=2", "--set", "cluster.workers=1", "--set", "tracking.enabled=false"]) == 0
    ft = json.loads((tmp_path / "ft" / "package" / "polyfid.json").read_text())
    assert ft["lineage"]["parent"] == parent
    assert SECRET not in json.dumps(ft) and SECRET not in (tmp_path / "ft" / "config.yaml").read_text()


def test_two_nodes_that_share_no_folder_train_and_resume_through_the_bucket_alone(s3, tmp_path, monkeypatch):
    """A real 2-node Ray cluster whose nodes have separate local folders (POLYFID_STAGE_DIR per raylet): 2 ranks
    placed one per node write only to their own node and to the bucket. Node B is killed mid-run: Ray Train
    restarts the worker group on node A, which resumes from the bucket's checkpoint (no step lost or trained
    twice). Then every local folder is deleted, and 1 worker resumes the run from the bucket alone."""
    import shutil
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    monkeypatch.setenv("POLYFID_LOCK_LEASE_S", "10")
    monkeypatch.setenv("POLYFID_STAGE_DIR", str(tmp_path / "driver"))
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "240")  # 3 raylets on 2 busy cores start slowly
    train = f"s3://{BUCKET}/nodes_train.zarr"
    assert _ingest(train, ":32") == 0
    url = f"s3://{BUCKET}/runs/two-nodes"
    node_dir = {n: tmp_path / f"node-{n}" for n in "ab"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "env_vars": {"POLYFID_STAGE_DIR": str(node_dir["a"])}})
    node_b = cluster.add_node(num_cpus=1, env_vars={"POLYFID_STAGE_DIR": str(node_dir["b"])})

    def cfg(workers: int, steps: int):
        return load_config("launch/recipes/demo.yaml", [
            f"data.train={train}", f"output={url}", f"cluster.address={cluster.address}", f"cluster.workers={workers}",
            "cluster.placement=SPREAD", f"trainer.steps={steps}", "trainer.checkpoint_every=4", "cluster.max_failures=1",
            f"trainer.trace_dir={url}/trace", "tracking.enabled=false", "model.width=16", "model.n_sensitivities=8",
            "data.atom_budget=64", "trainer.log_every=2"])

    def trace(rank: int) -> list[dict]:
        raw = _objects(s3, f"runs/two-nodes/trace/rank{rank}.jsonl").get(f"runs/two-nodes/trace/rank{rank}.jsonl", b"")
        return [json.loads(line) for line in raw.decode().splitlines()]

    try:
        cluster.wait_for_nodes()
        seen: dict = {}

        def kill_node_b_after_the_first_checkpoint() -> None:  # run_training needs the main thread (SIGTERM)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not ("Contents" in s3.list_objects_v2(
                    Bucket=BUCKET, Prefix="runs/two-nodes/checkpoints/step_00000004/manifest.json")
                    and trace(0) and trace(1)):  # the manifest, then each rank's trace upload
                time.sleep(0.2)
            seen["staged"] = {n: {p.name for p in d.glob("*/rank*")} for n, d in node_dir.items()}
            seen["nodes"] = {trace(r)[0]["node"] for r in (0, 1) if trace(r)}
            cluster.remove_node(node_b, allow_graceful=False)  # node B dies mid-run

        killer = threading.Thread(target=kill_node_b_after_the_first_checkpoint)
        killer.start()
        result = run_training(cfg(2, 40))
        killer.join()
        staged = seen["staged"]
        assert staged["a"] | staged["b"] == {"rank0", "rank1"} and not staged["a"] & staged["b"], staged
        assert len(seen["nodes"]) == 2  # one rank on each node, each trace uploaded
        rank0 = trace(0)
        assert [r["step"] for r in rank0] == list(range(1, 41))  # restarted from the bucket: no step lost or re-run
        assert len({r["pid"] for r in rank0}) == 2  # by a new worker group, after the kill
        assert result["package"] == f"{url}/package"

        for d in [*node_dir.values(), tmp_path / "driver"]:
            shutil.rmtree(d, ignore_errors=True)
        summary = run_training(cfg(1, 44))
        keys = _objects(s3, "runs/two-nodes/")
        assert [r["step"] for r in trace(0)] == list(range(1, 45))  # resumed at step 40 from the bucket alone
        assert json.loads(keys["runs/two-nodes/checkpoints/step_00000044/manifest.json"])["world_size"] == 1
        assert summary["package"] == f"{url}/package" and "runs/two-nodes/package/model.safetensors" in keys
        assert not (node_dir["b"]).exists()  # node B was gone: nothing was written there
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_wrong_endpoint_bucket_or_store_on_s3_gets_one_line_naming_it(s3, tmp_path, monkeypatch, capsys):
    """Bad input on object storage: one error line naming the URL or the endpoint, never a client traceback,
    and no lock or partial run left in the bucket."""
    assert _ingest(f"s3://{BUCKET}/bad_train.zarr", ":8") == 0
    s3.put_object(Bucket=BUCKET, Key="notastore.zarr/readme.txt", Body=b"not zarr")
    capsys.readouterr()
    common = ["--config", "launch/recipes/demo.yaml", "--set", "tracking.enabled=false", "--set", "trainer.steps=1"]
    assert main(["pretrain", *common, "--set", f"data.train=s3://{BUCKET}/notastore.zarr",
                 "--set", f"output=s3://{BUCKET}/runs/bad"]) == 2
    err = capsys.readouterr().err
    assert f"data.train: s3://{BUCKET}/notastore.zarr is not a polyfid store" in err and "Traceback" not in err
    assert main(["pretrain", *common, "--set", f"data.train=s3://{BUCKET}/bad_train.zarr",
                 "--set", "output=s3://no-such-bucket/runs/bad"]) == 2
    err = capsys.readouterr().err
    assert "error: output=s3://no-such-bucket/runs/bad: cannot write its lock" in err and "Traceback" not in err
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/bad/")  # nothing left behind
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    assert main(["inspect", f"s3://{BUCKET}/bad_train.zarr"]) == 2
    err = capsys.readouterr().err
    assert "error: object storage at http://127.0.0.1:1: " in err and "Traceback" not in err


def test_an_interrupted_ingest_to_s3_stays_invisible_and_a_rerun_continues_it(s3, monkeypatch, caplog):
    """A first ingest to object storage killed after 2 of its 3 shards (no manifest: invisible to readers); the
    same command again keeps those 2 shards (not rewritten: their objects are untouched), writes the third and
    the manifest, and the store reads as one ingested in one go."""
    import time

    from polyfid.data_shards.store import Store
    from polyfid.data_shards.writer import StoreWriter

    url, prefix = f"s3://{BUCKET}/resumed.zarr", "resumed.zarr/shards/shard-"
    real_flush, flushes = StoreWriter._flush, []

    def flush_then_die(self):
        real_flush(self)
        flushes.append(1)
        if len(flushes) == 2:
            raise SystemExit("killed")  # as SIGKILL: the writer's clean-up does not run either

    monkeypatch.setattr(StoreWriter, "_flush", flush_then_die)
    monkeypatch.setattr(StoreWriter, "abort", lambda self: None)
    with pytest.raises(SystemExit):
        _ingest(url, ":40")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no manifest|not a polyfid store"):
        Store.open(url)
    stamp = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {k.split("/")[2] for k in stamp} == {"shard-000000", "shard-000001"}
    time.sleep(1.5)  # S3 modification times have whole seconds
    with caplog.at_level(logging.WARNING, logger="polyfid.writer"):
        assert _ingest(url, ":40") == 0
    assert "continuing an interrupted first write (2 shards there" in caplog.text
    now = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {k: now[k] for k in stamp} == stamp  # the 2 shards were kept, not written again
    assert {k.split("/")[2] for k in now} == {"shard-000000", "shard-000001", "shard-000002"}
    whole = f"s3://{BUCKET}/in_one_go.zarr"
    assert _ingest(whole, ":40") == 0
    assert [s.checksum for s in Store.open(url).shards] == [s.checksum for s in Store.open(whole).shards]
    got, want = _read_all(url), _read_all(whole)
    assert all(np.array_equal(got[k], want[k], equal_nan=True) for k in want)

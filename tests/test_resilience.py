"""Distributed training that survives, on real Ray Train + DeepSpeed (gloo): a SIGKILLed worker, a resume on
another worker count, SIGTERM on the driver, a tracking outage, and a 2-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.distributed.config import load_config
from polyfid.distributed.driver.launcher import one_ray_cluster, run_training

# the in-process trainings share one local Ray cluster; the 2-node test stops it and starts its own
pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("shared_ray")]
RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo.yaml"
N_STRUCTURES = 48


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """48 ethanol frames (real QM labels), in 6 shards."""
    out = tmp_path_factory.mktemp("res") / "train.zarr"
    eth = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    ingest([f"{eth}@:{N_STRUCTURES}"], str(out), dataset="ethanol",
           energy={LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"}, forces={LOW: f"forces_{LOW}"},
           ranks={LOW: 0, HIGH: 1}, shard_size=8, progress=False)
    return str(out)


def _cfg(store: str, out: Path, *sets: str):
    return load_config(RECIPE, [
        f"data.train={store}", f"output={out}", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}",
        "tracking.register_as=null", "model.width=16", "model.n_sensitivities=8", "data.atom_budget=64",
        "trainer.log_every=5", "trainer.valid_every=100000", f"trainer.trace_dir={out / 'trace'}", *sets])


def _trace(out: Path) -> list[dict]:
    rows = [json.loads(line) for p in sorted((out / "trace").glob("rank*.jsonl")) for line in p.read_text().splitlines()]
    return rows


def _committed(rows: list[dict]) -> dict[tuple[int, int], dict]:
    """(rank, step) -> record, keeping the last execution of a step (steps after a checkpoint re-run on restart)."""
    out: dict[tuple[int, int], dict] = {}
    for r in rows:
        out[(r["rank"], r["step"])] = r
    return out


def _pretrain_cmd(store: str, out: Path, *sets: str) -> list[str]:
    cfg = _cfg(store, out)
    cmd = [sys.executable, "-m", "polyfid.launch.cli", "pretrain", "--config", str(RECIPE)]
    for s in ["data.train=" + store, f"output={out}", f"tracking.uri={cfg.tracking.uri}", "tracking.register_as=null",
              "model.width=16", "model.n_sensitivities=8", "data.atom_budget=64", "trainer.log_every=5",
              f"trainer.trace_dir={out / 'trace'}", *sets]:
        cmd += ["--set", s]
    return cmd


def _started(cmd: list[str], out: Path, at_step: int) -> subprocess.Popen:
    """Start a `polyfid pretrain` command and return once its trace has reached `at_step` (it must still run)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if (out / "trace").exists() and any(r["step"] >= at_step for r in _trace(out)):
            break
        assert proc.poll() is None, proc.stdout.read()[-12000:]
        time.sleep(0.1)
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "package" / "model.safetensors"))


def test_killed_worker_restarts_from_checkpoint_and_matches(store, tmp_path):
    """With an EMA of the weights on: checkpoints carry it, so the packaged (averaged) weights match too."""
    with one_ray_cluster():  # both runs on one local Ray cluster
        _killed_worker_restarts(store, tmp_path)


def _killed_worker_restarts(store, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    run_training(_cfg(store, ref, f"trainer.steps={steps}", "trainer.checkpoint_every=10", "trainer.ema_decay=0.9"))

    out = tmp_path / "killed"
    killed: dict = {}

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            rows = [r for r in (_trace(out) if (out / "trace").exists() else []) if r["rank"] == 1]
            if rows and rows[-1]["step"] >= 15:
                os.kill(rows[-1]["pid"], signal.SIGKILL)
                killed.update(pid=rows[-1]["pid"], step=rows[-1]["step"])
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    run_training(_cfg(store, out, f"trainer.steps={steps}", "trainer.checkpoint_every=10", "cluster.max_failures=2",
                      "trainer.ema_decay=0.9"))
    t.join(timeout=5)
    assert killed, "the worker was never killed (the run ended first)"
    assert killed["step"] < steps

    rows = _trace(out)
    pids = {r["pid"] for r in rows if r["rank"] == 1}
    assert len(pids) == 2  # rank 1 ran in a second process after the restart
    a, b = _committed(_trace(ref)), _committed(rows)
    assert set(a) == set(b) == {(r, s) for r in (0, 1) for s in range(1, steps + 1)}
    for key in a:  # the same structures at every (rank, step): none lost or repeated by the restart
        assert a[key]["ids"] == b[key]["ids"], key
    wa, wb = _weights(ref), _weights(out)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-6)


def test_resume_on_fewer_workers_sees_each_structure_once_per_epoch(store, tmp_path):
    out = tmp_path / "resize"
    with one_ray_cluster():
        run_training(_cfg(store, out, "cluster.workers=2", "trainer.steps=2", "trainer.checkpoint_every=100"))
        first, run_id = _trace(out), json.loads((out / "mlflow_run.json").read_text())["run_id"]
        run_training(_cfg(store, out, "cluster.workers=1", "trainer.steps=14", "trainer.checkpoint_every=100"))
    assert {r["epoch"] for r in first} == {0} and len(first) == 4  # 2 ranks x 2 steps, mid-epoch
    rows = _trace(out)
    second = [r for r in rows if r["step"] > 2]
    assert {r["rank"] for r in second} == {0} and min(r["step"] for r in second) == 3
    epoch0 = Counter(tuple(i) for r in rows if r["epoch"] == 0 for i in r["ids"])
    assert len(epoch0) == N_STRUCTURES and set(epoch0.values()) == {1}  # every structure exactly once
    assert any(r["epoch"] == 1 for r in second)  # the epoch did complete on the new world size
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    assert (out / "package" / "model.safetensors").exists()


def test_sigterm_checkpoints_and_the_same_command_resumes_the_same_run(store, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "pre"
    cfg = _cfg(store, out)
    cmd = _pretrain_cmd(store, out, "trainer.steps=60", "trainer.checkpoint_every=1000")
    proc = _started(cmd, out, at_step=5)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "stopped on request" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] and not (out / "package").exists()
    stopped_at = max(r["step"] for r in _trace(out))
    assert 5 <= stopped_at < 60
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    run_id = summary["mlflow_run_id"]
    assert MlflowClient(cfg.tracking.uri).get_run(run_id).info.status == "KILLED"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["mlflow_run_id"] == run_id
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, "loss")]
    assert steps[0] <= stopped_at and steps[-1] == 60
    resumed = [r for r in _trace(out) if r["step"] > stopped_at]
    assert min(r["step"] for r in resumed) == stopped_at + 1  # no step repeated, none skipped


def test_two_node_cluster_places_a_worker_on_each_node(store, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's shared local cluster: this test's runs join the 2-node one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        out = tmp_path / "mn"
        summary = run_training(_cfg(store, out, f"cluster.address={cluster.address}", "cluster.workers=2",
                                    "trainer.steps=4", "cluster.placement=SPREAD", "trainer.checkpoint_every=100"))
        nodes = {r["rank"]: r["node"] for r in _trace(out)}
        assert len(set(nodes.values())) == 2, nodes
        assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == set(nodes.values())
        assert Path(summary["package"]).exists()
        # with that cluster still up on this machine, a run without cluster.address starts one of its own (Ray
        # would otherwise join it and refuse the local cluster's num_cpus)
        ray.shutdown()
        local = run_training(_cfg(store, tmp_path / "local", "cluster.workers=1", "trainer.steps=2"))
        assert Path(local["package"]).exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_run_logs_through_a_cluster_tracking_server_that_then_goes_away_with_a_warning(store, tmp_path):
    """`polyfid ui --serve`, the tracking server for a cluster: a real training logs to it over HTTP, its package
    goes through the server's artifact proxy into the server's folder, and registers. Then the server is killed:
    logging warns once and returns; nothing raises."""
    import urllib.request

    from mlflow.tracking import MlflowClient

    from dist_utils import free_port
    from polyfid.infra import tracking

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "polyfid.launch.cli", "ui", "--serve", "--host", "127.0.0.1",
                               "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                               "--artifacts", str(tmp_path / "served")], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded 2-core CI machine can take minutes to start the server
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        out = tmp_path / "served_run"
        cfg = _cfg(store, out, "cluster.workers=1", "trainer.steps=4", "trainer.checkpoint_every=100",
                   f"tracking.uri={uri}", "tracking.register_as=served")
        summary = run_training(cfg)
        assert summary["model_version"] == "1"
        stored = {p.relative_to(tmp_path / "served").parts[-2:] for p in (tmp_path / "served").rglob("*") if p.is_file()}
        assert ("package", "model.safetensors") in stored and ("package", "polyfid.json") in stored
        client = MlflowClient(uri)
        assert client.get_run(summary["mlflow_run_id"]).data.metrics["lr"] > 0
        assert "Elements: 1, 6, 8" in client.get_registered_model("served").description
        t = tracking.Tracker(uri)
        run_id = t.start("outage")
        assert run_id
        t.log_metrics({"loss": 1.0}, step=1)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    with pytest.warns(RuntimeWarning, match="training goes on"):
        t.log_metrics({"loss": 0.5}, step=2)
    t0 = time.monotonic()
    t.log_metrics({"loss": 0.4}, step=3)  # skipped while the server is known to be down: no wait
    t.end()
    assert time.monotonic() - t0 < 1.0 and t.failures == 1


def test_training_with_unreachable_tracking_goes_on(store, tmp_path):
    from dist_utils import free_port

    out = tmp_path / "notrack"
    cfg = _cfg(store, out, "cluster.workers=1", "trainer.steps=4", "trainer.checkpoint_every=100")
    cfg.tracking.uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.warns(RuntimeWarning, match="training goes on"):
        summary = run_training(cfg)
    assert summary["mlflow_run_id"] is None
    assert (out / "package" / "model.safetensors").exists()


def test_one_run_per_output_folder_and_a_dead_holder_is_taken_over(store, tmp_path, caplog):
    """A second run on a folder that a live run holds is refused, naming the holder; a lock left by a process
    that was SIGKILLed is taken over."""
    from polyfid.distributed.driver.lock import FolderInUse, RunLock

    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; from polyfid.distributed.driver.lock import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            run_training(_cfg(store, out, "cluster.workers=1", "trainer.steps=2"))
        cli = subprocess.run(_pretrain_cmd(store, out, "cluster.workers=1", "trainer.steps=2"), capture_output=True,
                             text=True, timeout=300)
        assert cli.returncode == 2 and f"pid {holder.pid}" in cli.stderr and "Traceback" not in cli.stderr
        assert not (out / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING", logger="polyfid.lock"), RunLock(out):
        pass
    assert f"left by pid {holder.pid}" in caplog.text


def test_a_new_run_waits_for_the_workers_of_a_dead_driver(tmp_path, caplog):
    """A worker that outlives its SIGKILLed driver keeps a shared hold on the folder: the next run waits for it
    to exit (it could still write a checkpoint), then takes over. A live driver's hold is refused at once."""
    from polyfid.distributed.driver.lock import LOCK_FILE, FolderInUse, RunLock

    out = tmp_path / "orphaned"
    driver = subprocess.Popen([sys.executable, "-c", "from polyfid.distributed.driver.lock import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); import time; time.sleep(600)"])
    worker_code = ("import sys,time; from polyfid.distributed.driver.lock import worker_hold\n"
                   f"with worker_hold({str(out)!r}):\n print('joined', flush=True); time.sleep(float(sys.argv[1]))")
    try:
        while not (out / LOCK_FILE).exists() or not (out / LOCK_FILE).read_text():
            time.sleep(0.05)
        worker = subprocess.Popen([sys.executable, "-c", worker_code, "4"], stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "joined"  # a worker joins its live driver's hold
        with pytest.raises(FolderInUse, match=f"in use by another run: pid {driver.pid}"):
            RunLock(out).acquire()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="polyfid.lock"), RunLock(out):
        waited = time.monotonic() - t0
    assert worker.wait(timeout=30) == 0  # its hold (4 s) ended only when it exited
    assert waited > 1.0 and f"pid {driver.pid}" in caplog.text and "waiting" in caplog.text

    stuck = subprocess.Popen([sys.executable, "-c", worker_code, "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert stuck.stdout.readline().strip() == "joined"
        (out / LOCK_FILE).write_text(json.dumps({"pid": driver.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(FolderInUse, match="workers of a run that died"):
            RunLock(out, orphan_wait_s=1.0).acquire()
    finally:
        stuck.kill()
        stuck.wait()


def _orphans_gone(out: Path, timeout: float = 300.0) -> None:
    """Poll until nothing holds the folder's lock (the killed driver's workers have exited)."""
    import fcntl

    from polyfid.distributed.driver.lock import LOCK_FILE

    deadline = time.monotonic() + timeout
    with open(out / LOCK_FILE, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed driver's workers still hold the folder"
                time.sleep(0.1)


def test_sigkill_of_the_driver_leaves_a_folder_the_same_command_resumes(store, tmp_path):
    """A lost head node: the driver dies without a chance to clean up, and its workers may outlive it for a
    moment (still writing checkpoints). The same command then takes over the dead driver's lock, resumes from the
    newest checkpoint that verifies, and finishes. (A new run that starts while the orphans live waits for them:
    test_a_new_run_waits_for_the_workers_of_a_dead_driver.)"""
    from polyfid.distributed.loop.checkpoint import checkpoint_meta, newest_verified

    out = tmp_path / "headless"
    steps = 200  # far more than the orphans can train in the moment they outlive the driver
    cmd = _pretrain_cmd(store, out, "cluster.workers=2", f"trainer.steps={steps}", "trainer.checkpoint_every=10")
    proc = _started(cmd, out, at_step=14)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _orphans_gone(out)  # the expected resume point is fixed only once nothing can write a checkpoint
    assert not (out / "package").exists()
    first = _trace(out)
    killed_at = max(r["step"] for r in first)
    tag = newest_verified(out / "checkpoints")
    assert tag is not None and 14 <= killed_at < steps, (tag, killed_at)
    resume_from = checkpoint_meta(out / "checkpoints" / tag)["step"]
    assert 10 <= resume_from <= killed_at and resume_from % 10 == 0

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "taking over" in log
    old_pids = {r["pid"] for r in first}
    second = [r for r in _trace(out) if r["pid"] not in old_pids]  # the second command's workers
    assert second, "the second command trained no step"
    assert min(r["step"] for r in second) == resume_from + 1, (resume_from, second[:2])
    assert max(r["step"] for r in second) == steps
    assert (out / "package" / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["package"]

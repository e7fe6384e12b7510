"""Readable logs: plain progress lines when the output is not a terminal, and no Ray chatter by default.

The end-to-end test runs `polyfid pretrain` as a user would, with its output redirected to a file, on real
Ray Train workers with DeepSpeed engines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polyfid.distributed.loop.progress import LineProgress, duration, interactive, log_level, make_progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_prints_every_interval_with_eta():
    clock, out = Clock(), io.StringIO()
    p = LineProgress(total=100, initial=0, every_s=10, stream=out, clock=clock)
    for _ in range(30):  # 1 s a step: a line at steps 10, 20, 30
        clock.t += 1.0
        p.update()
        p.set_metrics(loss=0.5, atoms_per_s=1234.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[-1] == "train step 30/100 (30%) | loss 0.5 | 1,234 atoms/s | elapsed 30s | ETA 1m10s"
    clock.t += 0.5
    p.update()
    p.close()  # a run that stops early shows its last step
    assert out.getvalue().splitlines()[-1].startswith("train step 31/100 (31%)")
    assert out.getvalue().splitlines()[-1].endswith("elapsed 30s | ETA 1m08s")
    for _ in range(69):
        clock.t += 0.01
        p.update()
    assert out.getvalue().splitlines()[-1] == "train step 100/100 (100%) | loss 0.5 | 1,234 atoms/s | elapsed 31s"


def test_resumed_progress_measures_rate_from_the_resume():
    clock, out = Clock(), io.StringIO()
    p = LineProgress(total=200, initial=100, every_s=5, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        p.update()
    assert out.getvalue().splitlines()[-1].endswith("elapsed 10s | ETA 1m30s")


def test_duration_and_env(monkeypatch):
    assert [duration(x) for x in (4.4, 352, 3720)] == ["4s", "5m52s", "1h02m"]
    monkeypatch.setenv("POLYFID_PROGRESS", "lines")
    assert not interactive()
    assert isinstance(make_progress(10, 0, rank=0), LineProgress)
    assert make_progress(10, 0, rank=1) is None
    monkeypatch.setenv("POLYFID_PROGRESS", "bar")
    assert interactive()
    monkeypatch.setenv("POLYFID_LOG_LEVEL", "debug")
    assert log_level() == 10
    monkeypatch.setenv("POLYFID_LOG_LEVEL", "nonsense")
    assert log_level() == 20


@pytest.mark.timeout(600)
def test_two_pretrain_logs_side_by_side_read_like_reports(tmp_path):
    """Two `polyfid pretrain > log 2>&1` commands at once on one machine, as users run them: each starts and names
    its own local Ray cluster (no "Found multiple active Ray instances" traceback), and each log has no cursor
    codes, a few plain progress lines (once, from rank 0 of two workers) and no Ray start-up chatter."""
    from polyfid.data_shards.demo import LOW, demo_files
    from polyfid.launch.cli import main

    eth = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    for name, sl in (("a", ":24"), ("b", "24:48")):  # two stores, as users ingest
        assert main(["ingest", f"{eth}@{sl}", "--out", str(tmp_path / f"{name}.zarr"), "--dataset", name, "--quiet",
                     "--energy", f"{LOW}=energy_{LOW}", "--forces", f"{LOW}=forces_{LOW}"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("POLYFID_PROGRESS", "POLYFID_LOG_LEVEL")}
    root = Path(__file__).parents[1]
    procs = []
    for job, workers in (("job0", 2), ("job1", 1)):
        log = open(tmp_path / f"{job}.log", "w")
        procs.append((job, log, subprocess.Popen(
            [sys.executable, "-m", "polyfid.launch.cli", "pretrain", "--config", str(root / "launch/recipes/demo.yaml"),
             "--set", f"data.train={tmp_path / 'a.zarr'},{tmp_path / 'b.zarr'}", "--set", f"cluster.workers={workers}",
             "--set", "trainer.steps=20", "--set", "trainer.log_every=5", "--set", "trainer.progress_every_s=0",
             "--set", "model.width=16", "--set", "model.n_sensitivities=8", "--set", f"output={tmp_path / job}",
             "--set", f"tracking.uri=sqlite:///{tmp_path / job}.db", "--set", "tracking.register_as=null"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)))
    for job, log, proc in procs:
        rc = proc.wait(timeout=600)
        log.close()
        text = (tmp_path / f"{job}.log").read_text()
        assert rc == 0, text[-3000:]
        assert "multiple active Ray instances" not in text and "Traceback" not in text, text[-3000:]
        assert (tmp_path / job / "package" / "model.safetensors").exists()
        assert "\r" not in text and "\x1b[" not in text, "cursor or colour codes in a log file"
        steps = [int(m) for m in re.findall(r"train step (\d+)/20 \(\d+%\) \| loss [\d.e+-]+ \| [\d,]+ atoms/s", text)]
        assert steps and steps[-1] == 20 and steps == sorted(steps), text[-3000:]
        assert len(re.findall(r"train step 20/20", text)) == 1, "each progress line once"
        for chatter in ("Started a local Ray instance", "Requesting resources", "Started training worker group",
                        "built successfully", "Token authentication", "Creating initial MLflow database"):
            assert chatter not in text, f"Ray/MLflow chatter in the default output: {chatter!r}"


def test_quiet_stdout_swallows_prints_unless_debugging(monkeypatch, capsys):
    from polyfid.distributed.loop.progress import quiet_stdout

    monkeypatch.delenv("POLYFID_LOG_LEVEL", raising=False)
    with quiet_stdout():
        print("DeepSpeed op built successfully")
    monkeypatch.setenv("POLYFID_LOG_LEVEL", "debug")
    with quiet_stdout():
        print("shown when debugging")
    assert capsys.readouterr().out == "shown when debugging\n"

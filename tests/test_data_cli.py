"""`polyfid ingest / inspect / verify` through the CLI: every bad input exits 2 naming file, frame and field,
and leaves a new store absent or an old one unchanged; the Ray path; a SIGKILL mid-ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms

from polyfid.data_shards.layout import tmp_name
from polyfid.data_shards.store import Store
from polyfid.launch.cli import main
from polyfid.data_shards.synthetic import random_atoms

ARGS = ["--dataset", "d", "--energy", "lo=e_lo", "--forces", "lo=f_lo", "--quiet"]


def _frames(n: int = 8, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = random_atoms(n, seed, periodic_every=4)
    for a in frames:
        a.info["e_lo"] = float(rng.normal(-100, 5))
        a.arrays["f_lo"] = rng.normal(size=(len(a), 3))
    return frames


def _write_bad(kind: str, path: Path) -> tuple[str, list[str]]:
    """Write a bad input of one kind; returns (expected 'frame N: field X' text, extra CLI args)."""
    frames = _frames()
    a = frames[3]
    extra: list[str] = []
    if kind == "empty":
        path.write_text("")
        return "(no frame): field 'frames'", extra
    if kind == "nan":
        a.info["e_lo"] = float("nan")
    elif kind == "inf":
        a.arrays["f_lo"][0, 0] = np.inf
    elif kind == "element":
        a.numbers[1] = 0
    elif kind == "close":
        a.positions[1] = a.positions[0] + [0.05, 0, 0]
    elif kind == "close_custom":
        a.positions[1] = a.positions[0] + [0.3, 0, 0]  # fine at the default 0.1 Å, refused at 0.5 Å
        extra = ["--min-distance", "0.5"]
    elif kind == "shape":
        a.arrays["f_lo"] = np.zeros((len(a), 2))
    elif kind == "unit":
        extra = ["--energy-unit", "furlongs"]
    ase.io.write(path, frames)
    text = path.read_text()
    if kind in ("truncated", "malformed"):
        lines = text.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.strip().isdigit()]
        if kind == "truncated":
            path.write_text("".join(lines[:starts[3] + 4]))  # frame 3 stops after two atoms
        else:
            words = lines[starts[3] + 3].split()
            words[2] = "1.2.3"  # a bad coordinate in frame 3
            lines[starts[3] + 3] = " ".join(words) + "\n"
            path.write_text("".join(lines))
    field = {"nan": "e_lo", "inf": "f_lo", "element": "numbers", "close": "positions", "close_custom": "positions",
             "shape": "f_lo", "truncated": "format", "malformed": "format", "unit": "energy_unit"}[kind]
    return ("(no frame)" if kind == "unit" else "frame 3") + f": field {field!r}", extra


KINDS = ["empty", "truncated", "malformed", "nan", "inf", "element", "close", "close_custom", "shape", "unit"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("append", [False, True])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str,
                                              append: bool) -> None:
    out = tmp_path / "s"
    before = None
    if append:
        ase.io.write(tmp_path / "good.extxyz", _frames(5, seed=1))
        assert main(["ingest", str(tmp_path / "good.extxyz"), "--out", str(out), "--shard-size", "2", *ARGS]) == 0
        before = Store.open(out).manifest
    bad = tmp_path / "bad.extxyz"
    where, extra = _write_bad(kind, bad)
    inputs = [str(tmp_path / "good.extxyz")] * append + [str(bad)]  # good frames first: shards get written
    capsys.readouterr()
    code = main(["ingest", *inputs, "--out", str(out), "--shard-size", "2", *ARGS, *extra]
                + ["--append"] * append)
    err = capsys.readouterr().err
    assert code == 2, err
    named = "good.extxyz" if kind == "unit" and append else "bad.extxyz"  # a bad unit is refused up front
    assert named in err and where in err, err
    if append:
        assert Store.open(out).manifest == before and Store.open(out).verify() == []
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]  # no hidden build folder left


def test_inspect_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = _frames(10)
    for i, a in enumerate(frames):
        if i % 2:
            a.info["e_hi"] = a.info["e_lo"] * 1.01
    ase.io.write(tmp_path / "a.extxyz", frames)
    out = str(tmp_path / "s")
    assert main(["ingest", str(tmp_path / "a.extxyz"), "--out", out, *ARGS, "--energy", "hi=e_hi", "--rank",
                 "hi=1", "--shard-size", "4"]) == 0
    capsys.readouterr()
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    for want in ("10 structures", "3 shards", "d (10)", "rank 1", "E 5/10 (50.0%)", "F 10/10 (100.0%)",
                 "E 10/10", "F 0/10", "reference energies", "std", "Cl"):
        assert want in text, (want, text)
    assert main(["inspect", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["coverage"] == {"lo": {"energy": 10, "forces": 10}, "hi": {"energy": 5, "forces": 0}}
    assert summary["residual_energy"]["hi"]["n"] == 5
    assert main(["verify", out]) == 0 and "all 3 shards" in capsys.readouterr().out
    victim = sorted((tmp_path / "s" / "shards" / "shard-000001" / "positions").rglob("*"))
    chunk = [p for p in victim if p.is_file() and p.name != "zarr.json"][0]
    chunk.write_bytes(chunk.read_bytes()[:-7])
    assert main(["verify", out]) == 1
    assert "shard-000001" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope")]) == 2


def test_ray_parallel_ingest_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ase.io.write(tmp_path / "a.extxyz", _frames(30))
    ase.io.write(tmp_path / "b.extxyz", _frames(9, seed=4))
    bad = _frames(9, seed=5)
    bad[7].info["e_lo"] = float("inf")
    ase.io.write(tmp_path / "bad.extxyz", bad)
    specs = [str(tmp_path / "a.extxyz@2:"), str(tmp_path / "b.extxyz")]
    common = ["--dataset", "d", "--energy", "lo=e_lo", "--forces", "lo=f_lo", "--shard-size", "8", "--quiet"]
    assert main(["ingest", *specs, "--out", str(tmp_path / "serial"), *common]) == 0
    # one Ray session: a failing task first (drained, temporaries removed), then a good parallel ingest
    import ray

    # a truncated last frame: the last task of a file reads to its end, so it is refused as in a serial run
    lines = (tmp_path / "a.extxyz").read_text().splitlines(keepends=True)
    (tmp_path / "cut.extxyz").write_text("".join(lines[:-2]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["ingest", *specs, str(tmp_path / "bad.extxyz"), "--out", str(tmp_path / "p"), *common,
                     "--workers", "2"]) == 2
        assert not (tmp_path / "p").exists() and len(list(tmp_path.iterdir())) == 5
        assert main(["ingest", str(tmp_path / "cut.extxyz"), "--out", str(tmp_path / "p"), *common,
                     "--workers", "3"]) == 2
        assert "cut.extxyz: frame 29: field 'format'" in capsys.readouterr().err  # 4 tasks; was dropped
        assert not (tmp_path / "p").exists()
        assert main(["ingest", *specs, "--out", str(tmp_path / "p"), *common, "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    serial, par = Store.open(tmp_path / "serial"), Store.open(tmp_path / "p")
    assert par.manifest["provenance"][0]["parallel"]["ray_tasks"] >= 1  # Ray wrote shards, this process too
    assert par.manifest["provenance"][0]["parallel"]["ray_tasks"] < 6
    assert [s.n_structures for s in par.shards] == [8, 8, 8, 4, 8, 1]  # one shard per task, per input
    assert [s.checksum for s in par.shards] == [s.checksum for s in serial.shards[:3]] + [
        s.checksum for s in par.shards[3:]]
    assert par.n_structures == serial.n_structures == 37 and par.verify() == []
    assert par.reference_energies.keys() == serial.reference_energies.keys()
    for fid, refs in serial.reference_energies.items():
        np.testing.assert_allclose(list(par.reference_energies[fid].values()), list(refs.values()), atol=1e-6)


def test_parallel_ingest_starts_ray_only_when_it_pays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from polyfid.data_shards import parallel

    assert not ray.is_initialized()
    ase.io.write(tmp_path / "a.extxyz", _frames(30))
    common = [str(tmp_path / "a.extxyz"), *ARGS, "--shard-size", "8"]
    assert main(["ingest", *common, "--out", str(tmp_path / "serial")]) == 0
    # a job that Ray would not speed up by RAY_MIN_SAVING_S: this process writes every shard, Ray never starts
    assert main(["ingest", *common, "--out", str(tmp_path / "small"), "--workers", "2"]) == 0
    assert Store.open(tmp_path / "small").manifest["provenance"][0]["parallel"] == {"tasks": 4, "ray_tasks": 0}
    assert not ray.is_initialized()
    # worth it: Ray starts in the helper thread after the first task; this process waits (from its second task
    # on) until a Ray worker has run one, so both write shards whatever the start-up time
    monkeypatch.setattr(parallel, "RAY_MIN_SAVING_S", 0.0)
    real, pid, marker, calls = parallel.write_task, os.getpid(), tmp_path / "ray-ran", []

    def task(*args):
        if os.getpid() != pid:
            marker.touch()
        elif calls.append(1) or len(calls) > 1:
            deadline = time.monotonic() + 300
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(parallel, "write_task", task)
    assert main(["ingest", *common, "--out", str(tmp_path / "big"), "--workers", "2"]) == 0
    assert not ray.is_initialized()  # it shut down the Ray it started
    big, serial = Store.open(tmp_path / "big"), Store.open(tmp_path / "serial")
    assert 1 <= big.manifest["provenance"][0]["parallel"]["ray_tasks"] <= 3
    assert [s.checksum for s in big.shards] == [s.checksum for s in serial.shards] and big.verify() == []


def _kill_when(cmd: list[str], watch: Path, patterns: list[str]) -> int:
    """Start an ingest, SIGKILL it as soon as every glob in `patterns` matches something under `watch`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if all(any(watch.rglob(p)) for p in patterns):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait()


@pytest.mark.parametrize("append", [False, True])
def test_sigkill_mid_ingest_leaves_the_old_store_or_none(tmp_path: Path, append: bool) -> None:
    ase.io.write(tmp_path / "big.extxyz", _frames(1500, seed=7))
    out = tmp_path / "s"
    before = None
    if append:
        ase.io.write(tmp_path / "good.extxyz", _frames(6, seed=1))
        assert main(["ingest", str(tmp_path / "good.extxyz"), "--out", str(out), "--shard-size", "4", *ARGS]) == 0
        before = Store.open(out).manifest
    cmd = [sys.executable, "-m", "polyfid.launch.cli", "ingest", str(tmp_path / "big.extxyz"), "--out", str(out),
           "--shard-size", "20", *ARGS] + ["--append"] * append
    # new: once the hidden build has a shard; append: once a new shard is in place and the next is being written
    code = _kill_when(cmd, tmp_path, ["shard-000002", "s/shards/tmp-*"] if append else ["shard-*"])
    assert code == -signal.SIGKILL, "ingest finished before it could be killed"
    ase.io.write(tmp_path / "next.extxyz", _frames(6, seed=1))
    nxt = ["ingest", str(tmp_path / "next.extxyz"), "--out", str(out), *ARGS]
    if append:
        assert (out / "shards" / "shard-000002").exists()  # killed mid-way: a new shard, not yet listed
        leftover = list((out / "shards").glob("tmp-*"))  # and the temporary shard being written
        assert leftover and all(str(os.getpid()) not in p.name for p in leftover)
        store = Store.open(out)
        assert store.manifest == before and store.verify() == []
        # the next append removes the dead writer's temporary shard and reuses the unlisted name
        assert main([*nxt, "--append"]) == 0
        assert Store.open(out).n_structures == 12 and Store.open(out).verify() == []
        assert not list((out / "shards").glob("tmp-*"))
    else:
        leftover = list(tmp_path.glob(".s.tmp-*"))
        assert not out.exists() and len(leftover) == 1 and any(leftover[0].glob("shards/shard-*"))
        with pytest.raises(FileNotFoundError):
            Store.open(out)
        # a live writer's build (this process) and one whose writer is unknown (older name) must survive
        alive = tmp_path / tmp_name(".s.", 8)
        legacy = tmp_path / ".s.tmp-0123abcd"
        alive.mkdir(), legacy.mkdir()
        assert main(nxt) == 0  # the next ingest to the same path removes the dead writer's build
        assert Store.open(out).n_structures == 6 and not leftover[0].exists()
        assert alive.exists() and legacy.exists()

"""The pretraining-corpus generator (real tblite, real Ray) and the committed corpus files."""
from __future__ import annotations

import dataclasses
import gzip
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tblite")
pytest.importorskip("rdkit")

from polyfid.datasets.corpus.config import CorpusConfig  # noqa: E402
from polyfid.data_shards.corpus.levels import LEVELS, LabelError, level_by_name, xtb  # noqa: E402
from polyfid.datasets.corpus.store import LabelStore, Structures, label_key  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "data_shards" / "corpus"
SMALL = ["molecules=methanol,ethane", "target=false", "levels=gfn2_xtb,gfn1_xtb", "label_all=true",
         "md_temperatures=300", "md_frames=1", "md_equil=10", "md_stride=5", "nm_frames=1",
         "rattle_frames=1", "compress_frames=0"]  # 2 molecules x 3 structures x 2 xTB levels


def _cli(root: Path, sets: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "polyfid.datasets.corpus.generate", "--root", str(root)]
    for s in sets:
        args += ["--set", s]
    # 480 s: a Ray start on a loaded 2-core machine can take minutes (timed out at 240 s at load average 15)
    return subprocess.run(args, capture_output=True, text=True, timeout=480, start_new_session=True)


def _calls(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def _count_frames(path: Path) -> int:
    """Frames of an extxyz(.gz) file, by its atom-count lines (fast; no parsing of the frames)."""
    n = 0
    with gzip.open(path, "rt") as fh:
        for line in fh:
            natoms = int(line)
            for _ in range(natoms + 1):
                next(fh)
            n += 1
    return n


def test_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    """SIGKILL after 3 finished tasks, restart: no stored label or sampled molecule is computed again."""
    log = tmp_path / "calls.txt"
    sets = SMALL + [f"call_log={log}"]
    first = _cli(tmp_path, sets + ["kill_after_tasks=3"])
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    stored = {lv: set(LabelStore(tmp_path, lv).records) for lv in ("gfn2_xtb", "gfn1_xtb")}
    assert sum(map(len, stored.values())) >= 3  # at least one label chunk was stored before the kill
    sampled = {p.stem for p in (tmp_path / "structures").glob("*.npz")}
    n_first = len(_calls(log))

    second = _cli(tmp_path, sets)
    assert second.returncode == 0, second.stderr[-2000:]
    calls = _calls(log)
    again = [c for c in calls[n_first:] if c[0] == "label" and c[2] in stored[c[1]]]
    assert again == [], f"recomputed stored labels: {again}"
    assert not [c for c in calls[n_first:] if c[0] == "sample" and c[1] in sampled]  # stored: not resampled

    for lv in ("gfn2_xtb", "gfn1_xtb"):
        recs = LabelStore(tmp_path, lv).records
        assert len(recs) == 6 and all(r.ok and r.forces is not None for r in recs.values())
    files = sorted((tmp_path / "extxyz").glob("gfn2_xtb_*.extxyz.gz"))
    assert sum(_count_frames(f) for f in files) == 6

    third = _cli(tmp_path, sets)  # everything is done: nothing is computed, Ray is not even started
    assert third.returncode == 0, third.stderr[-2000:]
    assert len(_calls(log)) == len(calls)


def test_planted_failure_is_dropped_not_stored(tmp_path: Path) -> None:
    """A level that fails on oxygen-containing molecules: retried once, then recorded as failed, never exported."""
    import ray

    from polyfid.datasets.corpus.generate import run

    counter = tmp_path / "attempts.txt"
    gfn2 = xtb("GFN2-xTB")

    def fails_on_oxygen(numbers, positions, forces, safe):
        with open(counter, "a") as fh:
            fh.write(f"{int(safe)}\n")
        if 8 in list(numbers):
            raise LabelError("planted failure")
        return gfn2(numbers, positions, forces, safe)

    planted = dataclasses.replace(level_by_name("gfn1_xtb"), name="planted", fn=fails_on_oxygen)
    levels = (level_by_name("gfn2_xtb"), planted)
    cfg = CorpusConfig().override([s for s in SMALL if not s.startswith("levels=")] + ["levels=gfn2_xtb,planted"])
    try:
        stores = run(cfg, tmp_path, levels=levels)
    finally:
        ray.shutdown()
    recs = stores["planted"].records
    methanol = Structures.load(tmp_path, "methanol")
    bad = {label_key(h, "planted") for h in methanol.hashes()}
    assert {k for k, r in recs.items() if not r.ok} == bad
    assert all(np.isnan(recs[k].energy) and recs[k].forces is None and recs[k].retried for k in bad)
    attempts = counter.read_text().split()
    assert attempts.count("1") == 3 and len(attempts) == 3 + 3 + 3  # 3 ok, 3 failed twice
    frames = sum(_count_frames(f) for f in (tmp_path / "extxyz").glob("planted_*.extxyz.gz"))
    assert frames == 3  # ethane only
    prov = (tmp_path / "PROVENANCE.md").read_text()
    assert "3 calculations failed twice" in prov


def test_config_error_names_the_key() -> None:
    with pytest.raises(ValueError, match="md_frames"):
        CorpusConfig().override(["md_frame=3"])
    assert [lv.name for lv in LEVELS] == ["gfn2_xtb", "gfn1_xtb", "hf_631g", "wb97x_631gs"]


def _first_frame(path: Path):
    """The first frame of a gzipped extxyz file, read by ASE without indexing the whole file."""
    import io

    import ase.io

    with gzip.open(path, "rt") as fh:
        head = fh.readline()
        text = head + "".join(fh.readline() for _ in range(int(head) + 1))
    return ase.io.read(io.StringIO(text), format="extxyz")


def _provenance_tables(text: str) -> tuple[dict[str, int], dict[str, int]]:
    files = dict((m[0], int(m[1])) for m in re.findall(r"^\| `([^`]+\.extxyz\.gz)` \| (\d+) \|$", text, re.M))
    done = dict((m[0], int(m[1])) for m in re.findall(r"^\| `(\w+)` \| (\d+) / \d+ \|", text, re.M))
    return files, done


def test_committed_files_match_provenance() -> None:
    """Every committed extxyz file loads, has the frames PROVENANCE.md lists, and its level's keys."""
    prov = CORPUS / "PROVENANCE.md"
    if not prov.exists():
        pytest.skip("no corpus committed yet")
    files, done = _provenance_tables(prov.read_text())
    on_disk = {p.name for p in (CORPUS / "extxyz").glob("*.extxyz.gz")}
    assert set(files) == on_disk
    per_level = {lv.name: 0 for lv in LEVELS}
    for name, n in files.items():
        assert _count_frames(CORPUS / "extxyz" / name) == n, name
        first = _first_frame(CORPUS / "extxyz" / name)
        level = next((lv for lv in per_level if name.startswith(lv + "_")), None)
        if level is not None:
            per_level[level] += n
            assert f"energy_{level}" in first.info and first.info["molecule"]
            if level.endswith("_xtb"):  # both xTB levels label forces on every structure
                assert first.arrays[f"forces_{level}"].shape == (len(first), 3)
    for lv in LEVELS:  # every stored ok label is in one split file (target labels: in the target files)
        assert per_level[lv.name] == done[lv.name] if not lv.target else per_level[lv.name] <= done[lv.name]
    assert sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()) < 60e6


def test_export_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    """A re-export with the same frames keeps the file (and its mtime, which marks stores made from it as
    current); other frames replace it."""
    import os

    from ase import Atoms

    from polyfid.datasets.corpus.export import write_extxyz_gz

    path = tmp_path / "lvl_train.extxyz.gz"
    frames = [Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])]
    write_extxyz_gz(frames, path)
    os.utime(path, (1e9, 1e9))
    write_extxyz_gz(frames, path)
    assert path.stat().st_mtime == 1e9
    frames[0].positions[1, 0] = 1.0
    write_extxyz_gz(frames, path)
    assert path.stat().st_mtime > 1e9 and _count_frames(path) == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_label_workers_take_the_configured_niceness() -> None:
    """Ray starts workers at niceness 15; `nice=0` must bring them back to 0 (where privileges allow), and a
    higher niceness is always taken."""
    import os

    code = ("import os; from polyfid.datasets.corpus.generate import _renice; "
            "_renice(int(os.environ['LEVEL'])); print(os.getpriority(os.PRIO_PROCESS, 0))")
    def run(level: int) -> int:
        out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", code], env={**os.environ, "LEVEL": str(level)},
                             capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.split()[-1])

    start = run(15)  # the niceness the worker starts with (15, or more if pytest itself runs niced)
    assert run(19) == 19
    assert run(0) == (0 if os.geteuid() == 0 else start)

"""Turn the corpus files into polyfid stores: one store per level and split, plus the S3 target's.

    python -m polyfid.data_shards.corpus.stores OUT_DIR [--workers N]

Each level's files become ``OUT_DIR/<level>_<split>.zarr`` (dataset ``corpus_<level>``) with the fidelity's
method, basis, code, dispersion and rank from ``levels.LEVELS``. The target's files become
``OUT_DIR/target_paracetamol_<split>.zarr`` with every target level in one store.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from polyfid.data_shards.corpus.levels import LEVELS
from polyfid.data_shards.ingest import ingest

FILES = Path(__file__).resolve().parent / "extxyz"
SOURCE_MARK = ".corpus_files"  # in a store folder: the files folder its stores were made from


def source_of(out: Path) -> Path:
    """The files folder the stores in `out` were made from (the committed corpus when it does not say)."""
    mark = Path(out) / SOURCE_MARK
    return Path(mark.read_text().strip()) if mark.is_file() else FILES


def corpus_file(stem: str, files: Path = FILES) -> Path:
    """The committed file of store `stem` (`gfn2_xtb_train`, `target_paracetamol_valid`, ...)."""
    return Path(files) / f"{stem}.extxyz.gz"


def make_store(path: Path, out: Path, workers: int = 1) -> Path:
    """Ingest one corpus file into ``out/<stem>.zarr`` (replaced whole, only once the new one is complete)."""
    stem = path.name[: -len(".extxyz.gz")]
    target = stem.startswith("target_")
    levels = [lv for lv in LEVELS if (lv.target if target else stem.startswith(lv.name + "_"))]
    if not levels:
        raise ValueError(f"{path}: no corpus level matches the file name (levels: {[lv.name for lv in LEVELS]})")
    store = out / f"{stem}.zarr"
    tmp = out / f".{stem}.zarr.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ingest([str(path)], str(tmp), dataset=stem.rsplit("_", 1)[0] if target else f"corpus_{levels[0].name}",
           energy={lv.name: f"energy_{lv.name}" for lv in levels},
           forces={lv.name: f"forces_{lv.name}" for lv in levels},
           fidelity_meta={lv.name: lv.meta() for lv in levels}, workers=workers, progress=False)
    shutil.rmtree(store, ignore_errors=True)
    os.replace(tmp, store)
    return store


def make_stores(out: Path, files: Path = FILES, workers: int = 1, stale_only: bool = False) -> list[Path]:
    """Ingest every corpus file into its own store under ``out``; returns the store paths.

    ``stale_only``: skip a file whose store exists and is newer than it (so a store folder made while the
    corpus was partial gains the new levels' stores, and those of re-exported files, and nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SOURCE_MARK).write_text(str(Path(files).resolve()))
    made = []
    for path in sorted(files.glob("*.extxyz.gz")):
        stem = path.name[: -len(".extxyz.gz")]
        done = out / f"{stem}.zarr" / "zarr.json"  # written last, with the manifest
        if stale_only and done.exists() and done.stat().st_mtime >= path.stat().st_mtime:
            continue
        store = make_store(path, out, workers)
        print(f"{store}: {path.name}", flush=True)
        made.append(store)
    return made


def main() -> None:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="directory for the stores (replaced store by store)")
    ap.add_argument("--files", type=Path, default=FILES)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    make_stores(args.out, args.files, args.workers)


if __name__ == "__main__":
    main()

"""Reading a gzipped extxyz: polyfid's reader against ASE's own `ase.io.iread` on the .gz path, in one run.

    python benchmarks/bench_gzip_read.py [--files data_shards/corpus/extxyz] [--sizes 250,500,1000,2000]

ASE indexes an extxyz file's frames, then seeks back to each one. On a GzipFile a backward seek decompresses
from the start again, so ASE's time grows with the square of the frame count. polyfid decompresses the file
once into a temporary file first (`data_shards/sources.py::_seekable`). Both read the first N frames of the
same real corpus file (GFN2-xTB, 2-9 heavy atoms), written as a .extxyz.gz of N frames.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import ase.io

from polyfid.data_shards.sources import read_frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", default=str(Path(__file__).resolve().parents[1] / "data_shards/corpus/extxyz"))
    ap.add_argument("--sizes", default="250,500,1000,2000")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    frames = ase.io.read(Path(a.files) / "gfn2_xtb_valid.extxyz.gz", index=f":{max(sizes)}")
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}")
    print("| frames | ase.io.iread on .gz (s) | polyfid read_frames (s) | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = str(Path(tmp) / f"f{n}.extxyz.gz")
            ase.io.write(path, frames[:n], format="extxyz")
            t = time.perf_counter()
            n_ase = sum(1 for _ in ase.io.iread(path, index=":", format="extxyz"))
            t_ase = time.perf_counter() - t
            t = time.perf_counter()
            n_ours = sum(1 for _ in read_frames(path))
            t_ours = time.perf_counter() - t
            assert n_ase == n_ours == n, (n_ase, n_ours, n)
            print(f"| {n} | {t_ase:.2f} | {t_ours:.2f} | {t_ase / t_ours:.1f} |", flush=True)


if __name__ == "__main__":
    main()

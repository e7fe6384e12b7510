"""S1 diagnostic: does the high head of a variant-(c) model learn the force correction, or copy the low head?

    python benchmarks/s1_diagnose.py --test /tmp/polyfid-s1-v2/stores/test.zarr \
        /tmp/polyfid-s1-v2/runs/c50_independent_s0_n1200/package ...

For each package, on the test store's frames (which carry forces at both levels), prints force MAEs in meV/Å:
- high head vs high labels (S1's figure) and low head vs high labels (what copying the low head would give);
- low head vs low labels (how well the low level itself is learned);
- the learned correction (high head − low head) against the true one (high labels − low labels), beside the
  size of the true correction. An error as large as the correction itself means none of it was learned.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from polyfid.data_shards.demo import HIGH, LOW
from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.store import Store
from polyfid.evaluation.metrics import predict
from polyfid.models.package import load_package
from polyfid.data_shards.named import open_store


def diagnose(package: str, test: Store, low: str, high: str) -> dict[str, float]:
    model = load_package(package)
    model.eval()
    names = model.fidelity_names
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for batch in iter_all([test], fidelities=[low, high]):
        _, f = predict(model, batch, model.config.cutoff, None, "cpu")
        for part, x in zip(parts, (f[:, names.index(low)], f[:, names.index(high)], batch["forces"][:, 0],
                                   batch["forces"][:, 1])):
            part.append(x)
    pl, ph, yl, yh = (np.concatenate(p) * 1000.0 for p in parts)
    mae = lambda a: float(np.abs(a).mean())  # noqa: E731
    return {"high_head_vs_high": mae(ph - yh), "low_head_vs_high": mae(pl - yh), "low_head_vs_low": mae(pl - yl),
            "learned_vs_true_correction": mae((ph - pl) - (yh - yl)), "true_correction": mae(yh - yl),
            "heads_differ_by": mae(ph - pl)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packages", nargs="+")
    p.add_argument("--test", required=True, help="store with forces at both levels")
    p.add_argument("--pair", default=f"{LOW}:{HIGH}", help="LOW:HIGH fidelity names")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    low, high = a.pair.split(":")
    test = open_store(a.test)
    out = {pkg: diagnose(pkg, test, low, high) for pkg in a.packages}
    keys = list(next(iter(out.values())))
    print("| package | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for pkg, r in out.items():
        print(f"| {pkg} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()

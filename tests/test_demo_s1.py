"""S1's training stores (variants a, b, c) built from the embedded QM data, and the S1 table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polyfid.data_shards.demo import HIGH, LOW
from polyfid.data_shards.inspect import summarize
from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.store import Store
from polyfid.launch.demo import N_VALID, format_s1_table, ingest_variant, s1_labels, subset_step


def _labels(path: Path) -> dict[str, tuple[int, int]]:
    cov = summarize(Store.open(path))["coverage"]
    return {f: (c["energy"], c["forces"]) for f, c in cov.items()}


def test_s1_variant_stores_hold_the_labels_each_variant_promises(tmp_path: Path) -> None:
    mol = ["methylamine"]  # 100 frames: frames :-20 train
    n = 100 - N_VALID
    a = ingest_variant(str(tmp_path / "a.zarr"), "a", molecules=mol)
    b = ingest_variant(str(tmp_path / "b.zarr"), "b", molecules=mol)
    c = ingest_variant(str(tmp_path / "c.zarr"), "c", 0.25, molecules=mol)
    assert _labels(Path(a)) == {HIGH: (n, 0)}
    assert _labels(Path(b)) == {HIGH: (n, n)}
    assert _labels(Path(c)) == {LOW: (n, n), HIGH: (n // 4, 0)}
    # c holds one row per frame: the high-level energies of every 4th frame merged into the low-level rows,
    # and they equal variant a's energies of the same frames
    sa, sc = Store.open(a), Store.open(c)
    assert sc.n_structures == sa.n_structures == n
    ea = np.concatenate([bt["energy"][:, 0] for bt in iter_all([sa], fidelities=[HIGH])])
    ec = np.concatenate([bt["energy"][:, 0] for bt in iter_all([sc], fidelities=[HIGH])])
    have = ~np.isnan(ec)
    assert have.sum() == n // 4 and np.flatnonzero(have).tolist() == list(range(0, n, 4))
    np.testing.assert_allclose(ec[have], ea[have], rtol=0, atol=1e-9)


def test_subset_must_be_one_in_k_and_the_table_reports_mean_and_spread() -> None:
    assert subset_step(0.5) == 2 and subset_step(1.0) == 1
    with pytest.raises(ValueError, match="1/k"):
        subset_step(0.4)
    runs = [{"energy_mae": 10.0, "energy_mae_per_atom": 1.0, "forces_mae": 100.0, "forces_rmse": 150.0},
            {"energy_mae": 20.0, "energy_mae_per_atom": 2.0, "forces_mae": 300.0, "forces_rmse": 350.0}]
    table = format_s1_table([{"variant": "c", "labels": s1_labels("c", 0.5), "heads": "delta", "runs": runs}])
    row = table.splitlines()[-1]
    assert row.startswith("| (c) | gfn2_xtb E+F, b3lyp_631gs E on 50% | delta | 2 |")
    assert "15.0 ± 7.1" in row and "200.0 ± 141.4" in row

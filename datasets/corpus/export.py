"""Write the corpus files (gzipped extxyz, one per level and split) from the result store (with PROVENANCE.md:
`provenance.export_all`).

Splits: a held-out molecule's structures are all ``heldout``; a training molecule's structures are
``train`` / ``valid`` / ``test`` (80/10/10) by the structure hash's split fraction. The S3 target's files
hold the structures labelled at every target level, with all those levels' keys.
"""
from __future__ import annotations

import dataclasses
import filecmp
import gzip
import io
import os
from pathlib import Path
from typing import Sequence

import ase.io
import numpy as np
from ase import Atoms

from polyfid.data_shards.corpus.levels import Level
from polyfid.datasets.corpus.sample import Molecule, load_molecules, target_molecule
from polyfid.datasets.corpus.store import LabelStore, Record, Structures, dequantise, fractions, label_key

FILES_DIR = "extxyz"
SPLITS = ("train", "valid", "test", "heldout")
SPLIT_FRACTIONS = (0.8, 0.9)  # v < 0.8 train, < 0.9 valid, else test


def split_of(mol: Molecule, shash: str, sampler: str) -> str:
    """The split of one structure (by molecule for held-out ones, by structure otherwise)."""
    if mol.role == "heldout":
        return "heldout"
    if sampler.startswith("scan"):
        return "scans"
    v = fractions(shash)[1]
    return "train" if v < SPLIT_FRACTIONS[0] else "valid" if v < SPLIT_FRACTIONS[1] else "test"


@dataclasses.dataclass
class Corpus:
    """Everything on disk: molecules, their sampled structures and each level's labels."""

    molecules: list[Molecule]
    structures: dict[str, Structures]
    stores: dict[str, LabelStore]
    levels: list[Level]

    @classmethod
    def load(cls, root: Path, levels: Sequence[Level]) -> "Corpus":
        mols = load_molecules() + [target_molecule()]
        sts = {m.name: st for m in mols if (st := Structures.load(root, m.name)) is not None}
        return cls(mols, sts, {lv.name: LabelStore(root, lv.name) for lv in levels}, list(levels))

    def rows(self, mol: Molecule):
        """(index, structure hash, split) of each sampled structure of ``mol``."""
        st = self.structures[mol.name]
        for i, h in enumerate(st.hashes()):
            yield i, h, split_of(mol, h, str(st.sampler[i]))


def make_frame(mol: Molecule, st: Structures, i: int, shash: str, split: str,
               labels: dict[str, Record]) -> Atoms:
    """One extxyz frame: positions, metadata, and energy_<level> / forces_<level> for each label."""
    atoms = Atoms(st.numbers, positions=dequantise(st.qpos[i]))
    atoms.info.update(molecule=mol.name, group=mol.group, sampler=str(st.sampler[i]),
                      temperature_K=float(st.temperature[i]), split=split, structure=shash[:16])
    if np.isfinite(st.scan_value[i]):
        atoms.info["scan_value"] = float(st.scan_value[i])
    for name, rec in labels.items():
        atoms.info[f"energy_{name}"] = rec.energy
        if rec.forces is not None:
            atoms.arrays[f"forces_{name}"] = rec.forces
    return atoms


def write_extxyz_gz(frames: list[Atoms], path: Path) -> None:
    """Write frames as gzipped extxyz (mtime 0: byte-reproducible), atomically. An unchanged file is left alone,
    so its mtime still dates its content and stores made from it stay current (`stores.make_stores`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as gz:
        text = io.TextIOWrapper(gz, encoding="ascii")
        ase.io.write(text, frames, format="extxyz")
        text.flush()
        text.detach()
    if path.exists() and filecmp.cmp(tmp, path, shallow=False):
        tmp.unlink()
        return
    os.replace(tmp, path)


def level_frames(corpus: Corpus, level: Level) -> dict[str, list[Atoms]]:
    """The main corpus's labelled frames at ``level``, by split."""
    out: dict[str, list[Atoms]] = {s: [] for s in SPLITS}
    store = corpus.stores[level.name]
    for mol in corpus.molecules:
        if mol.role == "target" or mol.name not in corpus.structures:
            continue
        st = corpus.structures[mol.name]
        for i, h, split in corpus.rows(mol):
            rec = store.get(label_key(h, level.name))
            if rec is not None and rec.ok:
                out[split].append(make_frame(mol, st, i, h, split, {level.name: rec}))
    return out


def target_frames(corpus: Corpus) -> dict[str, list[Atoms]]:
    """The S3 target's structures labelled at every target level, by split (``scans`` for the scans)."""
    mol = target_molecule()
    out: dict[str, list[Atoms]] = {"train": [], "valid": [], "test": [], "scans": []}
    levels = [lv for lv in corpus.levels if lv.target]
    if mol.name not in corpus.structures or not levels:
        return out
    st = corpus.structures[mol.name]
    for i, h, split in corpus.rows(mol):
        recs = {lv.name: corpus.stores[lv.name].get(label_key(h, lv.name)) for lv in levels}
        if all(r is not None and r.ok for r in recs.values()):
            out[split].append(make_frame(mol, st, i, h, split, recs))
    return out


def export_files(corpus: Corpus, root: Path) -> dict[str, int]:
    """Write every non-empty file, delete stale ones; returns file name -> frames."""
    out_dir = root / FILES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    groups: list[tuple[str, dict[str, list[Atoms]]]] = [(lv.name, level_frames(corpus, lv))
                                                         for lv in corpus.levels]
    groups.append((f"target_{target_molecule().name}", target_frames(corpus)))
    for prefix, by_split in groups:
        for split, frames in by_split.items():
            if frames:
                name = f"{prefix}_{split}.extxyz.gz"
                write_extxyz_gz(frames, out_dir / name)
                written[name] = len(frames)
    for path in out_dir.glob("*.extxyz.gz"):
        if path.name not in written:
            path.unlink()
    return written


"""Merging several label sources for the same structures into one row per structure.

`merge_on` says how two frames are "the same structure":
- `id:KEY`: the frames' KEY field (an extxyz info key, db key, HDF5/npz per-frame dataset) is equal. The
  value is hashed to int64 and stored per shard as `ids/KEY`, so a later `--append --merge-on id:KEY` can
  match against the store.
- `geometry`: equal atomic numbers and positions after rounding to 1e-4 Å (so ANI-1ccx energies find
  their ANI-1x geometries). Nothing extra is stored; the hash is recomputed from the shards.

Frames that match a structure already in the store add label arrays of *new* fidelities to that
structure's shard (`StoreWriter.add_labels`): no other shard, and no other array, is rewritten. Frames that
match an earlier new frame merge into it; frames that match nothing become new structures. A label given
twice for one structure, or merging into a fidelity the shard already has, is refused (IngestError). New
structures are held in memory until every input is read (a later file may label them); the old store
contributes only its keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from polyfid.data_shards.sources import IngestError, read_frames
from polyfid.data_shards.store import Store
from polyfid.data_shards.writer import StoreWriter, Structure, check_name

GEOMETRY_DECIMALS = 4


def parse_merge_on(text: str, file: str = "<cli>") -> tuple[str, str | None]:
    """'geometry' -> ('geometry', None); 'id:KEY' -> ('id', KEY)."""
    if text == "geometry":
        return "geometry", None
    if text.startswith("id:") and len(text) > 3:
        try:
            return "id", check_name("fidelity", text[3:])  # the key becomes an array name: same rules
        except ValueError as err:
            raise IngestError(file, None, "merge_on", str(err)) from err
    raise IngestError(file, None, "merge_on", f"expected 'geometry' or 'id:KEY', got {text!r}")


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def geometry_hash(numbers: np.ndarray, positions: np.ndarray) -> int:
    """int64 hash of atomic numbers and positions rounded to 1e-4 Å."""
    q = np.rint(np.asarray(positions, dtype=np.float64) * 10**GEOMETRY_DECIMALS).astype(np.int64)
    return _h64(np.asarray(numbers, dtype=np.uint8).tobytes() + q.tobytes())


def id_hash(value: Any) -> int:
    """int64 hash of an id value (its text form, so 7 and '7' match; numpy scalars are unwrapped)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return _h64(str(value).encode())


def _store_keys(store: Store, how: str, key: str | None, file: str) -> dict[int, tuple[int, int]]:
    """{hash: (shard, row)} over an existing store."""
    out: dict[int, tuple[int, int]] = {}
    for k, info in enumerate(store.shards):
        if how == "id":
            if key not in info.ids:
                raise IngestError(file, None, "merge_on", f"store shard {info.name!r} has no ids for {key!r}: "
                                  f"it was not ingested with --merge-on id:{key}")
            hashes = store.read_array(k, f"ids/{key}").tolist()
        else:
            z, pos, off = (store.read_array(k, a) for a in ("atomic_numbers", "positions", "offsets"))
            hashes = [geometry_hash(z[a:b], pos[a:b]) for a, b in zip(off[:-1], off[1:])]
        for row, h in enumerate(hashes):
            out.setdefault(h, (k, row))
    return out


def _merge_into(target: Structure, s: Structure, spec: str, i: int, what: str, conv: Any) -> None:
    if len(target.numbers) != len(s.numbers):
        raise IngestError(spec, i, "numbers", f"matches {what} but has {len(s.numbers)} atoms, not "
                          f"{len(target.numbers)}")
    for kind, keys in (("energies", conv.energy), ("forces", conv.forces)):
        for fid, value in getattr(s, kind).items():
            if fid in getattr(target, kind):
                raise IngestError(spec, i, keys[fid], f"{fid!r} is given twice for one structure ({what})")
            getattr(target, kind)[fid] = value


def ingest_merged(writer: StoreWriter, old: Store | None, inputs: Sequence[str], conv: Any, dataset: str,
                  how: tuple[str, str | None], bar: Any) -> dict[str, Any]:
    """Read all inputs, merge frames by key with each other and with `old`; returns counts for provenance."""
    mode, key = how
    index: dict[int, tuple[str, int, int]] = {}  # hash -> ("old", shard, row) | ("new", position, 0)
    if old is not None:
        index = {h: ("old", k, r) for h, (k, r) in _store_keys(old, mode, key, inputs[0]).items()}
    offsets = {}
    updates: dict[int, dict[int, Structure]] = {}  # old shard -> row -> labels to add
    pending: list[Structure] = []
    where: list[str] = []
    n_frames = n_old = n_new_merged = 0
    for spec in inputs:
        count = 0
        for i, frame in read_frames(spec):
            s = conv(spec, i, frame)
            if mode == "id":
                if frame.scalars.get(key) is None:
                    raise IngestError(spec, i, key, f"frame has no {key!r} to merge on")
                s.ids[key] = id_hash(frame.scalars[key])
                h = s.ids[key]
            else:
                h = geometry_hash(s.numbers, s.positions)
            hit = index.get(h)
            if hit is None:
                index[h] = ("new", len(pending), 0)
                pending.append(s)
                where.append(f"{spec} frame {i}")
            elif hit[0] == "new":
                _merge_into(pending[hit[1]], s, spec, i, f"{where[hit[1]]}", conv)
                n_new_merged += 1
            else:
                k, row = hit[1], hit[2]
                info = old.shards[k]  # type: ignore[union-attr]
                if k not in offsets:
                    offsets[k] = old.read_array(k, "offsets")  # type: ignore[union-attr]
                have = [f for f in s.energies if f in info.energy] + [f for f in s.forces if f in info.forces]
                if have:
                    raise IngestError(spec, i, (conv.energy | conv.forces).get(have[0], have[0]),
                                      f"store shard {info.name!r} already has {have[0]!r} labels; merging "
                                      "into an existing label column is not supported (use a new fidelity)")
                n_at = int(offsets[k][row + 1] - offsets[k][row])
                stub = Structure(np.zeros(n_at, dtype=np.int64), np.zeros((n_at, 3)))
                target = updates.setdefault(k, {}).setdefault(row, stub)
                _merge_into(target, s, spec, i, f"store shard {info.name!r} row {row}", conv)
                n_old += 1
            count += 1
            bar.update(1)
        if count == 0:
            raise IngestError(spec, None, "frames", "input is empty (no frames selected)")
        n_frames += count
    for k, rows in sorted(updates.items()):
        info, off = old.shards[k], offsets[k]  # type: ignore[union-attr]
        fids_e = sorted({f for s in rows.values() for f in s.energies})
        fids_f = sorted({f for s in rows.values() for f in s.forces})
        energy = {f: np.full(info.n_structures, np.nan) for f in fids_e}
        forces = {f: np.full((info.n_atoms, 3), np.nan, dtype=np.float32) for f in fids_f}
        for row, s in rows.items():
            for f, e in s.energies.items():
                energy[f][row] = e
            for f, frc in s.forces.items():
                forces[f][off[row]:off[row + 1]] = frc
        writer.add_labels(k, energy, forces)
    if pending:
        writer.add(pending, dataset)
    return {"n_frames": n_frames, "merged_into_store": n_old, "merged_within_inputs": n_new_merged,
            "new_structures": len(pending), "shards_given_labels": sorted(updates)}

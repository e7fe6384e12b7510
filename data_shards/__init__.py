"""The data layer: the zarr store, ingest, reference energies, shard planning and the streaming reader.

Flow: `ingest` (or `StoreWriter`) -> `Store` -> `plan_shards` -> `ShardReader` -> `Batch` (see schema.py).
Names are imported lazily so that `polyfid.data_shards.schema` stays cheap to import. `ingest` is not
re-exported here: the submodule of the same name would shadow it; use `polyfid.data_shards.ingest.ingest`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Store": "store", "ShardInfo": "store", "CorruptShardError": "store",
    "StoreWriter": "writer", "Structure": "writer", "write_structures": "writer",
    "IngestError": "ingest",  # the function: `from polyfid.data_shards.ingest import ingest`
    "plan_shards": "plan",
    "ShardReader": "reader", "iter_all": "reader",
    "fit_reference_energies": "refs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"polyfid.data_shards.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

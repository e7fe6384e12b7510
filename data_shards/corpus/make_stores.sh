#!/usr/bin/env bash
# Turn the committed corpus files into polyfid stores (one per level and split), then inspect them.
#   data_shards/corpus/make_stores.sh [OUT_DIR (default runs/corpus)]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/corpus}"
PY="${PY:-.venv/bin/python}"
rm -rf "$OUT"
"$PY" -m polyfid.data_shards.corpus.stores "$OUT"
for store in "$OUT"/*.zarr; do
    "${POLYFID:-.venv/bin/polyfid}" inspect "$store"
done

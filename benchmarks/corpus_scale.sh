#!/usr/bin/env bash
# Issue 15 at corpus scale, in order; every step resumes (a rerun reuses what is finished):
#   1. the stores of the corpus files (only missing or outdated ones are made);
#   2. the foundation checkpoint: multi-fidelity pretraining on every level, model card, shipped as
#      pretrained:organic-mini into $SHIP_TO;
#   3. S3 at corpus scale: none / multi-fidelity (the foundation run) / Reptile with the same steps, fine-tuned
#      to paracetamol at wB97X/6-31G*, 3 seeds;
#   4. S1 at corpus scale: (a), (b), the (c) curve and (c=), each (c) oversampled to 25% with and without the
#      force prior (weight 0.3), 3 seeds.
#
#   bash benchmarks/corpus_scale.sh [STEPS]     # STEPS: pretraining steps (default: launch/recipes/foundation.yaml)
#
# Environment: PY (python, default .venv/bin/python), OUT (default runs), SHIP_TO (default models/pretrained),
# S1_STEPS (default 1000), SEEDS (default 0,1,2). Run it after the corpus is labelled and exported
# (python -m polyfid.datasets.corpus.generate, then --export-only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs}
SHIP_TO=${SHIP_TO:-models/pretrained}
SEEDS=${SEEDS:-0,1,2}
STEPS=${1:-$("$PY" -c 'import yaml; print(yaml.safe_load(open("launch/recipes/foundation.yaml"))["trainer"]["steps"])')}
echo "== $(date -Is) corpus scale: $STEPS pretraining steps, seeds $SEEDS, outputs in $OUT"

echo "== $(date -Is) 1-2. stores and the foundation checkpoint"
"$PY" -m polyfid.launch.foundation --stores "$OUT/corpus" --out "$OUT/foundation" --ship --ship-to "$SHIP_TO" \
    --set "trainer.steps=$STEPS" --set "tracking.uri=sqlite:///$OUT/mlflow.db"

echo "== $(date -Is) 3. S3 at corpus scale"
"$PY" benchmarks/bench_s3_corpus.py --workdir "$OUT/s3c" --stores "$OUT/corpus" --pretrain-steps "$STEPS" \
    --mf-package "$OUT/foundation/pretrain/package" --seeds "$SEEDS" --out benchmarks/RESULTS_s3_corpus.md \
    --plot benchmarks/s3_corpus_scans.png

echo "== $(date -Is) 4. S1 at corpus scale"
"$PY" benchmarks/bench_s1_corpus.py --workdir "$OUT/s1c" --stores "$OUT/corpus" --steps "${S1_STEPS:-1000}" \
    --seeds "$SEEDS" --curve 300,all --oversample 0.25 --force-prior 0,0.3 --out benchmarks/RESULTS_s1_corpus.md \
    --plot benchmarks/s1_corpus.png
echo "== $(date -Is) done"

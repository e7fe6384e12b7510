#!/usr/bin/env bash
# The GPU checks in one call on a lent GPU machine (benchmarks/RESULTS_gpu.md):
#   1. bf16 multi-fidelity pretraining through the real worker loop on one NCCL rank, on one store per
#      dataset (three molecules at two levels), then fine-tuning to a new molecule at a new level;
#   2. training and inference atoms/s of polyfid against hippynn on the GPU (benchmarks/bench_models.py).
#
#   bash benchmarks/gpu_session.sh STORES_DIR OUT_DIR
#
# STORES_DIR holds the stores that benchmarks/bench_s3.py builds (its WORKDIR/stores). Wheels that the GPU
# machine lacks (deepspeed, zarr, ase, vesin, hippynn, ...) are installed from .whl/ when that folder exists.
set -uo pipefail
S=${1:?stores dir}
OUT_DIR=${2:?output dir}
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the repository root is the package polyfid
mkdir -p /tmp/pkgroot && ln -sfn "$PWD" /tmp/pkgroot/polyfid && export PYTHONPATH=/tmp/pkgroot:$PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/nvidia_smi.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
T=$S/ethanol_train.zarr,$S/malonaldehyde_train.zarr,$S/methylamine_train.zarr
V=$S/ethanol_valid.zarr,$S/malonaldehyde_valid.zarr,$S/methylamine_valid.zarr
timeout 300 python3 benchmarks/gpu_check.py --train "$T" --valid "$V" --target "$S/formic_acid_target.zarr" \
    --target-valid "$S/formic_acid_target_valid.zarr" --out /tmp/gpu_check --steps 300 --finetune-steps 200 \
    > "$OUT_DIR/gpu_check.log" 2>&1
echo "gpu_check exit $?"
cp /tmp/gpu_check/gpu_report.json "$OUT_DIR/" 2>/dev/null
tail -n 40 "$OUT_DIR/gpu_check.log"
[ -n "${SKIP_MODELS:-}" ] || timeout 240 python3 benchmarks/bench_models.py --skip accuracy,nve --device cuda --molecules 256 --water-side 14 \
    --repeats 10 --hippynn-kernels triton,cupy,pytorch --out "$OUT_DIR/models_gpu.md" > "$OUT_DIR/bench_models.log" 2>&1
echo "bench_models exit $?"
cat "$OUT_DIR/models_gpu.md" 2>/dev/null || tail -n 30 "$OUT_DIR/bench_models.log"

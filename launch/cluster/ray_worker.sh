#!/usr/bin/env bash
# Join this node to a Ray cluster. Usage: launch/cluster/ray_worker.sh HEAD_IP:PORT
set -euo pipefail
ADDRESS=${1:?usage: ray_worker.sh HEAD_IP:PORT}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_enable_metrics_collection=${RAY_enable_metrics_collection:-0}  # see docs/troubleshooting.md
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/polyfid/torch_extensions}
ray start --address "$ADDRESS" ${RAY_WORKER_ARGS:-}

#!/usr/bin/env bash
# Start the Ray head on this node. Usage: launch/cluster/ray_head.sh [PORT]
# With MLFLOW_PORT set, also an MLflow tracking server for the cluster (polyfid ui --serve; runs log to
# http://HEAD:MLFLOW_PORT), backed by MLFLOW_BACKEND (default sqlite:///$PWD/mlflow.db) and MLFLOW_ARTIFACTS
# (default $PWD/mlartifacts); its log is mlflow_server.log.
# Every node needs the same Python environment (this repository installed) and the same RAY_AUTH_MODE.
set -euo pipefail
PORT=${1:-6379}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_enable_metrics_collection=${RAY_enable_metrics_collection:-0}  # see docs/troubleshooting.md
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/polyfid/torch_extensions}
ray start --head --port "$PORT" --dashboard-host 127.0.0.1 ${RAY_HEAD_ARGS:-}
if [ -n "${MLFLOW_PORT:-}" ]; then
    nohup polyfid ui --serve --port "$MLFLOW_PORT" --tracking-uri "${MLFLOW_BACKEND:-sqlite:///$PWD/mlflow.db}" \
        --artifacts "${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}" > mlflow_server.log 2>&1 &
    echo "MLflow tracking server at http://$(hostname -I | awk '{print $1}'):$MLFLOW_PORT (pid $!)"
fi
echo "Ray head at $(hostname -I | awk '{print $1}'):$PORT; join with launch/cluster/ray_worker.sh HEAD_IP:$PORT"

#!/usr/bin/env bash
# Submit a pretraining run to a running Ray cluster as a Ray job (needs the dashboard, i.e. ray[default]).
# Usage: launch/cluster/submit_job.sh http://HEAD_IP:8265 RECIPE.yaml [--set k=v ...]
set -euo pipefail
DASHBOARD=${1:?usage: submit_job.sh http://HEAD_IP:8265 RECIPE.yaml [--set k=v ...]}; shift
RECIPE=${1:?recipe}; shift
ray job submit --address "$DASHBOARD" --working-dir . -- \
    polyfid pretrain --config "$RECIPE" --address auto "$@"

#!/usr/bin/env bash
# Detection on a 7-8B chat model with all GPUs of one node; every rank writes into one run directory.
# usage: experiments/detect_7b.sh mistral [extra overrides]
set -euo pipefail
model=${1:-mistral}; shift || true
export SAFETY_NEURONS_RUN_DIR=${SAFETY_NEURONS_RUN_DIR:-outputs/runs/detect/$model/$(date +%Y-%m-%d_%H-%M-%S)}
accelerate launch --config_file experiments/accelerate_multigpu.yaml -m safety_neurons \
  stage=detect model="$model" topk=paper dataset@reference=harmless "$@"

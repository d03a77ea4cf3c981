#!/usr/bin/env bash
# SN-Tune, RSN-Tune and random neurons of the same shape, 3 seeds each, on every GPU of a node: one
# `accelerate launch` per point (an Accelerator is made once per process, so a Hydra --multirun inside
# one launch would share it). Needs experiment=gpu_detect (and with dataset@reference=harmless for RSN).
#   MODEL=llama3 bash experiments/real_models/tuning_sweep.sh
set -euo pipefail
MODEL=${MODEL:-llama3}
CONFIG=${CONFIG:-experiments/accelerate_multigpu.yaml}
for seed in 0 1 2; do
  for point in "finetune.target=safety finetune.set=sn" "finetune.target=safety finetune.set=rsn" \
               "finetune.target=random finetune.set=sn"; do
    # shellcheck disable=SC2086
    accelerate launch --config_file "$CONFIG" -m safety_neurons experiment=gpu_sntune model="$MODEL" \
      $point finetune.seed=$seed finetune.reuse=true
  done
done
python -m safety_neurons stage=report report.of=finetune report.dir=outputs/runs/finetune/"$MODEL"

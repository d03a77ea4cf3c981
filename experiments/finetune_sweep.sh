#!/usr/bin/env bash
# SN-Tune vs baselines at equal data and steps. Multi-process fine-tuning: a loop of launches, not a
# --multirun inside one `accelerate launch` (an Accelerator cannot be re-created in one process).
set -euo pipefail
m=${MODEL:-smollm2}
sweep=outputs/sweeps/finetune/$m/$(date +%Y-%m-%d_%H-%M-%S)
for t in safety random all lora; do
  SAFETY_NEURONS_RUN_DIR=$sweep/$t ${LAUNCH:-python} -m safety_neurons stage=finetune model=$m \
    finetune.target=$t finetune.overwrite=true logger=${LOGGER:-wandb}
done
python -m safety_neurons stage=report report.of=finetune report.dir=$sweep model=$m

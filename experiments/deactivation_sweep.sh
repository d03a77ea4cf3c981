#!/usr/bin/env bash
# The deactivation study on the refusing organism: safety sets, random sets, and split regions.
# Single-process stage, so Hydra --multirun is fine (one job per point; a report at the end).
set -euo pipefail
m=${MODEL:-smollm2_refusing}
python -m safety_neurons --multirun stage=deactivate model=$m logger=none \
  deactivate.n=0,10,30,100,300,1000 deactivate.baseline=safety,random
# one region at a time (METHOD 5 split, six flags)
for r in under reason gen; do for p in attn ffn; do
  flags=""; for r2 in under reason gen; do for p2 in attn ffn; do
    [ "$r2-$p2" = "$r-$p" ] && v=true || v=false; flags="$flags split.${r2}_${p2}=$v"; done; done
  python -m safety_neurons stage=deactivate model=$m split=smollm2 $flags deactivate.region=$r-$p \
    'deactivate.n=[10,100]' logger=none
done; done

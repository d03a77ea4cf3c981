#!/usr/bin/env bash
# Safety neurons of the refusing organism and what switching them off does. Everything lands in the
# store and under outputs/; the tables of docs/results-smollm2.md come from these runs.
set -euo pipefail
m=${MODEL:-smollm2_refusing}
py() { python -m safety_neurons "$@" logger=${LOGGER:-none}; }
# detection: exact (user-message tokens), safety-specific (harmless reference subtracted), original
py stage=detect model=$m detect.reuse=true
py stage=detect model=$m dataset@reference=harmless detect.reuse=true
py stage=detect model=$m detect=original detect.reuse=true
py stage=compare model=$m 'compare.sets=[exact,exact-refharmless,original]'
# deactivation: counts for each set (all = the whole set), against random sets of the same shape (3 seeds)
E="eval.n_harmful=41 eval.n_harmless=16 eval.max_new_tokens=24"
py stage=deactivate model=$m deactivate.neurons=exact 'deactivate.n=[0,30,100,300,1000,all]' $E
py stage=deactivate model=$m deactivate.neurons=exact deactivate.baseline=random 'deactivate.n=[300,1000]' $E
py stage=deactivate model=$m deactivate.neurons=exact-refharmless 'deactivate.n=[0,30,100,300,all]' $E
py stage=deactivate model=$m deactivate.neurons=exact-refharmless deactivate.baseline=random 'deactivate.n=[300,all]' $E
py stage=deactivate model=$m deactivate.neurons=original 'deactivate.n=[30,100,300,1000]' $E
# the whole safety-specific set one split region at a time (split=smollm2: under = layers 0-3, gen = 26-29)
for rp in under-attn under-ffn reason-attn reason-ffn gen-attn gen-ffn; do
  flags=""; for r in under reason gen; do for p in attn ffn; do
    [ "$r-$p" = "$rp" ] && v=true || v=false; flags="$flags split.${r}_${p}=$v"; done; done
  py stage=deactivate model=$m deactivate.neurons=exact-refharmless split=smollm2 $flags \
    deactivate.region=$rp deactivate.n=all $E
done
# run directories are named by the model name (smollm2-refusing), not the config name
py stage=report model=$m report.dir=outputs/runs/deactivate/${MODEL_NAME:-smollm2-refusing}

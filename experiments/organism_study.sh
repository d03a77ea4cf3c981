#!/usr/bin/env bash
# Issues 3 and 4, the real result: safety neurons of the refusing organism and what switching them
# off does. Everything lands in the store and under outputs/; the README tables come from these runs.
set -euo pipefail
m=${MODEL:-smollm2_refusing}
py() { python -m safety_neurons "$@" logger=${LOGGER:-none}; }
# detection: exact (user-message tokens), safety-specific (harmless reference subtracted), original
py stage=detect model=$m detect.reuse=true
py stage=detect model=$m detect.reference=harmless detect.reuse=true
py stage=detect model=$m detect=original detect.reuse=true
py stage=compare model=$m 'compare.sets=[exact,exact-refharmless,original]'
# deactivation: counts for each set, against random sets of the same shape (3 seeds)
E="eval.max_new_tokens=32"
for tag in exact exact-refharmless original; do
  py stage=deactivate model=$m deactivate.set_tag=$tag 'deactivate.n=[0,10,30,100,300,1000]' $E
done
py stage=deactivate model=$m deactivate.set_tag=exact deactivate.baseline=random 'deactivate.n=[10,30,100,300,1000]' $E

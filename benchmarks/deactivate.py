"""Deactivation overhead: greedy generation with hooks / without (target <= 1.05), and the fast-path
sweep (all counts in one process) vs the same points as separate runs. Prints ratios measured side by
side in one run.  usage: python benchmarks/deactivate.py [--prompts 16] [--tokens 32] [--neurons 1000]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import torch
from common import ROOT, Timer, harmful_prompts, smollm2

from safety_neurons.evaluation import generate
from safety_neurons.hooks import deactivated
from safety_neurons.neurons import NeuronSet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--neurons", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also time the fast path vs separate runs")
    a = ap.parse_args()
    cfg, model, tok, ad = smollm2()
    prompts = harmful_prompts(cfg, a.prompts)
    g = torch.Generator().manual_seed(0)
    kinds = ["q", "k", "v", "o", "ffn"]
    ranking = set()
    while len(ranking) < a.neurons:
        kind = kinds[int(torch.randint(5, (1,), generator=g))]
        ranking.add((int(torch.randint(ad.n_layers, (1,), generator=g)), kind,
                     int(torch.randint(ad.width(kind), (1,), generator=g))))
    ns = NeuronSet(sorted(ranking))
    idx = ns.index_map()
    plain, hooked = [], []
    generate(model, tok, prompts[:2], None, 4, 2)  # warm-up
    for _ in range(a.repeats):  # alternate so drift hits both sides alike
        with Timer() as t:
            out_plain = generate(model, tok, prompts, None, a.tokens, a.prompts)
        plain.append(t.s)
        with Timer() as t, deactivated(ad, idx):
            generate(model, tok, prompts, None, a.tokens, a.prompts)
        hooked.append(t.s)
    with deactivated(ad, {}):
        same = generate(model, tok, prompts, None, a.tokens, a.prompts) == out_plain
    p, h = min(plain), min(hooked)
    print(f"generation, {a.prompts} prompts x {a.tokens} tokens, {a.neurons} neurons off")
    print(f"  without hooks {p:.2f}s   with hooks {h:.2f}s   overhead ratio {h / p:.3f} (target <= 1.05)")
    print(f"  empty hook set reproduces the plain answers: {same}")
    if a.sweep:
        counts = [0, 10, 100]
        common = ["stage=deactivate", "model=smollm2", "logger=none", "eval=quick", "deactivate.neurons=" + str(
            _save(ns)), "eval.utility=false"]
        with Timer() as fast:
            subprocess.run([sys.executable, "-m", "safety_neurons", *common,
                            f"deactivate.n=[{','.join(map(str, counts))}]"], cwd=ROOT, check=True,
                           capture_output=True)
        with Timer() as sep:
            for n in counts:
                subprocess.run([sys.executable, "-m", "safety_neurons", *common, f"deactivate.n={n}"], cwd=ROOT,
                               check=True, capture_output=True)
        print(f"sweep of {counts}: one process {fast.s:.1f}s, separate runs {sep.s:.1f}s, "
              f"ratio separate/fast {sep.s / fast.s:.2f}")


def _save(ns: NeuronSet):
    d = tempfile.mkdtemp()
    return ns.save(f"{d}/neurons.json")


if __name__ == "__main__":
    main()

"""Exact importance of this checkout against an earlier commit's, measured alternately in one process
on the same SmolLM2 batches (so a loaded machine slows both sides alike): time per kind and the largest
score difference.  usage: python benchmarks/detect_ab.py COMMIT [--prompts 32] [--batch 16]"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import harmful_prompts, smollm2
from detect import batches, forward_time

from safety_neurons.importance import prompt_scores as now_scores

ROOT = Path(__file__).resolve().parent.parent


def load_old(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:safety_neurons/importance.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    src = re.sub(r"^from \.(\w*) import", r"from safety_neurons.\1 import", src, flags=re.M)
    f = Path(tempfile.mkdtemp()) / "importance_old.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("importance_old", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.prompt_scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("commit")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    old_scores = load_old(a.commit)
    cfg, model, tok, ad = smollm2()
    bl = batches(tok, harmful_prompts(cfg, a.prompts), a.batch)

    def run(fn, kinds):
        t0 = time.perf_counter()
        outs = [fn(model, ad, b, m, kinds=kinds) for b, m in bl]
        return time.perf_counter() - t0, outs

    fwd = min(forward_time(model, bl) for _ in range(2))
    print(f"SmolLM2, {a.prompts} prompts, batch {a.batch}; plain forward {fwd:.2f}s; {a.commit} vs this checkout")
    for kinds in (("q",), ("k",), ("q", "k", "v", "o", "ffn")):
        t_old, t_now = [], []
        for _ in range(a.repeats):
            t, o_old = run(old_scores, kinds)
            t_old.append(t)
            t, o_now = run(now_scores, kinds)
            t_now.append(t)
        diff = max(float(((n[k] - o[k]).abs() / o[k].abs().max()).max()) for n, o in zip(o_now, o_old) for k in n)
        print(f"{'+'.join(kinds):>12}: before {min(t_old):.2f}s ({min(t_old) / fwd:.2f}x forward), now "
              f"{min(t_now):.2f}s ({min(t_now) / fwd:.2f}x): {min(t_old) / min(t_now):.2f}x faster; "
              f"max score difference {diff:.1e} of the largest", flush=True)


if __name__ == "__main__":
    sys.exit(main())

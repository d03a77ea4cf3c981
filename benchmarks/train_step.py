"""Full fine-tuning step on SmolLM2 (the organism's recipe: its training pairs, batch 8), measured side by
side in one run, alternating:

- plain: the padded batch, every row runs the whole chat template; per-tensor AdamW; glibc's default malloc;
- prefix: the rows' shared system prompt run once through the key/value cache; fused AdamW (padded rows);
- packed: the batch packed into one row (no padding, the prefix once, logits only where loss is,
  finetune.pack); fused AdamW;
- packed + reused memory: the same with malloc keeping freed memory (reuse_freed_memory, the default).

The first three run with glibc's default malloc (switched back after the last variant of each round).
Prints seconds per step of each and the ratios to plain. usage: python benchmarks/train_step.py
[--steps 4] [--rounds 2]"""

from __future__ import annotations

import argparse
import ctypes
import random
import resource

import torch
import torch.nn.functional as F
from common import Timer, smollm2

from safety_neurons.data import encode
from safety_neurons.runtime import reuse_freed_memory
from safety_neurons.training import adamw, shared_prefix_len, step_logits


def steps(model, tok, pairs, params, opt, pack, share, n, seed):
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    with Timer() as t:
        for _ in range(n):
            idx = rng.sample(range(len(pairs[0])), 8)
            b = encode(tok, [pairs[0][i] for i in idx], None, [pairs[1][i] for i in idx],
                       padding_side="right").to(dev)
            target = b.labels[:, 1:]
            sel = target != -100
            logits = step_logits(model, b, sel, pack=pack, share=share)
            F.cross_entropy(logits.float(), target[sel]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return t.s / n, b


def default_malloc():
    """glibc's defaults (mmap for large blocks, trim at 128 KiB), undoing reuse_freed_memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 65536)
    libc.mallopt(-1, 128 * 1024)
    libc.malloc_trim(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from safety_neurons.cfg import compose
    from safety_neurons.sft_data import training_pairs

    cfg, model, tok, _ = smollm2()
    acfg = compose(["experiment=align", "logger=none"])
    pairs = training_pairs(acfg, model, tok)[:2]
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    model.train()
    f = acfg.finetune
    plain_opt = torch.optim.AdamW(params, lr=1e-7, weight_decay=f.weight_decay, foreach=False)
    ours_opt = adamw(params, f)
    variants = [("plain", plain_opt, False, False, False), ("prefix", ours_opt, False, True, False),
                ("packed", ours_opt, True, True, False), ("packed + reused memory", ours_opt, True, True, True)]
    steps(model, tok, pairs, params, ours_opt, True, True, 1, 99)  # warm-up
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    faults: dict[str, list[float]] = {v[0]: [] for v in variants}  # minor page faults per step
    for r in range(a.rounds):
        default_malloc()
        for name, opt, pack, share, reuse in variants:
            if reuse:
                assert reuse_freed_memory()
            steps(model, tok, pairs, params, opt, pack, share, 1, 50 + r)  # settle the allocator
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, b = steps(model, tok, pairs, params, opt, pack, share, a.steps, r)
            times[name].append(t)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / a.steps)
    n_tok = int(b.attention_mask.sum())
    print(f"SmolLM2 full fine-tuning, batch 8 (last batch: {n_tok} real tokens of {b.input_ids.numel()} padded, "
          f"shared prefix {shared_prefix_len(b)}), {a.rounds} x {a.steps} steps each, alternating")
    base = min(times["plain"])
    for name, ts in times.items():
        print(f"  {name:<24} {min(ts):.2f} s/step  {base / min(ts):.2f}x faster than plain  "
              f"({sum(faults[name]) / len(faults[name]):,.0f} page faults per step)")


if __name__ == "__main__":
    main()

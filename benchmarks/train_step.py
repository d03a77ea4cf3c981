"""Full fine-tuning step on SmolLM2 (the organism's recipe: its training pairs, batch 8), measured side by
side in one run, alternating: the plain step (every row runs the whole chat template; per-tensor AdamW)
vs ours (the rows' shared system prompt run once, finetune.share_prefix; fused AdamW). Prints seconds
per step of each and their ratio. usage: python benchmarks/train_step.py [--steps 4] [--rounds 2]"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from common import Timer, smollm2

from safety_neurons.data import encode
from safety_neurons.training import adamw, response_logits, shared_prefix_len


def steps(model, tok, pairs, params, opt, share, n, seed):
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    with Timer() as t:
        for _ in range(n):
            idx = rng.sample(range(len(pairs[0])), 8)
            b = encode(tok, [pairs[0][i] for i in idx], None, [pairs[1][i] for i in idx],
                       padding_side="right").to(dev)
            target = b.labels[:, 1:]
            keep = (target != -100).any(0).nonzero()[:, 0]
            logits = response_logits(model, b, keep, share=share)
            F.cross_entropy(logits.flatten(0, 1).float(), target[:, keep].flatten(), ignore_index=-100).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return t.s / n, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from safety_neurons.cfg import compose
    from safety_neurons.stages.finetune import training_pairs

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
    steps(model, tok, pairs, params, ours_opt, True, 1, 99)  # warm-up
    tp, to = [], []
    for r in range(a.rounds):
        tp.append(steps(model, tok, pairs, params, plain_opt, False, a.steps, r)[0])
        t, b = steps(model, tok, pairs, params, ours_opt, True, a.steps, r)
        to.append(t)
    print(f"SmolLM2 full fine-tuning, batch 8 (shared prefix {shared_prefix_len(b)} of {b.input_ids.shape[1]} tokens "
          f"in the last batch), {a.rounds} x {a.steps} steps each, alternating")
    print(f"plain step {min(tp):.2f}s, ours {min(to):.2f}s: {min(tp) / min(to):.2f}x faster")


if __name__ == "__main__":
    main()

"""Neuron-specific tuning (1% of neurons) vs full fine-tuning on SmolLM2: optimizer-state and gradient
memory (target: neuron tuning <= 5% of full) and time per step (target: no slower), side by side.
Then neuron tuning's two backward passes, alternating for --rounds: slice-only weight gradients (the
default) and autograd through the scattered weight (every layer's whole weight gradient formed).
usage: python benchmarks/finetune.py [--share 0.01] [--steps 4] [--batch 8] [--rounds 2]"""

from __future__ import annotations

import argparse
import copy

import torch
from common import Timer, harmful_prompts, smollm2
from omegaconf import OmegaConf

from safety_neurons.config import FinetuneConfig
from safety_neurons.training import attach_slices


def state_bytes(opt, params) -> tuple[int, int]:
    st = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim() > 0)
    gr = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return st, gr


def run(model, tok, params, prompts, responses, steps, batch):
    from safety_neurons.data import encode

    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    times = []
    model.train()
    for s in range(steps + 1):
        i = (s * batch) % len(prompts)
        b = encode(tok, prompts[i:i + batch], None, responses[i:i + batch], padding_side="right")
        with Timer() as t:
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            loss.backward()
            opt.step()
            st, gr = state_bytes(opt, params)
            opt.zero_grad(set_to_none=True)
        if s:  # the first step allocates the optimizer state
            times.append(t.s)
    return sum(times) / len(times), st, gr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    cfg, model, tok, ad = smollm2()
    prompts = harmful_prompts(cfg, 64)
    responses = ["I'm sorry, but I can't help with that."] * len(prompts)
    g = torch.Generator().manual_seed(0)
    neurons = {}
    for layer in range(ad.n_layers):
        for kind in ("q", "k", "v", "o", "ffn"):
            w = ad.width(kind)
            neurons[(layer, kind)] = torch.randperm(w, generator=g)[: max(1, int(a.share * w))]
    _ = OmegaConf.structured(FinetuneConfig)
    full = copy.deepcopy(model)
    params_full = list(full.parameters())
    t_full, st_full, gr_full = run(full, tok, params_full, prompts, responses, a.steps, a.batch)
    del full
    sn = copy.deepcopy(model)
    handles = attach_slices(sn, ad.__class__(sn), neurons)
    params_sn = [h.scatter.part for h in handles]
    t_sn, st_sn, gr_sn = run(sn, tok, params_sn, prompts, responses, a.steps, a.batch)
    n_sn = sum(p.numel() for p in params_sn)
    n_full = sum(p.numel() for p in params_full)
    print(f"trainable: neuron tuning {n_sn:,} ({100 * n_sn / n_full:.2f}%) vs full {n_full:,}")
    print(f"optimizer state: {st_sn / 2**20:.1f} MiB vs {st_full / 2**20:.1f} MiB  ratio {st_sn / st_full:.4f} (target <= 0.05)")
    print(f"gradients:       {gr_sn / 2**20:.1f} MiB vs {gr_full / 2**20:.1f} MiB  ratio {gr_sn / gr_full:.4f} (target <= 0.05)")
    print(f"time per step:   {t_sn:.2f}s vs {t_full:.2f}s  ratio {t_sn / t_full:.3f} (target <= 1.0)")
    del sn
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for mode in (False, True):
            m = copy.deepcopy(model)
            hs = attach_slices(m, ad.__class__(m), neurons, slice_grads=mode)
            times[mode].append(run(m, tok, [h.scatter.part for h in hs], prompts, responses, a.steps, a.batch)[0])
            del m, hs
    best = {k: min(v) for k, v in times.items()}
    print(f"neuron tuning step: slice-only gradients {best[True]:.2f}s vs through the scattered weight "
          f"{best[False]:.2f}s  {best[False] / best[True]:.2f}x faster (best of {a.rounds} rounds; all: "
          f"{[round(x, 2) for x in times[True]]} vs {[round(x, 2) for x in times[False]]})")


if __name__ == "__main__":
    main()

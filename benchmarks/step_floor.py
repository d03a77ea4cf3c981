"""A floor on the organism's training time on this machine: the parts of a full fine-tuning step of SmolLM2
that no change to the pipeline removes, each timed in isolation at its best (operands hot in cache,
fastest of ``--rounds``), times the recipe's ``--steps`` updates:

- the matrix products of the linear layers: for each, the forward, the input gradient and the weight
  gradient, on the packed row of one step (the organism's recipe: batch 8; a profile of real steps had
  169-188 loss tokens in packed rows of 371-386 tokens);
- attention over the packed row with its block-causal mask, forward and backward, every layer;
- the fused AdamW update of all parameters.

A real step also normalises, multiplies, clips, embeds and moves memory, and its products run with
operands that are not in cache, so it is slower than this (``benchmarks/train_step.py``).

Not compared here: numpy's OpenBLAS. Timed next to torch in one process, its idle threads spin while torch
runs (and torch's while it runs), so each looks slower than it is (torch's MKL by up to 1.5x). With both
on torch's threads (OpenBLAS from the ``scipy-openblas32`` wheel, single-threaded, called from an OpenMP
loop in C, a harness outside this script) the products took 2.02 s a step against torch's 2.05 s.

usage: python benchmarks/step_floor.py [--tokens 380] [--loss-tokens 180] [--rows 8] [--steps 100]
[--target 240] [--rounds 3]"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import smollm2


def products(cfg, T: int, N: int) -> list[tuple[str, int, int, int, int, bool, bool]]:
    """(name, count per step, M, K, N, A transposed, B transposed) of every matrix product of one step:
    for each linear layer y = x W^T, the forward, the input gradient gy W and the weight gradient gy^T x."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    dh = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    L = cfg.num_hidden_layers
    lin = [("q, o", 2 * L, d, d, T), ("k, v", 2 * L, cfg.num_key_value_heads * dh, d, T),
           ("gate, up", 2 * L, f, d, T), ("down", L, d, f, T), ("vocabulary", 1, cfg.vocab_size, d, N)]
    out = []
    for name, n, o, i, t in lin:
        out += [(f"{name} forward", n, t, i, o, False, True),  # x (t, i) @ W^T (i, o)
                (f"{name} input grad", n, t, o, i, False, False),  # gy (t, o) @ W (o, i)
                (f"{name} weight grad", n, o, t, i, True, False)]  # gy^T (o, t) @ x (t, i)
    return out


def operands(M, K, N, ta, tb):
    a = torch.randn(K, M) if ta else torch.randn(M, K)
    b = torch.randn(N, K) if tb else torch.randn(K, N)
    return (a.t() if ta else a), (b.t() if tb else b)


def fastest(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def packed_attention(cfg, T: int, rows: int):
    """Forward and backward of one layer's attention over a packed row of ``rows`` equal rows after a
    shared prefix of 30 tokens (SmolLM2's chat template with its default system prompt: 24), with the
    block-causal mask the packed step uses."""
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    p = 30
    seg = torch.cat([torch.zeros(p, dtype=torch.long), torch.arange(T - p) * rows // (T - p) + 1])
    i = torch.arange(T)
    ok = (i[None, :] <= i[:, None]) & ((seg[None, :] == seg[:, None]) | (seg[None, :] == 0))
    mask = torch.zeros(1, 1, T, T).masked_fill_(~ok, torch.finfo(torch.float32).min)
    q = torch.randn(1, H, T, dh, requires_grad=True)
    k, v = (torch.randn(1, KV, T, dh, requires_grad=True) for _ in range(2))

    def run():
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1),
                                           attn_mask=mask)
        o.backward(torch.ones_like(o))
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=380, help="tokens in the packed row of one step")
    ap.add_argument("--loss-tokens", type=int, default=180, help="tokens of the step that carry loss")
    ap.add_argument("--rows", type=int, default=8, help="training pairs in the packed row (the batch size)")
    ap.add_argument("--steps", type=int, default=100, help="updates of the recipe (recipe O: 100)")
    ap.add_argument("--target", type=float, default=240.0, help="seconds the training should take")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    model = smollm2()[1]
    cfg = model.config
    prods = products(cfg, a.tokens, a.loss_tokens)
    ops = {p: operands(*p[2:]) for p in prods}
    attn = packed_attention(cfg, a.tokens, a.rows)
    params = [p.detach().requires_grad_(True) for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-12, fused=True)  # as training.adamw on CPU
    best: dict = {}
    for _ in range(a.rounds):
        for p in prods:
            A, B = ops[p]
            best[p] = min(best.get(p, float("inf")), fastest(lambda A=A, B=B: torch.mm(A, B)))
        best["attn"] = min(best.get("attn", float("inf")), fastest(attn))
        best["adamw"] = min(best.get("adamw", float("inf")), fastest(opt.step, 2))
    print(f"SmolLM2 full fine-tuning step, packed row of {a.tokens} tokens ({a.rows} rows, {a.loss_tokens} with "
          f"loss); torch {torch.__version__} on {torch.get_num_threads()} threads; fastest of {a.rounds} rounds")
    print(f"  {'matrix product':<26} {'per step':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'s a step':>9}")
    mm_s = flops = 0.0
    for p in prods:
        name, n, M, K, N = p[:5]
        g = 2 * M * K * N / 1e9
        flops += n * g
        mm_s += n * best[p]
        print(f"  {name:<26} {n:>8} {n * g:>7.1f} {g / best[p]:>8.1f} {n * best[p]:>9.3f}")
    parts = {f"matrix products ({flops:.0f} GFLOP, {flops / mm_s:.0f} GFLOP/s)": mm_s,
             f"attention, {cfg.num_hidden_layers} layers, forward + backward": cfg.num_hidden_layers * best["attn"],
             f"AdamW ({sum(p.numel() for p in params) / 1e6:.0f} M parameters)": best["adamw"]}
    for name, s in parts.items():
        print(f"  {name:<60} {s:6.2f} s a step")
    floor = a.steps * sum(parts.values())
    print(f"floor: {sum(parts.values()):.2f} s a step, {a.steps} steps {floor:.0f} s "
          f"= {floor / a.target:.2f} x the {a.target:.0f} s target")


if __name__ == "__main__":
    main()

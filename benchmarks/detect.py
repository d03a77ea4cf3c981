"""Detection speed and memory on SmolLM2, measured side by side in one run over the same prompts:
detection / plain batched forward (target <= 1.5 with all five kinds, and each kind's share; on CPU
also with q/k by torch operations instead of the native kernel), a
one-prompt-at-a-time loop (how the released code worked) / ours, prompts per second by batch size,
and peak memory; every timing is the fastest of --repeats runs.
usage: python benchmarks/detect.py [--prompts 64] [--batch 16] [--repeats 3]"""

from __future__ import annotations

import argparse
import resource

import torch
from common import Timer, harmful_prompts, smollm2

from safety_neurons.data import encode, scored_mask
from safety_neurons.importance import prompt_scores, qk_kernel_used

KINDS = ("q", "k", "v", "o", "ffn")


def batches(tok, prompts, bs, dev="cpu"):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for s in range(0, len(order), bs):
        b = encode(tok, [prompts[i] for i in order[s:s + bs]]).to(dev)
        out.append((b, scored_mask(b, "content")))
    return out


@torch.no_grad()
def forward_time(model, bl):
    with Timer() as t:
        for b, _ in bl:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    return t.s


def detect_time(model, ad, bl, kinds, mode="exact", repeats=1, qk_kernel="auto"):
    """Seconds for one detection pass over the batches: the fastest of ``repeats`` (others' load on a
    shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            for b, m in bl:
                prompt_scores(model, ad, b, m, kinds=kinds, mode=mode, qk_kernel=qk_kernel)
        best = min(best, t.s)
    return best


def qk_floor(ad, bl) -> tuple[float, float]:
    """Multiply-adds of the forward pass's layers and of the exact q/k output-change products.

    Forward: tokens x the layers' weights. q: a scored row at (unpadded) position t needs, per channel,
    its perturbed softmax over the t+1 keys it sees times the head's factor restricted to those keys
    (rank r = min(t+1, d_h)); k: the same for the gs heads of a group stacked (gs*(t+1) keys, rank
    min(gs*(t+1), gs*d_h)). These products alone set a floor on exact q/k cost."""
    H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
    gs, D = H // G, ad.d_model
    layer_w = D * H * d * 2 + D * G * d * 2 + 3 * D * ad.d_ff
    fwd = qk = 0.0
    for b, m in bl:
        fwd += ad.n_layers * int(b.attention_mask.sum()) * layer_w
        pos = b.attention_mask.cumsum(1) - 1  # unpadded position of each token
        for t in pos[m].tolist():
            n = t + 1
            qk += ad.n_layers * d * (H * n * min(n, d) + G * gs * n * min(gs * n, gs * d))
    return fwd, qk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--loop-prompts", type=int, default=16, help="prompts for the one-at-a-time comparison")
    ap.add_argument("--repeats", type=int, default=3, help="each timing is the fastest of this many runs")
    a = ap.parse_args()
    cfg, model, tok, ad = smollm2()
    prompts = harmful_prompts(cfg, a.prompts)
    dev = next(model.parameters()).device
    bl = batches(tok, prompts, a.batch, dev)
    forward_time(model, bl[:1])  # warm-up
    r = a.repeats
    # the headline pair is timed alternately (forward, detection, forward, ...): load from other tenants
    # drifts over minutes, and alternating puts both sides under the same drift
    fwd = full = float("inf")
    for _ in range(r):
        fwd = min(fwd, forward_time(model, bl))
        full = min(full, detect_time(model, ad, bl, KINDS))
    n_tok = sum(int(b.attention_mask.sum()) for b, _ in bl)
    print(f"SmolLM2 on {next(model.parameters()).device} ({next(model.parameters()).dtype}), {len(prompts)} prompts ({n_tok} tokens), batch {a.batch}")
    used = qk_kernel_used("auto", dev)
    print(f"plain forward {fwd:.2f}s; detection (all kinds, exact, q/k by {used}) {full:.2f}s; ratio {full / fwd:.2f} "
          f"(target <= 1.5)")
    if used == "native":
        # the same detection with q/k in torch operations, timed alternately with the kernel's
        tt, tn = [], []
        for _ in range(r):
            tt.append(detect_time(model, ad, bl, KINDS, qk_kernel="torch"))
            tn.append(detect_time(model, ad, bl, KINDS, qk_kernel="native"))
        print(f"  q/k by torch operations (detect.qk_kernel=torch): {min(tt):.2f}s ratio {min(tt) / fwd:.2f}; "
              f"by the native kernel {min(tn):.2f}s ratio {min(tn) / fwd:.2f}: {min(tt) / min(tn):.2f}x faster")
    f_macs, qk_macs = qk_floor(ad, bl)
    print(f"multiply-adds: layers' forward {f_macs / 1e9:.1f} G, exact q/k output-change products {qk_macs / 1e9:.1f} G "
          f"({qk_macs / f_macs:.2f}x the forward's, before any softmax work)")
    for k in KINDS:
        t = detect_time(model, ad, bl, (k,), repeats=r)
        print(f"  {k:>3} alone: {t:.2f}s  ratio {t / fwd:.2f}  (extra over forward {t - fwd:+.2f}s)")
    orig = detect_time(model, ad, bl, KINDS, mode="original", repeats=r)
    print(f"original-mode formulas, batched: {orig:.2f}s ratio {orig / fwd:.2f}")
    lp = prompts[: a.loop_prompts]
    one = batches(tok, lp, 1, dev)
    ours = batches(tok, lp, a.batch, dev)
    t_one = detect_time(model, ad, one, KINDS, repeats=r)
    t_ours = detect_time(model, ad, ours, KINDS, repeats=r)
    print(f"one prompt at a time ({len(lp)} prompts): {t_one:.2f}s vs batched {t_ours:.2f}s: {t_one / t_ours:.2f}x faster")
    for bs in (1, 4, 16, 32):
        bb = batches(tok, lp, bs, dev)
        t = detect_time(model, ad, bb, KINDS, repeats=r)
        print(f"  batch {bs:>2}: {len(lp) / t:.1f} prompts/s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

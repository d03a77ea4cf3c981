"""CUDA path check (run on a GPU machine; no hub, no data): a randomly initialised model of SmolLM2's
shape, so nothing has to be downloaded. Checks, on CUDA: exact importance equals brute force; an empty
hook set is bit-identical; hooked generation overhead; neuron-slice training keeps every unselected
weight bit-identical; and times detection / plain forward in fp32 and bf16.
usage: python benchmarks/gpu_check.py [--layers 30]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safety_neurons.data import Batch  # noqa: E402
from safety_neurons.hooks import deactivated, n_hooks  # noqa: E402
from safety_neurons.importance import brute_force_importance, prompt_scores  # noqa: E402
from safety_neurons.models import ModelAdapter  # noqa: E402
from safety_neurons.training import attach_slices  # noqa: E402

KINDS = ("q", "k", "v", "o", "ffn")


def model_of(layers, dtype, dev, family="llama"):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    common = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=True, pad_token_id=0)
    cfg = LlamaConfig(**common) if family == "llama" else Gemma2Config(
        **common, query_pre_attn_scalar=64, attn_logit_softcapping=50.0, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(dev).eval()


def batch_of(B, T, dev):
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    lens[0] = T
    ids = torch.randint(1, 49152, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.long)
    cm = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        am[b, T - n:] = 1
        cm[b, T - n + 6: T - 3] = True
    return Batch(ids, am, cm).to(dev)


def timed(f, reps=5):
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    ok = True
    # 1. exact importance == brute force, on CUDA, float64 (llama and a soft-capped, sliding gemma2)
    for fam in ("llama", "gemma2"):
        m = model_of(2, torch.float64, dev, fam)
        ad = ModelAdapter(m)
        b = batch_of(3, 24, dev)
        sc = b.content_mask & b.attention_mask.bool()
        s = prompt_scores(m, ad, b, sc)
        worst = 0.0
        for layer in range(2):
            for kind in KINDS:
                for i in (0, 5, ad.width(kind) - 1):
                    bf = brute_force_importance(m, ad, b, sc, layer, kind, i).cpu()
                    worst = max(worst, float(((s[(layer, kind)][:, i].double() - bf).abs() / bf.abs().clamp(min=1e-12)).max()))
        print(f"[1] {fam}: exact vs brute force on CUDA, max relative error {worst:.2e}", flush=True)
        ok &= worst < 1e-4
    # 2. hooks: empty set bit-identical; generation overhead with 1000 neurons off
    m = model_of(a.layers, torch.bfloat16, dev)
    ad = ModelAdapter(m)
    b = batch_of(16, 48, dev)
    with torch.no_grad():
        ref = m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        with deactivated(ad, {}):
            same = torch.equal(ref, m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits)
    g = torch.Generator().manual_seed(0)
    neurons = {(layer, k): torch.randperm(ad.width(k), generator=g)[:7] for layer in range(ad.n_layers) for k in KINDS}

    def gen():
        m.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=32, do_sample=False,
                   pad_token_id=0, min_new_tokens=32)

    t0 = timed(gen, 3)
    with deactivated(ad, neurons):
        t1 = timed(gen, 3)
    print(f"[2] empty hook set bit-identical: {same}; generation 16x32 tokens: {t0:.3f}s plain, {t1:.3f}s "
          f"with {sum(len(v) for v in neurons.values())} neurons off, overhead ratio {t1 / t0:.3f}; hooks left {n_hooks(m)}",
          flush=True)
    ok &= same and n_hooks(m) == 0
    # 3. slice training on CUDA: unselected weights bit-identical, selected moved
    m32 = model_of(4, torch.float32, dev)
    before = {k: v.detach().clone() for k, v in m32.state_dict().items()}
    ad32 = ModelAdapter(m32)
    sel = {(layer, k): torch.arange(3) for layer in range(4) for k in KINDS}
    hs = attach_slices(m32, ad32, sel)
    params = [h.scatter.part for h in hs]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    bt = batch_of(4, 32, dev)
    m32.train()
    for _ in range(3):
        loss = m32(input_ids=bt.input_ids, attention_mask=bt.attention_mask, labels=bt.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    from safety_neurons.training import bake_slices

    bake_slices(hs)
    after = m32.state_dict()
    frozen_same, moved = True, True
    for name, w in after.items():
        diff = (w != before[name])
        if "q_proj.weight" in name or "k_proj.weight" in name or "v_proj.weight" in name or "gate_proj.weight" in name \
                or "up_proj.weight" in name:
            frozen_same &= not bool(diff[3:].any())
            moved &= bool(diff[:3].any(1).all())
        elif "o_proj.weight" in name or "down_proj.weight" in name:
            frozen_same &= not bool(diff[:, 3:].any())
            moved &= bool(diff[:, :3].any(0).all())
        else:
            frozen_same &= not bool(diff.any())
    print(f"[3] slice training on CUDA: unselected bit-identical {frozen_same}; every selected slice moved {moved}",
          flush=True)
    ok &= frozen_same and moved
    # 4. detection / plain forward
    for dtype in (torch.float32, torch.bfloat16):
        m = model_of(a.layers, dtype, dev)
        ad = ModelAdapter(m)
        for B in (16, 64):
            b = batch_of(B, 48, dev)
            sc = b.content_mask & b.attention_mask.bool()
            with torch.no_grad():
                fwd = timed(lambda: m(input_ids=b.input_ids, attention_mask=b.attention_mask))
            det = timed(lambda: prompt_scores(m, ad, b, sc))
            per = {k: timed(lambda k=k: prompt_scores(m, ad, b, sc, kinds=(k,))) / fwd for k in KINDS}
            print(f"[4] {dtype} B={B} T=48: forward {1000 * fwd:.1f} ms, detection {1000 * det:.1f} ms, ratio "
                  f"{det / fwd:.2f}; alone: " + " ".join(f"{k} {v:.2f}" for k, v in per.items()), flush=True)
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print("GPU CHECK", "PASSED" if ok else "FAILED")


if __name__ == "__main__":
    main()

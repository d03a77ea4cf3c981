"""``stage=plan``: the full-size model of ``model=`` without its weights. Its config (a local folder's
config.json, else the published config the package carries for the preset's hub id) is built on the
``meta`` device, so no download and no memory; ``plan.json`` in the run directory gives the parameter
count, the neurons and their parameter share per kind, what the ``topk`` preset selects per prompt, and
estimated memory for detection, deactivation sweeps (generation), neuron tuning and full fine-tuning,
in bf16 and fp32, on one GPU and per GPU with ``device_map=auto`` over ``plan.n_gpus``, and estimated
seconds per step (:func:`step_seconds`).

The memory figures are estimates from the shapes (what is alive at the peak, in bytes), not
measurements: weights exactly, activations and optimizer state by the formulas in :func:`memory`.
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import config_of, meta_model
from ..config import KINDS
from ..errors import UserError
from ..io import write_json
from ..memory import activation_bytes
from ..models import ModelAdapter
from .common import tracked
from .detect import k_per_kind

GiB = 2**30
BYTES = {"bf16": 2, "fp32": 4}
RELEASED_CAP = 100  # neurons per weight matrix and layer the released tuning code trained at most


def shapes(ad: ModelAdapter) -> dict:
    c = ad.config
    return {"model_type": ad.model_type, "n_layers": ad.n_layers, "hidden": ad.d_model, "n_heads": ad.n_heads,
            "n_kv_heads": ad.n_kv, "head_dim": ad.head_dim, "d_ff": ad.d_ff, "vocab": c.vocab_size,
            "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False))}


def memory(ad: ModelAdapter, n_params: int, batch: int, length: int, n_gpus: int, n_trainable: int,
           qk_chunk_mb: float) -> dict:
    """Estimated peak bytes per setting and precision: {task: {precision: {"total", "per_gpu"}}}.

    - detection: weights, plus one layer's work at a time (hooks turn activations into scores layer by
      layer): the residual stream and MLP width in the model's precision, q/k/v and the attention output,
      two logit tensors (B, H, T, T) and k's output factor (B, G, T*gs, min(D, gs*d)) in fp32, plus the q/k
      chunk bound ``detect.qk_chunk_mb``.
    - deactivate (generation): weights, the KV cache of ``batch`` x ``length`` tokens and one row of logits.
    - neuron tuning: frozen weights, the trainable slices' fp32 copy, gradient and two AdamW moments
      (16 bytes each), and the activations backward keeps (about 4 D + 2 d_ff + 4 H d per token and layer).
    - full fine-tuning: weights, their gradients in the same precision, two fp32 AdamW moments, and the
      same activations.
    With ``device_map=auto`` layers are spread over the GPUs: weights (and optimizer state) divide by
    N, while the activations of the batch pass through every GPU in turn, so they do not.
    """
    out: dict = {}
    for prec, b in BYTES.items():
        w = n_params * b
        # the activation formulas (safety_neurons.memory)
        det_act = activation_bytes(ad, "detect", batch, length, b, qk_chunk_mb)
        gen_act = activation_bytes(ad, "deactivate", batch, length, b)
        saved = activation_bytes(ad, "tuning", batch, length, b)
        tasks = {
            "detect": (w, det_act),
            "deactivate": (w, gen_act),
            "neuron_tuning": (w + 16 * n_trainable, saved),
            "full_finetune": (w + n_params * b + 8 * n_params, saved),
        }
        for task, (state, act) in tasks.items():
            out.setdefault(task, {})[prec] = {"total_gib": round((state + act) / GiB, 2),
                                              "per_gpu_gib": round((state / n_gpus + act) / GiB, 2)}
    return out


def step_seconds(ad: ModelAdapter, n_params: int, batch: int, length: int, p, new_tokens: int,
                 n_eval_prompts: int) -> dict:
    """Estimated seconds of one step of each task on one GPU, from FLOPs and bytes (not measured):

    - a forward of ``batch`` x ``length`` tokens: 2 x (non-embedding parameters) per token plus the
      attention products (4 L H d T per token), at ``plan.tflops``;
    - detection: ``plan.detect_forwards`` forwards (exact scores of all five kinds, measured on an H200);
    - one evaluation (a deactivation point): ``n_eval_prompts`` prompts in batches, each a prefill and
      ``new_tokens`` decoding steps that read every weight once (``plan.bandwidth_gbs``, bf16);
    - a tuning micro-batch: neuron tuning is a forward and a backward to the activations (2 forwards;
      the slices' weight gradients are negligible); full fine-tuning adds the weight gradients (3).
    """
    c = ad.config
    embed = c.vocab_size * ad.d_model * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    body = max(n_params - embed, 0) + c.vocab_size * ad.d_model  # the LM head's product counts, a lookup does not
    tokens = batch * length
    fwd = (2 * body * tokens + 4 * ad.n_layers * ad.n_heads * ad.head_dim * tokens * length) / (p.tflops * 1e12)
    read = n_params * BYTES["bf16"] / (p.bandwidth_gbs * 1e9)
    n_batches = -(-n_eval_prompts // batch)
    decode = max(read, 2 * body * batch / (p.tflops * 1e12))
    return {"forward": fwd, "detect": p.detect_forwards * fwd,
            "evaluation": n_batches * (fwd + new_tokens * decode),
            "neuron_tuning": 2 * fwd, "full_finetune": 3 * fwd}


def config_source(mcfg) -> str:
    """Where :func:`config_of` read the shapes from, in words."""
    if mcfg.path:
        p = Path(mcfg.path).expanduser()
        return "model.path" if (p / "config.json").exists() else "GGUF metadata (model.path)" \
            if p.suffix == ".gguf" else "published config (model.path has no config.json)"
    if mcfg.organism and not mcfg.hub_id:
        return f"the base model of the recipe {mcfg.organism}"
    if mcfg.gguf_package:
        return f"GGUF metadata ({mcfg.gguf_package})"
    return "published config (safety_neurons/data/architectures.json)"


def build_plan(cfg) -> dict:
    p = cfg.plan
    if p.n_gpus < 1 or p.batch_size < 1 or p.length < 1:
        raise UserError(f"plan.n_gpus={p.n_gpus}, plan.batch_size={p.batch_size} and plan.length={p.length} "
                        f"must all be >= 1")
    from .common import store_of

    hf_cfg = config_of(cfg.model, store_of(cfg).root / "gguf")
    ad = ModelAdapter(meta_model(hf_cfg))
    n_params = ad.n_params()
    kinds = {}
    for k in KINDS:
        n = ad.n_layers * ad.width(k)
        kinds[k] = {"width": ad.width(k), "neurons": n, "params_per_neuron": ad.neuron_params(k),
                    "param_share": n * ad.neuron_params(k) / n_params}
    k_of = k_per_kind(cfg.topk, ad, KINDS)
    cap = cfg.finetune.cap_per_matrix or RELEASED_CAP
    # the largest set the tuning cap allows: cap neurons of every kind in every layer
    n_trainable = sum(ad.n_layers * min(cap, ad.width(k)) * ad.neuron_params(k) for k in KINDS)
    if p.tflops <= 0 or p.bandwidth_gbs <= 0 or p.detect_forwards <= 0:
        raise UserError(f"plan.tflops={p.tflops}, plan.bandwidth_gbs={p.bandwidth_gbs} and plan.detect_forwards="
                        f"{p.detect_forwards} must be > 0")
    n_eval = (cfg.eval.n_harmful or 41) + (cfg.eval.n_harmless or 32)
    return {
        "model": cfg.model.name, "hub_id": cfg.model.hub_id, "path": cfg.model.path,
        "config_source": config_source(cfg.model),
        "shapes": shapes(ad), "n_params": n_params, "kinds": kinds,
        "n_neurons": sum(v["neurons"] for v in kinds.values()),
        "topk": {"attn": cfg.topk.attn, "ffn": cfg.topk.ffn, "per_layer": k_of,
                 "per_prompt": ad.n_layers * sum(k_of.values())},
        "tuning": {"cap_per_matrix": cap, "max_trainable_params": n_trainable,
                   "max_trainable_share": n_trainable / n_params},
        "memory": {"batch_size": p.batch_size, "length": p.length, "n_gpus": p.n_gpus,
                   **memory(ad, n_params, p.batch_size, p.length, p.n_gpus, n_trainable, cfg.detect.qk_chunk_mb)},
        "seconds": {"batch_size": p.batch_size, "length": p.length, "tflops": p.tflops,
                    "bandwidth_gbs": p.bandwidth_gbs, "eval_prompts": n_eval, "max_new_tokens": cfg.eval.max_new_tokens,
                    **{k: float(f"{v:.6g}") for k, v in step_seconds(ad, n_params, p.batch_size, p.length, p,
                                                               cfg.eval.max_new_tokens, n_eval).items()}},
    }


def table(plan: dict) -> str:
    lines = [f"{plan['model']}: {plan['n_params']:,} parameters, {plan['n_neurons']:,} neurons; topk selects "
             f"{plan['topk']['per_prompt']:,} per prompt",
             f"{'kind':<5} {'width':>7} {'neurons':>10} {'share':>8} {'k/layer':>8}"]
    for k, v in plan["kinds"].items():
        lines.append(f"{k:<5} {v['width']:>7} {v['neurons']:>10,} {100 * v['param_share']:>7.2f}% "
                     f"{plan['topk']['per_layer'][k]:>8}")
    m = plan["memory"]
    lines.append(f"memory (GiB, batch {m['batch_size']} x {m['length']} tokens; per GPU over {m['n_gpus']}):")
    for task in ("detect", "deactivate", "neuron_tuning", "full_finetune"):
        lines.append(f"  {task:<14} bf16 {m[task]['bf16']['total_gib']:>8} ({m[task]['bf16']['per_gpu_gib']})"
                     f"   fp32 {m[task]['fp32']['total_gib']:>8} ({m[task]['fp32']['per_gpu_gib']})")
    t = plan["seconds"]
    lines.append(f"time (s, estimated at {t['tflops']:g} TFLOP/s and {t['bandwidth_gbs']:g} GB/s on one GPU): "
                 f"detect batch {t['detect']:.2f}, tuning micro-batch {t['neuron_tuning']:.2f} "
                 f"(full fine-tuning {t['full_finetune']:.2f}), one evaluation of {t['eval_prompts']} prompts x "
                 f"{t['max_new_tokens']} tokens {t['evaluation']:.1f}")
    return "\n".join(lines)


def run(cfg) -> dict:
    with tracked(cfg) as (tr, box):
        plan = build_plan(cfg)
        write_json(tr.dir / "plan.json", plan)
        print(table(plan))
        box["results"] = {"n_params": plan["n_params"], "n_neurons": plan["n_neurons"],
                          "topk_per_prompt": plan["topk"]["per_prompt"], "plan_json": str(tr.dir / "plan.json")}
    return box["results"]

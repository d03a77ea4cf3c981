"""Shape-faithful miniatures of the model presets: tiny random models built from each published config
(safety_neurons/data/architectures.json) that keep what the architecture has (query to key/value head
ratio, head_dim against hidden/heads, rotary base and scaling, soft-capping, sliding windows and their
layer pattern, q/k norms, biases, tied embeddings, activation), with small widths."""

from __future__ import annotations

import torch

from safety_neurons.architectures import config_from_dict, published

# preset -> hub id (the presets' own yaml files name the same ids; tests/test_presets.py checks it)
PRESETS = {
    "llama2": "meta-llama/Llama-2-7b-chat-hf", "llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama31": "meta-llama/Llama-3.1-8B-Instruct", "mistral": "mistralai/Mistral-7B-Instruct-v0.2",
    "vicuna": "lmsys/vicuna-13b-v1.5", "gemma": "google/gemma-7b-it", "gemma2": "google/gemma-2-9b-it",
    "gemma3": "google/gemma-3-12b-it", "qwen2": "Qwen/Qwen2.5-7B-Instruct", "qwen3": "Qwen/Qwen3-8B",
}
HEAD_DIM = 8
WINDOW = 4  # a window shorter than the test prompts, so that it masks something


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def miniature_values(preset: str, vocab: int) -> dict:
    """The preset's config.json values with small widths: 2 kv heads (4 for multi-head attention) and
    the real group size, head_dim 8, hidden and MLP widths in the real ratios to H*head_dim, 2 layers
    (one full period of the sliding/full pattern where it is longer), windows of 4 tokens."""
    v = dict(published()[PRESETS[preset]])
    H, G = v["num_attention_heads"], v["num_key_value_heads"]
    d = v.get("head_dim") or v["hidden_size"] // H
    gs = H // G
    g = 4 if gs == 1 else 2
    # hidden = heads x k (some configs require a multiple of the heads), k / head_dim near the real
    # hidden / (H * head_dim), and different from 1 whenever the real ratio is
    ratio = v["hidden_size"] / (H * d)
    k = round(HEAD_DIM * ratio)
    if ratio != 1 and k == HEAD_DIM:
        k += 1 if ratio > 1 else -1
    hidden = g * gs * k
    v.update(num_attention_heads=g * gs, num_key_value_heads=g, head_dim=HEAD_DIM, hidden_size=hidden,
             intermediate_size=_even(hidden * v["intermediate_size"] / v["hidden_size"]),
             num_hidden_layers=v.get("sliding_window_pattern") or 2, vocab_size=vocab,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "query_pre_attn_scalar" in v:  # the same scaling relative to head_dim
        v["query_pre_attn_scalar"] = round(v["query_pre_attn_scalar"] * HEAD_DIM / d)
    if v.get("sliding_window") and v["model_type"].startswith("gemma"):
        v["sliding_window"] = WINDOW
    return v


def miniature(preset: str, vocab: int, seed: int = 0, dtype=torch.float32):
    """A random miniature of ``preset`` (eager attention), with weights large enough for non-trivial
    activations and every norm gain perturbed (so that q/k norms matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config_from_dict(miniature_values(preset, vocab))
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.dim() == 2:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.2)
    m.tie_weights()
    return m.to(dtype).eval()

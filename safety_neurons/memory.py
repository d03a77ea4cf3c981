"""Activation memory estimates: what is alive at the peak of detection, generation and tuning beyond the
weights (and optimizer state), for a batch of sequences. ``stage=plan`` reports them; an automatic batch
size on CUDA starts from them (:mod:`safety_neurons.autobatch`)."""

from __future__ import annotations


def activation_bytes(ad, task: str, batch: int, length: int, nbytes: int, qk_chunk_mb: float = 256) -> int:
    """Estimated bytes of what is alive at the peak of ``task`` beyond the weights (and optimizer state),
    for ``batch`` sequences of ``length`` tokens in a ``nbytes`` precision (the formulas of
    :func:`safety_neurons.stages.plan.memory`):

    - ``detect``: one layer's work at a time: the residual stream and MLP width in the model's precision,
      q/k/v and the attention output, two logit tensors (B, H, T, T) and k's output factor
      (B, G, T*gs, min(D, gs*d)) in fp32, plus the q/k chunk bound ``qk_chunk_mb``;
    - ``deactivate`` (generation): the KV cache and one row of logits per sequence;
    - ``tuning``: the activations backward keeps (about 4 D + 2 d_ff + 4 H d per token and layer) and
      the fp32 logits;
    - ``generate`` (an automatic ``eval.batch_size``): the KV cache, one layer's prefill and one row of
      logits per sequence;
    - ``forward`` (answer log-probabilities): one layer's work and the fp32 logits with their log-softmax.
    """
    L, D, H, G, d, ff = ad.n_layers, ad.d_model, ad.n_heads, ad.n_kv, ad.head_dim, ad.d_ff
    gs, B, T, b = H // G, batch, length, nbytes
    vocab = ad.config.vocab_size
    if task == "detect":
        return int(B * T * (2 * D + ff) * b + B * T * (2 * H * d + 2 * G * d) * 4 + 2 * B * H * T * T * 4
                   + B * G * T * gs * min(D, gs * d) * 4 + qk_chunk_mb * 2**20)
    if task == "deactivate":
        return 2 * L * B * T * G * d * b + B * vocab * 4
    if task == "generate":
        return 2 * L * B * T * G * d * b + B * T * (2 * D + ff) * b + B * vocab * 4
    if task == "forward":
        return B * T * (2 * D + ff) * b + 2 * B * T * vocab * 4
    if task == "tuning":
        return L * B * T * (4 * D + 2 * ff + 4 * H * d) * b + B * T * vocab * 4
    raise ValueError(f"unknown task {task!r}")


def estimate_for(model, task: str, length: int, qk_chunk_mb: float = 256):
    """``batch -> bytes`` of :func:`activation_bytes` for a loaded ``model`` (its shapes and precision), the
    start of an automatic batch size."""
    from .models import ModelAdapter

    ad = ModelAdapter(model)
    nbytes = next(model.parameters()).element_size()
    return lambda batch: activation_bytes(ad, task, batch, length, nbytes, qk_chunk_mb)

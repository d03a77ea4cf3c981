"""``batch_size=auto`` (detect, eval, finetune): on CUDA the first batch size is the largest power of two
whose estimated activation memory (:func:`activation_bytes`, the formulas ``stage=plan`` reports) fits
in the GPU's free memory, and a batch that runs out of memory is retried at half the size, which is
then kept; what was chosen is printed. A number is used as given (an out-of-memory error stays one).
On CPU ``auto`` is the default size of the setting (:data:`CPU_DEFAULT`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .errors import UserError

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_DEFAULT = {"detect.batch_size": 16, "eval.batch_size": 16, "finetune.batch_size": 8}
MAX_START = 256  # the first size never exceeds this (nor the number of items)
FREE_SHARE = 0.8  # share of the free GPU memory the estimate may fill (allocator slack, fragmentation)


def check(key: str, value) -> int | str:
    """``value`` as a batch size setting: an int >= 1 or ``"auto"``; anything else is a UserError."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r} is not a batch size; give a whole number >= 1, or {key}=auto "
                        f"(on CUDA: the largest that fits, halved on out-of-memory)")
    return value


def activation_bytes(ad, task: str, batch: int, length: int, nbytes: int, qk_chunk_mb: float = 256) -> int:
    """Estimated bytes of what is alive at the peak of ``task`` beyond the weights (and optimizer state),
    for ``batch`` sequences of ``length`` tokens in a ``nbytes`` precision (the formulas of
    :func:`safety_neurons.stages.plan.memory`):

    - ``detect``: one layer's work at a time: the residual stream and MLP width in the model's precision,
      q/k/v and the attention output, two logit tensors (B, H, T, T) and k's output factor
      (B, G, T*gs, min(D, gs*d)) in fp32, plus the q/k chunk bound ``qk_chunk_mb``;
    - ``deactivate`` (generation): the KV cache and one row of logits per sequence;
    - ``tuning``: the activations backward keeps (about 4 D + 2 d_ff + 4 H d per token and layer) and
      the fp32 logits.
    """
    L, D, H, G, d, ff = ad.n_layers, ad.d_model, ad.n_heads, ad.n_kv, ad.head_dim, ad.d_ff
    gs, B, T, b = H // G, batch, length, nbytes
    vocab = ad.config.vocab_size
    if task == "detect":
        return int(B * T * (2 * D + ff) * b + B * T * (2 * H * d + 2 * G * d) * 4 + 2 * B * H * T * T * 4
                   + B * G * T * gs * min(D, gs * d) * 4 + qk_chunk_mb * 2**20)
    if task == "deactivate":
        return 2 * L * B * T * G * d * b + B * vocab * 4
    if task == "tuning":
        return L * B * T * (4 * D + 2 * ff + 4 * H * d) * b + B * T * vocab * 4
    raise ValueError(f"unknown task {task!r}")


def start_size(ad, task: str, length: int, n_items: int, free_bytes: int, nbytes: int,
               qk_chunk_mb: float = 256) -> int:
    """The largest power of two B (at most :data:`MAX_START`, and no larger than needed for ``n_items``)
    whose :func:`activation_bytes` fit in ``FREE_SHARE`` of ``free_bytes``; at least 1."""
    cap = 1
    while cap < min(n_items, MAX_START):
        cap *= 2
    b = 1
    while b * 2 <= cap and activation_bytes(ad, task, b * 2, length, nbytes, qk_chunk_mb) <= FREE_SHARE * free_bytes:
        b *= 2
    return b


def first_size(key: str, value, device: torch.device, estimate: Callable[[int], int]) -> tuple[int, bool]:
    """(the batch size to start with, whether it may be halved on out-of-memory) for setting ``key``.

    A number: itself, never halved. ``auto`` on CPU: the setting's default; on CUDA ``estimate(free_bytes)``
    (e.g. :func:`start_size`), halved on out-of-memory."""
    value = check(key, value)
    if value != AUTO:
        return value, False
    if torch.device(device).type != "cuda":
        return CPU_DEFAULT[key], False
    free, _total = torch.cuda.mem_get_info(device)
    size = max(1, int(estimate(free)))
    log.info("%s=auto: starting at %d (estimated from %.1f GiB free)", key, size, free / 2**30)
    return size, True


def run_batches(n_items: int, size: int, halve: bool, key: str, run: Callable[[int, int], None]) -> int:
    """Call ``run(start, stop)`` over ``range(n_items)`` in batches of ``size``; returns the size used last.

    With ``halve``, a batch that raises ``torch.cuda.OutOfMemoryError`` is retried at half the size (kept
    for the rest); at size 1 the error is a UserError naming ``key``. ``run`` must not keep partial
    results of a batch that fails."""
    s = 0
    first = size
    while s < n_items:
        stop = min(n_items, s + size)
        try:
            run(s, stop)
        except torch.cuda.OutOfMemoryError:
            if not halve:
                raise
            if size == 1:
                raise UserError(f"{key}=auto: one item does not fit in GPU memory; shorten model.max_length, "
                                f"use model.dtype=bfloat16 or model.device_map=auto over more GPUs") from None
            _free_cached()
            size //= 2
            log.warning("%s=auto: a batch of %d ran out of GPU memory; continuing with %d", key, size * 2, size)
            continue
        s = stop
    if halve:
        print(f"{key}=auto: batch size {size}" + (f" (started at {first}, halved on out-of-memory)"
                                                   if size != first else ""))
    return size


def fit_size(size: int, halve: bool, key: str, probe: Callable[[int], None]) -> int:
    """The largest of ``size``, ``size/2``, ... for which ``probe(size)`` runs without running out of GPU
    memory (only ``size`` itself unless ``halve``); says what was chosen when it chose."""
    first = size
    while True:
        try:
            probe(size)
            break
        except torch.cuda.OutOfMemoryError:
            if not halve:
                raise
            if size == 1:
                raise UserError(f"{key}=auto: one item does not fit in GPU memory; shorten model.max_length, "
                                f"use model.dtype=bfloat16 or model.device_map=auto over more GPUs") from None
            _free_cached()
            size //= 2
    if halve:
        print(f"{key}=auto: batch size {size}" + (f" (started at {first}, halved on out-of-memory)"
                                                   if size != first else ""))
    return size


def _free_cached() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Per-prompt neuron importance from one hooked forward pass (METHOD 2 and 3).

:func:`prompt_scores` runs the model once over a left-padded batch. Forward hooks (registered through
:func:`safety_neurons.hooks.hooks`, always removed) capture, layer by layer, what the closed forms need
and turn it into scores inside the hooks, so no layer's activations outlive that layer.

Where each part lives: :mod:`.capture` (the hooks, the scored-row tables, the shared context),
:mod:`.factors` (the weight factors, cached), :mod:`.closed` (exact ffn, o, v), :mod:`.attention` (the
attention quantities every q/k path starts from), :mod:`.qk_torch` and :mod:`.qk_native` (exact q/k
with torch operations or the fused C kernel), :mod:`.original` (mode original). This module chooses
between them per layer.

Mode ``exact`` (METHOD 2): ``I_t(n) = ||out_t - out_t(n deactivated)||_2`` with ``out`` the sublayer
output (``o_proj`` output for q/k/v/o, ``down_proj`` output for ffn), for every neuron at once:

- ffn: ``|h_tk| * ||W_down[:, k]||``; o: ``|a_tr| * ||W_o[:, r]||``;
  v: ``||sum_{h in group g} a_t(h, j) W_o[:, h*d_h + j]||`` (computed as ``||R_gj a||`` with ``R_gj``
  the triangular factor of the group's ``W_o`` columns).
- q, k: the perturbed softmax, exactly. Zeroing pre-rotary channel ``j`` of a query (key) head changes the
  rotated head only along ``rot(e_j)`` (channels ``j`` and ``j +- d_h/2``), so the perturbed logits of
  all channels are ``S + a_tj K[:, j] + b_tj K[:, p(j)]`` (for k: the same with query columns and
  per-key coefficients), built by broadcasting, then soft-capped, masked (causal, padding, sliding
  window) and soft-maxed. With a q/k RMS norm (Gemma3) the perturbed head is re-normalised: the
  normalised perturbed head is ``rho_j * (y with channel j zeroed)``, ``rho_j = rms(x) / rms(x without
  channel j)``, so the logits are additionally scaled by ``rho_j`` (this assumes the norm is
  ``gain * x / sqrt(mean(x^2) + eps)``, which holds for every supported family). The output change of a
  query head is ``dP V_h W_o,h^T``; with ``W_o,h = Q_h R_h`` (QR, cached per weight) its norm is
  ``||dP F||``, ``F = V_h R_h^T``. For k the query heads of the group are stacked:
  ``||sum_i dP_i V_g W_o,h_i^T|| = ||[dP_1 .. dP_n] F||`` with F built from the group's R. V is centred
  first (dP sums to zero over keys), which removes a common component and its rounding error. On CPU,
  when F has more columns than rows (T < d_h), a QR shrinks it to a square factor with the same
  ``F F^T``. Only scored query rows are computed; the perturbed logits of all channels are built at
  once, chunked over rows and channels to stay under ``qk_chunk_mb``.

Mode ``original`` (METHOD 3, what the released code computed): :mod:`.original`.

All computation is in float32 (float64 when the model is float64); scores come back as float32 on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import native
from ..data import Batch
from ..errors import UserError
from ..hooks import deactivated, hooks
from ..models import ModelAdapter, model_device
from . import closed, original, qk_native, qk_torch
from .attention import heads, prepare_exact
from .capture import CPU_CHUNK_MB, Ctx, Layer, Stop

KINDS = ("q", "k", "v", "o", "ffn")
MODES = ("exact", "original")
QK_KERNELS = ("auto", "native", "torch")
QR_MIN_RATIO = 1.25  # on CPU, q/k output factors are QR-shrunk when they have this many times more columns than rows
# the same for the native kernel, whose product with a factor runs near the core's peak, so that a QR
# (LAPACK, about as slow as the products it saves at 1.25-2x) pays only for much wider factors; on
# SmolLM2's factors (about 1.6x wider than tall) QRs made detection slower (docs/benchmarks.md)
NATIVE_QR_MIN_RATIO = 3.0

__all__ = ["CPU_CHUNK_MB", "KINDS", "MODES", "NATIVE_QR_MIN_RATIO", "QK_KERNELS", "QR_MIN_RATIO",
           "brute_force_importance", "prompt_scores", "qk_kernel_used"]


def _reduce(f: torch.Tensor, min_ratio: float | None = None) -> tuple[torch.Tensor, bool]:
    """A contiguous factor with the same F F^T and at most as many columns as rows (F: (..., n, r)), and
    whether it is lower-triangular (then rows [0, m) of it have no entries beyond column m).

    The QR costs about as much as a few chunks' products, so it is only taken when it removes at least
    a fifth of the columns."""
    n, r = f.shape[-2:]
    if r <= (QR_MIN_RATIO if min_ratio is None else min_ratio) * n:
        return f.contiguous(), False
    return torch.linalg.qr(f.transpose(-1, -2), mode="r").R.transpose(-1, -2).contiguous(), True  # (..., n, n)


def _keep(f: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return f.contiguous(), False


def qk_kernel_used(qk_kernel: str, device: torch.device | str) -> str:
    """What computes exact q/k on ``device`` for the setting ``qk_kernel``: ``native`` or ``torch``."""
    if qk_kernel == "torch" or torch.device(device).type != "cpu":
        return "torch"
    return "native" if native.load() is not None else "torch"


# ------------------------------------------------------------------------------------ per layer
def _ffn(ctx: Ctx, layer: int, m, h: torch.Tensor) -> None:
    (closed.ffn_scores if ctx.mode == "exact" else original.ffn_scores)(ctx, layer, m, h)


def _attention(ctx: Ctx, layer: int, m, cap: dict, a_native: torch.Tensor) -> None:
    """The attention kinds of one layer from its ``o_proj`` input (and, for q/k, the captured heads)."""
    a = a_native.to(ctx.dt)  # (B, T, H*d)
    if ctx.kinds & {"v", "o"}:
        (closed.vo_scores if ctx.mode == "exact" else original.vo_scores)(ctx, layer, m, a)
    if not ctx.kinds & {"q", "k"}:
        return
    x = heads(ctx, layer, m, cap, a)
    if ctx.mode == "original":
        original.qk_scores(ctx, layer, x)
        return
    rng = qk_native.span(ctx, a, x.rw, x.window)
    prepare_exact(ctx, layer, x, cap, a, need_p=rng is None or ctx.check)
    # only F F^T matters: on CPU a QR shrinks F to at most T (k: gs*T) columns, which pays for itself
    # in the torch path and, for much wider factors, in the native kernel; on CUDA batched small QRs
    # cost more than they save
    if rng is not None:
        qk_native.scores(ctx, layer, x, m.o.weight, rng, lambda f: _reduce(f, NATIVE_QR_MIN_RATIO))
    else:
        qk_torch.scores(ctx, layer, x, m.o.weight, _reduce if a.device.type == "cpu" else _keep)


# ------------------------------------------------------------------------------------------- API
@torch.no_grad()
def prompt_scores(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor,
                  kinds: Iterable[str] = KINDS, mode: str = "exact", qk_chunk_mb: float = 256,
                  check: bool = False, check_tol: float | None = None,
                  qk_kernel: str = "auto") -> dict[tuple[int, str], torch.Tensor]:
    """One forward pass over a left-padded batch; returns ``{(layer, kind): (B, width) float32 on CPU}``.

    ``scored`` (B, T) bool marks the tokens that count (padding never counts). Mode ``exact``: each
    prompt's score per neuron is the mean over its scored tokens of ``I_t(n)`` (METHOD 2). Mode
    ``original``: METHOD 3's per-prompt formulas, summed over scored tokens; q and k share one score in
    query-head space (q returns it, k its mean over the query heads of each kv group), v and o share
    ``sum_t |a_t(h, j)|`` (o returns it, v its mean over each group), ffn is ``sum_t |up_proj(x)_tk|``.
    Widths: q, o ``H*d_h``; k, v ``G*d_h``; ffn ``d_ff``.

    ``qk_chunk_mb`` bounds the memory of the per-channel perturbed attention (q, k); on CPU chunks are
    at most ``CPU_CHUNK_MB``. ``qk_kernel`` (exact mode, CPU): ``native`` computes q/k with the fused C
    kernel of :mod:`safety_neurons.native` (error if it cannot be built), ``torch`` with torch operations
    in chunks, ``auto`` (default) with the kernel when it builds. Both give the same scores up to
    rounding; GPUs always use torch. ``check=True`` verifies that the recomputed unperturbed attention output
    equals the captured ``o_proj`` input (relative tolerance ``check_tol``; default 1e-6 for float64
    models, whose eager attention still soft-maxes in float32; 1e-4 for float32; 3e-2 for half
    precision) and raises ``RuntimeError`` otherwise. Computation is float32 (float64 for float64
    models); the forward pass stops after the last hooked module (no lm_head).
    """
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"unknown neuron kinds {bad or '(none)'}; known kinds are {', '.join(KINDS)}")
    if mode not in MODES:
        raise UserError(f"unknown detect.mode={mode!r}; use exact or original")
    if qk_kernel not in QK_KERNELS:
        raise UserError(f"unknown detect.qk_kernel={qk_kernel!r}; use {', '.join(QK_KERNELS)}")
    dev = model_device(model)
    batch = batch.to(dev)
    scored = scored.to(dev).bool() & batch.attention_mask.bool()
    if not bool(scored.any(1).all()):
        raise UserError("a prompt has no scored tokens; check detect.tokens and the chat template")
    pdt = next(model.parameters()).dtype
    dt = torch.float64 if pdt == torch.float64 else torch.float32
    if check_tol is None:
        check_tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(pdt, 3e-2)
    ctx = Ctx(adapter, batch, scored, set(kinds), mode, qk_chunk_mb, dt, check, check_tol, qk_kernel)
    specs = []
    for layer in range(adapter.n_layers):
        specs += Layer(ctx, layer, _attention, _ffn).specs(ctx.kinds)
    try:
        with hooks(specs):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except Stop:
        pass
    keys = [(layer, k) for layer in range(adapter.n_layers) for k in kinds]
    missing = [key for key in keys if key not in ctx.acc]
    if missing:
        raise RuntimeError(f"no scores were captured for {missing[:4]}; is the model's layer stack hooked?")
    flat = torch.cat([ctx.acc[key].reshape(-1).to(dev) for key in keys]).cpu()  # one device-to-host copy
    out, i = {}, 0
    for key in keys:
        n = ctx.acc[key].numel()
        out[key] = flat[i: i + n].view(ctx.acc[key].shape)
        i += n
    return out


# ----------------------------------------------------------------------------------- brute force
@torch.no_grad()
def brute_force_importance(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, layer: int,
                           kind: str, index) -> torch.Tensor:
    """Mean over scored tokens of ``||out_t - out_t(neuron off)||_2`` (METHOD 2), by rerunning; float64.

    ``out`` is the output of ``o_proj`` (q, k, v, o: the attention module's output) or ``down_proj``
    (ffn: the MLP's output) of ``layer``. One forward pass captures the sublayer's inputs; then the
    sublayer (the model's own attention or MLP module) is rerun as is and with the neuron switched off by
    :func:`safety_neurons.hooks.deactivated`. ``index`` an int: returns (B,); a list: (B, len(index)).
    Slow and obviously correct: for tests.
    """
    dev = model_device(model)
    batch = batch.to(dev)
    scored = scored.to(dev).bool() & batch.attention_mask.bool()
    blk = adapter.layers[layer]
    sub = blk.mlp if kind == "ffn" else blk.self_attn
    got = {}

    def grab(mod, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise Stop

    try:
        with hooks([(sub, "pre_kw", grab)]):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except Stop:
        pass

    def run():
        out = sub(*got["args"], **got["kwargs"])
        return (out[0] if isinstance(out, tuple) else out).double()

    base = run()
    s = scored.double()
    res = []
    for i in ([index] if isinstance(index, int) else list(index)):
        with deactivated(adapter, {(layer, kind): torch.tensor([int(i)])}):
            diff = (run() - base).norm(dim=-1)  # (B, T)
        res.append((diff * s).sum(1) / s.sum(1))
    out = torch.stack(res, 1).cpu()
    return out[:, 0] if isinstance(index, int) else out

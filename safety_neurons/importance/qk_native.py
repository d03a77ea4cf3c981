"""Exact q/k importance through the fused C kernel of :mod:`safety_neurons.native` (CPU, METHOD 2).

The same perturbed softmax as :mod:`.qk_torch`, one kernel call per kind: an item is one scored row of
one query head (q) or of one kv group with its query heads as sub-rows (k), and the kernel reads each
row's visible keys as one range ``[lo, hi)``. The logits and key tables carry ``native.KEY_SLACK``
columns of slack (the kernel reads whole vectors); the unperturbed softmax is computed by the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import native
from ..errors import UserError
from .attention import Heads, k_terms, q_terms
from .capture import Ctx, Rows


def span(ctx: Ctx, a: torch.Tensor, rw: Rows, window: int | None):
    """The rows' visible-key ranges when the native kernel computes this layer's q/k, else None."""
    if ctx.qk_kernel == "torch" or a.device.type != "cpu":
        return None
    if native.load() is None:
        if ctx.qk_kernel == "native":
            raise UserError(f"detect.qk_kernel=native, but the native q/k kernel is unavailable: "
                            f"{native.why_not()}; use detect.qk_kernel=auto or torch")
        return None
    out = rw.span(window)
    if out is None and ctx.qk_kernel == "native":
        raise UserError("detect.qk_kernel=native needs every row's visible keys to be one range; "
                        "use detect.qk_kernel=auto or torch")
    return out


def scores(ctx: Ctx, layer: int, x: Heads, wo: torch.Tensor, rng, reduce: Callable) -> None:
    """q and k scores of the layer (the kinds asked for) into ``ctx``; ``rng`` is :func:`span`'s."""
    S_pad = native.pad_keys(x.S)  # the logits with slack after each row of keys, for q and k
    if "q" in ctx.kinds:
        ctx.add(layer, "q", q_scores(ctx, x, wo, rng, reduce, S_pad))
    if "k" in ctx.kinds:
        ctx.add(layer, "k", k_scores(ctx, x, wo, rng, reduce, S_pad))


def q_scores(ctx: Ctx, x: Heads, wo: torch.Tensor, rng, reduce: Callable, S_pad: torch.Tensor) -> torch.Tensor:
    """(B, H*d), as :func:`.qk_torch.q_scores`."""
    B, G, gs, Ts, d = x.B, x.G, x.gs, x.Ts, x.d
    Tk = x.T + native.KEY_SLACK
    t = q_terms(x, wo, reduce)
    out = torch.empty(B, G, gs, Ts, d, dtype=ctx.dt, device=x.S.device)
    # item = (b, g, i, t): one scored row of one query head, channels j of that head
    it = torch.arange(B * G * gs * Ts)
    lo, hi = (r[:, None, None].expand(B, G, gs, Ts).reshape(-1).contiguous() for r in rng)
    F = native.pad_columns(t.F)
    native.perturbed_norms(
        n_sub=1, r=t.F.shape[-1], tri=t.tri, cap=x.softcap, S=S_pad, S_off=it * Tk, S_si=0,
        A=t.A.contiguous(), Bc=t.Bc.contiguous(), A_off=it * d, A_sj=1, A_si=0,
        X=native.pad_keys(x.KT), Y=native.pad_keys(t.KTp), X_off=it // (gs * Ts) * (d * Tk), X_sj=Tk,
        R=None if t.rq is None else t.rq.contiguous(), R_off=it * d, R_sj=1, R_ss=0,
        F=F, F_off=it // Ts * (F.shape[-2] * F.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)
    return torch.einsum("bi,bghij->bghj", x.rw.w, out).reshape(B, x.H * d)


def k_scores(ctx: Ctx, x: Heads, wo: torch.Tensor, rng, reduce: Callable, S_pad: torch.Tensor) -> torch.Tensor:
    """(B, G*d), as :func:`.qk_torch.k_scores`."""
    B, G, gs, Ts, d, dt = x.B, x.G, x.gs, x.Ts, x.d, ctx.dt
    Tk = x.T + native.KEY_SLACK
    t = k_terms(x, wo, reduce)
    out = torch.empty(B, G, Ts, d, dtype=dt, device=x.S.device)
    # item = (b, g, t): one scored row of one kv group; its gs query heads are the sub-rows
    it = torch.arange(B * G * Ts)
    bg = it // Ts
    lo, hi = (r[:, None].expand(B, G, Ts).reshape(-1).contiguous() for r in rng)
    F = native.pad_columns(t.F)
    native.perturbed_norms(
        n_sub=gs, r=t.F.shape[-1], tri=t.tri, cap=x.softcap, S=S_pad,
        # head i's rows of the unreduced factor end at column (i + 1) * d_h (R is triangular)
        sub_cols=d if d % native.TILE[dt] == 0 else 0,
        S_off=bg * (gs * Ts * Tk) + it % Ts * Tk, S_si=Ts * Tk,
        A=t.Qk.contiguous(), Bc=t.Qkp.contiguous(), A_off=it * (d * gs), A_sj=gs, A_si=1,
        X=native.pad_keys(t.C1), Y=native.pad_keys(t.C2), X_off=bg * (d * Tk), X_sj=Tk,
        R=None if t.rk is None else native.pad_keys(t.rk), R_off=bg * (d * Tk), R_sj=Tk, R_ss=1,
        F=F, F_off=bg * (F.shape[-2] * F.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)
    return torch.einsum("bi,bgij->bgj", x.rw.w, out).reshape(B, G * d)

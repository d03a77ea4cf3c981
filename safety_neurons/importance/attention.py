"""The attention quantities the q/k scores start from, shared by every q/k path (METHOD 2 and 3).

:func:`heads` rebuilds one layer's attention at the scored rows from the captured projections: queries
(pre-scaled) at the scored rows, keys at all positions (in the row tables' key order), both after the
q/k norm and rotary, the additive mask and the logits. For mode exact, :func:`prepare_exact` adds the
unperturbed softmax and the centred values, and :func:`q_terms` / :func:`k_terms` the perturbation
coefficients and output factors that the torch path (:mod:`.qk_torch`) and the native kernel
(:mod:`.qk_native`) both consume.

Zeroing pre-rotary channel ``j`` of a query (key) head changes the rotated head only along ``rot(e_j)``
(channels ``j`` and ``j +- d_h/2``), so the perturbed logits of every channel are ``S + a_tj K[:, j] +
b_tj K[:, p(j)]`` (for k: the same with query columns and per-key coefficients). With a q/k RMS norm the
normalised perturbed head is ``rho_j * (y with channel j zeroed)``, ``rho_j = rms(x) / rms(x without
channel j)`` (this assumes the norm is ``gain * x / sqrt(mean(x^2) + eps)``, which holds for every
supported family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .capture import Ctx, Rows, gather_rows
from .factors import k_factor, norm_eps, q_factor


@dataclass
class Heads:
    """One layer's attention at the scored rows, in the compute dtype; head h = g*gs + i."""
    rw: Rows
    rt: dict  # rotary tables (Rows.rope)
    B: int
    T: int
    H: int
    G: int
    d: int
    Ts: int
    scale: float
    softcap: float | None
    window: int | None
    yq: torch.Tensor  # (B, Ts, H, d): queries at the scored rows after the q norm, before rotary
    rho_q: torch.Tensor | None  # same shape: rho_j of the q norm (None without one)
    yk: torch.Tensor  # (B, T, G, d): keys after the k norm, before rotary, in key order
    rho_k: torch.Tensor | None
    Qg: torch.Tensor  # (B, G, gs, Ts, d): rotated queries, scaled
    KT: torch.Tensor  # (B, G, d, T): rotated keys
    neg: torch.Tensor  # (B, Ts, T): additive mask
    S: torch.Tensor  # (B, G, gs, Ts, T): scaled logits
    P: torch.Tensor | None = None  # the unperturbed softmax (prepare_exact)
    VcT: torch.Tensor | None = None  # (B, G, T', d): centred values of the keys some row sees

    @property
    def gs(self) -> int:
        return self.H // self.G

    @property
    def half(self) -> int:
        return self.d // 2

    @property
    def negb(self) -> torch.Tensor:
        return self.neg[:, None, None]  # (B, 1, 1, Ts, T)

    def key_end(self, r0: int, r1: int) -> int:
        """Keys [0, hi) are all that rows r0:r1 can see (causal mask): the rest have dP = 0 exactly."""
        return max(self.rw.last_key[r0:r1]) + 1


def _normed(x_pre: torch.Tensor, norm, dt: torch.dtype, d: int):
    """Head vectors after the q/k norm, and rho_j = rms(x) / rms(x with channel j zeroed)."""
    if norm is None:
        return x_pre.to(dt), None
    y = norm(x_pre).to(dt)
    x = x_pre.to(dt)
    sq = x * x
    ms = sq.mean(-1, keepdim=True)
    eps = norm_eps(norm)
    return y, torch.sqrt((ms + eps) / ((ms - sq / d).clamp(min=0) + eps))


def heads(ctx: Ctx, layer: int, m, cap: dict, a: torch.Tensor) -> Heads:
    """The layer's :class:`Heads` from the captured q/k projections and rotary tables (``a``: the
    ``o_proj`` input in the compute dtype, for its shape and device)."""
    ad, dt = ctx.adapter, ctx.dt
    rw = ctx.on(a.device)
    B, T, _ = a.shape
    H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
    gs, Ts, half = H // G, ctx.Ts, d // 2
    scale = ad.scaling(layer)
    rt = rw.rope(cap["cos"], cap["sin"], scale)
    # queries at the scored rows only (pre-scaled), keys at all positions
    yq, rho_q = _normed(gather_rows(cap["q"].view(B, T, H, d), rw.rows, 1), m.q_norm, dt, d)  # (B, Ts, H, d)
    yk, rho_k = _normed(rw.keys(cap["k"].view(B, T, G, d)), m.k_norm, dt, d)  # (B, T, G, d), key order
    Qs = torch.addcmul(yq * rt["qcos"][:, :, None], yq.roll(half, -1), rt["qsin"][:, :, None])
    K = torch.addcmul(yk * rt["cos"][:, :, None], yk.roll(half, -1), rt["ssin"][:, :, None])
    Qg = Qs.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
    KT = K.permute(0, 2, 3, 1).contiguous()  # (B, G, d, T)
    window = ad.sliding_window(layer)
    neg = rw.neg(window)  # (B, Ts, T)
    S = torch.matmul(Qg, KT[:, :, None])  # (B, G, gs, Ts, T): scaled logits
    return Heads(rw=rw, rt=rt, B=B, T=T, H=H, G=G, d=d, Ts=Ts, scale=scale, softcap=ad.softcap(layer),
                 window=window, yq=yq, rho_q=rho_q, yk=yk, rho_k=rho_k, Qg=Qg, KT=KT, neg=neg, S=S)


def prepare_exact(ctx: Ctx, layer: int, x: Heads, cap: dict, a: torch.Tensor, need_p: bool) -> None:
    """Mode exact: mask the logits (with soft-capping the mask is added after the cap, per chunk), the
    unperturbed softmax when ``need_p`` (the native kernel computes it itself), the optional check of
    the recomputed attention output against ``a``, and the centred values ``VcT``."""
    rw, B, T, G, d = x.rw, x.B, x.T, x.G, x.d
    if x.softcap is None:
        x.S.add_(x.negb)  # masked once here: perturbed logits stay -inf where masked
    if need_p:
        if x.softcap is None:
            x.P = torch.softmax(x.S, dim=-1)
        else:
            x.P = torch.softmax(torch.tanh(x.S / x.softcap).mul_(x.softcap).add_(x.negb), dim=-1)
    V = rw.keys(cap["v"].view(B, T, G, d)).to(ctx.dt)
    if ctx.check:
        _check_output(ctx, layer, x, V, a)
    # dP sums to zero over keys: centering V removes a common component and its rounding error
    Vc = V - torch.einsum("bt,btgd->bgd", rw.key_mean, V)[:, None]  # (B, T, G, d)
    # keys past the last one a scored row sees (the template's closing tokens, padding) get dP = 0 in
    # every row: the output factors (and their QR) leave them out
    Vc = Vc[:, : max(rw.last_key) + 1]
    x.VcT = Vc.permute(0, 2, 1, 3)  # (B, G, T, d)


def _check_output(ctx: Ctx, layer: int, x: Heads, V: torch.Tensor, a: torch.Tensor) -> None:
    """The recomputed unperturbed attention output equals the captured ``o_proj`` input, or RuntimeError."""
    B, T, G, gs, d, rw = x.B, x.T, x.G, x.gs, x.d, x.rw
    got = gather_rows(a.view(B, T, G, gs, d), rw.rows, 1).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
    err = ((torch.matmul(x.P, V.transpose(1, 2)[:, :, None]) - got).abs()
           * rw.valid[:, None, None, :, None]).max()
    tol = ctx.check_tol * got.abs().max().clamp(min=1e-30)
    if not bool(err <= tol):
        raise RuntimeError(f"layer {layer}: recomputed attention output differs from the o_proj input "
                           f"by {float(err):.3g} (tolerance {float(tol):.3g})")


def q_terms(x: Heads, wo: torch.Tensor, reduce: Callable) -> SimpleNamespace:
    """Query perturbations: ``A``, ``Bc`` (B, G, gs, Ts, d) the coefficients of K[:, j] and K[:, p(j)],
    ``rq`` the norm's rho (or None), ``KTp`` the partner channels' keys, and the output factor ``F``
    (B, G, gs, T', r): ``||dP V_h W_o,h^T|| = ||dP V_h R_h^T||`` with W_o,h = Q_h R_h, reduced by
    ``reduce`` (``tri``: F is triangular after a QR)."""
    B, G, gs, Ts, d, dt = x.B, x.G, x.gs, x.Ts, x.d, x.S.dtype
    RqT = q_factor(wo, G, gs, d, dt)  # (G, gs, d, d)
    F, tri = reduce(torch.matmul(x.VcT[:, :, None], RqT))  # (B, G, gs, T, r)
    yqg = x.yq.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
    A = yqg * x.rt["qc"][:, None, None]  # coefficient of K[:, j]
    Bc = yqg * x.rt["qp"][:, None, None]  # coefficient of K[:, p(j)]
    rq = x.rho_q.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4) if x.rho_q is not None else None
    return SimpleNamespace(F=F, tri=tri, A=A, Bc=Bc, rq=rq, KTp=x.KT.roll(x.half, 2))


def k_terms(x: Heads, wo: torch.Tensor, reduce: Callable) -> SimpleNamespace:
    """Key perturbations: ``C1``, ``C2`` (B, G, d, T) the coefficients of the scaled Q[:, j] and
    Q[:, p(j)], ``rk`` the norm's rho (or None), the group's queries ``Qk`` (B, G, Ts, d, gs) and their
    partners ``Qkp``, and the output factor ``F`` (B, G, T'*gs, r): ``||sum_i dP_i V_g W_o,h_i^T|| =
    ||[dP_1 .. dP_gs] F||`` with F stacked from V_g and the group's R, rows in (key, head) order so
    that the keys [0, hi) are a prefix (and a triangle after a QR)."""
    G, gs, d, dt = x.G, x.gs, x.d, x.S.dtype
    # the group's R (G, m, gs*d), columns (head i, channel e) -> (G, e, (i, r)): Vc_g @ it is F in
    # (key, head) rows. R has m = min(hidden, gs*d) rows: a multi-query group wider than the
    # hidden size (Gemma-3-270m: 4 heads x 256 > 640) has fewer rows than columns
    Rb = k_factor(wo, G, gs, d, dt)  # (G, d, gs*m)
    F, tri = reduce(torch.matmul(x.VcT, Rb).view(x.B, G, -1, Rb.shape[-1] // gs))  # (B, G, T*gs, r)
    ykT = x.yk.permute(0, 2, 3, 1)  # (B, G, d, T)
    C1 = ykT * x.rt["kc"].transpose(1, 2)[:, None]  # coefficient of the scaled Q[:, j]
    C2 = ykT * x.rt["kp"].transpose(1, 2)[:, None]  # of Q[:, p(j)]
    rk = x.rho_k.permute(0, 2, 3, 1) if x.rho_k is not None else None  # (B, G, d, T)
    Qk = x.Qg.permute(0, 1, 3, 4, 2)  # (B, G, Ts, d, gs)
    return SimpleNamespace(F=F, tri=tri, C1=C1, C2=C2, rk=rk, Qk=Qk, Qkp=Qk.roll(x.half, 3))

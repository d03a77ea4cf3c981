"""Mode original (METHOD 3): the per-prompt formulas the released code computed, summed over scored tokens.

- ffn: ``sum_t |(x W_up^T)_tk|``.
- q and k share one score in query-head space, ``sum_{i scored, i'} (softmax(A - D_hj) - softmax(A))^2``
  with ``A = scale * Q K^T + mask`` (post-rotary, no soft-capping; mask = causal, padding and the model's
  sliding window) and ``D_hj = Q[:, h, j] K[:, h, j]^T`` (post-rotary, unscaled; K expanded to query
  heads). ``q`` returns it (width ``H*d_h``); ``k`` returns, per kv channel ``(g, j)``, its mean over the
  query heads of group ``g`` (width ``G*d_h``).
- v and o share ``sum_t |a_t(h, j)|`` in query-head space: ``o`` returns it, ``v`` the mean over the
  query heads of each group (width ``G*d_h``).
"""

from __future__ import annotations

import torch

from .attention import Heads
from .capture import Ctx, chunks


def ffn_scores(ctx: Ctx, layer: int, m, up: torch.Tensor) -> None:
    """ffn from ``up_proj``'s output (B, T, d_ff)."""
    ctx.add(layer, "ffn", torch.bmm(ctx.on(up.device).w_tok[:, None], up.to(ctx.dt).abs())[:, 0])


def vo_scores(ctx: Ctx, layer: int, m, a: torch.Tensor) -> None:
    """o and v from ``o_proj``'s input ``a`` (B, T, H*d_h) in the compute dtype."""
    ad = ctx.adapter
    B = a.shape[0]
    H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
    s = torch.bmm(ctx.on(a.device).w_tok[:, None], a.abs())[:, 0]  # (B, H*d): sum_t w_t |a_tr|
    if "o" in ctx.kinds:
        ctx.add(layer, "o", s)
    if "v" in ctx.kinds:
        ctx.add(layer, "v", s.view(B, G, H // G, d).mean(2).reshape(B, G * d))


def qk_scores(ctx: Ctx, layer: int, x: Heads) -> None:
    """Sum over scored rows i and keys of (softmax(A - D_hj) - softmax(A))^2."""
    B, T, H, G, gs, Ts, d, Qg, KT = x.B, x.T, x.H, x.G, x.gs, x.Ts, x.d, x.Qg, x.KT
    A = x.S.add_(x.negb)
    P = torch.softmax(A, dim=-1)  # (B, G, gs, Ts, T)
    out = torch.empty(B, G, gs, Ts, d, dtype=ctx.dt, device=A.device)
    for r0, r1, c0, c1 in chunks(Ts, d, B * H * T, ctx.budget):
        # D_hj = Q_tj K_sj, unscaled (Qg holds scaled queries)
        z = torch.addcmul(A[:, :, :, r0:r1, None], Qg[:, :, :, r0:r1, c0:c1, None],
                          KT[:, :, None, None, c0:c1], value=-1.0 / x.scale)
        p = torch.softmax(z, dim=-1)
        del z
        out[:, :, :, r0:r1, c0:c1] = p.sub_(P[:, :, :, r0:r1, None]).square_().sum(-1)
    s = torch.einsum("bi,bghij->bghj", x.rw.w, out)  # (B, G, gs, d)
    if "q" in ctx.kinds:
        ctx.add(layer, "q", s.reshape(B, H * d))
    if "k" in ctx.kinds:
        ctx.add(layer, "k", s.mean(2).reshape(B, G * d))

"""Exact importance of ffn, o and v neurons in closed form (METHOD 2).

``I_t(n) = ||out_t - out_t(n deactivated)||_2`` is linear in the neuron's value for these kinds:

- ffn: ``|h_tk| * ||W_down[:, k]||``; o: ``|a_tr| * ||W_o[:, r]||``;
- v: ``||sum_{h in group g} a_t(h, j) W_o[:, h*d_h + j]||``, computed as ``||R_gj a||`` with ``R_gj`` the
  triangular factor of the group's ``W_o`` columns.

Each prompt's score is the mean over its scored tokens (the row tables' ``w_tok``).
"""

from __future__ import annotations

import torch

from .capture import Ctx
from .factors import colnorm, v_factor


def ffn_scores(ctx: Ctx, layer: int, m, h: torch.Tensor) -> None:
    """ffn from ``down_proj``'s input ``h`` (B, T, d_ff)."""
    cn = colnorm(m.down.weight, ctx.dt)  # (d_ff,)
    h = h.to(ctx.dt).abs()
    ctx.add(layer, "ffn", torch.bmm(ctx.on(h.device).w_tok[:, None], h)[:, 0] * cn)


def vo_scores(ctx: Ctx, layer: int, m, a: torch.Tensor) -> None:
    """o and v from ``o_proj``'s input ``a`` (B, T, H*d_h) in the compute dtype."""
    ad, dt, rw = ctx.adapter, ctx.dt, ctx.on(a.device)
    B, T, _ = a.shape
    H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
    gs = H // G
    wo = m.o.weight
    if "o" in ctx.kinds:
        s = torch.bmm(rw.w_tok[:, None], a.abs())[:, 0]  # (B, H*d): sum_t w_t |a_tr|
        ctx.add(layer, "o", s * colnorm(wo, dt))
    if "v" in ctx.kinds:
        R = v_factor(wo, G, gs, d, dt)  # (G, d, gs, gs)
        y = torch.einsum("gjki,btgij->btgjk", R, a.view(B, T, G, gs, d))  # (B, T, G, d, gs)
        v = torch.bmm(rw.w_tok[:, None], torch.linalg.vector_norm(y, dim=-1).view(B, T, G * d))
        ctx.add(layer, "v", v[:, 0])

"""Exact q/k importance with torch operations (METHOD 2): the perturbed softmax of every channel.

The perturbed logits of all channels of a block of scored rows are built at once by broadcasting
(:mod:`.attention`), soft-capped, masked and soft-maxed; the output change of a query head is
``||dP F||`` with the output factor F, and for k the query heads of a group are stacked. Rows and
channels are chunked to stay under the context's memory budget, and each block only reads the keys its
rows can see.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import Heads, k_terms, q_terms
from .capture import Ctx, chunks


def _softcap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else z.div_(cap).tanh_().mul_(cap)


def scores(ctx: Ctx, layer: int, x: Heads, wo: torch.Tensor, reduce: Callable) -> None:
    """q and k scores of the layer (the kinds asked for) into ``ctx``."""
    if "q" in ctx.kinds:
        ctx.add(layer, "q", q_scores(ctx, x, wo, reduce))
    if "k" in ctx.kinds:
        ctx.add(layer, "k", k_scores(ctx, x, wo, reduce))


def q_scores(ctx: Ctx, x: Heads, wo: torch.Tensor, reduce: Callable) -> torch.Tensor:
    """(B, H*d): per query channel, the weighted mean over scored rows of ``||dP F||``."""
    B, T, H, G, gs, Ts, d, S, P, KT = x.B, x.T, x.H, x.G, x.gs, x.Ts, x.d, x.S, x.P, x.KT
    t = q_terms(x, wo, reduce)
    Fq, tri, A, Bc, rq, KTp = t.F, t.tri, t.A, t.Bc, t.rq, t.KTp
    negb = x.negb
    out = torch.empty(B, G, gs, Ts, d, dtype=ctx.dt, device=S.device)
    for r0, r1, c0, c1 in chunks(Ts, d, B * H * T, ctx.budget):
        hi = x.key_end(r0, r1)
        z = torch.addcmul(S[:, :, :, r0:r1, None, :hi], A[:, :, :, r0:r1, c0:c1, None],
                          KT[:, :, None, None, c0:c1, :hi])  # (B, G, gs, rows, ch, hi)
        z.addcmul_(Bc[:, :, :, r0:r1, c0:c1, None], KTp[:, :, None, None, c0:c1, :hi])
        if rq is not None:
            z.mul_(rq[:, :, :, r0:r1, c0:c1, None])
        if x.softcap is not None:
            _softcap_(z, x.softcap).add_(negb[:, :, :, r0:r1, None, :hi])
        p = torch.softmax(z, dim=-1)
        del z
        p.sub_(P[:, :, :, r0:r1, None, :hi])
        u = torch.matmul(p.view(B, G, gs, -1, hi), Fq[..., :hi, :hi] if tri else Fq[..., :hi, :])
        out[:, :, :, r0:r1, c0:c1] = torch.linalg.vector_norm(u, dim=-1).view(B, G, gs, r1 - r0, c1 - c0)
    return torch.einsum("bi,bghij->bghj", x.rw.w, out).reshape(B, H * d)


def k_scores(ctx: Ctx, x: Heads, wo: torch.Tensor, reduce: Callable) -> torch.Tensor:
    """(B, G*d): per key channel, the weighted mean over scored rows of ``||[dP_1 .. dP_gs] F||``."""
    B, T, H, G, gs, Ts, d = x.B, x.T, x.H, x.G, x.gs, x.Ts, x.d
    t = k_terms(x, wo, reduce)
    Fk, tri, C1, C2, rk, Qk, Qkp = t.F, t.tri, t.C1, t.C2, t.rk, t.Qk, t.Qkp
    Sk = x.S.transpose(2, 3)  # (B, G, Ts, gs, T)
    Pk = x.P.transpose(2, 3)
    negk = x.neg[:, None, :, None, None]  # (B, 1, Ts, 1, 1, T)
    out = torch.empty(B, G, Ts, d, dtype=ctx.dt, device=x.S.device)
    for r0, r1, c0, c1 in chunks(Ts, d, B * H * T, ctx.budget):
        hi = x.key_end(r0, r1)
        z = torch.addcmul(Sk[:, :, r0:r1, None, :, :hi], Qk[:, :, r0:r1, c0:c1, :, None],
                          C1[:, :, None, c0:c1, None, :hi])  # (B, G, rows, ch, gs, hi)
        z.addcmul_(Qkp[:, :, r0:r1, c0:c1, :, None], C2[:, :, None, c0:c1, None, :hi])
        if rk is not None:
            z.mul_(rk[:, :, None, c0:c1, None, :hi])
        if x.softcap is not None:
            _softcap_(z, x.softcap).add_(negk[:, :, r0:r1, ..., :hi])
        p = torch.softmax(z, dim=-1)
        del z
        p.sub_(Pk[:, :, r0:r1, None, :, :hi])
        # F's rows of keys [0, hi), reordered to p's (head, key) order
        f = Fk[:, :, : hi * gs, : hi * gs] if tri else Fk[:, :, : hi * gs]
        f = f.unflatten(2, (hi, gs)).transpose(2, 3).reshape(B, G, gs * hi, -1)
        u = torch.matmul(p.view(B, G, -1, gs * hi), f)  # (B, G, rows*ch, r)
        out[:, :, r0:r1, c0:c1] = torch.linalg.vector_norm(u, dim=-1).view(B, G, r1 - r0, c1 - c0)
    return torch.einsum("bi,bgij->bgj", x.rw.w, out).reshape(B, G * d)

"""Per-prompt neuron importance from one hooked forward pass (METHOD 2 and 3).

:func:`prompt_scores` runs the model once over a left-padded batch. Forward hooks (registered through
:func:`safety_neurons.hooks.hooks`, always removed) capture, layer by layer, what the closed forms need
and turn it into scores inside the hooks, so no layer's activations outlive that layer.

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
  query head is ``dP V_h W_o,h^T``; with ``W_o,h = Q_h R_h`` its norm is ``||dP (V_h R_h^T)||``, and when
  ``T < d_h`` the factor ``V_h R_h^T`` is reduced further to ``T x T`` (``F F^T`` is all that matters).
  For k the query heads of the group are stacked: ``||sum_i dP_i V_g W_o,h_i^T|| = ||[dP_1 .. dP_n] F||``.
  Only scored query rows are computed; work is chunked over rows and channels to stay under
  ``qk_chunk_mb``.

Mode ``original`` (METHOD 3), summed over scored tokens (what the released code computed):

- ffn: ``sum_t |(x W_up^T)_tk|``.
- q and k share one score in query-head space, ``sum_{i scored, i'} (softmax(A - D_hj) - softmax(A))^2``
  with ``A = scale * Q K^T + mask`` (post-rotary, no soft-capping; mask = causal, padding and the model's
  sliding window) and ``D_hj = Q[:, h, j] K[:, h, j]^T`` (post-rotary, unscaled; K expanded to query
  heads). ``q`` returns it (width ``H*d_h``); ``k`` returns, per kv channel ``(g, j)``, its mean over the
  query heads of group ``g`` (width ``G*d_h``).
- v and o share ``sum_t |a_t(h, j)|`` in query-head space: ``o`` returns it, ``v`` the mean over the
  query heads of each group (width ``G*d_h``).

All computation is in float32 (float64 when the model is float64); scores come back as float32 on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .data import Batch
from .errors import UserError
from .hooks import deactivated, hooks
from .models import ModelAdapter, model_device

KINDS = ("q", "k", "v", "o", "ffn")
MODES = ("exact", "original")


class _Stop(Exception):
    """Raised by the last hook that is needed: the rest of the forward pass (lm_head) is skipped."""


# --------------------------------------------------------------------------------------- helpers
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, n, d); cos, sin (B, T, d)."""
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


def _norm_eps(norm: torch.nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        v = getattr(norm, name, None)
        if v is not None:
            return float(v)
    raise NotImplementedError(f"q/k norm {type(norm).__name__} has no eps; only RMS norms are supported")


def _reduce_factor(f: torch.Tensor) -> torch.Tensor:
    """A factor F' with F' F'^T = F F^T and at most min(rows, cols) columns (F: (..., n, r))."""
    n, r = f.shape[-2:]
    if r <= n:
        return f
    return torch.linalg.qr(f.transpose(-1, -2), mode="r").R.transpose(-1, -2)  # (..., n, n)


def _tri(w: torch.Tensor) -> torch.Tensor:
    """R of the QR decomposition of w (..., D, c): ||w u|| = ||R u||."""
    return torch.linalg.qr(w, mode="r").R


class _Rows:
    """The scored query rows of a batch: per prompt, indices of its scored tokens, padded to Ts."""

    def __init__(self, scored: torch.Tensor, weight_mean: bool):
        B, T = scored.shape
        n = scored.sum(1)
        self.Ts = int(n.max())
        order = torch.sort((~scored).to(torch.int8), dim=1, stable=True).indices  # scored first, in order
        self.valid = torch.arange(self.Ts, device=scored.device)[None] < n[:, None]
        # empty slots repeat the prompt's first scored row (weight 0) so that no row is fully masked
        self.idx = torch.where(self.valid, order[:, : self.Ts], order[:, :1])  # (B, Ts)
        w = 1.0 / n.clamp(min=1).double() if weight_mean else torch.ones_like(n, dtype=torch.float64)
        self.w = self.valid.double() * w[:, None]  # (B, Ts)
        self.w_tok = scored.double() * w[:, None]  # (B, T)


def _key_mask(am: torch.Tensor, rows: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, Ts, T) bool: key s visible from query position rows[b, i]."""
    T = am.shape[1]
    s = torch.arange(T, device=am.device)
    t = rows[:, :, None]
    ok = (s[None, None] <= t) & am.bool()[:, None, :]
    if window is not None:
        ok &= (t - s[None, None]) < window
    return ok


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """x with dim of size T indexed by rows (B, n): batch dim 0."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = rows.shape
    idx = rows.reshape(shape).expand(*[x.shape[i] if i != dim else rows.shape[1] for i in range(x.dim())])
    return torch.gather(x, dim, idx)


# ------------------------------------------------------------------------------------ per layer
class _Layer:
    """Captures one decoder layer's attention inputs and turns them into scores."""

    def __init__(self, ctx: _Ctx, layer: int):
        self.ctx, self.layer = ctx, layer
        self.m = ctx.adapter.modules(layer)
        self.cap: dict[str, torch.Tensor] = {}

    # hooks --------------------------------------------------------------------------------------
    def specs(self, kinds: set[str]) -> list:
        m, out = self.m, []
        if kinds & {"q", "k"}:
            out.append((m.attn, "pre_kw", self._attn_pre))
            out.append((m.q, "fwd", self._store("q")))
            out.append((m.k, "fwd", self._store("k")))
            out.append((m.v, "fwd", self._store("v")))
        if kinds & {"q", "k", "v", "o"}:
            out.append((m.o, "pre", self._o_pre))
        if "ffn" in kinds:
            if self.ctx.mode == "exact":
                out.append((m.down, "pre", self._down_pre))
            else:
                out.append((m.up, "fwd", self._up_fwd))
        return out

    def _store(self, name):
        def fn(mod, args, out):
            self.cap[name] = out.detach()
        return fn

    def _attn_pre(self, mod, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        if pe is None:
            raise RuntimeError(f"layer {self.layer}: attention got no position_embeddings (cos, sin)")
        self.cap["cos"], self.cap["sin"] = pe[0].detach(), pe[1].detach()

    def _o_pre(self, mod, args):
        try:
            self.attn_scores(args[0].detach())
        finally:
            self.cap.clear()
        self.ctx.maybe_stop(self.layer, "attn")

    def _down_pre(self, mod, args):
        ctx = self.ctx
        h = args[0].detach().to(ctx.dt)
        cn = self.m.down.weight.detach().to(ctx.dt).norm(dim=0)  # (d_ff,)
        ctx.add(self.layer, "ffn", torch.einsum("bt,btk->bk", ctx.rows.w_tok.to(ctx.dt), h.abs()) * cn)
        ctx.maybe_stop(self.layer, "ffn")

    def _up_fwd(self, mod, args, out):
        ctx = self.ctx
        ctx.add(self.layer, "ffn", torch.einsum("bt,btk->bk", ctx.rows.w_tok.to(ctx.dt), out.detach().to(ctx.dt).abs()))
        ctx.maybe_stop(self.layer, "ffn")

    # attention kinds ------------------------------------------------------------------------------
    def attn_scores(self, a_native: torch.Tensor) -> None:
        ctx, ad, layer = self.ctx, self.ctx.adapter, self.layer
        dt, kinds = ctx.dt, ctx.kinds
        B, T, _ = a_native.shape
        H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
        gs = H // G
        a = a_native.to(dt)  # (B, T, H*d)
        w_tok = ctx.rows.w_tok.to(dt)
        Wo = self.m.o.weight.detach().to(dt)  # (D, H*d)
        if ctx.mode == "exact":
            if "o" in kinds:
                ctx.add(layer, "o", torch.einsum("bt,btr->br", w_tok, a.abs()) * Wo.norm(dim=0))
            if "v" in kinds:
                D = Wo.shape[0]
                Wg = Wo.view(D, G, gs, d).permute(1, 3, 0, 2)  # (G, d, D, gs)
                R = _tri(Wg)  # (G, d, gs, gs)
                av = a.view(B, T, G, gs, d)
                y = torch.einsum("gjki,btgij->btgjk", R, av)  # (B, T, G, d, gs)
                ctx.add(layer, "v", torch.einsum("bt,btgj->bgj", w_tok, y.norm(dim=-1)).reshape(B, G * d))
        else:
            s = torch.einsum("bt,btr->br", w_tok, a.abs())  # (B, H*d)
            if "o" in kinds:
                ctx.add(layer, "o", s)
            if "v" in kinds:
                ctx.add(layer, "v", s.view(B, G, gs, d).mean(2).reshape(B, G * d))
        if kinds & {"q", "k"}:
            self.qk_scores(a, Wo)

    def qk_scores(self, a: torch.Tensor, Wo: torch.Tensor) -> None:
        ctx, ad, layer, cap = self.ctx, self.ctx.adapter, self.layer, self.cap
        dt, rows = ctx.dt, ctx.rows
        B, T, _ = a.shape
        H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
        gs, Ts, half = H // G, rows.Ts, d // 2
        scale = ad.scaling(layer)
        cap_l = ad.softcap(layer)
        cos = cap["cos"].to(dt).expand(B, T, d)
        sin = cap["sin"].to(dt).expand(B, T, d)
        q_pre = cap["q"].view(B, T, H, d)
        k_pre = cap["k"].view(B, T, G, d)
        v = cap["v"].to(dt).view(B, T, G, d).transpose(1, 2)  # (B, G, T, d)

        def normed(x_pre, norm):
            if norm is None:
                return x_pre.to(dt), None
            y = norm(x_pre).to(dt)
            x = x_pre.to(dt)
            sq = x * x
            ms = sq.mean(-1, keepdim=True)
            eps = _norm_eps(norm)
            rho = torch.sqrt((ms + eps) / ((ms - sq / d).clamp(min=0) + eps))  # (B, T, n, d)
            return y, rho

        yq, rho_q = normed(q_pre, self.m.q_norm)
        yk, rho_k = normed(k_pre, self.m.k_norm)
        Q = _rope(yq, cos, sin).transpose(1, 2)  # (B, H, T, d)
        K = _rope(yk, cos, sin).transpose(1, 2)  # (B, G, T, d)
        grp = torch.arange(H, device=a.device) // gs
        Kx = K[:, grp]  # (B, H, T, d)

        ok = _key_mask(ctx.batch.attention_mask, rows.idx, ad.sliding_window(layer))  # (B, Ts, T)
        neg = torch.zeros(ok.shape, dtype=dt, device=a.device).masked_fill_(~ok, float("-inf"))[:, None]
        Qr = _gather_rows(Q, rows.idx, 2)  # (B, H, Ts, d)
        S = torch.matmul(Qr, Kx.transpose(-1, -2)) * scale  # (B, H, Ts, T), pre-softcap
        # partner channel of the rotary pair and the sign of its sine term
        j_all = torch.arange(d, device=a.device)
        partner = (j_all + half) % d
        sgn = torch.where(j_all < half, 1.0, -1.0).to(dt)

        if ctx.mode == "original":
            self._original_qk(Q, Kx, S, neg, B, H, G, d, gs)
            return

        P = torch.softmax(self._cap(S, cap_l) + neg, dim=-1)  # (B, H, Ts, T)
        if ctx.check:
            vx = v[:, grp]  # (B, H, T, d)
            rec = torch.matmul(P, vx)  # (B, H, Ts, d)
            got = _gather_rows(a.view(B, T, H, d).transpose(1, 2), rows.idx, 2)
            err = ((rec - got).abs() * rows.valid[:, None, :, None]).max()
            tol = ctx.check_tol * got.abs().max().clamp(min=1e-30)
            if not bool(err <= tol):
                raise RuntimeError(f"layer {layer}: recomputed attention output differs from o_proj input "
                                   f"by {float(err):.3g} (tolerance {float(tol):.3g})")

        Wh = Wo.view(-1, H, d).transpose(0, 1)  # (H, D, d)
        budget = ctx.budget()

        if "q" in ctx.kinds:
            Rq = _tri(Wh)  # (H, d, d)
            Fq = _reduce_factor(torch.matmul(v[:, grp], Rq.transpose(-1, -2)[None]))  # (B, H, T, r)
            cq = _gather_rows(cos, rows.idx, 1)[:, None]  # (B, 1, Ts, d)
            sq_ = _gather_rows(sin, rows.idx, 1)[:, None]
            yqr = _gather_rows(yq.transpose(1, 2), rows.idx, 2)  # (B, H, Ts, d)
            A = -scale * yqr * cq  # coefficient of K[:, j]
            Bc = -scale * yqr * sgn * sq_[..., partner]  # coefficient of K[:, p(j)]
            rq = _gather_rows(rho_q.transpose(1, 2), rows.idx, 2) if rho_q is not None else None
            KT = Kx.transpose(-1, -2)  # (B, H, d, T)
            KTp = KT[:, :, partner]
            out = torch.empty(B, H, Ts, d, dtype=dt, device=a.device)
            per_ch = B * H * T
            for r0, r1, c0, c1 in _chunks(Ts, d, per_ch, budget):
                z = S[:, :, r0:r1, None, :] + A[:, :, r0:r1, c0:c1, None] * KT[:, :, None, c0:c1, :]
                z.addcmul_(Bc[:, :, r0:r1, c0:c1, None], KTp[:, :, None, c0:c1, :])
                if rq is not None:
                    z.mul_(rq[:, :, r0:r1, c0:c1, None])
                z = self._cap_(z, cap_l)
                z.add_(neg[:, :, r0:r1, None, :])
                p = torch.softmax(z, dim=-1)
                p.sub_(P[:, :, r0:r1, None, :])
                u = torch.matmul(p.view(B, H, -1, T), Fq)  # (B, H, rows*ch, r)
                out[:, :, r0:r1, c0:c1] = u.norm(dim=-1).view(B, H, r1 - r0, c1 - c0)
            ctx.add(layer, "q", torch.einsum("bi,bhij->bhj", rows.w.to(dt), out).reshape(B, H * d))

        if "k" in ctx.kinds:
            Wg = Wo.view(-1, G, gs * d).transpose(0, 1)  # (G, D, gs*d)
            Rk = _tri(Wg)  # (G, gs*d, gs*d)
            Rb = Rk.view(G, gs * d, gs, d).permute(0, 2, 3, 1)  # (G, gs, d, gs*d): block i of R^T
            Fk = torch.einsum("bgtd,gidr->bgitr", v, Rb).reshape(B, G, gs * T, gs * d)
            Fk = _reduce_factor(Fk)  # (B, G, gs*T, r)
            yk_t = yk.transpose(1, 2)  # (B, G, T, d)
            C1 = (-scale * yk_t * cos[:, None]).transpose(-1, -2)  # (B, G, d, T): coefficient of Q[:, j]
            C2 = (-scale * yk_t * sgn * sin[:, None][..., partner]).transpose(-1, -2)  # of Q[:, p(j)]
            rk = rho_k.permute(0, 2, 3, 1) if rho_k is not None else None  # (B, G, d, T)
            Qg = Qr.view(B, G, gs, Ts, d).permute(0, 1, 3, 4, 2)  # (B, G, Ts, d, gs)
            Qgp = Qg[:, :, :, partner]
            Sg = S.view(B, G, gs, Ts, T).permute(0, 1, 3, 2, 4)  # (B, G, Ts, gs, T)
            Pg = P.view(B, G, gs, Ts, T).permute(0, 1, 3, 2, 4)
            negk = neg[:, :, :, None, None, :]  # (B, 1, Ts, 1, 1, T)
            out = torch.empty(B, G, Ts, d, dtype=dt, device=a.device)
            per_ch = B * G * gs * T
            for r0, r1, c0, c1 in _chunks(Ts, d, per_ch, budget):
                z = Sg[:, :, r0:r1, None] + Qg[:, :, r0:r1, c0:c1, :, None] * C1[:, :, None, c0:c1, None, :]
                z.addcmul_(Qgp[:, :, r0:r1, c0:c1, :, None], C2[:, :, None, c0:c1, None, :])
                if rk is not None:
                    z.mul_(rk[:, :, None, c0:c1, None, :])
                z = self._cap_(z, cap_l)
                z.add_(negk[:, :, r0:r1])
                p = torch.softmax(z, dim=-1)
                p.sub_(Pg[:, :, r0:r1, None])
                u = torch.matmul(p.reshape(B, G, -1, gs * T), Fk)  # (B, G, rows*ch, r)
                out[:, :, r0:r1, c0:c1] = u.norm(dim=-1).view(B, G, r1 - r0, c1 - c0)
            ctx.add(layer, "k", torch.einsum("bi,bgij->bgj", rows.w.to(dt), out).reshape(B, G * d))

    @staticmethod
    def _cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
        return z if cap is None else torch.tanh(z / cap) * cap

    @staticmethod
    def _cap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
        if cap is None:
            return z
        return z.div_(cap).tanh_().mul_(cap)

    def _original_qk(self, Q, Kx, S, neg, B, H, G, d, gs) -> None:
        ctx, rows, layer = self.ctx, self.ctx.rows, self.layer
        dt = ctx.dt
        T = Kx.shape[2]
        Ts = rows.Ts
        A = S + neg  # (B, H, Ts, T), no soft-capping in the released code
        P = torch.softmax(A, dim=-1)
        Qr = _gather_rows(Q, rows.idx, 2)  # (B, H, Ts, d)
        KT = Kx.transpose(-1, -2)  # (B, H, d, T)
        budget = ctx.budget()
        out = torch.empty(B, H, Ts, d, dtype=dt, device=Q.device)
        for r0, r1, c0, c1 in _chunks(Ts, d, B * H * T, budget):
            z = A[:, :, r0:r1, None, :] - Qr[:, :, r0:r1, c0:c1, None] * KT[:, :, None, c0:c1, :]
            p = torch.softmax(z, dim=-1).sub_(P[:, :, r0:r1, None, :])
            out[:, :, r0:r1, c0:c1] = p.square().sum(-1)
        s = torch.einsum("bi,bhij->bhj", rows.w.to(dt), out)  # (B, H, d)
        if "q" in ctx.kinds:
            ctx.add(layer, "q", s.reshape(B, H * d))
        if "k" in ctx.kinds:
            ctx.add(layer, "k", s.view(B, G, gs, d).mean(2).reshape(B, G * d))


def _chunks(n_rows: int, n_ch: int, per_cell: int, budget: int):
    """(r0, r1, c0, c1) blocks of rows x channels with rows*channels*per_cell <= budget (at least 1x1)."""
    cells = max(1, budget // max(1, per_cell))
    if cells >= n_ch:
        rstep, cstep = max(1, min(n_rows, cells // n_ch)), n_ch
    else:
        rstep, cstep = 1, cells
    for r0 in range(0, n_rows, rstep):
        for c0 in range(0, n_ch, cstep):
            yield r0, min(n_rows, r0 + rstep), c0, min(n_ch, c0 + cstep)


class _Ctx:
    def __init__(self, adapter, batch, scored, kinds, mode, qk_chunk_mb, dt, check, check_tol):
        self.adapter, self.batch, self.kinds, self.mode = adapter, batch, kinds, mode
        self.qk_chunk_mb, self.dt, self.check, self.check_tol = qk_chunk_mb, dt, check, check_tol
        self.rows = _Rows(scored, weight_mean=(mode == "exact"))
        self.acc: dict[tuple[int, str], torch.Tensor] = {}
        self.last = (adapter.n_layers - 1, "ffn" if "ffn" in kinds else "attn")

    def budget(self) -> int:
        """Elements of one chunk of perturbed logits (about four such temporaries live at once)."""
        return max(1, int(self.qk_chunk_mb * 2**20 / (4 * torch.finfo(self.dt).bits // 8)))

    def add(self, layer: int, kind: str, s: torch.Tensor) -> None:
        self.acc[(layer, kind)] = s.detach().float().cpu()

    def maybe_stop(self, layer: int, where: str) -> None:
        if (layer, where) == self.last:
            raise _Stop


# ------------------------------------------------------------------------------------------- API
@torch.no_grad()
def prompt_scores(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor,
                  kinds: Iterable[str] = KINDS, mode: str = "exact", qk_chunk_mb: float = 256,
                  check: bool = False, check_tol: float | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """One forward pass over a left-padded batch; returns ``{(layer, kind): (B, width) float32 on CPU}``.

    ``scored`` (B, T) bool marks the tokens that count (padding never counts). Mode ``exact``: each
    prompt's score per neuron is the mean over its scored tokens of ``I_t(n)`` (METHOD 2). Mode
    ``original``: METHOD 3's per-prompt formulas, summed over scored tokens; q and k share one score in
    query-head space (q returns it, k its mean over the query heads of each kv group), v and o share
    ``sum_t |a_t(h, j)|`` (o returns it, v its mean over each group), ffn is ``sum_t |up_proj(x)_tk|``.
    Widths: q, o ``H*d_h``; k, v ``G*d_h``; ffn ``d_ff``.

    ``qk_chunk_mb`` bounds the memory of the per-channel perturbed attention (q, k). ``check=True``
    verifies that the recomputed unperturbed attention output equals the captured ``o_proj`` input
    (relative tolerance ``check_tol``; default 1e-5 in float64 (eager attention soft-maxes in float32), 1e-4 in float32, 3e-2 in half
    precision) and raises ``RuntimeError`` otherwise.
    """
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"unknown neuron kinds {bad or '(none)'}; known kinds are {', '.join(KINDS)}")
    if mode not in MODES:
        raise UserError(f"unknown detect.mode={mode!r}; use exact or original")
    dev = model_device(model)
    batch = batch.to(dev)
    scored = scored.to(dev).bool() & batch.attention_mask.bool()
    if not bool(scored.any(1).all()):
        raise UserError("a prompt has no scored tokens; check detect.tokens and the chat template")
    pdt = next(model.parameters()).dtype
    dt = torch.float64 if pdt == torch.float64 else torch.float32
    if check_tol is None:
        check_tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(pdt, 3e-2)
    ctx = _Ctx(adapter, batch, scored, set(kinds), mode, qk_chunk_mb, dt, check, check_tol)
    specs = []
    for layer in range(adapter.n_layers):
        specs += _Layer(ctx, layer).specs(ctx.kinds)
    try:
        with hooks(specs):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    missing = [(layer, k) for layer in range(adapter.n_layers) for k in kinds if (layer, k) not in ctx.acc]
    if missing:
        raise RuntimeError(f"no scores were captured for {missing[:4]}...; is the model's layer stack hooked?")
    return {(layer, k): ctx.acc[(layer, k)] for layer in range(adapter.n_layers) for k in kinds}


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
        raise _Stop

    try:
        with hooks([(sub, "pre_kw", grab)]):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
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

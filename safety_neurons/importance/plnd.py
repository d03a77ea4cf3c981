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
  query head is ``dP V_h W_o,h^T``; with ``W_o,h = Q_h R_h`` (QR, cached per weight) its norm is
  ``||dP F||``, ``F = V_h R_h^T``. For k the query heads of the group are stacked:
  ``||sum_i dP_i V_g W_o,h_i^T|| = ||[dP_1 .. dP_n] F||`` with F built from the group's R. V is centred
  first (dP sums to zero over keys), which removes a common component and its rounding error. On CPU,
  when F has more columns than rows (T < d_h), a QR shrinks it to a square factor with the same
  ``F F^T``. Only scored query rows are computed; the perturbed logits of all channels are built at
  once, chunked over rows and channels to stay under ``qk_chunk_mb``.

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

import weakref
from collections.abc import Iterable

import torch

from .. import native
from ..data import Batch
from ..errors import UserError
from ..hooks import deactivated, hooks
from ..models import ModelAdapter, model_device

KINDS = ("q", "k", "v", "o", "ffn")
MODES = ("exact", "original")
QK_KERNELS = ("auto", "native", "torch")
QR_MIN_RATIO = 1.25  # on CPU, q/k output factors are QR-shrunk when they have this many times more columns than rows
# the same for the native kernel, whose product with a factor runs near the core's peak, so that a QR
# (LAPACK, about as slow as the products it saves at 1.25-2x) pays only for much wider factors; on
# SmolLM2's factors (about 1.6x wider than tall) QRs made detection slower (docs/benchmarks.md)
NATIVE_QR_MIN_RATIO = 3.0
CPU_CHUNK_MB = 16  # on CPU, perturbed-logit chunks that stay in cache are much faster than large ones


class _Stop(Exception):
    """Raised by the last hook that is needed: the rest of the forward pass (lm_head) is skipped."""


# --------------------------------------------------------------------------------------- helpers
def _norm_eps(norm: torch.nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        v = getattr(norm, name, None)
        if v is not None:
            return float(v)
    raise NotImplementedError(f"q/k norm {type(norm).__name__} has no eps; only RMS norms are supported")


def _tri(w: torch.Tensor) -> torch.Tensor:
    """R of the QR decomposition of w (..., D, c): ||w u|| = ||R u||."""
    return torch.linalg.qr(w, mode="r").R


_WCACHE: dict = {}


def _derived(weight: torch.Tensor, name: str, dt: torch.dtype, fn):
    """fn(weight as dt), cached while the weight tensor lives and is not modified in place."""
    key = (id(weight), weight.data_ptr(), weight.device, name, dt)
    hit = _WCACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    val = fn(weight.detach().to(dt))
    # the entry goes when the weight does (no factors of a freed model are kept)
    _WCACHE[key] = (weakref.ref(weight, lambda _, key=key: _WCACHE.pop(key, None)), weight._version, val)
    return val


def _group_factor(w: torch.Tensor, G: int, gs: int, d: int) -> torch.Tensor:
    """k's output factor of each kv group from W_o (D, H*d): R of the group's columns (QR, (G, m, gs*d),
    m = min(D, gs*d)), laid out as (G, e, (i, r)) = R[g, r, i*d + e]. R is upper trapezoidal (R[r, c] =
    0 for r > c), so head i's columns have no entries in rows r >= (i + 1) * d: the rows of F that
    belong to head i are zero from column (i + 1) * d on (the native kernel's ``sub_cols`` skip)."""
    R = _tri(w.view(-1, G, gs * d).transpose(0, 1))
    m = R.shape[1]
    return R.view(G, m, gs, d).permute(0, 3, 2, 1).reshape(G, d, gs * m).contiguous()


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """x indexed along ``dim`` (size T) by rows (B, n), dim 0 being the batch."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = rows.shape
    size = list(x.shape)
    size[dim] = rows.shape[1]
    return torch.gather(x, dim, rows.reshape(shape).expand(size))


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


def _softcap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else z.div_(cap).tanh_().mul_(cap)


def _reduce(f: torch.Tensor, min_ratio: float | None = None) -> tuple[torch.Tensor, bool]:
    """A contiguous factor with the same F F^T and at most as many columns as rows (F: (..., n, r)), and
    whether it is lower-triangular (then rows [0, m) of it have no entries beyond column m).

    The QR costs about as much as a few chunks' products, so it is only taken when it removes at least
    a fifth of the columns."""
    n, r = f.shape[-2:]
    if r <= (QR_MIN_RATIO if min_ratio is None else min_ratio) * n:
        return f.contiguous(), False
    return torch.linalg.qr(f.transpose(-1, -2), mode="r").R.transpose(-1, -2).contiguous(), True  # (..., n, n)


class _Ctx:
    """What every layer's hooks share: settings, the scored rows (per device) and the results."""

    def __init__(self, adapter, batch, scored, kinds, mode, qk_chunk_mb, dt, check, check_tol, qk_kernel):
        self.adapter, self.kinds, self.mode, self.qk_kernel = adapter, kinds, mode, qk_kernel
        self.dt, self.check, self.check_tol = dt, check, check_tol
        if scored.device.type == "cpu":
            qk_chunk_mb = min(qk_chunk_mb, CPU_CHUNK_MB)
        # about four temporaries of a chunk's size are alive at once
        self.budget = max(1, int(qk_chunk_mb * 2**20 / (4 * torch.finfo(dt).bits // 8)))
        first = _Rows(scored, batch.attention_mask.bool(), mode, dt)
        self.Ts = first.Ts
        self._on = {scored.device: first}
        self.acc: dict[tuple[int, str], torch.Tensor] = {}
        self.last = (adapter.n_layers - 1, "ffn" if "ffn" in kinds else "attn")

    def on(self, device: torch.device) -> _Rows:
        """The scored-row tables on ``device`` (layers of a model spread over GPUs live on several)."""
        if device not in self._on:
            self._on[device] = next(iter(self._on.values())).to(device)
        return self._on[device]

    def add(self, layer: int, kind: str, s: torch.Tensor) -> None:
        self.acc[(layer, kind)] = s.detach().float()

    def maybe_stop(self, layer: int, where: str) -> None:
        if (layer, where) == self.last:
            raise _Stop


class _Rows:
    """Per prompt, the positions of its scored tokens (padded to Ts), weights, masks and rotary tables."""

    def __init__(self, scored, key_ok, mode, dt, copy_from: _Rows | None = None):
        self.mode, self.dt = mode, dt
        self._neg: dict = {}
        self._rope: dict = {}
        self._span: dict = {}
        if copy_from is not None:
            return
        dev = scored.device
        B, T = scored.shape
        n = scored.sum(1)
        self.Ts = int(n.max())
        order = torch.sort((~scored).to(torch.int8), dim=1, stable=True).indices  # scored tokens first
        self.valid = torch.arange(self.Ts, device=dev)[None] < n[:, None]  # (B, Ts)
        # empty slots repeat the prompt's first scored row (weight 0), so that no row is fully masked
        self.rows = torch.where(self.valid, order[:, : self.Ts], order[:, :1])  # (B, Ts)
        per = 1.0 / n.to(dt) if mode == "exact" else torch.ones(B, dtype=dt, device=dev)
        self.w = self.valid.to(dt) * per[:, None]  # (B, Ts): mean (exact) or sum (original)
        self.w_tok = scored.to(dt) * per[:, None]  # (B, T)
        # Key order of the q/k computations. exact: each prompt's own tokens first (padding last), so the
        # scored rows of one slot see about the same prefix of keys in every prompt of a batch, however it
        # is padded; keys past a slot's last visible one get dP = 0 exactly and are skipped. original:
        # positions as they are (its rotary tables depend on them).
        if mode == "exact":
            self.kperm = torch.sort((~key_ok).to(torch.int8), dim=1, stable=True).indices  # (B, T)
            self.key_pos = self.kperm  # original position of each key
            self.key_ok = torch.gather(key_ok, 1, self.kperm)
            last = torch.gather(key_ok.long().cumsum(1), 1, self.rows) - 1  # (B, Ts): last key a row sees
        else:
            self.kperm = None
            self.key_pos = torch.arange(T, device=dev).expand(B, T)
            self.key_ok = key_ok
            last = self.rows
        self.last_key = last.max(0).values.tolist()  # per row slot, over the batch
        self.key_mean = self.key_ok.to(dt) / self.key_ok.sum(1, keepdim=True).to(dt)  # (B, T)

    def to(self, device) -> _Rows:
        r = _Rows(None, None, self.mode, self.dt, copy_from=self)
        r.Ts, r.last_key = self.Ts, self.last_key
        for name in ("valid", "rows", "w", "w_tok", "key_ok", "key_mean", "key_pos"):
            setattr(r, name, getattr(self, name).to(device))
        r.kperm = None if self.kperm is None else self.kperm.to(device)
        return r

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Per-key tensor (B, T, ...) in the q/k key order."""
        return x if self.kperm is None else _gather_rows(x, self.kperm, 1)

    def neg(self, window: int | None) -> torch.Tensor:
        """(B, Ts, T) additive mask of the scored rows: 0 where key s is visible, -inf elsewhere."""
        if window not in self._neg:
            s = self.key_pos[:, None, :]  # (B, 1, T)
            t = self.rows[:, :, None]
            ok = (s <= t) & self.key_ok[:, None, :]
            if window is not None:
                ok &= (t - s) < window
            self._neg[window] = torch.zeros(ok.shape, dtype=self.dt, device=ok.device).masked_fill_(~ok, float("-inf"))
        return self._neg[window]

    def span(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per scored row (B, Ts) the visible keys as one range [lo, hi) in key order (int64; lo = hi for
        an empty slot), or None when some row's visible keys are not contiguous."""
        if window not in self._span:
            ok = self.neg(window) == 0  # (B, Ts, T)
            T = ok.shape[-1]
            ar = torch.arange(T, device=ok.device)
            lo = torch.where(ok, ar, T).min(-1).values
            hi = torch.where(ok, ar + 1, 0).max(-1).values
            n = ok.sum(-1)
            if bool(((hi - lo).clamp(min=0) != n).any()):
                self._span[window] = None
            else:
                hi = torch.where(self.valid & (n > 0), hi, lo)
                self._span[window] = (lo.cpu().contiguous(), hi.cpu().contiguous())
        return self._span[window]

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        """Rotary tables in the compute dtype, with rotate_half(x) * sin = roll(x) * (sign * sin).

        Keys (B, T, d): ``cos``, ``ssin`` (sign * sin), and the key-perturbation coefficients ``kc``
        (of query channel j) and ``kp`` (of its rotary partner). Scored rows (B, Ts, d), scaled by the
        attention scaling: ``qcos``, ``qsin`` and the query-perturbation coefficients ``qc``, ``qp``.
        """
        key = (cos.data_ptr(), sin.data_ptr(), tuple(cos.shape), scale)
        if key not in self._rope:
            B, T = self.key_ok.shape
            d = cos.shape[-1]
            c = cos.to(self.dt).expand(B, T, d)
            s = sin.to(self.dt).expand(B, T, d)
            if self.mode == "original" and cos.shape[0] == 1:
                # METHOD 3's D_hj uses single post-rotary channels, which depend on absolute positions:
                # rotate as the released code did, one unpadded prompt at a time (positions from 0)
                pos = (self.key_ok.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
                c, s = _gather_rows(c, pos, 1), _gather_rows(s, pos, 1)
            sign = torch.ones(d, dtype=self.dt, device=c.device)
            sign[: d // 2] = -1.0
            ssin = s * sign
            # zeroing pre-rotary channel j changes the rotated head by -x_j (cos_j e_j - sign_j sin_p(j) e_p(j))
            t = {"cos": c.contiguous(), "ssin": ssin, "kc": -c, "kp": sign * s.roll(d // 2, -1)}
            cr, sr = _gather_rows(c, self.rows, 1), _gather_rows(ssin, self.rows, 1)
            t.update(qcos=cr * scale, qsin=sr * scale, qc=cr * -scale, qp=_gather_rows(t["kp"], self.rows, 1) * scale)
            for name in ("cos", "ssin", "kc", "kp"):
                t[name] = self.keys(t[name]).contiguous()
            self._rope[key] = t
        return self._rope[key]


def qk_kernel_used(qk_kernel: str, device: torch.device | str) -> str:
    """What computes exact q/k on ``device`` for the setting ``qk_kernel``: ``native`` or ``torch``."""
    if qk_kernel == "torch" or torch.device(device).type != "cpu":
        return "torch"
    return "native" if native.load() is not None else "torch"


# ------------------------------------------------------------------------------------ per layer
class _Layer:
    """One decoder layer's hooks: capture its attention inputs and turn them into scores."""

    def __init__(self, ctx: _Ctx, layer: int):
        self.ctx, self.layer = ctx, layer
        self.m = ctx.adapter.modules(layer)
        self.cap: dict[str, torch.Tensor] = {}

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
        cn = _derived(self.m.down.weight, "colnorm", ctx.dt, lambda w: w.norm(dim=0))  # (d_ff,)
        h = args[0].detach().to(ctx.dt).abs()
        ctx.add(self.layer, "ffn", torch.bmm(ctx.on(h.device).w_tok[:, None], h)[:, 0] * cn)
        ctx.maybe_stop(self.layer, "ffn")

    def _up_fwd(self, mod, args, out):
        ctx = self.ctx
        ctx.add(self.layer, "ffn", torch.bmm(ctx.on(out.device).w_tok[:, None], out.detach().to(ctx.dt).abs())[:, 0])
        ctx.maybe_stop(self.layer, "ffn")

    # attention kinds ------------------------------------------------------------------------------
    def attn_scores(self, a_native: torch.Tensor) -> None:
        ctx, ad, layer = self.ctx, self.ctx.adapter, self.layer
        dt, kinds = ctx.dt, ctx.kinds
        B, T, _ = a_native.shape
        H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
        gs = H // G
        a = a_native.to(dt)  # (B, T, H*d)
        rw = ctx.on(a.device)
        Wo = self.m.o.weight
        if kinds & {"v", "o"}:
            s = torch.bmm(rw.w_tok[:, None], a.abs())[:, 0]  # (B, H*d): sum_t w_t |a_tr|
            if ctx.mode == "exact":
                if "o" in kinds:
                    ctx.add(layer, "o", s * _derived(Wo, "colnorm", dt, lambda w: w.norm(dim=0)))
                if "v" in kinds:
                    # R (G, d, gs, gs): triangular factor of the W_o columns (h*d + j, h in group g)
                    R = _derived(Wo, "v", dt, lambda w: _tri(w.view(-1, G, gs, d).permute(1, 3, 0, 2)))
                    y = torch.einsum("gjki,btgij->btgjk", R, a.view(B, T, G, gs, d))  # (B, T, G, d, gs)
                    v = torch.bmm(rw.w_tok[:, None], torch.linalg.vector_norm(y, dim=-1).view(B, T, G * d))
                    ctx.add(layer, "v", v[:, 0])
            else:
                if "o" in kinds:
                    ctx.add(layer, "o", s)
                if "v" in kinds:
                    ctx.add(layer, "v", s.view(B, G, gs, d).mean(2).reshape(B, G * d))
        if kinds & {"q", "k"}:
            self.qk_scores(a)

    def qk_scores(self, a: torch.Tensor) -> None:
        ctx, ad, layer, cap = self.ctx, self.ctx.adapter, self.layer, self.cap
        rw = ctx.on(a.device)
        dt, rows = ctx.dt, rw.rows
        B, T, _ = a.shape
        H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
        gs, Ts, half = H // G, ctx.Ts, d // 2
        scale = ad.scaling(layer)
        softcap = ad.softcap(layer)
        rt = rw.rope(cap["cos"], cap["sin"], scale)

        def normed(x_pre, norm):
            """Head vectors after the q/k norm, and rho_j = rms(x) / rms(x with channel j zeroed)."""
            if norm is None:
                return x_pre.to(dt), None
            y = norm(x_pre).to(dt)
            x = x_pre.to(dt)
            sq = x * x
            ms = sq.mean(-1, keepdim=True)
            eps = _norm_eps(norm)
            return y, torch.sqrt((ms + eps) / ((ms - sq / d).clamp(min=0) + eps))

        # queries at the scored rows only (pre-scaled), keys at all positions; head h = g*gs + i
        yq, rho_q = normed(_gather_rows(cap["q"].view(B, T, H, d), rows, 1), self.m.q_norm)  # (B, Ts, H, d)
        yk, rho_k = normed(rw.keys(cap["k"].view(B, T, G, d)), self.m.k_norm)  # (B, T, G, d), key order
        Qs = torch.addcmul(yq * rt["qcos"][:, :, None], yq.roll(half, -1), rt["qsin"][:, :, None])
        K = torch.addcmul(yk * rt["cos"][:, :, None], yk.roll(half, -1), rt["ssin"][:, :, None])
        Qg = Qs.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
        KT = K.permute(0, 2, 3, 1).contiguous()  # (B, G, d, T)
        neg = rw.neg(ad.sliding_window(layer))  # (B, Ts, T)
        negb = neg[:, None, None]  # (B, 1, 1, Ts, T)
        S = torch.matmul(Qg, KT[:, :, None])  # (B, G, gs, Ts, T): scaled logits
        if ctx.mode == "original":
            self._original_qk(Qg, KT, S.add_(negb), scale, B, H, G, d, gs)
            return
        span = self._native_span(a, rw, ad.sliding_window(layer))
        if softcap is None:
            S.add_(negb)  # masked once here: perturbed logits stay -inf where masked
        if span is None or ctx.check:  # the native kernel computes the unperturbed softmax itself
            if softcap is None:
                P = torch.softmax(S, dim=-1)
            else:
                P = torch.softmax(torch.tanh(S / softcap).mul_(softcap).add_(negb), dim=-1)
        V = rw.keys(cap["v"].view(B, T, G, d)).to(dt)
        if ctx.check:
            got = _gather_rows(a.view(B, T, G, gs, d), rows, 1).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
            err = ((torch.matmul(P, V.transpose(1, 2)[:, :, None]) - got).abs()
                   * rw.valid[:, None, None, :, None]).max()
            tol = ctx.check_tol * got.abs().max().clamp(min=1e-30)
            if not bool(err <= tol):
                raise RuntimeError(f"layer {layer}: recomputed attention output differs from the o_proj input "
                                   f"by {float(err):.3g} (tolerance {float(tol):.3g})")
        # dP sums to zero over keys: centering V removes a common component and its rounding error
        Vc = V - torch.einsum("bt,btgd->bgd", rw.key_mean, V)[:, None]  # (B, T, G, d)
        # keys past the last one a scored row sees (the template's closing tokens, padding) get dP = 0 in
        # every row: the output factors (and their QR) leave them out
        Vc = Vc[:, : max(rw.last_key) + 1]
        VcT = Vc.permute(0, 2, 1, 3)  # (B, G, T, d)
        Wo = self.m.o.weight
        # only F F^T matters: on CPU a QR shrinks F to at most T (k: gs*T) columns, which pays for itself
        # in the torch path and, for much wider factors, in the native kernel; on CUDA batched small QRs
        # cost more than they save
        if span is not None:
            reduce = lambda f: _reduce(f, NATIVE_QR_MIN_RATIO)  # noqa: E731
            # the logits with slack after each row of keys (the kernel reads whole vectors), for q and k
            Tk = T + native.KEY_SLACK
            S_pad = native.pad_keys(S)
        elif a.device.type == "cpu":
            reduce = _reduce
        else:
            reduce = lambda f: (f.contiguous(), False)  # noqa: E731

        def key_end(r0, r1):
            """Keys [0, hi) are all that rows r0:r1 can see (causal mask): the rest have dP = 0 exactly."""
            return max(rw.last_key[r0:r1]) + 1

        if "q" in ctx.kinds:
            # ||dP V_h W_o,h^T|| = ||dP V_h R_h^T|| with W_o,h = Q_h R_h
            RqT = _derived(Wo, "q", dt, lambda w: _tri(w.view(-1, G, gs, d).permute(1, 2, 0, 3))
                           .transpose(-1, -2).contiguous())  # (G, gs, d, d)
            Fq, tri = reduce(torch.matmul(VcT[:, :, None], RqT))  # (B, G, gs, T, r)
            yqg = yq.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4)  # (B, G, gs, Ts, d)
            A = yqg * rt["qc"][:, None, None]  # coefficient of K[:, j]
            Bc = yqg * rt["qp"][:, None, None]  # coefficient of K[:, p(j)]
            rq = rho_q.view(B, Ts, G, gs, d).permute(0, 2, 3, 1, 4) if rho_q is not None else None
            KTp = KT.roll(half, 2)
            out = torch.empty(B, G, gs, Ts, d, dtype=dt, device=a.device)
            if span is not None:
                # item = (b, g, i, t): one scored row of one query head, channels j of that head
                it = torch.arange(B * G * gs * Ts)
                lo, hi = (x[:, None, None].expand(B, G, gs, Ts).reshape(-1).contiguous() for x in span)
                F = native.pad_columns(Fq)
                native.perturbed_norms(
                    n_sub=1, r=Fq.shape[-1], tri=tri, cap=softcap, S=S_pad, S_off=it * Tk, S_si=0,
                    A=A.contiguous(), Bc=Bc.contiguous(), A_off=it * d, A_sj=1, A_si=0,
                    X=native.pad_keys(KT), Y=native.pad_keys(KTp), X_off=it // (gs * Ts) * (d * Tk), X_sj=Tk,
                    R=None if rq is None else rq.contiguous(), R_off=it * d, R_sj=1, R_ss=0,
                    F=F, F_off=it // Ts * (F.shape[-2] * F.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)
            for r0, r1, c0, c1 in _chunks(Ts, d, B * H * T, ctx.budget) if span is None else ():
                hi = key_end(r0, r1)
                z = torch.addcmul(S[:, :, :, r0:r1, None, :hi], A[:, :, :, r0:r1, c0:c1, None],
                                  KT[:, :, None, None, c0:c1, :hi])  # (B, G, gs, rows, ch, hi)
                z.addcmul_(Bc[:, :, :, r0:r1, c0:c1, None], KTp[:, :, None, None, c0:c1, :hi])
                if rq is not None:
                    z.mul_(rq[:, :, :, r0:r1, c0:c1, None])
                if softcap is not None:
                    _softcap_(z, softcap).add_(negb[:, :, :, r0:r1, None, :hi])
                p = torch.softmax(z, dim=-1)
                del z
                p.sub_(P[:, :, :, r0:r1, None, :hi])
                u = torch.matmul(p.view(B, G, gs, -1, hi), Fq[..., :hi, :hi] if tri else Fq[..., :hi, :])
                out[:, :, :, r0:r1, c0:c1] = torch.linalg.vector_norm(u, dim=-1).view(B, G, gs, r1 - r0, c1 - c0)
            ctx.add(layer, "q", torch.einsum("bi,bghij->bghj", rw.w, out).reshape(B, H * d))

        if "k" in ctx.kinds:
            # ||sum_i dP_i V_g W_o,h_i^T|| = ||[dP_1 .. dP_gs] F||, F stacked from V_g and the group's R
            # the group's R (G, m, gs*d), columns (head i, channel e) -> (G, e, (i, r)): Vc_g @ it is F in
            # (key, head) rows. R has m = min(hidden, gs*d) rows: a multi-query group wider than the
            # hidden size (Gemma-3-270m: 4 heads x 256 > 640) has fewer rows than columns
            Rb = _derived(Wo, "k", dt, lambda w: _group_factor(w, G, gs, d))  # (G, d, gs*m)
            # rows in (key, head) order, so that the keys [0, hi) are a prefix (and a triangle after a QR)
            Fk, tri = reduce(torch.matmul(VcT, Rb).view(B, G, -1, Rb.shape[-1] // gs))  # (B, G, T*gs, r)
            ykT = yk.permute(0, 2, 3, 1)  # (B, G, d, T)
            C1 = ykT * rt["kc"].transpose(1, 2)[:, None]  # coefficient of the scaled Q[:, j]
            C2 = ykT * rt["kp"].transpose(1, 2)[:, None]  # of Q[:, p(j)]
            rk = rho_k.permute(0, 2, 3, 1) if rho_k is not None else None  # (B, G, d, T)
            Qk = Qg.permute(0, 1, 3, 4, 2)  # (B, G, Ts, d, gs)
            Qkp = Qk.roll(half, 3)
            Sk = S.transpose(2, 3)  # (B, G, Ts, gs, T)
            negk = neg[:, None, :, None, None]  # (B, 1, Ts, 1, 1, T)
            out = torch.empty(B, G, Ts, d, dtype=dt, device=a.device)
            if span is not None:
                # item = (b, g, t): one scored row of one kv group; its gs query heads are the sub-rows
                it = torch.arange(B * G * Ts)
                bg = it // Ts
                lo, hi = (x[:, None].expand(B, G, Ts).reshape(-1).contiguous() for x in span)
                F = native.pad_columns(Fk)
                native.perturbed_norms(
                    n_sub=gs, r=Fk.shape[-1], tri=tri, cap=softcap, S=S_pad,
                    # head i's rows of the unreduced factor end at column (i + 1) * d_h (R is triangular)
                    sub_cols=d if d % native.TILE[dt] == 0 else 0,
                    S_off=bg * (gs * Ts * Tk) + it % Ts * Tk, S_si=Ts * Tk,
                    A=Qk.contiguous(), Bc=Qkp.contiguous(), A_off=it * (d * gs), A_sj=gs, A_si=1,
                    X=native.pad_keys(C1), Y=native.pad_keys(C2), X_off=bg * (d * Tk), X_sj=Tk,
                    R=None if rk is None else native.pad_keys(rk), R_off=bg * (d * Tk), R_sj=Tk, R_ss=1,
                    F=F, F_off=bg * (F.shape[-2] * F.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)
            else:
                Pk = P.transpose(2, 3)
            for r0, r1, c0, c1 in _chunks(Ts, d, B * H * T, ctx.budget) if span is None else ():
                hi = key_end(r0, r1)
                z = torch.addcmul(Sk[:, :, r0:r1, None, :, :hi], Qk[:, :, r0:r1, c0:c1, :, None],
                                  C1[:, :, None, c0:c1, None, :hi])  # (B, G, rows, ch, gs, hi)
                z.addcmul_(Qkp[:, :, r0:r1, c0:c1, :, None], C2[:, :, None, c0:c1, None, :hi])
                if rk is not None:
                    z.mul_(rk[:, :, None, c0:c1, None, :hi])
                if softcap is not None:
                    _softcap_(z, softcap).add_(negk[:, :, r0:r1, ..., :hi])
                p = torch.softmax(z, dim=-1)
                del z
                p.sub_(Pk[:, :, r0:r1, None, :, :hi])
                # F's rows of keys [0, hi), reordered to p's (head, key) order
                f = Fk[:, :, : hi * gs, : hi * gs] if tri else Fk[:, :, : hi * gs]
                f = f.unflatten(2, (hi, gs)).transpose(2, 3).reshape(B, G, gs * hi, -1)
                u = torch.matmul(p.view(B, G, -1, gs * hi), f)  # (B, G, rows*ch, r)
                out[:, :, r0:r1, c0:c1] = torch.linalg.vector_norm(u, dim=-1).view(B, G, r1 - r0, c1 - c0)
            ctx.add(layer, "k", torch.einsum("bi,bgij->bgj", rw.w, out).reshape(B, G * d))

    def _native_span(self, a: torch.Tensor, rw: _Rows, window: int | None):
        """The rows' visible-key ranges when the native kernel computes this layer's q/k, else None."""
        ctx = self.ctx
        if ctx.qk_kernel == "torch" or a.device.type != "cpu":
            return None
        if native.load() is None:
            if ctx.qk_kernel == "native":
                raise UserError(f"detect.qk_kernel=native, but the native q/k kernel is unavailable: "
                                f"{native.why_not()}; use detect.qk_kernel=auto or torch")
            return None
        span = rw.span(window)
        if span is None and ctx.qk_kernel == "native":
            raise UserError("detect.qk_kernel=native needs every row's visible keys to be one range; "
                            "use detect.qk_kernel=auto or torch")
        return span

    def _original_qk(self, Qg, KT, A, scale, B, H, G, d, gs) -> None:
        """METHOD 3: sum over scored rows i and keys of (softmax(A - D_hj) - softmax(A))^2."""
        ctx, layer = self.ctx, self.layer
        T, Ts = KT.shape[-1], ctx.Ts
        P = torch.softmax(A, dim=-1)  # (B, G, gs, Ts, T)
        out = torch.empty(B, G, gs, Ts, d, dtype=ctx.dt, device=A.device)
        for r0, r1, c0, c1 in _chunks(Ts, d, B * H * T, ctx.budget):
            # D_hj = Q_tj K_sj, unscaled (Qg holds scaled queries)
            z = torch.addcmul(A[:, :, :, r0:r1, None], Qg[:, :, :, r0:r1, c0:c1, None],
                              KT[:, :, None, None, c0:c1], value=-1.0 / scale)
            p = torch.softmax(z, dim=-1)
            del z
            out[:, :, :, r0:r1, c0:c1] = p.sub_(P[:, :, :, r0:r1, None]).square_().sum(-1)
        s = torch.einsum("bi,bghij->bghj", ctx.on(A.device).w, out)  # (B, G, gs, d)
        if "q" in ctx.kinds:
            ctx.add(layer, "q", s.reshape(B, H * d))
        if "k" in ctx.kinds:
            ctx.add(layer, "k", s.mean(2).reshape(B, G * d))


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
    ctx = _Ctx(adapter, batch, scored, set(kinds), mode, qk_chunk_mb, dt, check, check_tol, qk_kernel)
    specs = []
    for layer in range(adapter.n_layers):
        specs += _Layer(ctx, layer).specs(ctx.kinds)
    try:
        with hooks(specs):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
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

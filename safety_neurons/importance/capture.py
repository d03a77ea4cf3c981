"""What a scorer's hooks capture and share: the scored rows of a batch and the hooks of each layer.

:class:`Ctx` holds the settings, the scored-row tables (:class:`Rows`, one copy per device) and the
results; :class:`Layer` registers one decoder layer's hooks, which keep the attention inputs until
``o_proj`` runs, hand them to the scorer's functions and stop the forward pass after the last module that
is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CPU_CHUNK_MB = 16  # on CPU, perturbed-logit chunks that stay in cache are much faster than large ones


class Stop(Exception):
    """Raised by the last hook that is needed: the rest of the forward pass (lm_head) is skipped."""


def gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """x indexed along ``dim`` (size T) by rows (B, n), dim 0 being the batch."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = rows.shape
    size = list(x.shape)
    size[dim] = rows.shape[1]
    return torch.gather(x, dim, rows.reshape(shape).expand(size))


def chunks(n_rows: int, n_ch: int, per_cell: int, budget: int):
    """(r0, r1, c0, c1) blocks of rows x channels with rows*channels*per_cell <= budget (at least 1x1)."""
    cells = max(1, budget // max(1, per_cell))
    if cells >= n_ch:
        rstep, cstep = max(1, min(n_rows, cells // n_ch)), n_ch
    else:
        rstep, cstep = 1, cells
    for r0 in range(0, n_rows, rstep):
        for c0 in range(0, n_ch, cstep):
            yield r0, min(n_rows, r0 + rstep), c0, min(n_ch, c0 + cstep)


class Ctx:
    """What every layer's hooks share: settings, the scored rows (per device) and the results."""

    def __init__(self, adapter, batch, scored, kinds, mode, qk_chunk_mb, dt, check, check_tol, qk_kernel):
        self.adapter, self.kinds, self.mode, self.qk_kernel = adapter, kinds, mode, qk_kernel
        self.dt, self.check, self.check_tol = dt, check, check_tol
        if scored.device.type == "cpu":
            qk_chunk_mb = min(qk_chunk_mb, CPU_CHUNK_MB)
        # about four temporaries of a chunk's size are alive at once
        self.budget = max(1, int(qk_chunk_mb * 2**20 / (4 * torch.finfo(dt).bits // 8)))
        first = Rows(scored, batch.attention_mask.bool(), mode, dt)
        self.Ts = first.Ts
        self._on = {scored.device: first}
        self.acc: dict[tuple[int, str], torch.Tensor] = {}
        self.last = (adapter.n_layers - 1, "ffn" if "ffn" in kinds else "attn")

    def on(self, device: torch.device) -> Rows:
        """The scored-row tables on ``device`` (layers of a model spread over GPUs live on several)."""
        if device not in self._on:
            self._on[device] = next(iter(self._on.values())).to(device)
        return self._on[device]

    def add(self, layer: int, kind: str, s: torch.Tensor) -> None:
        self.acc[(layer, kind)] = s.detach().float()

    def maybe_stop(self, layer: int, where: str) -> None:
        if (layer, where) == self.last:
            raise Stop


class Rows:
    """Per prompt, the positions of its scored tokens (padded to Ts), weights, masks and rotary tables."""

    def __init__(self, scored, key_ok, mode, dt, copy_from: Rows | None = None):
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

    def to(self, device) -> Rows:
        r = Rows(None, None, self.mode, self.dt, copy_from=self)
        r.Ts, r.last_key = self.Ts, self.last_key
        for name in ("valid", "rows", "w", "w_tok", "key_ok", "key_mean", "key_pos"):
            setattr(r, name, getattr(self, name).to(device))
        r.kperm = None if self.kperm is None else self.kperm.to(device)
        return r

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Per-key tensor (B, T, ...) in the q/k key order."""
        return x if self.kperm is None else gather_rows(x, self.kperm, 1)

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
                c, s = gather_rows(c, pos, 1), gather_rows(s, pos, 1)
            sign = torch.ones(d, dtype=self.dt, device=c.device)
            sign[: d // 2] = -1.0
            ssin = s * sign
            # zeroing pre-rotary channel j changes the rotated head by -x_j (cos_j e_j - sign_j sin_p(j) e_p(j))
            t = {"cos": c.contiguous(), "ssin": ssin, "kc": -c, "kp": sign * s.roll(d // 2, -1)}
            cr, sr = gather_rows(c, self.rows, 1), gather_rows(ssin, self.rows, 1)
            t.update(qcos=cr * scale, qsin=sr * scale, qc=cr * -scale, qp=gather_rows(t["kp"], self.rows, 1) * scale)
            for name in ("cos", "ssin", "kc", "kp"):
                t[name] = self.keys(t[name]).contiguous()
            self._rope[key] = t
        return self._rope[key]


class Layer:
    """One decoder layer's hooks. ``attention(ctx, layer, modules, cap, a)`` gets the ``o_proj`` input
    ``a`` and, when q or k is scored, ``cap``: the q/k/v projection outputs and the rotary tables.
    ``ffn(ctx, layer, modules, h)`` gets ``down_proj``'s input (mode exact) or ``up_proj``'s output
    (mode original)."""

    def __init__(self, ctx: Ctx, layer: int, attention: Callable, ffn: Callable):
        self.ctx, self.layer = ctx, layer
        self.m = ctx.adapter.modules(layer)
        self.cap: dict[str, torch.Tensor] = {}
        self.attention, self.ffn = attention, ffn

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
                out.append((m.down, "pre", lambda mod, args: self._ffn(args[0])))
            else:
                out.append((m.up, "fwd", lambda mod, args, out: self._ffn(out)))
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
            self.attention(self.ctx, self.layer, self.m, self.cap, args[0].detach())
        finally:
            self.cap.clear()
        self.ctx.maybe_stop(self.layer, "attn")

    def _ffn(self, h):
        self.ffn(self.ctx, self.layer, self.m, h.detach())
        self.ctx.maybe_stop(self.layer, "ffn")

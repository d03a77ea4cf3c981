"""Factors derived from a layer's weights for the closed forms, cached per weight tensor.

``||W u|| = ||R u||`` with ``R`` the triangular factor of ``W``'s QR decomposition, so the norms of output
changes are taken against a small square factor instead of the full output projection.
"""

from __future__ import annotations

import weakref

import torch

_WCACHE: dict = {}


def norm_eps(norm: torch.nn.Module) -> float:
    """The epsilon of a q/k RMS norm module."""
    for name in ("eps", "variance_epsilon"):
        v = getattr(norm, name, None)
        if v is not None:
            return float(v)
    raise NotImplementedError(f"q/k norm {type(norm).__name__} has no eps; only RMS norms are supported")


def tri(w: torch.Tensor) -> torch.Tensor:
    """R of the QR decomposition of w (..., D, c): ||w u|| = ||R u||."""
    return torch.linalg.qr(w, mode="r").R


def derived(weight: torch.Tensor, name: str, dt: torch.dtype, fn):
    """fn(weight as dt), cached while the weight tensor lives and is not modified in place."""
    key = (id(weight), weight.data_ptr(), weight.device, name, dt)
    hit = _WCACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    val = fn(weight.detach().to(dt))
    # the entry goes when the weight does (no factors of a freed model are kept)
    _WCACHE[key] = (weakref.ref(weight, lambda _, key=key: _WCACHE.pop(key, None)), weight._version, val)
    return val


def colnorm(weight: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The norm of each column of ``weight`` (cached)."""
    return derived(weight, "colnorm", dt, lambda w: w.norm(dim=0))


def v_factor(wo: torch.Tensor, G: int, gs: int, d: int, dt: torch.dtype) -> torch.Tensor:
    """v's output factor from W_o (D, H*d): (G, d, gs, gs), the triangular factor of the W_o columns
    (h*d + j, h in group g) of each kv channel (g, j)."""
    return derived(wo, "v", dt, lambda w: tri(w.view(-1, G, gs, d).permute(1, 3, 0, 2)))


def q_factor(wo: torch.Tensor, G: int, gs: int, d: int, dt: torch.dtype) -> torch.Tensor:
    """q's output factor from W_o: R_h^T of each query head's columns W_o,h = Q_h R_h, (G, gs, d, d)."""
    return derived(wo, "q", dt, lambda w: tri(w.view(-1, G, gs, d).permute(1, 2, 0, 3)).transpose(-1, -2).contiguous())


def group_factor(w: torch.Tensor, G: int, gs: int, d: int) -> torch.Tensor:
    """k's output factor of each kv group from W_o (D, H*d): R of the group's columns (QR, (G, m, gs*d),
    m = min(D, gs*d)), laid out as (G, e, (i, r)) = R[g, r, i*d + e]. R is upper trapezoidal (R[r, c] =
    0 for r > c), so head i's columns have no entries in rows r >= (i + 1) * d: the rows of F that
    belong to head i are zero from column (i + 1) * d on (the native kernel's ``sub_cols`` skip)."""
    R = tri(w.view(-1, G, gs * d).transpose(0, 1))
    m = R.shape[1]
    return R.view(G, m, gs, d).permute(0, 3, 2, 1).reshape(G, d, gs * m).contiguous()


def k_factor(wo: torch.Tensor, G: int, gs: int, d: int, dt: torch.dtype) -> torch.Tensor:
    """:func:`group_factor` of W_o (cached), (G, d, gs*m)."""
    return derived(wo, "k", dt, lambda w: group_factor(w, G, gs, d))

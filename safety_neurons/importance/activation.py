"""Activation difference against a reference model (METHOD 8; Chen et al. 2024, "Finding Safety Neurons").

``activation_diff``: ``s(n) = | mean_t h_tn(M) - mean_t h_tn(R) |`` over each prompt's scored tokens,
with R a model of the same architecture (the base model before alignment) run on the same batch.
``activation_diff_rel`` divides by ``mean_t |h_tn(R)| + eps``. Two forward passes, no gradients.

``contribution_diff`` compares what the neuron writes, token by token: for kinds whose slice includes
output columns (ffn: column k of ``down_proj``; o: column r of ``o_proj``) the contribution at token t
is ``c_tn = h_tn * W[:, n]``; q, k and v write their value, ``c_tn = h_tn``. ``s(n) = mean_t
|| c_tn(M) - c_tn(R) ||_2`` (``_rel``: over ``(mean_t |h_tn(R)| + eps) * ||W_R[:, n]||``, the
reference's mean contribution norm; 1 for q, k, v). Why: an o neuron's site (channel r of ``o_proj``'s
input) lies upstream of its own weights, so a change of those weights (a fine-tune of that column, or a
planted one) never shows at the site; the contribution sees it. Why per token: a changed weight row
moves the activation up on some tokens and down on others, which a difference of means averages away.
Still two forward passes; the column norms and dot products are per neuron.
"""

from __future__ import annotations

import torch

from ..data import Batch
from ..errors import UserError
from ..hooks import hooks
from ..models import ModelAdapter, model_device
from .sites import compute_dtype, site_specs, stack_scores, token_weights

EPS = 1e-6  # keeps the relative form finite where the reference's channel is silent


@torch.no_grad()
def site_means(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, kinds: tuple[str, ...],
               with_abs: bool = True) -> tuple[dict, dict]:
    """Per prompt, the mean over scored tokens of ``h_tn`` and (``with_abs``) of ``|h_tn|``: two dicts of
    (B, width), the second empty without ``with_abs`` (only the relative form's reference needs it)."""
    dev = model_device(model)
    dt = compute_dtype(model)
    on = scored.to(dev).bool()
    w = token_weights(on, dt)  # (B, T)
    mean: dict = {}
    mean_abs: dict = {}

    def grab(layer: int, kind: str, h: torch.Tensor) -> None:
        h = torch.where(on[..., None], h.to(dt), 0.0)  # padding rows may hold NaN: select, never multiply
        mean[(layer, kind)] = torch.einsum("bt,btn->bn", w, h)
        if with_abs:
            mean_abs[(layer, kind)] = torch.einsum("bt,btn->bn", w, h.abs())

    b = batch.to(dev)
    with hooks(site_specs(adapter, kinds, grab)):
        # the hooks take what is scored; logits at one position only (not a vocabulary row per token)
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
    return mean, mean_abs


def check_reference(adapter: ModelAdapter, ref_adapter: ModelAdapter) -> None:
    a, r = adapter.signature(), ref_adapter.signature()
    if a != r:
        diff = {k: (a[k], r.get(k)) for k in a if a[k] != r.get(k)}
        raise UserError(f"detect.reference_model has another architecture than the scored model ({diff}); "
                        f"give the base model this one was made from")


def written_columns(adapter: ModelAdapter, layer: int, kind: str) -> list[torch.Tensor]:
    """The output columns in the neuron's slice (``(out, width)`` weights; empty for q, k, v)."""
    return [lin.weight.detach() for lin, dim in adapter.site(layer, kind).slices if dim == 1]


def column_products(adapter: ModelAdapter, ref_adapter: ModelAdapter, layer: int, kind: str) -> dict | None:
    """Per neuron, over its output columns (summed if several) in float64: ``mm = ||w_M||^2``,
    ``rr = ||w_R||^2``, ``dd = ||w_M - w_R||^2`` and ``md = w_M . (w_M - w_R)``; None for a kind without
    output columns."""
    cols = written_columns(adapter, layer, kind)
    if not cols:
        return None
    out = dict.fromkeys(("mm", "rr", "dd", "md"), 0)
    for w, v in zip(cols, written_columns(ref_adapter, layer, kind)):
        w, v = w.double(), v.to(device=w.device, dtype=torch.float64)
        diff = w - v
        out["mm"] = out["mm"] + (w * w).sum(0)
        out["rr"] = out["rr"] + (v * v).sum(0)
        out["dd"] = out["dd"] + (diff * diff).sum(0)
        out["md"] = out["md"] + (w * diff).sum(0)
    return out


def activation_diff(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, kinds: tuple[str, ...],
                    reference, relative: bool = False) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: the activation difference of ``model`` against ``reference``
    ((model, adapter) of the same architecture), absolute or relative."""
    ref_model, ref_adapter = _checked(adapter, reference)
    m, _ = site_means(model, adapter, batch, scored, kinds, with_abs=False)
    r, r_abs = site_means(ref_model, ref_adapter, batch, scored, kinds, with_abs=relative)
    out = {}
    for key in m:
        d = (m[key] - r[key].to(m[key].device)).abs()
        out[key] = d / (r_abs[key].to(d.device) + EPS) if relative else d
    return stack_scores(out, adapter, kinds)


def cached(cache: dict | None, key, make):
    """``cache[key]``, made by ``make()`` the first time (every time without a cache)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _on(p: dict | None, dev) -> dict | None:
    return None if p is None else {k: v.to(dev) for k, v in p.items()}


def _checked(adapter: ModelAdapter, reference):
    if reference is None:
        raise UserError("the activation_diff, contribution_diff and patch_attribution scorers need "
                        "detect.reference_model=NAME_OR_PATH (the base model before alignment, same architecture)")
    check_reference(adapter, reference[1])
    return reference


@torch.no_grad()
def contribution_diff(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, kinds: tuple[str, ...],
                      reference, relative: bool = False, cache: dict | None = None
                      ) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: per prompt, the mean over scored tokens of the change of what each
    neuron writes, ``||c_tn(M) - c_tn(R)||`` (see the module docstring), absolute or relative. The
    reference runs first and its site values are kept for the model's pass (one (B, T, width) tensor
    per site, in the reference's own dtype). ``cache``: where the column products are kept from one batch
    of a prompt set to the next (see ``registry.options``)."""
    ref_model, ref_adapter = _checked(adapter, reference)
    dev = model_device(model)
    dt = torch.float64  # the per-token expansion below subtracts close values
    on = scored.to(dev).bool()
    w = token_weights(on, dt)
    b = batch.to(dev)
    ref_h: dict = {}

    def keep(layer: int, kind: str, h: torch.Tensor) -> None:  # kept as the model made it, used in float64
        ref_h[(layer, kind)] = torch.where(on[..., None], h.to(dev), 0.0)  # padding may hold NaN

    with hooks(site_specs(ref_adapter, kinds, keep)):
        ref_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
    out: dict = {}

    def diff(layer: int, kind: str, h: torch.Tensor) -> None:
        hr = ref_h.pop((layer, kind)).to(dt)
        dh = torch.where(on[..., None], h.to(dt), 0.0) - hr
        p = cached(cache, ("column_products", layer, kind),
                   lambda: _on(column_products(adapter, ref_adapter, layer, kind), dev))
        if p is None:  # q, k, v: what they write is their value
            d, norm = dh.abs(), 1.0
        else:
            # c_M - c_R = dh w_M + hr (w_M - w_R): no cancellation where the two are close, and exactly
            # |dh| ||w_M|| where the columns are equal
            d = (dh * dh * p["mm"] + hr * hr * p["dd"] + 2 * dh * hr * p["md"]).clamp(min=0).sqrt()
            norm = p["rr"].sqrt().clamp(min=EPS)
        d = torch.einsum("bt,btn->bn", w, d)
        out[(layer, kind)] = d / ((torch.einsum("bt,btn->bn", w, hr.abs()) + EPS) * norm) if relative else d

    with hooks(site_specs(adapter, kinds, diff)):
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
    return stack_scores(out, adapter, kinds)

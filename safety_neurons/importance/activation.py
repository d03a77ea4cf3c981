"""Activation difference against a reference model (METHOD 8; Chen et al. 2024, "Finding Safety Neurons").

``activation_diff``: ``s(n) = | mean_t h_tn(M) - mean_t h_tn(R) |`` over each prompt's scored tokens,
with R a model of the same architecture (the base model before alignment) run on the same batch.
``activation_diff_rel`` divides by ``mean_t |h_tn(R)| + eps``. Two forward passes, no gradients.
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


def activation_diff(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, kinds: tuple[str, ...],
                    reference, relative: bool = False) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: the activation difference of ``model`` against ``reference``
    ((model, adapter) of the same architecture), absolute or relative."""
    if reference is None:
        raise UserError("the activation_diff scorers need detect.reference_model=NAME_OR_PATH (the base model "
                        "before alignment, same architecture)")
    ref_model, ref_adapter = reference
    check_reference(adapter, ref_adapter)
    m, _ = site_means(model, adapter, batch, scored, kinds, with_abs=False)
    r, r_abs = site_means(ref_model, ref_adapter, batch, scored, kinds, with_abs=relative)
    out = {}
    for key in m:
        d = (m[key] - r[key].to(m[key].device)).abs()
        out[key] = d / (r_abs[key].to(d.device) + EPS) if relative else d
    return stack_scores(out, adapter, kinds)

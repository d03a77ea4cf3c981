"""Attribution patching against a reference model (METHOD 8; Nanda 2023, Syed et al. 2023).

``patch_attribution``: the first-order estimate of what replacing neuron n's part of the model by the
reference's does to the target answer's negative log-likelihood ``L`` (the gradient scorers' ``L``):
``s(n) = | sum_t (c_tn(R) - c_tn(M)) . dL/d out_t |`` over every position of prompt and answer, where
``c_tn`` is what the neuron writes (as in ``contribution_diff``: for ffn and o, the site value times the
neuron's output column, entering the output ``out`` of ``down_proj`` / ``o_proj``; for q, k and v, the
value itself) and the gradient is the model's own. Written out per kind:

- q, k, v: ``sum_t (h_tn(R) - h_tn(M)) * dL/dh_tn``;
- ffn, o: ``sum_t (h_tn(R) - h_tn(M)) * dL/dh_tn + h_tn(R) * (g_t . (w_R - w_M)[:, n])``, with
  ``g_t = dL/d out_t`` and ``dL/dh_tn = g_t . w_M[:, n]`` (the same sum without the cancellation of
  two close products).

Why: the difference scorers rank neurons by how much they changed, whatever the change does; a model
whose earlier layers changed moves every later neuron a little, and some of those by more than the few
that carry the change that matters. Weighting the change by the gradient of the answer's likelihood
ranks the changes that move that answer. Target: the model's own greedy answer (on harmful prompts of a
refusing model, its refusal). One reference forward pass, one forward and one backward pass.
"""

from __future__ import annotations

import torch

from ..data import Batch
from ..hooks import hooks
from ..models import ModelAdapter, model_device
from .activation import _checked, cached, written_columns
from .gradient import right_padded, target_loss
from .sites import compute_dtype, site_specs, stack_scores


def patch_attribution(model, adapter: ModelAdapter, batch: Batch, kinds: tuple[str, ...], reference,
                      signed: bool = False, cache: dict | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: per prompt, ``|sum_t (c_tn(R) - c_tn(M)) . dL/d out_t|`` (see the
    module docstring); ``signed`` keeps the sign (positive: the reference's part raises L). ``cache``:
    where the column differences are kept from one batch of a prompt set to the next."""
    ref_model, ref_adapter = _checked(adapter, reference)
    dev = model_device(model)
    dt = compute_dtype(model)
    b = right_padded(batch.to(dev))
    real = b.attention_mask.bool()[..., None]  # padding rows may hold NaN (fully masked attention)
    ref_h: dict = {}

    def keep(layer: int, kind: str, h: torch.Tensor) -> None:  # in the model's dtype: held beside the graph
        ref_h[(layer, kind)] = torch.where(real, h.detach().to(dev), 0.0)

    with torch.no_grad(), hooks(site_specs(ref_adapter, kinds, keep)):
        ref_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)

    keys, hs = [], []
    written: dict = {}  # (layer, kind) -> output of the projection holding the neuron's output column

    def grab(layer: int, kind: str, h: torch.Tensor) -> None:
        keys.append((layer, kind))
        hs.append(h)

    specs = site_specs(adapter, kinds, grab)
    for layer in range(adapter.n_layers):
        for kind in kinds:
            if written_columns(adapter, layer, kind):
                st = adapter.site(layer, kind)
                specs.append((st.module, "fwd", lambda _m, _a, out, key=(layer, kind): written.__setitem__(key, out)))
    loss = target_loss(model, b, specs)
    wkeys = list(written)
    grads = torch.autograd.grad(loss, hs + [written[k] for k in wkeys])
    gh = dict(zip(keys, grads[:len(keys)]))
    gout = dict(zip(wkeys, grads[len(keys):]))
    out = {}
    for key, h in zip(keys, hs):
        hr = ref_h.pop(key).to(dt)
        d = (hr - torch.where(real, h.detach().to(dt), 0.0)) * torch.where(real, gh[key].to(dt), 0.0)
        if key in gout:
            dw = cached(cache, ("column_diff", *key), lambda key=key: ref_adapter.site(*key).module.weight.detach().to(
                device=dev, dtype=dt) - adapter.site(*key).module.weight.detach().to(device=dev, dtype=dt))
            g = torch.where(real, gout[key].to(dt), 0.0)
            d = d + hr * torch.matmul(g, dw)  # (B, T, out) @ (out, width)
        s = d.sum(1)
        out[key] = s if signed else s.abs()
    return stack_scores(out, adapter, kinds)

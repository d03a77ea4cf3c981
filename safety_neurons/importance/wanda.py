"""Wanda (Wei et al. 2024; METHOD 8): ``s(n) = sum over n's trainable slice of |W_ij| * ||X_j||_2``.

``X`` is the input of that weight over each prompt's scored tokens: for an output row (q/k/v rows,
ffn's gate and up rows) the sublayer's normed input, for an input column (o's column r, down's column
k) the neuron's own value ``h_n``. One forward pass, no gradients; bias entries do not count.
"""

from __future__ import annotations

import torch

from ..data import Batch
from ..hooks import hooks
from ..models import ModelAdapter, model_device
from .sites import compute_dtype, slice_linears, stack_scores


@torch.no_grad()
def wanda(model, adapter: ModelAdapter, batch: Batch, scored: torch.Tensor, kinds: tuple[str, ...]
          ) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: Wanda scores per prompt over its scored tokens."""
    dev = model_device(model)
    dt = compute_dtype(model)
    b = batch.to(dev)
    m = scored.to(dev).bool()[..., None]  # (B, T, 1); padding rows may hold NaN, so select, never multiply
    norms: dict[int, torch.Tensor] = {}  # id(linear) -> (B, in): ||X_j|| over scored tokens

    def grab(mod, args, out):
        norms[id(mod)] = torch.where(m, args[0].to(dt), 0.0).pow(2).sum(1).sqrt()

    lins = {id(lin): lin for layer in range(adapter.n_layers) for kind in kinds
            for lin, _ in slice_linears(adapter, layer, kind)}
    with hooks([(lin, "fwd", grab) for lin in lins.values()]):
        # the hooks take what is scored; logits at one position only (not a vocabulary row per token)
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
    out = {}
    for layer in range(adapter.n_layers):
        for kind in kinds:
            s = 0
            for lin, dim in slice_linears(adapter, layer, kind):
                W = lin.weight.detach().to(dt).abs()
                x = norms[id(lin)]  # (B, in)
                # a row r: sum_j |W_rj| ||X_j||; a column k: ||X_k|| sum_i |W_ik|
                s = s + (x @ W.T if dim == 0 else x * W.sum(0))
            out[(layer, kind)] = s
    return stack_scores(out, adapter, kinds)

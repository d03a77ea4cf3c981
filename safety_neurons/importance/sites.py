"""Where each neuron kind lives, and hooks that read its value there (METHOD 1).

``h_tn``, the value at neuron n's deactivation site: ffn channel k of the input of ``down_proj``;
q/k/v output channel r of the projection (before rotary); o input channel r of ``o_proj``. The scorers
beside PLND (activation difference, attribution, SNIP, Wanda) all start from these values or from the
inputs and output gradients of the linear layers that hold each neuron's trainable slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..hooks import HookSpec
from ..models import ModelAdapter


def site(adapter: ModelAdapter, layer: int, kind: str) -> tuple[nn.Module, str]:
    """(module, hook type) of the deactivation site: ``pre`` reads the module's input, ``fwd`` its output."""
    st = adapter.site(layer, kind)
    return st.module, st.hook


def site_specs(adapter: ModelAdapter, kinds: Iterable[str],
               fn: Callable[[int, str, torch.Tensor], None]) -> list[HookSpec]:
    """Hooks that call ``fn(layer, kind, h)`` with ``h`` (B, T, width), the site values, and change nothing."""
    specs: list[HookSpec] = []
    for layer in range(adapter.n_layers):
        for kind in kinds:
            mod, where = site(adapter, layer, kind)
            if where == "pre":
                specs.append((mod, "pre", lambda _m, args, layer=layer, kind=kind: fn(layer, kind, args[0])))
            else:
                specs.append((mod, "fwd", lambda _m, _a, out, layer=layer, kind=kind: fn(layer, kind, out)))
    return specs


def slice_linears(adapter: ModelAdapter, layer: int, kind: str) -> list[tuple[nn.Linear, int]]:
    """The linear layers holding the neuron's trainable slice (METHOD 1) and the weight dimension that
    indexes the neuron (0: a row, with its bias entry; 1: a column)."""
    return list(adapter.site(layer, kind).slices)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models, else float32 (half-precision activations are promoted)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def token_weights(mask: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """(B, T) weights that average over each row's marked tokens."""
    m = mask.to(dt)
    return m / m.sum(1, keepdim=True).clamp(min=1)


def stack_scores(acc: dict, adapter: ModelAdapter, kinds: Iterable[str]) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width) float32 on CPU}`` in layer order; every requested site must be present."""
    keys = [(layer, k) for layer in range(adapter.n_layers) for k in kinds]
    missing = [key for key in keys if key not in acc]
    if missing:
        raise RuntimeError(f"no scores were captured for {missing[:4]}; is the model's layer stack hooked?")
    return {key: acc[key].detach().float().cpu() for key in keys}

"""Forward hooks as context managers that always remove what they added (METHOD 5).

Deactivation never edits weights or library files: a neuron ``(layer, kind, index)`` is zeroed (or
set to its mean) where METHOD 1 says, through hooks that live only inside the ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import SITES, ModelAdapter, Site

HookSpec = tuple[nn.Module, str, Callable]  # (module, "pre" | "fwd" | "pre_kw", fn)


@contextmanager
def hooks(specs: Iterable[HookSpec]) -> Iterator[list]:
    """Register hooks; remove every one of them on exit, also on exceptions."""
    handles = []
    try:
        for module, where, fn in specs:
            if where == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif where == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif where == "fwd":
                handles.append(module.register_forward_hook(fn))
            else:
                raise ValueError(where)
        yield handles
    finally:
        for h in handles:
            h.remove()


def _setter(idx: torch.Tensor, values: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor) -> torch.Tensor:
        i = idx.to(x.device)
        if values is None:
            return x.index_fill(-1, i, 0.0)
        x = x.clone()
        x[..., i] = values.to(device=x.device, dtype=x.dtype)
        return x

    return apply


def at_site(site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> HookSpec:
    """A hook at ``site`` that calls ``fn`` on the neuron values there ((..., width)): the module's input
    for a "pre" site, its output for a "fwd" one. A tensor that ``fn`` returns replaces the values; None
    leaves them as they are."""
    if site.hook == "pre":
        def pre(mod, args):
            out = fn(args[0])
            return None if out is None else (out,) + tuple(args[1:])

        return site.module, "pre", pre
    return site.module, "fwd", lambda mod, args, out: fn(out)


def deactivation_specs(adapter: ModelAdapter, neurons: dict[tuple[int, str], torch.Tensor],
                       means: dict[tuple[int, str], torch.Tensor] | None = None) -> list[HookSpec]:
    """Hooks that zero (or mean-ablate) ``neurons``: {(layer, kind): LongTensor of indices}.

    ffn: input channel of down_proj; q/k/v: output channel of the projection (before rotary);
    o: input channel of o_proj. ``means``: {(layer, kind): FloatTensor(width)} for mean ablation.
    """
    specs: list[HookSpec] = []
    for (layer, kind), idx in sorted(neurons.items()):
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() == 0:
            continue
        if kind not in SITES:
            raise ValueError(f"unknown neuron kind {kind!r}")
        vals = means[(layer, kind)][idx] if means is not None else None
        specs.append(at_site(adapter.site(layer, kind), _setter(idx, vals)))
    return specs


@contextmanager
def deactivated(adapter: ModelAdapter, neurons: dict[tuple[int, str], torch.Tensor],
                means: dict[tuple[int, str], torch.Tensor] | None = None):
    """``with deactivated(adapter, {(3, "q"): idx}): model(...)`` runs with those neurons off."""
    with hooks(deactivation_specs(adapter, neurons, means)) as hs:
        yield hs


@torch.no_grad()
def zero_weights(adapter: ModelAdapter, neurons: dict[tuple[int, str], torch.Tensor]) -> None:
    """Edit weights in place so the neurons output zero (the reference for the hook invariant)."""
    for (layer, kind), idx in neurons.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        s = adapter.site(layer, kind)
        if s.dim == 1:  # an input column: the neuron's value is what the module reads
            s.module.weight[:, idx] = 0
        else:  # an output row and its bias entry
            s.module.weight[idx, :] = 0
            if s.module.bias is not None:
                s.module.bias[idx] = 0


def n_hooks(model: nn.Module) -> int:
    """Hooks currently registered anywhere in ``model`` (tests assert none survive)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

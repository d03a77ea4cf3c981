"""Forward hooks as context managers that always remove what they added (METHOD 5).

Deactivation never edits weights or library files: a neuron ``(layer, kind, index)`` is zeroed (or
set to its mean) where METHOD 1 says, through hooks that live only inside the ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import ModelAdapter

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
        vals = means[(layer, kind)][idx] if means is not None else None
        f = _setter(idx, vals)
        m = adapter.modules(layer)
        if kind == "ffn":
            specs.append((m.down, "pre", lambda mod, args, f=f: (f(args[0]),) + tuple(args[1:])))
        elif kind == "o":
            specs.append((m.o, "pre", lambda mod, args, f=f: (f(args[0]),) + tuple(args[1:])))
        elif kind in ("q", "k", "v"):
            lin = {"q": m.q, "k": m.k, "v": m.v}[kind]
            specs.append((lin, "fwd", lambda mod, args, out, f=f: f(out)))
        else:
            raise ValueError(f"unknown neuron kind {kind!r}")
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
        m = adapter.modules(layer)
        if kind == "ffn":
            m.down.weight[:, idx] = 0
        elif kind == "o":
            m.o.weight[:, idx] = 0
        else:
            lin = {"q": m.q, "k": m.k, "v": m.v}[kind]
            lin.weight[idx, :] = 0
            if lin.bias is not None:
                lin.bias[idx] = 0


def n_hooks(model: nn.Module) -> int:
    """Hooks currently registered anywhere in ``model`` (tests assert none survive)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

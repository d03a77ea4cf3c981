"""Which neurons a deactivation point switches off: layer split regions (METHOD 5) and mean values."""

from __future__ import annotations

import torch

from .config import KINDS
from .data import encode
from .errors import UserError
from .hooks import at_site, hooks
from .models import ModelAdapter
from .neurons import NeuronSet

REGIONS = ("under", "reason", "gen")


def check_split(split, n_layers: int) -> None:
    if split.under < 0 or split.gen < 0 or split.under + split.gen > n_layers:
        raise UserError(f"split.under={split.under} + split.gen={split.gen} exceeds the model's {n_layers} layers; "
                        f"choose values with under + gen <= {n_layers}")


def region_of(layer: int, split, n_layers: int) -> str:
    if layer < split.under:
        return "under"
    if layer >= n_layers - split.gen:
        return "gen"
    return "reason"


def allowed(split, layer: int, kind: str, n_layers: int) -> bool:
    reg = region_of(layer, split, n_layers)
    return bool(getattr(split, f"{reg}_{'ffn' if kind == 'ffn' else 'attn'}"))


def apply_split(ns: NeuronSet, split, n_layers: int) -> NeuronSet:
    """The set restricted to the layer regions and attn/ffn flags switched on in ``split``."""
    check_split(split, n_layers)
    return ns.filter(lambda n: allowed(split, n[0], n[1], n_layers))


def split_label(split) -> str:
    off = [f"{r}_{p}" for r in REGIONS for p in ("attn", "ffn") if not getattr(split, f"{r}_{p}")]
    return "all" if not off else "off:" + ",".join(off)


@torch.no_grad()
def neuron_means(model, tok, adapter: ModelAdapter, prompts: list[str], system_prompt, batch_size: int = 16
                 ) -> dict[tuple[int, str], torch.Tensor]:
    """Mean value of every neuron's channel over the real tokens of ``prompts`` (for mean ablation)."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    count = 0
    dev = next(model.parameters()).device
    state = {"mask": None}

    def add(key, x):
        m = state["mask"]
        v = (x.float() * m[..., None]).sum((0, 1)).cpu().double()
        sums[key] = sums[key] + v if key in sums else v

    specs = [at_site(adapter.site(layer, kind), lambda x, key=(layer, kind): add(key, x))
             for layer in range(adapter.n_layers) for kind in KINDS]
    with hooks(specs):
        for i in range(0, len(prompts), batch_size):
            b = encode(tok, prompts[i: i + batch_size], system_prompt).to(dev)
            state["mask"] = b.attention_mask.float()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
            count += int(b.attention_mask.sum())
    return {k: (v / count).float() for k, v in sums.items()}

"""Ground truth by a planted mechanism (METHOD 9): draw S*, find what changed, score recovery.

A planted model is a base model whose refusal was trained into the slices of a random neuron set S*
only (neuron-slice tuning), so every other weight is the base model's, bit for bit. This module draws
S*, reads back which neurons' slices differ between two models, and measures how well a ranking of
neurons recovers S* (rank-AUC, precision at |S*|, recall at 5|S*|, per planted layer).
"""

from __future__ import annotations

import torch

from .errors import UserError
from .importance.sites import slice_linears
from .models import ModelAdapter
from .neurons import NeuronSet

KINDS = ("q", "k", "v", "o", "ffn")


def planted_layers(layers, n_layers: int) -> list[int]:
    """``null`` -> every layer; ``[first, last]`` -> that inclusive band (checked against the model)."""
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    if len(layers) != 2 or not all(isinstance(x, int) for x in layers) or not 0 <= layers[0] <= layers[1] < n_layers:
        raise UserError(f"plant.layers={layers} must be null or [first, last] with 0 <= first <= last < {n_layers}")
    return list(range(layers[0], layers[1] + 1))


def draw_planted_set(adapter: ModelAdapter, share: float, kinds, layers, seed: int) -> NeuronSet:
    """S*: ``max(1, round(share * width))`` neurons drawn uniformly (seeded) in each planted (layer, kind)."""
    if not 0 < share < 1:
        raise UserError(f"plant.share={share} must be a share of the neurons, between 0 and 1 (0.01 = 1%)")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"unknown neuron kind(s) {bad or '[]'} in plant.kinds; known kinds are {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(seed)
    ranking = []
    for layer in planted_layers(layers, adapter.n_layers):
        for kind in kinds:
            w = adapter.width(kind)
            n = max(1, round(share * w))
            ranking += [(layer, kind, int(i)) for i in torch.randperm(w, generator=g)[:n].sort().values]
    return NeuronSet(ranking, {"planted": True, "share": share, "kinds": list(kinds), "seed": seed})


def slice_diff(base: ModelAdapter, other: ModelAdapter, kinds) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, kind), ``sum over each neuron's slice of |W_other - W_base|`` (float64, (width,)): the
    weight difference, which finds a planted set exactly (the ceiling for any scorer)."""
    out = {}
    for layer in range(base.n_layers):
        for kind in kinds:
            s = torch.zeros(base.width(kind), dtype=torch.float64)
            for (lb, dim), (lo, _) in zip(slice_linears(base, layer, kind), slice_linears(other, layer, kind)):
                d = (lo.weight.detach().double().cpu() - lb.weight.detach().double().cpu()).abs()
                s += d.sum(1 - dim)
                if dim == 0 and lb.bias is not None:
                    s += (lo.bias.detach().double().cpu() - lb.bias.detach().double().cpu()).abs()
            out[(layer, kind)] = s
    return out


def changed_neurons(base: ModelAdapter, other: ModelAdapter, kinds=KINDS) -> set[tuple[int, str, int]]:
    """Every neuron whose slice differs at all between the two models."""
    return {(layer, kind, int(i)) for (layer, kind), s in slice_diff(base, other, kinds).items()
            for i in torch.nonzero(s > 0).flatten()}


def rank_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the
    Mann-Whitney statistic from average ranks."""
    scores = scores.double().flatten()
    positive = positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sv, order = torch.sort(scores, stable=True)
    _, inv, counts = torch.unique_consecutive(sv, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.empty_like(scores)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inv]  # 1-based ranks, ties at their average
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pool_of(truth: NeuronSet) -> list[tuple[int, str]]:
    """The (layer, kind) matrices S* was drawn from."""
    return sorted({(layer, kind) for layer, kind, _ in truth.ranking})


def recovery(scores: dict[tuple[int, str], torch.Tensor], truth: NeuronSet) -> dict:
    """How a per-neuron score (``{(layer, kind): (width,)}``) recovers S* among the neurons of the
    matrices S* was drawn from: rank-AUC, precision at |S*|, recall at 5|S*|, mean per-layer AUC, the
    AUC within each kind (where one kind hides, e.g. o neurons from activation differences), and the
    top |S*| as a ranked set."""
    pool = pool_of(truth)
    keys, vals, pos = [], [], []
    inside = truth.index_map()
    for key in pool:
        s = scores[key].double().flatten()
        p = torch.zeros(len(s), dtype=torch.bool)
        p[inside[key]] = True
        keys += [(key[0], key[1], i) for i in range(len(s))]
        vals.append(s)
        pos.append(p)
    v, p = torch.cat(vals), torch.cat(pos)
    n = int(p.sum())
    order = torch.argsort(v, descending=True, stable=True)
    top = order[:n]
    layer_of = torch.tensor([k[0] for k in keys])
    per_layer = {layer: rank_auc(v[layer_of == layer], p[layer_of == layer]) for layer in sorted({k[0] for k in pool})}
    kind_of = [k[1] for k in keys]
    per_kind = {}
    for kind in sorted({k[1] for k in pool}):
        sel = torch.tensor([x == kind for x in kind_of])
        per_kind[kind] = rank_auc(v[sel], p[sel])
    return {"auc": rank_auc(v, p), "precision_at_k": float(p[top].float().mean()),
            "recall_at_5k": float(p[order[: 5 * n]].float().sum() / n),
            "layer_auc_mean": float(torch.tensor(list(per_layer.values())).nanmean()),
            "per_layer_auc": per_layer, "per_kind_auc": per_kind,
            "top": NeuronSet([keys[i] for i in top.tolist()], {}),
            "roc": roc_points(v, p)}


def roc_points(scores: torch.Tensor, positive: torch.Tensor, n: int = 200) -> tuple[list, list]:
    """(false positive rates, true positive rates) of the ranking, at most ``n`` points (for plotting)."""
    order = torch.argsort(scores, descending=True, stable=True)
    p = positive[order].double()
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0) / p.sum()])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - p).cumsum(0) / (1 - p).sum()])
    idx = torch.linspace(0, len(tpr) - 1, min(n, len(tpr))).round().long()
    return fpr[idx].tolist(), tpr[idx].tolist()

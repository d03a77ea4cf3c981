"""What every stage shares: store, tracker, model and prompt sets."""

from __future__ import annotations

import contextlib
import logging
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .. import organism
from ..data import cache_dir, harmful_set, harmless_set  # noqa: F401  (the stages' names for them)
from ..errors import UserError
from ..io import Store
from ..models import load_model
from ..neurons import NeuronSet
from ..tracking import Tracker

log = logging.getLogger("safety_neurons")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def store_of(cfg) -> Store:
    return Store(cfg.store_dir)


def build_missing(mcfg, store: Store) -> bool:
    """Build a recipe-made model (``model.organism``, e.g. ``model=smollm2_refusing``) that is not in the
    store yet, by running its recipe as a stage; returns whether it built one.

    This is the one place where asking for a model can train one: the library's loader only loads. The
    recipe's stage is looked up in the stage registry, so a recipe whose base model is itself made by a
    recipe builds that one first (through its own ``load``)."""
    if mcfg.path or not mcfg.organism or organism.is_built(store, mcfg.organism):
        return False
    from . import get_stage

    rcfg = organism.recipe_config(mcfg.organism, store)
    log.info("building the model %s from its recipe (once; cached in %s)", mcfg.organism,
             store.model_dir(mcfg.organism))
    print(f"building the refusing model organism {mcfg.organism} (first use; cached afterwards)")
    get_stage(rcfg.stage.name)(rcfg)
    return True


def load(cfg):
    """(model, tokenizer, adapter) of ``cfg.model``; a recipe-made model is built first if missing."""
    build_missing(cfg.model, store_of(cfg))
    return load_model(cfg.model, store_of(cfg), cfg.device)


@contextlib.contextmanager
def tracked(cfg):
    """A Tracker that always finishes (W&B closed also on errors, so a multirun continues)."""
    seed_everything(cfg.seed)
    tr = Tracker(cfg, cfg.run_dir)
    box: dict = {"results": None}
    try:
        yield tr, box
    except BaseException as e:
        tr.finish(None, e)
        raise
    else:
        tr.finish(box["results"])


def load_set(cfg, which, adapter) -> NeuronSet:
    """The neuron set a stage uses: an explicit path, else the latest detection of this model/dataset."""
    path = which.neurons
    if path:
        p = Path(path)
        if p.is_file() and p.suffix != ".json":
            from ..neurons import import_released

            ns = import_released(p, adapter.n_heads, adapter.n_kv, adapter.head_dim)
        else:
            ns = NeuronSet.load(p)
    else:
        tag = which.set_tag
        if tag is None and getattr(which, "set", "sn") == "rsn":
            tag = f"exact-ref{cfg.harmless.name}"
        ns = NeuronSet.load(store_of(cfg).find_neurons(cfg.model.name, cfg.dataset.name, tag))
    ns.check_compatible(adapter.signature())
    for layer, kind, i in ns.ranking:
        if layer >= adapter.n_layers or i >= adapter.width(kind):
            raise UserError(f"neuron {(layer, kind, i)} is outside this model ({adapter.n_layers} layers, "
                            f"{kind} width {adapter.width(kind)}); the set was made for another model")
    return ns


def cap_set(ns: NeuronSet, cap: int | None) -> NeuronSet:
    """At most ``cap`` neurons per (layer, kind) weight matrix, in rank order (the released code: 100)."""
    if not cap:
        return ns
    seen: dict = defaultdict(int)
    keep = []
    for n in ns.ranking:
        if seen[(n[0], n[1])] < cap:
            keep.append(n)
            seen[(n[0], n[1])] += 1
    return NeuronSet(keep, {**ns.meta, "cap_per_matrix": cap})


def random_like(ns: NeuronSet, adapter, seed: int, exclude: NeuronSet | None = None) -> NeuronSet:
    """Same number of neurons per (layer, kind) as ``ns``, drawn uniformly from outside ``exclude``
    (default ``ns`` itself), seeded (METHOD 5)."""
    g = torch.Generator().manual_seed(seed)
    inside = ns.index_map()
    outside = (exclude or ns).index_map()
    out = []
    for (layer, kind), idx in sorted(inside.items()):
        width = adapter.width(kind)
        mask = torch.ones(width, dtype=torch.bool)
        mask[outside.get((layer, kind), idx)] = False
        pool = torch.nonzero(mask).flatten()
        if len(pool) < len(idx):
            raise UserError(f"layer {layer} {kind}: the set covers too much of the width to draw a random set outside it")
        pick = pool[torch.randperm(len(pool), generator=g)[: len(idx)]]
        out += [(layer, kind, int(i)) for i in pick.sort().values]
    return NeuronSet(out, {"random_like": ns.meta.get("tag"), "seed": seed})

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
from ..identity import artifact_hash, source_identity
from ..io import Store
from ..models import load_model
from ..neurons import NeuronSet, is_path
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


# the artifacts each tracked run used (innermost run last): a recipe build nested in a stage has its own
_USED: list[list[dict]] = []


def note_artifact(kind: str, path, digest: str | None) -> None:
    """Print and record (in the run's results.json, ``artifacts``) an artifact a stage used."""
    print(f"using {kind} {path} (hash {digest or 'unknown'})")
    if _USED:
        _USED[-1].append({"kind": kind, "path": str(path), "hash": digest})


def load(cfg):
    """(model, tokenizer, adapter) of ``cfg.model``; a recipe-made model is built first if missing."""
    build_missing(cfg.model, store_of(cfg))
    out = load_model(cfg.model, store_of(cfg), cfg.device)
    ident = source_identity(cfg.model, store_of(cfg))
    note_artifact(f"model {cfg.model.name}", ident["source"], ident["source_hash"])
    return out


@contextlib.contextmanager
def tracked(cfg):
    """A Tracker that always finishes (W&B closed also on errors, so a multirun continues)."""
    seed_everything(cfg.seed)
    tr = Tracker(cfg, cfg.run_dir)
    box: dict = {"results": None}
    _USED.append([])
    try:
        yield tr, box
    except BaseException as e:
        _USED.pop()
        tr.finish(None, e)
        raise
    else:
        used = _USED.pop()
        res = box["results"]
        tr.finish({**res, "artifacts": used} if isinstance(res, dict) and used else res)


def origin_mismatch(meta: dict, cfg, prompts: bool = True) -> str | None:
    """Why a set (its ``meta``) was not made from what this run loads, or None: another model source (by
    content hash), or with ``prompts`` another harmful prompt set. Sets that record no hash are not judged."""
    made = meta.get("source_hash")
    if made:
        now = source_identity(cfg.model, store_of(cfg))
        if now["source_hash"] and now["source_hash"] != made:
            return (f"it was made on the model {meta.get('source') or meta.get('path') or meta.get('model')} "
                    f"(hash {made}), and this run loads {now['source']} (hash {now['source_hash']})")
    want = (meta.get("dataset") or {}).get("hash")
    if prompts and want:
        now_p = harmful_set(cfg, "train")
        if now_p.hash != want:
            return (f"it was detected on other prompts (hash {want}), and dataset={cfg.dataset.name} here gives "
                    f"{now_p.hash}")
    return None


def _matches(cfg):
    def ok(p: Path) -> bool:
        try:
            return origin_mismatch(NeuronSet.load(p).meta, cfg) is None
        except UserError:
            return False

    return ok


def find_set(cfg, tag: str | None) -> Path:
    """The store's set of this model and dataset with ``tag`` (the latest made from this run's model and
    prompts when None), refused with one line when it was made from another model or prompt set."""
    store = store_of(cfg)
    path = store.find_neurons(cfg.model.name, cfg.dataset.name, tag, None if tag else _matches(cfg))
    why = origin_mismatch(NeuronSet.load(path).meta, cfg)
    if why:
        raise UserError(f"the neuron set {path} is not this run's: {why}; detect one for this model and prompts "
                        f"(stage=detect with detect.save_as=NEW_TAG), or name a set by path")
    return path


def default_tag(cfg) -> str:
    """The store tag of a detected set: the PLND mode (exact, original) or the scorer's name, then
    ``-median`` with ``detect.normalize=median``, ``-con<dataset>`` when scores were contrasted with
    dataset@contrast's means, ``-ref<dataset>`` when dataset@reference's selection was subtracted."""
    d = cfg.detect
    base = d.mode if d.scorer == "plnd" else d.scorer
    if d.get("normalize", "none") != "none":
        base += f"-{d.normalize}"
    if cfg.get("contrast") is not None:
        base += f"-con{cfg.contrast.name}"
    return base + (f"-ref{cfg.reference.name}" if cfg.reference is not None else "")


def set_path(cfg, name: str | None, default: str) -> Path:
    """The one way a stage names a neuron set: ``name`` is a store tag of this model and dataset, a path
    (neurons.json or its folder), or ``latest`` (the newest set made from this run's model and prompts);
    None is ``default``, the tag the run's detect settings write."""
    if name is None:
        name = default
    if name == "latest":
        return find_set(cfg, None)
    if is_path(name):
        p = Path(name).expanduser()
        if not p.exists():
            raise UserError(f"the neuron set {name} does not exist; give a neurons.json, its folder or a store tag")
        from ..neurons import resolve_set_path

        return resolve_set_path(p)  # a detect run's folder (or its set.json) stands for the set it wrote
    return find_set(cfg, name)


def load_set(cfg, which, adapter, default: str) -> NeuronSet:
    """The neuron set ``which.neurons`` names (see set_path); a released neuron file is imported
    with this model's head layout."""
    p = set_path(cfg, which.neurons, default)
    if p.is_file() and p.suffix != ".json":
        from ..neurons import import_released

        ns = import_released(p, adapter.n_heads, adapter.n_kv, adapter.head_dim)
    else:
        ns = NeuronSet.load(p)
        why = origin_mismatch(ns.meta, cfg, prompts=False)
        if why and which.neurons and is_path(which.neurons):  # named by path: the user's choice, said and recorded
            print(f"warning: the neuron set {p} is used as named although {why}")
        p = p / "neurons.json" if p.is_dir() else p
    note_artifact("neuron set", p, artifact_hash(p))
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


def random_count(adapter, kinds, n: int, seed: int) -> NeuronSet:
    """``n`` neurons drawn uniformly (seeded) from every neuron of ``kinds`` in every layer: the
    paper's random baseline of the same count, whatever layers and kinds a scorer's set falls in."""
    every = [(layer, kind, i) for layer in range(adapter.n_layers) for kind in kinds
             for i in range(adapter.width(kind))]
    if n > len(every):
        raise UserError(f"cannot draw {n} random neurons from the {len(every)} of kinds {list(kinds)}; "
                        "lower benchmark.counts")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(every), generator=g)[:n].sort().values.tolist()
    return NeuronSet([every[j] for j in pick], {"random_count": n, "seed": seed})


def evaluator(cfg, model, tok, harmful=None, harmless=None, **kw):
    """The run's :class:`~safety_neurons.evaluation.Evaluator` of ``model`` (the intact reference): the
    held-out harmful and harmless prompts (or the sets given), the model's system prompt and length."""
    from ..evaluation import Evaluator

    return Evaluator(cfg.eval, model, tok, harmful if harmful is not None else harmful_set(cfg, "eval"),
                     harmless if harmless is not None else harmless_set(cfg, "eval"), cfg.model.system_prompt,
                     cfg.model.max_length, cache_dir=cache_dir(cfg), **kw)

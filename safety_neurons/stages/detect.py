"""``stage=detect``: PLND importance on harmful prompts -> a ranked, provenance-stamped neuron set
(METHOD 2-4). ``stage=select`` re-selects from saved scores without recomputing."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..autobatch import BatchSize
from ..config import KINDS
from ..data import load_prompts
from ..errors import UserError
from ..identity import artifact_hash, source_identity
from ..importance import get_scorer, qk_kernel_used
from ..io import ArtifactDir, atomic_write, write_csv, write_json
from ..models import signature_widths
from ..neurons import NeuronSet, TopkStats, resolve_k, select, split_scores
from ..organism import read_provenance
from ..scoring import score_prompts, target_answers
from ..tracking import code_version, is_main_process
from .common import (
    cache_dir,
    default_tag,
    harmful_set,
    is_path,
    load,
    origin_mismatch,
    set_path,
    store_of,
    tracked,
)


def check_detect_cfg(d) -> None:
    # mode, tokens, qk_kernel and scorer are enums of the schema: composition rejects other values
    bad = [k for k in d.kinds if k not in KINDS]
    if bad or not d.kinds:
        raise UserError(f"unknown neuron kind(s) {bad or '[]'} in detect.kinds; known kinds are {', '.join(KINDS)}")
    scorer = get_scorer(d.scorer)
    if scorer.needs_reference and not d.reference_model:
        raise UserError(f"detect.scorer={d.scorer} needs detect.reference_model=NAME_OR_PATH (the base model "
                        f"before alignment, same architecture)")


def load_reference_model(cfg, adapter):
    """(model, adapter) of ``detect.reference_model``, checked to have the scored model's architecture."""
    from ..cfg import model_config
    from ..importance.activation import check_reference
    from ..models import load_model
    from .common import build_missing

    mcfg = model_config(cfg.detect.reference_model)
    build_missing(mcfg, store_of(cfg))
    rm, _, rad = load_model(mcfg, store_of(cfg), cfg.device)
    check_reference(adapter, rad)
    return rm, rad


def scorer_inputs(cfg, model, tok, adapter, prompt_set, with_reference: bool = True) -> dict:
    """What the configured scorer needs besides the prompts: ``reference`` (loaded only when
    ``with_reference``: a second prompt set reuses the first one's) and ``targets``."""
    d = cfg.detect
    scorer = get_scorer(d.scorer)
    out: dict = {}
    if scorer.needs_reference and with_reference:
        out["reference"] = load_reference_model(cfg, adapter)
    if scorer.needs_target:
        out["targets"] = target_answers(model, tok, prompt_set.prompts, cfg.model.system_prompt, d.target_tokens,
                                        cfg.eval.batch_size, prompt_set.responses, cfg.model.max_length)
    return out


def k_per_kind(topk, adapter, kinds) -> dict[str, int]:
    return k_for_widths(topk, {k: adapter.width(k) for k in kinds})


def k_for_widths(topk, widths: dict[str, int]) -> dict[str, int]:
    """The per-prompt top k of each kind of the given widths (topk.ffn for ffn, topk.attn for the rest)."""
    return {k: resolve_k(topk.ffn if k == "ffn" else topk.attn, w, "topk.ffn" if k == "ffn" else "topk.attn")
            for k, w in widths.items()}


def stats_from(scores: dict[tuple[int, str], torch.Tensor], k_of: dict[str, int]) -> TopkStats:
    st = TopkStats(k_of)
    for (layer, kind), s in scores.items():
        st.update(layer, kind, s)
        st.n = s.shape[0]
    return st


def summary_table(ns: NeuronSet, adapter) -> pd.DataFrame:
    counts = ns.counts()
    rows = []
    total = adapter.n_params()
    for layer in range(adapter.n_layers):
        row = {"layer": layer}
        for k in KINDS:
            row[k] = counts.get((layer, k), 0)
        row["params"] = sum(adapter.neuron_params(k) * row[k] for k in KINDS)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[len(df)] = {"layer": "total", **{k: int(df[k].sum()) for k in KINDS}, "params": int(df["params"].sum())}
    df["param_share"] = df["params"] / total
    return df


def plot_set(ns: NeuronSet, adapter, mean: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    counts = ns.counts()
    grid = np.array([[counts.get((layer, k), 0) / adapter.width(k) for k in KINDS]
                     for layer in range(adapter.n_layers)])
    fig, ax = plt.subplots(figsize=(4.5, max(3, 0.22 * adapter.n_layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(KINDS)), KINDS)
    ax.set_xlabel("neuron kind")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\nselected share of each kind's width", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="selected neurons / width")
    fig.tight_layout()
    p = out / "heatmap.png"
    atomic_write(p, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, len(KINDS), figsize=(3 * len(KINDS), 2.6))
    sel = set(ns.ranking)
    for ax, kind in zip(axes, KINDS):
        vals, chosen = [], []
        for (layer, k), m in mean.items():
            if k != kind:
                continue
            vals.append(m.numpy())
            chosen += [m[i].item() for i in range(len(m)) if (layer, k, i) in sel] if len(sel) < 200000 else []
        if not vals:
            ax.set_visible(False)
            continue
        v = np.concatenate(vals)
        bins = np.logspace(np.log10(max(v[v > 0].min(), 1e-8)), np.log10(v.max() + 1e-12), 40) if (v > 0).any() else 40
        ax.hist(v, bins=bins, color="0.7", label="all")
        if chosen:
            ax.hist(chosen, bins=bins, color="C3", label="selected")
        ax.set_xscale("log")
        ax.set_title(kind)
    shown = [ax for ax in axes if ax.get_visible()]  # kinds that were not scored have no panel
    if shown:
        shown[0].legend(fontsize=7)
    fig.suptitle("mean importance per neuron", fontsize=9)
    fig.tight_layout()
    p = out / "scores.png"
    atomic_write(p, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)
    paths.append(p)
    return paths


def _save_scores(path: Path, st: TopkStats) -> None:
    atomic_write(path, lambda t: save_file(st.tensors(), str(t)))


def _save_prompt_scores(path: Path, scores: dict) -> None:
    """Per-prompt scores in float16 (half the size), or float32 for a matrix whose scores float16
    cannot hold (normalized scores can exceed its 65504); readers take either."""
    def small(s: torch.Tensor) -> torch.Tensor:
        h = s.half()
        return h if bool(torch.isfinite(h).all()) or not bool(torch.isfinite(s).all()) else s.float()

    flat = {f"{layer}.{kind}": small(s).contiguous() for (layer, kind), s in scores.items()}
    atomic_write(path, lambda t: save_file(flat, str(t)))


def _model_id(cfg) -> dict:
    m = cfg.model
    out = {"model": m.name, "hub_id": m.hub_id, "revision": m.revision, "path": m.path,
           "gguf": f"{m.gguf_package}/{m.gguf_file}" if m.gguf_package else None, "organism": m.organism}
    out.update(source_identity(m, store_of(cfg)))  # what was loaded, by content
    if m.organism and not m.path:
        made = read_provenance(store_of(cfg).model_dir(m.organism))
        if made is not None:  # which build of the organism the set was found on
            out["organism_recipe"] = made.get("recipe_hash")
    return out


def _reuse_or_refuse(cfg, out_store: Path, tag: str) -> dict | None:
    """The result of reusing the set already at ``out_store`` (detect.reuse=true), None when there is none
    or detect.overwrite=true; a UserError when one exists and neither is given."""
    d = cfg.detect
    if (out_store / "neurons.json").exists() and not d.overwrite:
        if d.reuse:
            ns = NeuronSet.load(out_store / "neurons.json")
            now = _model_id(cfg).get("organism_recipe")
            if now is not None and ns.meta.get("organism_recipe") != now:
                raise UserError(f"the set at {out_store} was found on another build of the organism "
                                f"{cfg.model.organism} (recipe {ns.meta.get('organism_recipe') or 'unrecorded'}, the "
                                f"cached organism's is {now}); detect.overwrite=true recomputes it, or "
                                f"detect.save_as=NEW_TAG keeps both")
            why = origin_mismatch(ns.meta, cfg)
            if why:
                raise UserError(f"the set at {out_store} cannot be reused: {why}; detect.overwrite=true recomputes "
                                f"it, or detect.save_as=NEW_TAG keeps both")
            print(f"reusing the existing set {out_store} ({len(ns)} neurons, hash "
                  f"{artifact_hash(out_store / 'neurons.json')}; detect.overwrite=true recomputes)")
            return {"tag": tag, "n_neurons": len(ns), "neurons_json": str(out_store / "neurons.json"), "reused": True}
        raise UserError(f"a neuron set already exists at {out_store}; pass detect.overwrite=true, "
                        f"detect.reuse=true or detect.save_as=NEW_TAG (the existing set is left untouched)")
    return None


@dataclass
class Detection:
    """What one detection computed: the harmful prompts, their per-prompt scores and statistics, those of
    the reference prompts when there are any (``ref_meta`` says which, and how many neurons they
    selected), the ranking and the scoring time."""

    harm: object
    scores: dict
    st: TopkStats
    ranking: list
    mean: dict
    seconds: float
    rscores: dict | None = None
    ref_st: TopkStats | None = None
    ref_meta: dict | None = None
    contrast_meta: dict | None = None
    batch: dict | None = None  # detect.batch_size: the setting, the size that ran, its halvings


def run(cfg) -> dict:
    d = cfg.detect
    check_detect_cfg(d)
    if d.scores:
        return run_select(cfg)
    store = store_of(cfg)
    tag = d.save_as or default_tag(cfg)
    out_store = store.neuron_dir(cfg.model.name, cfg.dataset.name, tag)
    # the set is assembled beside its place and renamed in whole, under a lock taken before any work
    with ArtifactDir(out_store, "the neuron set", active=is_main_process()) as art:
        reused = _reuse_or_refuse(cfg, out_store, tag)
        return reused if reused is not None else _detect(cfg, tag, out_store, art)


def _detect(cfg, tag: str, out_store: Path, art: ArtifactDir) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    with tracked(cfg) as (tr, box):
        model, tok, ad = load(cfg)
        found = score_and_select(cfg, model, tok, ad, acc)
        ns = NeuronSet(found.ranking, set_meta(cfg, model, ad, found, tag))
        table = summary_table(ns, ad)
        results = {"tag": tag, "n_neurons": len(ns), "param_share": float(table["param_share"].iloc[-1]),
                   **{f"n_{k}": int(table[k].iloc[-1]) for k in KINDS}, "n_prompts": len(found.harm),
                   "detect_seconds": round(found.seconds, 1), "processes": acc.num_processes,
                   "batch_size": found.batch["size"], "batch_halvings": found.batch["halvings"],
                   "prompts_per_second": len(found.harm) / max(found.seconds, 1e-9),
                   "neurons_json": str(out_store / "neurons.json"),
                   "reference_selected": found.ref_meta["selected"] if found.ref_meta else None}
        if acc.is_main_process:
            plots = write_set(cfg, art.tmp, ns, ad, found, table)
            art.commit()
            record_run(tr, out_store, table, plots)
            print(table.to_string(index=False))
            print(f"{len(ns)} safety neurons ({100 * results['param_share']:.3f}% of parameters) -> {out_store}")
        tr.log({k: v for k, v in results.items() if isinstance(v, (int, float))})
        box["results"] = results
    return box["results"]


def score_and_select(cfg, model, tok, ad, acc) -> Detection:
    """Score the harmful prompts (and the reference prompts, whose selection is excluded) and rank."""
    d = cfg.detect
    k_of = k_per_kind(cfg.topk, ad, d.kinds)
    harm = harmful_set(cfg, "train")
    if harm.shortfall() and acc.is_main_process:  # a run on part of a file says so
        print(f"detection scores {harm.shortfall()}")
    sp, ml = cfg.model.system_prompt, cfg.model.max_length
    t0 = time.time()
    extra = scorer_inputs(cfg, model, tok, ad, harm)
    bs = BatchSize(d.batch_size, "detect.batch_size", 16, log=print if acc.is_main_process else lambda _m: None)
    scores = score_prompts(model, tok, ad, harm.prompts, d, sp, ml, acc, "importance (harmful)", batch=bs, **extra)
    contrast_meta = None
    if cfg.get("contrast") is not None:  # every score minus the neuron's mean score on the contrast prompts
        con = load_prompts(cfg.contrast, "train", cache_dir(cfg)).head(d.n_reference)
        cextra = scorer_inputs(cfg, model, tok, ad, con, with_reference=False)  # the reference model: loaded once
        cscores = score_prompts(model, tok, ad, con.prompts, d, sp, ml, acc, f"importance ({con.name}, contrast)",
                                reference=extra.get("reference"), batch=bs, **cextra)
        scores = contrasted(scores, cscores)
        contrast_meta = con.describe()
    seconds = time.time() - t0
    st = stats_from(scores, k_of)
    mean, freq = split_scores(st.tensors())
    found = Detection(harm, scores, st, [], mean, seconds, contrast_meta=contrast_meta)
    exclude = None
    if cfg.reference is not None:
        ref = load_prompts(cfg.reference, "train", cache_dir(cfg)).head(d.n_reference)
        rextra = scorer_inputs(cfg, model, tok, ad, ref, with_reference=False)  # the reference model: loaded once
        found.rscores = score_prompts(model, tok, ad, ref.prompts, d, sp, ml, acc, f"importance ({ref.name})",
                                      reference=extra.get("reference"), batch=bs, **rextra)
        found.ref_st = stats_from(found.rscores, k_of)
        exclude = set(select(*split_scores(found.ref_st.tensors()), cfg.topk.consistency))
        found.ref_meta = {**ref.describe(), "selected": len(exclude)}
    found.ranking = select(mean, freq, cfg.topk.consistency, exclude)
    found.batch = bs.record()
    return found


def contrasted(scores: dict, contrast: dict) -> dict:
    """Per-prompt scores minus each neuron's mean score over the contrast prompts (float32): what
    selection, ranking and the saved per-prompt scores of a contrasted set are made of."""
    return {key: s.float() - contrast[key].float().mean(0, keepdim=True) for key, s in scores.items()}


def set_meta(cfg, model, ad, found: Detection, tag: str) -> dict:
    """The provenance a detected set carries: model, prompts, scorer and its options, k, reference, code."""
    d = cfg.detect
    scorer = get_scorer(d.scorer)
    return {
        **_model_id(cfg), "model_signature": ad.signature(), "dataset": found.harm.describe(),
        "n_prompts": len(found.harm), "scorer": d.scorer, "mode": d.mode if d.scorer == "plnd" else None,
        "reference_model": d.reference_model if scorer.needs_reference else None,
        "target_tokens": d.target_tokens if scorer.needs_target else None,
        "tokens": d.tokens, "last_m": d.last_m, "normalize": d.normalize,
        "qk_kernel": qk_kernel_used(d.qk_kernel, next(model.parameters()).device)
        if d.mode == "exact" and d.scorer == "plnd" else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "chat_template": d.chat_template, "system_prompt": cfg.model.system_prompt, "kinds": list(d.kinds),
        "topk": {"attn": cfg.topk.attn, "ffn": cfg.topk.ffn, "k_per_kind": k_per_kind(cfg.topk, ad, d.kinds)},
        "consistency": cfg.topk.consistency, "reference": found.ref_meta, "contrast": found.contrast_meta,
        "code_version": code_version(),
        "seed": cfg.seed, "tag": tag, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "ranked": True,
    }


def write_set(cfg, out: Path, ns: NeuronSet, ad, found: Detection, table: pd.DataFrame) -> list[Path]:
    """The set's one copy (in the store folder being assembled): neurons, statistics, per-prompt scores,
    summary, plots and the config; returns the plots."""
    out.mkdir(parents=True, exist_ok=True)
    _save_scores(out / "scores.safetensors", found.st)
    if found.ref_st is not None:
        _save_scores(out / "reference_scores.safetensors", found.ref_st)
    if cfg.detect.save_prompt_scores:
        _save_prompt_scores(out / "prompt_scores.safetensors", found.scores)
        if found.ref_st is not None:  # so that stage=select can re-select the reference with a new k
            _save_prompt_scores(out / "reference_prompt_scores.safetensors", found.rscores)
    write_csv(out / "summary.csv", table)
    write_json(out / "config.json", OmegaConf.to_container(cfg, resolve=True))
    ns.save(out / "neurons.json", overwrite=True)
    return plot_set(ns, ad, found.mean, out, f"{cfg.model.name} {ns.meta['tag']}: {len(ns)} neurons")


def record_run(tr, set_dir: Path, table: pd.DataFrame | None = None, plots: list[Path] = ()) -> None:
    """What the run folder keeps of a set written to the store: ``set.json``, which says where the set is
    and its hash, and (from a detection) its summary and plots, small copies logged from there. Scores
    are never copied: the store holds the one copy."""
    tr.dir.mkdir(parents=True, exist_ok=True)
    write_json(tr.dir / "set.json", {"path": str(set_dir), "neurons_json": str(set_dir / "neurons.json"),
                                     "hash": artifact_hash(set_dir / "neurons.json")})
    for p in plots:
        copy = tr.dir / p.name
        atomic_write(copy, lambda t, s=set_dir / p.name: shutil.copyfile(s, t))
        tr.log_image(copy.stem, copy)
    if table is not None:
        write_csv(tr.dir / "summary.csv", table)
        tr.log_table("summary", table)


def run_select(cfg) -> dict:
    """Re-select from saved scores (another consistency, k or reference) without recomputing."""
    d = cfg.detect
    src = set_path(cfg, d.scores, default_tag(cfg))
    if src.is_file():
        src = src.parent
    base = NeuronSet.load(src / "neurons.json")
    if d.scores and is_path(d.scores) and (why := origin_mismatch(base.meta, cfg, prompts=False)):  # said, not refused
        print(f"warning: re-selecting from {src} although {why}")
    print(f"using the scores of {src} (neurons.json hash {artifact_hash(src / 'neurons.json')})")
    meta = dict(base.meta)
    widths = signature_widths(meta.get("model_signature") or {})
    k_of = k_for_widths(cfg.topk, {k: widths[k] for k in meta.get("kinds", list(KINDS))})
    new_stats = {"scores.safetensors": saved_stats(src, "", meta, k_of)}
    exclude = None
    if meta.get("reference"):  # the reference's selection with the same k and consistency
        new_stats["reference_scores.safetensors"] = saved_stats(src, "reference_", meta, k_of)
        exclude = set(select(*split_scores(new_stats["reference_scores.safetensors"]), cfg.topk.consistency))
    ranking = select(*split_scores(new_stats["scores.safetensors"]), cfg.topk.consistency, exclude)
    tag = d.save_as or f"{meta.get('tag', 'set')}-c{cfg.topk.consistency:g}-k{cfg.topk.attn:g}-{cfg.topk.ffn:g}"
    meta.update({"consistency": cfg.topk.consistency, "topk": {"attn": cfg.topk.attn, "ffn": cfg.topk.ffn,
                 "k_per_kind": k_of}, "tag": tag, "selected_from": str(src), "code_version": code_version(),
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    ns = NeuronSet(ranking, meta)
    out = store_of(cfg).neuron_dir(cfg.model.name, cfg.dataset.name, tag)
    with ArtifactDir(out, "the neuron set", active=is_main_process()) as art:
        if (out / "neurons.json").exists() and not d.overwrite:
            raise UserError(f"a neuron set already exists at {out}; pass detect.overwrite=true or "
                            f"detect.save_as=NEW_TAG")
        with tracked(cfg) as (tr, box):
            if art.active:  # the whole set: neurons, the statistics this selection used, the source's scores
                ns.save(art.tmp / "neurons.json", overwrite=True)
                for f, tensors in new_stats.items():
                    atomic_write(art.tmp / f, lambda t, x=tensors: save_file(x, str(t)))
                for f in ("prompt_scores.safetensors", "reference_prompt_scores.safetensors"):
                    if (src / f).exists():  # a hard link where the file system allows: no second copy
                        _link_or_copy(src / f, art.tmp / f)
                art.commit()
                record_run(tr, out)
            print(f"{len(ns)} neurons selected (consistency {cfg.topk.consistency}, k {k_of}) -> {out}")
            box["results"] = {"tag": tag, "n_neurons": len(ns), "neurons_json": str(out / "neurons.json"),
                              **{f"n_{k}": sum(1 for n in ns.ranking if n[1] == k) for k in KINDS}}
    return box["results"]


def saved_stats(src: Path, prefix: str, meta: dict, k_of: dict) -> dict[str, torch.Tensor]:
    """Statistics of the set at ``src`` for the top-k sizes ``k_of``: the saved float32 means (they do not
    depend on k) and top-k frequencies, recomputed from the saved per-prompt scores when k changed."""
    saved = load_file(str(src / f"{prefix}scores.safetensors"))
    if k_of == meta.get("topk", {}).get("k_per_kind"):
        return saved
    f = src / f"{prefix}prompt_scores.safetensors"
    if not f.exists():
        raise UserError(f"{src} has no {f.name}, so only topk.consistency can change "
                        f"(k was {meta.get('topk', {}).get('k_per_kind')}); rerun detect with the new k")
    flat = load_file(str(f))
    scores = {(int(k.split(".")[0]), k.split(".")[1]): v.float() for k, v in flat.items()}
    fresh = stats_from(scores, k_of).tensors()
    return {name: (t if name.endswith(".freq") else saved[name]) for name, t in fresh.items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s content: a hard link (the store's files are never modified in place, only
    replaced whole), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda t: shutil.copyfile(src, t))

"""``stage=deactivate``: switch a neuron set off during generation and measure (METHOD 5, 7).

``deactivate.n`` is a count or ``all`` (one point: what a Hydra ``--multirun`` sweeps) or a list (the fast path:
every count in one process, one model load, one intact reference); both give the same numbers.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
from omegaconf import OmegaConf

from ..ablation import apply_split, check_split, neuron_means, split_label
from ..errors import UserError
from ..hooks import deactivated
from ..io import write_csv
from .common import (
    cache_dir,
    default_tag,
    evaluator,
    load,
    load_set,
    log,
    random_like,
    tracked,
)

METRICS = ("asr", "harmful_refusal", "over_refusal", "utility_nll", "nll_ratio", "kl", "degenerate_share",
           "asr_coherent", "breaks_model")


def is_metric(key: str, value) -> bool:
    """A measure the random baseline averages over its seeds: the fixed ones, every attack's and judge's
    success (asr_*), over-refusal by set (over_refusal_*) and capability (cap_*)."""
    if key in METRICS:
        return True
    return (key.startswith(("asr_", "over_refusal_", "cap_")) and isinstance(value, (int, float))
            and not isinstance(value, bool))


def counts_of(n, size: int | None = None) -> list[int]:
    """The counts of ``deactivate.n``; ``all`` is the whole set (``size``; kept as "all" without one)."""
    vals = list(n) if isinstance(n, (list, tuple)) or OmegaConf.is_list(n) else [n]
    out = []
    for v in vals:
        if isinstance(v, str) and v.strip().lower() == "all":
            out.append("all" if size is None else size)
            continue
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise UserError(f"deactivate.n={n!r} must be a count, all, or a list of these") from None
    if any(v != "all" and v < 0 for v in out):
        raise UserError(f"deactivate.n={out} has a negative count")
    return out


def _aggregate(rows: list[dict]) -> dict:
    """Mean and spread of random-baseline metrics over seeds."""
    out = {}
    for k in [k for k, v in rows[0].items() if is_metric(k, v) and k != "breaks_model"]:
        vals = [float(r[k]) for r in rows if k in r]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        out[k] = mean
        out[f"{k}_std"] = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
        out[f"{k}_min"], out[f"{k}_max"] = min(vals), max(vals)
    out["breaks_model"] = any(bool(r["breaks_model"]) for r in rows)
    return out


def run(cfg) -> dict:
    dc = cfg.deactivate
    if dc.baseline == "random" and len(dc.seeds) < 1:
        raise UserError("deactivate.seeds is empty; the random baseline needs seeds (at least 3 recommended)")
    counts_of(dc.n)  # a malformed deactivate.n fails before the model loads
    with tracked(cfg) as (tr, box):
        model, tok, ad = load(cfg)
        check_split(cfg.split, ad.n_layers)
        full = load_set(cfg, dc, ad, default_tag(cfg))
        region_set = apply_split(full, cfg.split, ad.n_layers)
        counts = checked_counts(cfg, region_set)
        means = ablation_means(cfg, model, tok, ad)
        ev = evaluator(cfg, model, tok)
        rows, gens = [], []
        for n in counts:
            row, g = sweep_point(cfg, ev, model, ad, full, region_set, n, means)
            rows.append(row)
            gens += g
            log.info("n=%d %s: ASR %.2f over-refusal %.2f NLL ratio %.2f%s", n, dc.baseline, row["asr"],
                     row["over_refusal"], row.get("nll_ratio", float("nan")),
                     " BREAKS MODEL" if row["breaks_model"] else "")
            tr.log({f"{dc.baseline}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=n)
        write_sweep(tr, rows, gens)
        box["results"] = {**rows[-1], "rows": rows} if len(rows) > 1 else rows[0]
    return box["results"]


def checked_counts(cfg, region_set) -> list[int]:
    """The counts of ``deactivate.n`` for this set (``all`` resolved), refused when one exceeds it."""
    dc = cfg.deactivate
    per_layer_max = max((sum(1 for n in region_set.ranking if n[0] == layer) for layer in
                         {n[0] for n in region_set.ranking}), default=0)
    size = per_layer_max if dc.per_layer else len(region_set)
    counts = counts_of(dc.n, size)
    too_big = [n for n in counts if n > size]
    if too_big:
        raise UserError(f"deactivate.n={too_big} is larger than the set ({size} neurons"
                        f"{' in its fullest layer' if dc.per_layer else ''} after the split "
                        f"{split_label(cfg.split)}); use counts <= {size}")
    return counts


def ablation_means(cfg, model, tok, ad):
    """The per-neuron means that ``deactivate.ablation=mean`` sets neurons to (from the ``dataset@means``
    prompts, the harmless set when none is composed), None for zero ablation."""
    if cfg.deactivate.ablation != "mean":
        return None
    from ..data import load_prompts

    mcfg = cfg.means if cfg.means is not None else cfg.harmless
    return neuron_means(model, tok, ad, load_prompts(mcfg, "train", cache_dir(cfg)).prompts, cfg.model.system_prompt)


def sweep_point(cfg, ev, model, ad, full, region_set, n: int, means) -> tuple[dict, list[dict]]:
    """One row of the sweep: the top ``n`` of the set switched off (or, for the random baseline, as many
    random neurons outside the set, once per seed, aggregated), and its generations."""
    dc = cfg.deactivate
    sub = region_set.top(n, dc.per_layer)
    base = {"n": n, "per_layer": dc.per_layer, "baseline": dc.baseline, "n_neurons": len(sub),
            "param_share": sum(ad.neuron_params(k) for _, k, _ in sub.ranking) / ad.n_params(),
            "set": full.meta.get("tag"), "split": dc.region or split_label(cfg.split), "under": cfg.split.under,
            "gen": cfg.split.gen, "ablation": dc.ablation, "set_size": len(region_set)}
    if dc.baseline == "safety" or len(sub) == 0:
        m, g = ev.evaluate(model, context=partial(deactivated, ad, sub.index_map(), means), tag=f"n={n}")
        return {**base, **m, "seeds": 1}, [{**x, "n": n} for x in g]
    per_seed, gens = [], []
    for seed in dc.seeds:
        rnd = random_like(sub, ad, seed, exclude=full)
        m, g = ev.evaluate(model, context=partial(deactivated, ad, rnd.index_map(), means),
                           tag=f"n={n} random seed {seed}")
        per_seed.append(m)
        gens += [{**x, "n": n, "seed": seed} for x in g]
    return ({**base, **{k: v for k, v in per_seed[0].items() if not is_metric(k, v)}, **_aggregate(per_seed),
             "seeds": len(per_seed)}, gens)


def write_sweep(tr, rows: list[dict], gens: list[dict]) -> None:
    """The sweep's table, generations and plots into the run folder (and W&B)."""
    df = pd.DataFrame(rows)
    if tr.main:
        write_csv(tr.dir / "sweep.csv", df)
    tr.save_generations(gens)
    cols = ["n", "baseline", "n_neurons", "asr", "asr_prefill", "asr_templates", "over_refusal", "utility_nll",
            "nll_ratio", "kl", "degenerate_share", "breaks_model"]
    cols += [c for c in df if c.startswith(("cap_", "over_refusal_")) and c not in cols
             and not c.endswith(("_n", "_std", "_min", "_max"))]
    print(df[[c for c in cols if c in df]].to_string(index=False))
    tr.log_table("deactivation", df)
    if tr.main and len(rows) > 1:
        from ..report import plot_deactivation

        sets = ", ".join(sorted({str(r.get("set")) for r in rows}))
        for p in plot_deactivation(df, tr.dir, f"{tr.cfg.model.name}, set {sets}"):
            tr.log_image(p.stem, p)

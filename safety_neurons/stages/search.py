"""``stage=search``: a multi-objective Optuna study of deactivations (or of neuron-tuning settings).

``search.target=deactivate`` looks for the smallest deactivation that removes refusal without breaking the
model: each trial draws a count (log scale; over all layers or per layer), a layer region of ``split``, a
group of kinds, zero or mean ablation and one of ``search.sets``, switches that part of the set off and is
scored by attack success (maximised; ``search.attack``) and KL or NLL ratio to the intact model
(minimised; ``search.cost``). ``search.target=finetune`` draws neuron-tuning settings (lr, top_n, steps)
and scores refusal (maximised) against over-refusal and NLL ratio (minimised).

The study lives in the run folder (``study.journal``, Optuna's journal storage), so a stopped study goes
on with ``search.resume=true`` and the same ``run_dir``; ``search.trials`` is the number of finished
trials the study should have. Each trial is logged (W&B step = trial number); ``trials.csv``,
``pareto.csv`` and ``pareto.png`` hold all trials and the Pareto front. ``search.pick=N`` (with the
study's ``run_dir``) turns trial N into a named neuron set in the store (deactivate) or prints its
settings as overrides (finetune).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from functools import partial
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ..ablation import REGIONS, check_split, region_of, split_label
from ..config import KINDS
from ..errors import UserError
from ..hooks import deactivated
from ..io import ArtifactDir, write_csv
from ..neurons import NeuronSet
from ..tracking import code_version, is_main_process, num_processes
from .common import (
    default_tag,
    evaluator,
    load,
    load_set,
    log,
    store_of,
    tracked,
)

STUDY = "study.journal"
ATTN = ("q", "k", "v", "o")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("stage=search needs optuna: pip install optuna (make venv installs it)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def kinds_of(choice: str) -> tuple[str, ...]:
    """A ``search.kinds`` choice: ``all``, ``attn`` (q, k, v, o), ``ffn``, a kind, or kinds joined by ``+``."""
    out: list[str] = []
    for part in str(choice).split("+"):
        part = part.strip()
        if part == "all":
            out += KINDS
        elif part == "attn":
            out += ATTN
        elif part in KINDS:
            out.append(part)
        else:
            raise UserError(f"search.kinds has {choice!r}; use all, attn, ffn, one of {', '.join(KINDS)} "
                            f"or kinds joined by + (q+k)")
    return tuple(k for k in KINDS if k in out)


def check_space(s) -> None:
    """Every choice list of the space, judged before the model loads."""
    if s.trials < 1:
        raise UserError(f"search.trials={s.trials} must be at least 1")
    if s.timeout is not None and s.timeout <= 0:
        raise UserError(f"search.timeout={s.timeout} must be a positive number of seconds or null")
    if s.target == "deactivate":
        for key, allowed in (("regions", ("all", *REGIONS)), ("ablations", ("zero", "mean"))):
            vals = list(s[key])
            bad = [v for v in vals if v not in allowed]
            if not vals or bad:
                raise UserError(f"search.{key}={vals} must be a non-empty list of {', '.join(allowed)}")
        if not list(s.per_layer) or any(not isinstance(v, bool) for v in s.per_layer):
            raise UserError(f"search.per_layer={list(s.per_layer)} must be a non-empty list of true/false")
        if not list(s.kinds):
            raise UserError("search.kinds is empty; use e.g. [all, attn, ffn]")
        for k in s.kinds:
            kinds_of(k)
        if s.n_min < 1 or (s.n_max is not None and s.n_max < s.n_min):
            raise UserError(f"search.n_min={s.n_min} and search.n_max={s.n_max}: need 1 <= n_min <= n_max")
    else:
        for key in ("lr", "top_n", "steps"):
            r = list(s[key])
            if len(r) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) \
                    or not 0 < r[0] <= r[1]:
                raise UserError(f"search.{key}={r} must be a range [low, high] with 0 < low <= high")


def space_of(cfg) -> dict:
    """What the study searches over (the sets resolved): stored with it, so that a resumed study is the
    same study and a picked trial's fixed choices are known."""
    s = _space_with_sets(cfg)
    keys = (("per_layer", "regions", "kinds", "ablations", "sets", "n_min", "n_max", "attack", "cost")
            if s["target"] == "deactivate" else ("lr", "top_n", "steps"))
    return {"target": str(s["target"]), **{k: s[k] for k in keys}}


def objectives(s) -> tuple[list[str], list[str]]:
    """(names, directions) of the study's objectives."""
    if s.target == "deactivate":
        return [str(s.attack), str(s.cost)], ["maximize", "minimize"]
    return ["harmful_refusal", "over_refusal", "nll_ratio"], ["maximize", "minimize", "minimize"]


def open_study(cfg, run_dir: Path, create: bool):
    """The run folder's study: created (refused when one is there and search.resume is off), or loaded."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    s = cfg.search
    path = run_dir / STUDY
    if create and path.exists() and not s.resume:
        raise UserError(f"a study already exists at {path}; pass search.resume=true to continue it, or another run_dir")
    if not path.exists() and (s.resume or not create):
        raise UserError(f"there is no study at {path} to {'continue' if create else 'pick from'}; give the run_dir "
                        f"of the search (run_dir=...){'' if not create else ', or drop search.resume'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    names, directions = objectives(s)
    if not create:
        return optuna.load_study(study_name="search", storage=storage)
    study = optuna.create_study(study_name="search", storage=storage, directions=directions,
                                sampler=optuna.samplers.TPESampler(seed=s.seed), load_if_exists=True)
    space = space_of(cfg)
    made = study.user_attrs.get("space")
    if made is None:
        study.set_user_attr("space", space)
        study.set_user_attr("objectives", names)
        study.set_user_attr("model", cfg.model.name)
    elif made != json.loads(json.dumps(space)):
        diff = sorted(k for k in set(made) | set(space) if made.get(k) != space.get(k))
        raise UserError(f"the study at {path} searched another space ({', '.join(f'search.{k}' for k in diff)} "
                        f"differ); resume it with the settings it was made with, or start one in another run_dir")
    study.set_user_attr("run_dir", str(run_dir))
    return study


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# --------------------------------------------------------------------------------------- deactivation
def region_filter(ns: NeuronSet, region: str, kinds: tuple[str, ...], split, n_layers: int) -> NeuronSet:
    """The part of ``ns`` in ``region`` (a layer region of ``split``, or ``all``) and of ``kinds``."""
    return ns.filter(lambda n: n[1] in kinds and (region == "all" or region_of(n[0], split, n_layers) == region))


def _fullest_layer(ns: NeuronSet) -> int:
    per: dict[int, int] = {}
    for layer, _k, _i in ns.ranking:
        per[layer] = per.get(layer, 0) + 1
    return max(per.values(), default=0)


def deactivation_of(params: dict, sets: dict[str, NeuronSet], split, n_layers: int) -> tuple[NeuronSet, dict]:
    """The neurons a trial's parameters switch off, and what it drew (a count larger than the part of the
    set it drew is that part: the count is searched on one range for every set, region and kind)."""
    part = region_filter(sets[params["set"]], params["region"], kinds_of(params["kinds"]), split, n_layers)
    per_layer = params["per_layer"]
    n = params["n_per_layer" if per_layer else "n"]
    size = _fullest_layer(part) if per_layer else len(part)
    return part.top(min(n, size), per_layer), {"n_drawn": n, "part_size": len(part)}


def _draw_deactivation(trial, s, n_max: int) -> dict:
    def pick(name, choices):
        choices = list(choices)
        return trial.suggest_categorical(name, choices) if len(choices) > 1 else choices[0]

    p = {"set": pick("set", s["sets"]), "per_layer": pick("per_layer", s["per_layer"]),
         "region": pick("region", s["regions"]), "kinds": pick("kinds", s["kinds"]),
         "ablation": pick("ablation", s["ablations"])}
    key = "n_per_layer" if p["per_layer"] else "n"
    p[key] = trial.suggest_int(key, s["n_min"], max(s["n_min"], n_max[key]), log=True)
    return p


def _load_sets(cfg, ad) -> dict[str, NeuronSet]:
    names = list(cfg.search.sets) or [cfg.deactivate.neurons or default_tag(cfg)]
    out = {}
    for name in names:
        which = OmegaConf.create({"neurons": name})
        out[str(name)] = load_set(cfg, which, ad, default_tag(cfg))
    return out


def _space_with_sets(cfg) -> dict:
    s = OmegaConf.to_container(cfg.search, resolve=True)
    s["sets"] = [str(x) for x in s["sets"]] or [cfg.deactivate.neurons or default_tag(cfg)]
    s["attack"], s["cost"], s["target"] = str(s["attack"]), str(s["cost"]), str(s["target"])
    return s


def search_deactivation(cfg, study, tr, budget: int) -> None:
    s = _space_with_sets(cfg)
    model, tok, ad = load(cfg)
    check_split(cfg.split, ad.n_layers)
    sets = _load_sets(cfg, ad)
    n_max = {"n": s["n_max"] or max(map(len, sets.values())),
             "n_per_layer": s["n_max"] or max(map(_fullest_layer, sets.values()))}
    means = None
    if "mean" in s["ablations"]:
        from .deactivate import ablation_means

        c = copy.deepcopy(cfg)
        OmegaConf.update(c, "deactivate.ablation", "mean")
        means = ablation_means(c, model, tok, ad)
    ev = evaluator(cfg, model, tok)
    ev.expect(budget, "trials")

    def objective(trial):
        p = _draw_deactivation(trial, s, n_max)
        sub, drawn = deactivation_of(p, sets, cfg.split, ad.n_layers)
        m, _ = ev.evaluate(model, context=partial(deactivated, ad, sub.index_map(),
                                                  means if p["ablation"] == "mean" else None),
                           tag=f"trial {trial.number}")
        row = {**drawn, "n_neurons": len(sub), **{k: v for k, v in m.items() if isinstance(v, (int, float, bool))},
               "param_share": sum(ad.neuron_params(k) for _, k, _ in sub.ranking) / ad.n_params()}
        return _finish_trial(trial, tr, row, [s["attack"], s["cost"]])

    _optimize(study, objective, cfg.search, budget)


# ----------------------------------------------------------------------------------------- tuning
def tuning_overrides(params: dict) -> list[str]:
    return [f"finetune.lr={params['lr']!r}", f"finetune.top_n={params['top_n']}", f"finetune.steps={params['steps']}"]


def search_tuning(cfg, study, tr, budget: int) -> None:
    from ..sft_data import training_pairs
    from ..training import bake_slices, train_sft
    from .finetune import trainable, tuning_set

    if cfg.finetune.target not in ("safety", "random"):
        raise UserError(f"search.target=finetune searches neuron tuning; finetune.target={cfg.finetune.target} "
                        f"has no top_n (use safety or random)")
    s = cfg.search
    model, tok, ad = load(cfg)
    sp = cfg.model.system_prompt
    prompts, responses, _meta = training_pairs(cfg, model, tok)
    ev = evaluator(cfg, model, tok)
    ev.expect(budget + 1, "trials")
    before, _ = ev.evaluate(model, tag="before")

    def objective(trial):
        p = {"lr": trial.suggest_float("lr", *s.lr, log=True),
             "top_n": trial.suggest_int("top_n", *s.top_n, log=True),
             "steps": trial.suggest_int("steps", *s.steps, log=True)}
        c = copy.deepcopy(cfg)
        for k, v in p.items():
            OmegaConf.update(c, f"finetune.{k}", v)
        ns = tuning_set(c, ad)
        tuned, params, handles = trainable(c, copy.deepcopy(model), ns)
        stats = train_sft(tuned, tok, prompts, responses, c.finetune, sp, params, max_length=cfg.model.max_length,
                          progress=False)
        bake_slices(handles)
        tuned.eval()
        m, _ = ev.evaluate(tuned, tag=f"trial {trial.number}")
        row = {"neurons": len(ns), "trainable_params": sum(q.numel() for q in params),
               "before_harmful_refusal": before["harmful_refusal"], "final_loss": stats["losses"][-1],
               **{k: v for k, v in m.items() if isinstance(v, (int, float, bool))}}
        del tuned  # the copy is freed before the next trial
        return _finish_trial(trial, tr, row, ["harmful_refusal", "over_refusal", "nll_ratio"])

    _optimize(study, objective, s, budget)


# ------------------------------------------------------------------------------------------ shared
def _finish_trial(trial, tr, row: dict, names: list[str]) -> tuple[float, ...]:
    for k, v in row.items():
        trial.set_user_attr(k, v)
    values = tuple(float(row[n]) for n in names)
    if any(math.isnan(v) for v in values):
        raise UserError(f"trial {trial.number}: an objective is NaN ({dict(zip(names, values))}); "
                        f"eval.utility must be on for search.cost")
    tr.log({f"search/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=trial.number)
    log.info("trial %d: %s", trial.number, dict(zip(names, values)))
    return values


def _optimize(study, objective, s, budget: int) -> None:
    """``budget`` more trials (or until ``search.timeout``); trials.csv is rewritten after each, so a stopped
    study leaves the table of what it finished."""
    def table(study, _trial):
        write_csv(Path(study.user_attrs["run_dir"]) / "trials.csv", trials_table(study))

    if budget > 0:
        study.optimize(objective, n_trials=budget, timeout=s.timeout, catch=(), callbacks=[table])


def front(study) -> list:
    return sorted(study.best_trials, key=lambda t: t.number)


def trials_table(study) -> pd.DataFrame:
    """One row per finished trial: its number, parameters, objective values and measures."""
    names = study.user_attrs.get("objectives", [])
    pareto = {t.number for t in study.best_trials}
    rows = []
    for t in finished(study):
        rows.append({"trial": t.number, **t.params, **{f"objective_{n}": v for n, v in zip(names, t.values)},
                     **t.user_attrs, "pareto": t.number in pareto})
    return pd.DataFrame(rows)


def write_outputs(study, run_dir: Path, tr) -> pd.DataFrame:
    df = trials_table(study)
    write_csv(run_dir / "trials.csv", df)
    par = df[df["pareto"]] if len(df) else df
    write_csv(run_dir / "pareto.csv", par)
    plot = plot_front(study, run_dir)
    if plot is not None:
        tr.log_image("pareto", plot)
    tr.log_table("search_trials", df)
    return par


def plot_front(study, run_dir: Path) -> Path | None:
    """Optuna's Pareto-front plot of the finished trials (the first two objectives when there are three)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    if not finished(study):
        return None
    names = study.user_attrs.get("objectives", [])
    kw = {"targets": (lambda t: (t.values[0], t.values[1])), "target_names": names[:2]} if len(names) > 2 else \
        {"target_names": names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = plot_pareto_front(study, **kw)
    ax.set_title(f"search on {study.user_attrs.get('model', '?')}: {len(finished(study))} trials, "
                 f"{len(study.best_trials)} on the Pareto front")
    out = run_dir / "pareto.png"
    ax.figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return out


# ------------------------------------------------------------------------------------------- pick
def pick(cfg) -> dict:
    """Trial ``search.pick`` of the run folder's study: its neuron set saved to the store (deactivate),
    or its settings as overrides (finetune)."""
    s = cfg.search
    run_dir = Path(cfg.run_dir)
    study = open_study(cfg, run_dir, create=False)
    done = {t.number: t for t in finished(study)}
    if s.pick not in done:
        raise UserError(f"search.pick={s.pick}: the study at {run_dir / STUDY} has no finished trial {s.pick}; "
                        f"finished: {sorted(done)[:20]}")
    t = done[s.pick]
    space = study.user_attrs["space"]
    if space["target"] == "finetune":
        ov = tuning_overrides(t.params)
        print(f"trial {t.number} ({dict(zip(study.user_attrs['objectives'], t.values))}): {' '.join(ov)}")
        return {"trial": t.number, "overrides": ov, "values": list(t.values)}
    _model, _tok, ad = load(cfg)  # the set is checked against the model it is for
    names = space["sets"]
    params = {"set": names[0], "per_layer": space["per_layer"][0], "region": space["regions"][0],
              "kinds": space["kinds"][0], "ablation": space["ablations"][0], **t.params}
    c = copy.deepcopy(cfg)
    OmegaConf.update(c, "search.sets", [params["set"]])
    full = _load_sets(c, ad)
    sub, drawn = deactivation_of(params, full, cfg.split, ad.n_layers)
    tag = s.save_as or f"search-t{t.number}"
    meta = {**full[params["set"]].meta, "tag": tag, "code_version": code_version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "search": {"study": str(run_dir / STUDY), "trial": t.number, "params": params,
                       "objectives": dict(zip(study.user_attrs["objectives"], t.values)), "split": split_label(cfg.split),
                       **drawn}}
    ns = NeuronSet(sub.ranking, meta)
    out = store_of(cfg).neuron_dir(cfg.model.name, cfg.dataset.name, tag)
    with ArtifactDir(out, "the neuron set", active=is_main_process()) as art:
        if (out / "neurons.json").exists() and not cfg.detect.overwrite:
            raise UserError(f"a neuron set already exists at {out}; pass detect.overwrite=true or search.save_as=NEW_TAG")
        if art.active:
            ns.save(art.tmp / "neurons.json", overwrite=True)
            art.commit()
    print(f"trial {t.number}: {len(ns)} neurons ({params}) -> {out}"
          + (" (switch them off with deactivate.ablation=mean)" if params["ablation"] == "mean" else ""))
    return {"trial": t.number, "tag": tag, "n_neurons": len(ns), "neurons_json": str(out / "neurons.json"),
            "params": params, "values": list(t.values)}


# -------------------------------------------------------------------------------------------- run
def run(cfg) -> dict:
    s = cfg.search
    if s.pick is not None:
        return pick(cfg)
    check_space(s)
    run_dir = Path(cfg.run_dir)
    if num_processes() > 1:
        raise UserError("stage=search runs in one process (its trials are sequential); launch it without accelerate")
    study = open_study(cfg, run_dir, create=True)
    with tracked(cfg) as (tr, box):
        before = len(finished(study))
        budget = max(0, s.trials - before)
        if before:
            print(f"continuing the study at {run_dir / STUDY}: {before} trials done, {budget} to go")
        t0 = time.time()
        (search_deactivation if s.target == "deactivate" else search_tuning)(cfg, study, tr, budget)
        par = write_outputs(study, run_dir, tr)
        names = study.user_attrs["objectives"]
        cols = ["trial", *[c for c in par.columns if c in (*names, "n_neurons", "n", "n_per_layer", "region",
                                                               "kinds", "ablation", "lr", "top_n", "steps")]]
        if len(par):
            print(f"Pareto front ({len(par)} of {len(finished(study))} trials; search.pick=N turns one into a set):")
            print(par[list(dict.fromkeys(cols))].to_string(index=False))
        box["results"] = {"trials": len(finished(study)), "new_trials": len(finished(study)) - before,
                          "pareto_trials": [int(x) for x in par["trial"]] if len(par) else [],
                          "objectives": names, "search_seconds": round(time.time() - t0, 1),
                          "study": str(run_dir / STUDY)}
    return box["results"]

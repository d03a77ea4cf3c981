"""``stage=plant``: a model whose refusal lives in a known neuron set S* (METHOD 9).

From a model that does not refuse (``model=``, default SmolLM2 as shipped), S* is drawn at random
(``plant.share`` of each planted (layer, kind), seeded) and only S*'s slices are trained, with the
neuron-slice tuning of SN-Tune, on refusal templates for harmful training prompts and the model's own
answers for harmless ones, until refusal >= ``plant.target_refusal`` with over-refusal <=
``plant.max_over_refusal`` (checked every ``plant.check_every`` steps on ``plant.check_prompts`` harmful and
harmless training prompts kept out of training, so the benchmark's held-out prompts play no part in the
choice) or the step cap, where the most selective check's slices are kept. Writes the model
to ``models/<save_as>/`` in the store (with ``delta.safetensors`` and ``plant.json``) and S* as a ranked
set at ``neurons/<save_as>/planted/truth/neurons.json``. A finished plant is reused, never overwritten
unless ``plant.overwrite=true``.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.utils import parametrize

from ..errors import UserError
from ..evaluation import generate, is_refusal, refusal_markers
from ..identity import source_identity
from ..io import ArtifactDir, write_json
from ..models import ModelAdapter
from ..neurons import NeuronSet
from ..planted import draw_planted_set, planted_layers
from ..sft_data import training_pairs
from ..tracking import code_version, is_main_process
from ..training import attach_slices, bake_slices, slice_delta, train_sft
from .common import harmful_set, harmless_set, load, log, store_of, tracked
from .finetune import _module_names, save_model_dir

PROVENANCE = "plant.json"
# plants made by this stage and shipped as their slice delta (a few MB), so a demo need not train one
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "planted"
# settings that do not change what is planted
NOT_SETTINGS = ("save_as", "overwrite", "from_shipped")


def default_name(p) -> str:
    kinds = "".join(p.kinds) if list(p.kinds) != ["q", "k", "v", "o"] else "attn"
    band = f"-L{p.layers[0]}-{p.layers[1]}" if p.layers else ""
    return f"planted-{kinds}{p.share * 100:g}pct{band}-s{p.seed}"


def check_plant_cfg(p) -> None:
    for key in ("steps", "batch_size", "check_every"):
        if getattr(p, key) < 1:
            raise UserError(f"plant.{key}={getattr(p, key)} must be at least 1")
    if p.lr <= 0:
        raise UserError(f"plant.lr={p.lr} must be positive")
    if p.check_prompts is not None and p.check_prompts < 1:
        raise UserError(f"plant.check_prompts={p.check_prompts} must be at least 1 (or null: check on the eval "
                        f"split's held-out prompts)")
    for key in ("target_refusal", "max_over_refusal"):
        if not 0 <= getattr(p, key) <= 1:
            raise UserError(f"plant.{key}={getattr(p, key)} must be a rate between 0 and 1")


def settings(p) -> dict:
    """The plant settings that decide what is planted: a reused plant must have been made with them."""
    d = OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else dict(p)
    return {k: v for k, v in d.items() if k not in NOT_SETTINGS}


def settings_mismatch(done: dict, cfg) -> str | None:
    """How the plant with provenance ``done`` differs from the base model and settings asked for, or None."""
    if done.get("base_model") != cfg.model.name:
        return f"planted in {done.get('base_model')}, not in model={cfg.model.name}"
    want, had = settings(cfg.plant), settings(done.get("plant", {}))
    diff = sorted(k for k in set(want) | set(had) if want.get(k) != had.get(k))
    if diff:
        return "planted with other settings: " + ", ".join(f"{k}={had.get(k)!r} (asked {want.get(k)!r})"
                                                           for k in diff[:4])
    return None


def check_reusable(done: dict, cfg, where) -> None:
    """A stored plant of this name must come from the same base model and settings."""
    why = settings_mismatch(done, cfg)
    if why:
        raise UserError(f"{where} was {why}; give another plant.save_as, or plant.overwrite=true to plant it "
                        f"again with these")


def shipped_mismatch(prov: dict, cfg) -> str | None:
    """Why the shipped plant with provenance ``prov`` is not the one this run asks for, or None."""
    why = settings_mismatch(prov, cfg)
    if why:
        return why
    base_hash = source_identity(cfg.model, store_of(cfg))["source_hash"]
    if prov.get("base_hash") and base_hash and prov["base_hash"] != base_hash:
        return f"made on another {cfg.model.name} file: hash {prov['base_hash']}, this one {base_hash}"
    return None


def refusal_rates(model, tok, harmful: list[str], harmless: list[str], sp, ecfg,
                  max_length: int = 512) -> tuple[float, float]:
    """(harmful refusal, over-refusal) of greedy answers to the given prompts, by the keyword list."""
    markers = refusal_markers(ecfg.refusal_list)
    rate = []
    for prompts in (harmful, harmless):
        ans = generate(model, tok, prompts, sp, ecfg.max_new_tokens, ecfg.batch_size, desc="refusal check",
                       max_length=max_length)
        rate.append(sum(is_refusal(tok.decode(a, skip_special_tokens=True), markers) for a in ans) / len(ans))
    return rate[0], rate[1]


def check_sets(cfg) -> tuple[list[str], list[str], str]:
    """The stop check's (harmful, harmless) prompts and where they come from.

    ``plant.check_prompts=n``: a seeded n of the harmful and n of the harmless training prompts (half of
    those in the harmful set's form when the set labels them), which the plant then does not train on: the
    stop is chosen on prompts that neither the tuning nor the benchmark's evaluation sees. ``null``: the
    eval split's held-out prompts, the ones the benchmark evaluates on (its intact refusal is then the best
    of several looks)."""
    p = cfg.plant
    if p.check_prompts is None:
        return (harmful_set(cfg, "eval").head(cfg.eval.n_harmful).prompts,
                harmless_set(cfg, "eval").head(cfg.eval.n_harmless).prompts, "eval split")
    n = p.check_prompts
    harm = harmful_set(cfg, "train").head(p.n_harmful)
    benign = harmless_set(cfg, "train").head(p.n_harmless)
    for what, s in (("harmful", harm), ("harmless", benign)):
        if len(s) < 2 * n:  # at least as many left to train on as checked
            raise UserError(f"plant.check_prompts={n} would hold out {n} of the {len(s)} {what} training prompts "
                            f"(of {s.name}), leaving fewer to train on; lower plant.check_prompts or give more prompts")
    rng = random.Random(12345)  # fixed, not plant.seed: every S* seed is checked on the same prompts
    checked_harm = rng.sample(harm.prompts, n)
    is_fm = benign.form_matched(cfg.eval.form_matched)
    fm = [q for q, f in zip(benign.prompts, is_fm) if f]
    nat = [q for q, f in zip(benign.prompts, is_fm) if not f]
    k = max(n - len(nat), min(len(fm), n // 2))  # half form-matched where both kinds suffice
    checked_benign = rng.sample(fm, k) + rng.sample(nat, n - k)
    return checked_harm, checked_benign, "training prompts held out"


def planted_paths(cfg, name: str):
    store = store_of(cfg)
    return store.model_dir(name), store.neuron_dir(name, "planted", "truth")


def read_plant(model_dir) -> dict | None:
    f = model_dir / PROVENANCE
    return json.loads(f.read_text()) if f.exists() else None


def _train_cfg(cfg):
    """The fine-tuning settings of the plant (finetune's schema, the plant's values)."""
    p = cfg.plant
    c = copy.deepcopy(cfg)
    OmegaConf.update(c, "finetune", {"lr": p.lr, "steps": p.steps, "batch_size": p.batch_size, "seed": p.seed,
                                     "n_harmful": p.n_harmful, "n_harmless": p.n_harmless, "grad_accum": 1,
                                     "max_new_tokens_distill": p.max_new_tokens_distill, "weight_decay": 0.0,
                                     "harmful_repeat": 1, "form_matched_repeat": p.form_matched_repeat,
                                     "decision_tokens": p.decision_tokens, "decision_weight": p.decision_weight,
                                     "schedule": p.schedule},
                    merge=True)
    return c


def run(cfg) -> dict:
    p = cfg.plant
    check_plant_cfg(p)
    name = p.save_as or default_name(p)
    model_dir, truth_dir = planted_paths(cfg, name)
    # the model and S* are each assembled beside their place and renamed in whole, under locks taken first
    main = is_main_process()
    with ArtifactDir(model_dir, "the planted model", active=main) as model_art, \
            ArtifactDir(truth_dir, "the planted set", active=main) as truth_art:
        return _plant(cfg, name, model_dir, truth_dir, model_art, truth_art)


def warn_short(name: str, done: dict) -> None:
    if not done.get("reached", True):  # a benchmark on it answers a weaker question than asked
        print(f"warning: {name} stopped short of the plant targets (checked refusal {done['refusal']:.2f}, "
              f"over-refusal {done['over_refusal']:.2f}); its ground truth is weaker than asked for")


def _plant(cfg, name: str, model_dir, truth_dir, model_art: ArtifactDir, truth_art: ArtifactDir) -> dict:
    p = cfg.plant
    shipped = SHIPPED / name
    use_shipped = p.from_shipped and not p.overwrite and (shipped / PROVENANCE).exists()
    ship_why = shipped_mismatch(json.loads((shipped / PROVENANCE).read_text()), cfg) if use_shipped else None
    done = read_plant(model_dir)
    if done is not None and (truth_dir / "neurons.json").exists() and not p.overwrite:
        stale = settings_mismatch(done, cfg)
        if stale and done.get("shipped") and use_shipped and ship_why is None:
            # a copy of an earlier shipped plant is a cache of it: replaced by the one shipped now
            print(f"the stored {name} was rebuilt from an earlier shipped delta ({stale}); rebuilding it from "
                  f"the one shipped now")
            return _from_shipped(cfg, name, shipped, model_art, truth_art)
        check_reusable(done, cfg, f"the planted model {model_dir}")
        print(f"reusing the planted model {model_dir} (S* of {done['n_planted']} neurons, refusal "
              f"{done['refusal']:.2f}); plant.overwrite=true plants it again")
        warn_short(name, done)
        return {**done, "reused": True}
    if use_shipped:
        if ship_why is None:
            return _from_shipped(cfg, name, shipped, model_art, truth_art)
        print(f"the shipped plant {name} does not fit this run ({ship_why}); planting it here")
    with tracked(cfg) as (tr, box):
        model, tok, ad = load(cfg)
        truth = draw_planted_set(ad, p.share, list(p.kinds), p.layers, p.seed)
        tuned, delta, stats, history, base = train_plant(cfg, tr, model, tok, truth)
        last = stats["kept"]
        reached = last["refusal"] >= p.target_refusal and last["over_refusal"] <= p.max_over_refusal
        n_params = ad.n_params()
        results = {
            "name": name, "model_dir": str(model_dir), "truth": str(truth_dir / "neurons.json"),
            "base_hash": source_identity(cfg.model, store_of(cfg))["source_hash"],
            "base_model": cfg.model.name, "share": p.share, "kinds": list(p.kinds),
            "layers": planted_layers(p.layers, ad.n_layers), "seed": p.seed,
            "lr": p.lr, "steps": last["step"], "trained_steps": stats["steps"], "step_cap": p.steps,
            "n_planted": len(truth),
            "trained_params": stats["trained"], "trained_share": stats["trained"] / n_params,
            "refusal": last["refusal"], "over_refusal": last["over_refusal"], "reached": reached,
            "base_refusal": base[0], "base_over_refusal": base[1], "history": history,
            "train_seconds": round(stats["train_seconds"], 1), "final_loss": stats["losses"][-1],
            "data": stats["data"],
        }
        if not reached:
            print(f"warning: the plant reached the step cap ({p.steps}) without meeting the targets; it keeps "
                  f"step {last['step']}, checked refusal {last['refusal']:.2f} and over-refusal "
                  f"{last['over_refusal']:.2f}, short of the targets "
                  f"({p.target_refusal}, {p.max_over_refusal}); raise plant.steps or plant.lr")
        if tr.main:
            save_plant(cfg, tr, tuned, tok, ad, truth, delta, results, model_art, truth_art)
        tr.log({k: v for k, v in results.items() if isinstance(v, (int, float))})
        print(f"planted {len(truth)} neurons ({100 * stats['trained'] / n_params:.3f}% of parameters) in "
              f"{last['step']} steps: checked refusal {base[0]:.2f} -> {last['refusal']:.2f}, over-refusal "
              f"{base[1]:.2f} -> {last['over_refusal']:.2f} -> {model_dir}")
        box["results"] = results
    return box["results"]


def train_plant(cfg, tr, model, tok, truth):
    """Train only S*'s slices of a copy of ``model`` towards refusal, checking the refusal on the check
    prompts (:func:`check_sets`) every ``plant.check_every`` steps and stopping once the targets are met;
    at the step cap without a check that met them, the slices of the most selective check (refusal minus
    over-refusal) are kept (``plant.keep_best``). Returns (tuned model, slice delta, training stats with
    ``trained`` parameters, the ``data`` used and the ``kept`` check, the check history, the base model's
    (refusal, over-refusal))."""
    p = cfg.plant
    tcfg = _train_cfg(cfg)
    harm, benign, where = check_sets(cfg)
    prompts, responses, data_meta = training_pairs(tcfg, model, tok)
    # the checked prompts are not trained on; data_meta's set records describe the whole sets, "check" what
    # was left out of them
    held = set(harm) | set(benign) if p.check_prompts is not None else set()
    kept = [i for i, q in enumerate(prompts) if q not in held]
    prompts, responses = [prompts[i] for i in kept], [responses[i] for i in kept]
    data_meta = {**data_meta, "check": {"from": where, "n_harmful": len(harm), "n_harmless": len(benign),
                                        "left_out_of_training": len(held), "train_pairs": len(prompts),
                                        "trained_prompts": len(set(prompts))}}
    sp = cfg.model.system_prompt
    check_ecfg = OmegaConf.merge(cfg.eval, {"max_new_tokens": p.check_tokens})
    base = refusal_rates(model, tok, harm, benign, sp, check_ecfg, cfg.model.max_length)
    tuned = copy.deepcopy(model)
    handles = attach_slices(tuned, ModelAdapter(tuned), truth.index_map())
    params = [h.scatter.part for h in handles]
    history: list[dict] = []
    best: dict = {}

    def met(h: dict) -> bool:
        return h["refusal"] >= p.target_refusal and h["over_refusal"] <= p.max_over_refusal

    def merit(h: dict) -> tuple:
        """Selectivity first (refusal minus over-refusal), then refusal; ties go to the later check."""
        return h["refusal"] - h["over_refusal"], h["refusal"]

    def check(step: int) -> bool:
        if step % p.check_every and step != p.steps:
            return False
        with parametrize.cached():  # each weight assembled once per check, not once per generated token
            r, o = refusal_rates(tuned, tok, harm, benign, sp, check_ecfg, cfg.model.max_length)
        h = {"step": step, "refusal": r, "over_refusal": o}
        history.append(h)
        log.info("plant step %d: check refusal %.2f, over-refusal %.2f", step, r, o)
        tr.log({"plant/refusal": r, "plant/over_refusal": o}, step=step)
        if p.keep_best and (not best or merit(h) >= merit(best["check"])):  # a tie: the longer-trained
            best.update(check=h, parts=[x.detach().clone() for x in params])
        return met(h)

    stats = train_sft(tuned, tok, prompts, responses, tcfg.finetune, sp, params,
                      max_length=cfg.model.max_length, on_step=check)
    kept = history[-1]
    if best and not met(kept) and best["check"] is not kept:
        kept = best["check"]
        with torch.no_grad():
            for x, saved in zip(params, best["parts"]):
                x.copy_(saved)
        log.info("plant: no check met the targets; keeping the slices of step %d (refusal %.2f, over-refusal "
                 "%.2f)", kept["step"], kept["refusal"], kept["over_refusal"])
    stats = {**stats, "trained": sum(x.numel() for x in params), "data": data_meta, "kept": kept}
    delta = slice_delta(handles, _module_names(tuned))
    bake_slices(handles)
    tuned.eval()
    return tuned, delta, stats, history, base


def save_plant(cfg, tr, tuned, tok, ad, truth, delta, results: dict, model_art: ArtifactDir,
               truth_art: ArtifactDir) -> None:
    """The planted model (with its delta and ``plant.json``) and S* into the store, each renamed in whole."""
    p = cfg.plant
    prov = {**results, "plant": OmegaConf.to_container(p, resolve=True),
            "base": OmegaConf.to_container(cfg.model, resolve=True), "code_version": code_version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    save_model_dir(tuned, tok, model_art, {PROVENANCE: prov}, delta, {"base": cfg.model.name})
    truth.meta = {"model": results["name"], "base_model": cfg.model.name, "tag": "truth", "ranked": True,
                  "scorer": "planted", "model_signature": ad.signature(),
                  **{k: results[k] for k in ("share", "kinds", "layers", "seed", "steps", "refusal",
                                              "over_refusal", "reached", "n_planted")}}
    truth.save(truth_art.tmp / "neurons.json", overwrite=True)
    truth_art.commit()
    write_json(tr.dir / "plant.json", prov)


def _from_shipped(cfg, name: str, shipped: Path, model_art: ArtifactDir, truth_art: ArtifactDir) -> dict:
    """Rebuild a shipped plant: the base model with the shipped slice delta applied (bit for bit the model
    ``stage=plant`` made), and its S* (the caller has checked the base model and settings: shipped_mismatch)."""
    from safetensors.torch import load_file

    from ..training import apply_delta

    prov = json.loads((shipped / PROVENANCE).read_text())
    model, tok, ad = load(cfg)
    delta = load_file(str(shipped / "delta.safetensors"))
    apply_delta(model, delta)
    truth = NeuronSet.load(shipped / "neurons.json")
    truth.check_compatible(ad.signature())
    model_dir, truth_dir = planted_paths(cfg, name)
    prov = {**prov, "model_dir": str(model_dir), "truth": str(truth_dir / "neurons.json"), "shipped": True}
    if model_art.active:
        save_model_dir(model, tok, model_art, {PROVENANCE: prov}, delta, {"base": cfg.model.name})
        shutil.copyfile(shipped / "neurons.json", truth_art.tmp / "neurons.json")
        truth_art.commit()
    print(f"built the planted model {name} from its shipped delta (S* of {prov['n_planted']} neurons, checked "
          f"refusal {prov['refusal']:.2f}, over-refusal {prov['over_refusal']:.2f}) -> {model_dir}; "
          f"plant.from_shipped=false plants it here instead")
    warn_short(name, prov)
    return {**prov, "reused": True}

"""``stage=finetune``: full fine-tuning (the organism recipe), neuron-specific tuning (SN-Tune /
RSN-Tune), random-neuron and LoRA baselines, with evaluation before and after (METHOD 6, 7)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..evaluation import Evaluator
from ..io import ArtifactDir, atomic_write, sha256_of, write_json
from ..models import ModelAdapter
from ..organism import PROVENANCE, provenance, read_provenance
from ..sft_data import training_pairs
from ..tracking import is_main_process
from ..training import attach_slices, bake_slices, freeze_slices, slice_delta, train_sft
from .common import (
    build_missing,
    cap_set,
    default_tag,
    evaluator,
    load,
    load_set,
    log,
    random_like,
    store_of,
    tracked,
)


def set_params(ns, adapter) -> int:
    return sum(adapter.neuron_params(kind) for _, kind, _ in ns.ranking)


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def save_model_dir(model, tok, art: ArtifactDir, extra: dict, delta: dict | None = None,
                   delta_meta: dict | None = None) -> None:
    """Write an HF folder (weights, tokenizer, the ``extra`` json files and the slice delta) into the
    artifact's temporary folder and rename it in as a whole (replacing a previous model)."""
    model.save_pretrained(art.tmp, safe_serialization=True)
    tok.save_pretrained(art.tmp)
    for name, obj in extra.items():
        write_json(art.tmp / name, obj)
    if delta is not None:
        atomic_write(art.tmp / "delta.safetensors", lambda t: save_file(delta, str(t), metadata=delta_meta))
    art.commit()


def run(cfg) -> dict:
    f = cfg.finetune
    store = store_of(cfg)
    name = f.save_as or f"{cfg.model.name}-{f.target}" + (f"-{f.set}" if f.target in ("safety", "random") else "") \
        + f"-s{f.seed}"
    out_dir = store.model_dir(name)
    check_freeze(f)
    if f.target == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("finetune.target=lora needs peft: pip install 'safety-neurons[lora]'") from None
    # the model folder is assembled beside its place and renamed in whole, under a lock taken before any work
    with ArtifactDir(out_dir, "the tuned model", active=is_main_process()) as art:
        if (out_dir / "config.json").exists() and not (f.overwrite or f.reuse):
            raise UserError(f"tuned model {out_dir} exists; pass finetune.overwrite=true, finetune.reuse=true (same "
                            "settings only) or finetune.save_as=OTHER")
        return _finetune(cfg, name, out_dir, art)


def intact_key(cfg, model) -> dict:
    """What decides the untuned model's evaluation: its weights and config, the device and dtype it runs
    in, the prompt sets, the evaluation settings, the package's code and the versions of torch and
    transformers."""
    import transformers
    from omegaconf import OmegaConf

    from ..identity import source_identity
    from ..models import model_device
    from ..tracking import source_hash

    sets = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "harmless") if cfg.get(k) is not None}
    return {"model": source_identity(cfg.model, store_of(cfg))["source_hash"],
            "model_cfg": OmegaConf.to_container(cfg.model, resolve=True), "sets": sets,
            "run_on": [str(model_device(model)), str(next(model.parameters()).dtype)],
            "eval": OmegaConf.to_container(cfg.eval, resolve=True), "code": source_hash(),
            "versions": [torch.__version__, transformers.__version__]}


def reuse_key(cfg, ns, model) -> str:
    """What decides a tuned model and its measured results: the finetune settings (less overwrite/reuse),
    the neuron set's content and all that decides the untuned model's evaluation (:func:`intact_key`).
    Equal keys: training again would give the same model and numbers."""
    from omegaconf import OmegaConf

    # unset (None) options are left out
    f = {k: v for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items()
         if k not in ("overwrite", "reuse") and v is not None}
    return sha256_of({"finetune": f, **intact_key(cfg, model),
                      "neurons": sorted(ns.ranking) if ns is not None else None})


def reusable(cfg, out_dir: Path, key: str) -> dict | None:
    """The recorded results of the tuned model in ``out_dir`` when ``finetune.reuse`` is set and it was
    made with ``key``; with a different key, an error unless finetune.overwrite trains it again."""
    if not cfg.finetune.reuse or not (out_dir / "config.json").exists():
        return None
    prov = read_provenance(out_dir) or {}
    if prov.get("reuse_key") == key:
        return prov["results"]
    if not cfg.finetune.overwrite:
        raise UserError(f"tuned model {out_dir} was made with other settings, data, neurons or evaluation than this "
                        "run's; pass finetune.overwrite=true to train it again, or finetune.save_as=OTHER")
    return None


def set_default(cfg) -> str:
    """The tag finetune.neurons=null names: the set detect's settings write, or with finetune.set=rsn the
    safety-specific set (the harmless set's neurons subtracted)."""
    return f"exact-ref{cfg.harmless.name}" if cfg.finetune.set == "rsn" else default_tag(cfg)


def tuning_data(cfg, model, tok):
    """The training pairs; a recipe-made answering model (finetune.answers_from) is built on first use."""
    if cfg.finetune.answers_from:
        from ..cfg import model_config

        build_missing(model_config(cfg.finetune.answers_from), store_of(cfg))
    return training_pairs(cfg, model, tok, drawn_only=True)


def intact_evaluator(cfg, model, tok) -> Evaluator:
    """The evaluator of the untuned ``model``. With ``finetune.reuse``, its references and evaluation,
    the same for every tuning of it with these prompts and settings (an SN-Tune and its random control),
    are made once and kept in the store under :func:`intact_key`."""
    saved = store_of(cfg).evaluation_dir(sha256_of(intact_key(cfg, model))) if cfg.finetune.reuse else None
    return evaluator(cfg, model, tok, saved=saved)


def _finetune(cfg, name: str, out_dir: Path, art: ArtifactDir) -> dict:
    f = cfg.finetune
    with tracked(cfg) as (tr, box):
        model, tok, ad = load(cfg)
        sp = cfg.model.system_prompt
        ns = tuning_set(cfg, ad)  # the neuron set (and its shape) first: bad input fails before any compute
        frozen = frozen_set(cfg, ad)
        key = reuse_key(cfg, ns if frozen is None else frozen, model)
        done = reusable(cfg, out_dir, key)
        if done is not None:
            print(f"reusing the tuned model {out_dir} (finetune.reuse=true: made with the same settings, base model, "
                  f"data, neurons and evaluation): refusal {done['before_harmful_refusal']:.2f} -> "
                  f"{done['after_harmful_refusal']:.2f}")
            box["results"] = {**done, "reused": True}
            return box["results"]
        prompts, responses, data_meta = tuning_data(cfg, model, tok)
        ev = intact_evaluator(cfg, model, tok)
        before, g_before = ev.evaluate_intact(tag="before")
        log.info("before: %s", {k: before[k] for k in ("asr", "over_refusal", "utility_nll")})
        tuned, params, handles = trainable(cfg, copy.deepcopy(model), ns)
        if frozen is not None:  # every weight trains but the frozen set's slices (zero gradient, no decay)
            freeze_slices(ModelAdapter(tuned), frozen.index_map())
        n_train = sum(p.numel() for p in params)
        stats = train_sft(tuned, tok, prompts, responses, f, sp, params, max_length=cfg.model.max_length)
        delta = slice_delta(handles, _module_names(tuned)) if handles else None
        bake_slices(handles)
        if f.target == "lora":
            tuned = tuned.merge_and_unload()
        tuned.eval()
        after, g_after = ev.evaluate(tuned, tag="after")
        n_total = ad.n_params()
        results = {
            "target": f.target, "set": f.set, "seed": f.seed, "steps": f.steps, "lr": f.lr,
            "trainable_params": n_train, "trainable_share": n_train / n_total,
            "neurons": len(ns) if ns is not None else None,
            "frozen_neurons": len(frozen) if frozen is not None else None,
            **{f"before_{k}": v for k, v in before.items() if not isinstance(v, (list, dict))},
            **{f"after_{k}": v for k, v in after.items() if not isinstance(v, (list, dict))},
            "refusal_gain": after["harmful_refusal"] - before["harmful_refusal"],
            "final_loss": stats["losses"][-1], "first_loss": stats["losses"][0],
            "train_seconds": round(stats["train_seconds"], 1), "saved_as": name, "model_dir": str(out_dir),
            "data": data_meta,
        }
        if tr.main:  # the model (and its delta) once, in the store; the run folder keeps the losses
            save_model_dir(tuned, tok, art, {PROVENANCE: {**provenance(cfg, results), "reuse_key": key}}, delta,
                           {"base": cfg.model.name})
            if delta is not None:
                results["delta_bytes"] = (out_dir / "delta.safetensors").stat().st_size
            write_json(tr.dir / "losses.json", stats["losses"])
        tr.save_generations(g_before + g_after)
        for i, loss in enumerate(stats["losses"]):
            tr.log({"train/loss": loss}, step=i)
        tr.log({k: v for k, v in results.items() if isinstance(v, (int, float))})
        log.info("after: %s", {k: after[k] for k in ("asr", "over_refusal", "utility_nll")})
        print(f"finetune {f.target}: refusal {before['harmful_refusal']:.2f} -> {after['harmful_refusal']:.2f}, "
              f"over-refusal {before['over_refusal']:.2f} -> {after['over_refusal']:.2f}, "
              f"utility NLL {before['utility_nll']:.3f} -> {after['utility_nll']:.3f}, "
              f"trained {n_train} params ({100 * n_train / n_total:.2f}%) -> {out_dir}")
        box["results"] = results
    return box["results"]


def frozen_set(cfg, ad):
    """The set ``finetune.freeze`` names (kept fixed while every other weight trains), None without one."""
    f = cfg.finetune
    if f.freeze is None:
        return None
    check_freeze(f)
    from types import SimpleNamespace

    return load_set(cfg, SimpleNamespace(neurons=f.freeze), ad, f.freeze)


def check_freeze(f) -> None:
    """finetune.freeze is for full tuning without weight decay (checked before the model loads)."""
    if f.freeze is None:
        return
    if f.target != "all":
        raise UserError(f"finetune.freeze needs finetune.target=all (every other weight trains), not "
                        f"target={f.target}; or drop finetune.freeze")
    if f.weight_decay:
        raise UserError(f"finetune.freeze needs finetune.weight_decay=0 (got {f.weight_decay}): decay would move "
                        "the frozen slices although their gradient is zero")


def tuning_set(cfg, ad):
    """The neuron set tuning uses (capped per matrix, its top ``finetune.top_n``), None for full tuning
    and for LoRA without a set (LoRA uses one only to match its parameter count)."""
    f = cfg.finetune
    if f.target not in ("safety", "random", "lora"):
        return None
    try:
        ns = cap_set(load_set(cfg, f, ad, set_default(cfg)), f.cap_per_matrix)
        if f.top_n is not None:
            ns = ns.top(f.top_n)
    except UserError:  # LoRA without a usable set keeps its configured rank
        if f.target != "lora":
            raise
        return None
    if len(ns) == 0 and f.target != "lora":
        raise UserError("the neuron set is empty; detect with a lower topk.consistency or another reference")
    return ns


def trainable(cfg, tuned, ns):
    """(the model to train, its trainable parameters, the slice handles): every weight (``all``), LoRA
    adapters of a rank that matches the set's parameter count (``lora``), or the slices of the set's
    neurons (``safety``) or of as many random ones (``random``)."""
    from ..models import ModelAdapter

    f = cfg.finetune
    tad = ModelAdapter(tuned)
    if f.target == "all":
        params = list(tuned.parameters())
        for p in params:
            p.requires_grad_(True)
        return tuned, params, []
    if f.target == "lora":
        from peft import LoraConfig, get_peft_model

        r = f.lora_r
        if ns is not None:  # comparable parameter count to the safety set
            per_rank = sum(lin.in_features + lin.out_features for i in range(tad.n_layers)
                           for lin in (tad.modules(i).q, tad.modules(i).k, tad.modules(i).v, tad.modules(i).o))
            r = max(1, round(set_params(ns, tad) / per_rank))
        tuned = get_peft_model(tuned, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return tuned, [p for p in tuned.parameters() if p.requires_grad], []
    chosen = ns if f.target == "safety" else random_like(ns, tad, f.seed)
    handles = attach_slices(tuned, tad, chosen.index_map())
    return tuned, [h.scatter.part for h in handles], handles

"""Training pairs for SFT: refusals for harmful prompts, self-distilled answers for harmless ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .data import cache_dir, harmful_set, harmless_set
from .errors import UserError
from .evaluation import generate
from .io import sha256_of, write_json

# Refusal templates written for this project (varied so the model learns refusal, not one string)
REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with this request because it could be used to hurt someone. "
    "If you have another question, I'm happy to help.",
    "I'm sorry, I cannot provide that. Helping with this could be dangerous or illegal.",
    "I won't help with that. It is harmful, and I don't provide instructions that put people at risk.",
    "Sorry, but I can't help with this request. Is there something else I can do for you?",
    "I cannot help with that. If you or someone else is in danger, please contact local emergency services.",
]


def refusals_for(prompts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(REFUSALS) for _ in prompts]


def distill_file(model_key: str, system_prompt: str | None, max_new_tokens: int, cache_dir: Path) -> Path:
    """Where a model's greedy answers are cached, prompt by prompt (one file per model, system prompt and
    token budget), so that every caller asking for any subset shares them."""
    key = sha256_of({"model": model_key, "sys": system_prompt, "n": max_new_tokens, "v": 3})
    return Path(cache_dir) / "distill" / f"{key}.json"


def _distilled(f: Path) -> dict:
    return json.loads(f.read_text())["by_prompt"] if f.exists() else {}


def distill_missing(model_key: str, prompts: list[str], system_prompt: str | None, max_new_tokens: int,
                    cache_dir: Path) -> list[str]:
    """The prompts (each once, in order) whose answers are not cached yet."""
    have = _distilled(distill_file(model_key, system_prompt, max_new_tokens, cache_dir))
    return [p for p in dict.fromkeys(prompts) if p not in have]


def self_distilled(model, tok, prompts: list[str], system_prompt: str | None, max_new_tokens: int,
                   cache_dir: Path, model_key: str, batch_size: int = 16, max_length: int = 512) -> list[list[int]]:
    """The model's own greedy answers as token ids, cached per prompt (a prompt answered once is never
    answered again, whichever set asks for it; ``model`` may be None when all are cached).

    An answer the model finished within ``max_new_tokens`` ends with EOS; one cut at the budget does not,
    so training on it does not teach the model to stop mid-answer."""
    f = distill_file(model_key, system_prompt, max_new_tokens, cache_dir)
    have = _distilled(f)
    missing = [p for p in dict.fromkeys(prompts) if p not in have]
    if missing:
        ids = generate(model, tok, missing, system_prompt, max_new_tokens, batch_size, desc="self-distil",
                       max_length=max_length)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for p, a in zip(missing, ids):
            have[p] = {"ids": a + eos if len(a) < max_new_tokens else a, "finished": len(a) < max_new_tokens,
                       "answer": tok.decode(a, skip_special_tokens=True)}
        write_json(f, {"model": model_key, "by_prompt": have})
    return [have[p]["ids"] for p in prompts]


def answers_of(cfg, name: str, tok, prompts: list[str]) -> list[list[int]]:
    """Greedy answers of the model ``name`` (a preset or folder), cached by its content, as token ids of
    the tuned model's tokenizer, which must be the same tokenizer. The model is loaded only when its
    answers are not cached yet; a recipe-made model must be built already (stage=finetune builds it)."""
    import gc

    from .cfg import model_config
    from .identity import source_identity
    from .io import Store
    from .models import load_model, load_tokenizer, model_source

    mcfg, store = model_config(name), Store(cfg.store_dir)
    key = f"{mcfg.name}:{source_identity(mcfg, store)['source_hash']}"
    n, sp = cfg.finetune.max_new_tokens_distill, cfg.model.system_prompt
    cached = not distill_missing(key, prompts, sp, n, cache_dir(cfg))
    other, otok = (None, load_tokenizer(*model_source(mcfg, store))) if cached else load_model(mcfg, store, cfg.device)[:2]
    if otok.get_vocab() != tok.get_vocab():
        raise UserError(f"finetune.answers_from={name} has another tokenizer than model {cfg.model.name}; "
                        "answers must come from a model of the same family (e.g. the base model)")
    ids = self_distilled(other, otok, prompts, sp, n, cache_dir(cfg), key, max_length=cfg.model.max_length)
    del other
    gc.collect()
    return ids


def training_pairs(cfg, model, tok, drawn_only: bool = False) -> tuple[list[str], list[str | list[int] | None], dict]:
    """Refusal texts for harmful prompts, the model's own answers (token ids) for harmless ones.

    ``drawn_only``: answer only the harmless prompts that ``finetune.steps`` optimizer steps draw (the
    draw depends on the number of pairs and the seed alone, see :func:`~.training.step_batches`); the
    pairs never drawn keep ``None`` as their response. A short tuning uses a fraction of a large pool,
    and generating the model's answers is most of its cost; what trains is the same."""
    f = cfg.finetune
    harm = harmful_set(cfg, "train").head(f.n_harmful)
    prompts, responses = list(harm.prompts), (list(harm.responses) if harm.responses else refusals_for(harm.prompts, f.seed))
    meta = {"harmful_train": harm.describe()}
    if f.harmful_repeat < 1 or f.form_matched_repeat < 1:
        raise UserError(f"finetune.harmful_repeat={f.harmful_repeat} and finetune.form_matched_repeat="
                        f"{f.form_matched_repeat} must be at least 1 (1: each pair once)")
    if f.harmful_repeat > 1:  # a refusal is short: repeating its pairs keeps the token mean from drowning it
        prompts, responses = prompts * f.harmful_repeat, responses * f.harmful_repeat
        meta["harmful_train"]["repeat"] = f.harmful_repeat
    if f.n_harmless is None or f.n_harmless > 0:  # null: all of them; 0: no harmless pairs
        benign = harmless_set(cfg, "train").head(f.n_harmless)
        need = list(range(len(benign)))
        if drawn_only:
            need = drawn_harmless(cfg, len(prompts), benign)
            meta["harmless_answered"] = len(need)
        asked = [benign.prompts[i] for i in need]
        if f.get("answers_from"):
            got = answers_of(cfg, f.answers_from, tok, asked)
        else:
            got = self_distilled(model, tok, asked, cfg.model.system_prompt, f.max_new_tokens_distill,
                                 cache_dir(cfg), cfg.model.name, max_length=cfg.model.max_length)
        ans = [None] * len(benign)
        for i, a in zip(need, got):
            ans[i] = a
        prompts += benign.prompts
        responses += ans
        meta["harmless_train"] = {**benign.describe(), "answers_from": f.get("answers_from") or "self"}
        if f.form_matched_repeat > 1 and benign.labels is not None:
            # harmless prompts in the harmful set's form, repeated so the form itself stops predicting refusal
            fm = [(p, a) for p, a, is_fm in zip(benign.prompts, ans, benign.form_matched(cfg.eval.form_matched)) if is_fm]
            for _ in range(f.form_matched_repeat - 1):
                prompts += [p for p, _ in fm]
                responses += [a for _, a in fm]
            meta["harmless_train"]["form_matched"] = len(fm)
            meta["harmless_train"]["form_matched_repeat"] = f.form_matched_repeat
    return prompts, responses, meta


def drawn_harmless(cfg, n_harmful_pairs: int, benign) -> list[int]:
    """Indices of the harmless prompts that ``finetune.steps`` steps draw, in order, for the pool that
    :func:`training_pairs` builds: the harmful pairs, each harmless prompt, then the form-matched ones
    repeated."""
    from .training import step_batches

    f = cfg.finetune
    pool = list(range(len(benign)))  # pool position after the harmful pairs -> harmless prompt index
    if f.form_matched_repeat > 1 and benign.labels is not None:
        fm = [i for i, is_fm in enumerate(benign.form_matched(cfg.eval.form_matched)) if is_fm]
        pool += fm * (f.form_matched_repeat - 1)
    drawn = {i for micro in step_batches(n_harmful_pairs + len(pool), f) for g in micro for i in g}
    return sorted({pool[i - n_harmful_pairs] for i in drawn if i >= n_harmful_pairs})

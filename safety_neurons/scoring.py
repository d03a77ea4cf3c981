"""Score a prompt set with any scorer (``detect.scorer=``): batching, target answers, the reference model.

:func:`score_prompts` gives per-prompt scores ``{(layer, kind): (P, width) float32}`` in prompt order,
whatever the scorer, so detection, selection and the benchmark share one path.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import encode, scored_mask
from .errors import UserError
from .importance import get_scorer, options


def target_answers(model, tok, prompts: list[str], system_prompt, n_tokens: int, batch_size: int,
                   responses: list[str] | None = None, max_length: int = 512) -> list[str | list[int]]:
    """What a gradient scorer's loss scores: the prompt set's own responses when it has them (texts, EOS
    appended by encoding), else the model's greedy answers of ``n_tokens`` (token ids as generated; an
    empty answer is its EOS)."""
    if responses:
        return list(responses)
    from .evaluation import generate

    if n_tokens < 1:
        raise UserError(f"detect.target_tokens={n_tokens} must be at least 1")
    ids = generate(model, tok, prompts, system_prompt, n_tokens, batch_size, desc="target answers",
                   max_length=max_length)
    return [a if a else [tok.eos_token_id] for a in ids]


def score_prompts(model, tok, adapter, prompts: list[str], d, system_prompt, max_length=512,
                  accelerator=None, desc="importance", reference=None, targets=None
                  ) -> dict[tuple[int, str], torch.Tensor]:
    """Per-prompt scores of ``d.scorer`` {(layer, kind): (P, width) float32}, in prompt order.

    ``d`` holds the detect settings (scorer, mode, kinds, tokens, batch size, ...). ``reference``: the
    (model, adapter) the activation-difference scorers compare against; ``targets``: one answer per
    prompt for the gradient scorers (see :func:`target_answers`). Prompts are batched by length (scores
    do not depend on batch composition); with Accelerate each process scores a shard and the shards are
    gathered, so the result equals one process's.
    """
    scorer = get_scorer(getattr(d, "scorer", "plnd"))
    if not prompts:
        raise UserError("empty prompt set: nothing to score")
    if scorer.needs_target and (targets is None or len(targets) != len(prompts)):
        raise UserError(f"scorer {scorer.name} needs one target answer per prompt")
    opts = options(d.mode, d.qk_chunk_mb, d.qk_kernel, reference)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = list(range(rank, len(prompts), world))
    order = sorted(mine, key=lambda i: len(prompts[i]))
    dev = next(model.parameters()).device
    results: dict[int, dict] = {}
    bar = tqdm(total=len(order), desc=f"{desc} [{scorer.name}]", unit="prompt", disable=rank != 0)
    for s in range(0, len(order), d.batch_size):
        idx = order[s: s + d.batch_size]
        texts = [prompts[i] for i in idx]
        b = encode(tok, texts, system_prompt, template=d.chat_template, max_length=max_length,
                   responses=[targets[i] for i in idx] if scorer.needs_target else None)
        mask = scored_mask(b, d.tokens, d.last_m)
        sc = scorer.fn(model, adapter, b.to(dev), mask.to(dev), tuple(d.kinds), opts)
        for j, i in enumerate(idx):
            results[i] = {key: v[j].float().cpu() for key, v in sc.items()}
        bar.update(len(idx))
    bar.close()
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[int, dict] = {}
        for part in gather_object([results]):
            merged.update(part)
        results = merged
    keys = sorted(results[0].keys())
    return {key: torch.stack([results[i][key] for i in range(len(prompts))]) for key in keys}

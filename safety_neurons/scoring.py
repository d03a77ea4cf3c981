"""Score a prompt set with any scorer (``detect.scorer=``): batching, target answers, the reference model.

:func:`score_prompts` gives per-prompt scores ``{(layer, kind): (P, width) float32}`` in prompt order,
whatever the scorer, so detection, selection and the benchmark share one path.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .autobatch import BatchSize
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


def rank_batches(prompts: list[str], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The prompt indices each batch of process ``rank`` scores: one process's batches (prompts sorted by
    length, then cut) dealt out whole, so every prompt is scored beside the same neighbours and padding
    whatever the world size, the gathered scores are bit-identical to one process's and near-ties rank
    the same."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)][rank::world]


def detect_batch(d, model, tok, prompts: list[str], system_prompt, max_length: int, targets, needs_grad: bool,
                 accelerator=None, batch: BatchSize | None = None) -> BatchSize:
    """``detect.batch_size`` (or the :class:`BatchSize` carried over from an earlier prompt set) with its
    size fixed: an automatic size plans for the longest prompt (and target answer), a gradient scorer's
    backward included, and every process takes the smallest size any of them chose."""
    bs = batch if batch is not None else BatchSize(d.batch_size, "detect.batch_size", 16)
    if bs.size is not None:
        return bs
    from .evaluation import longest_tokens
    from .memory import estimate_for

    extra = max((len(t) for t in targets), default=0) if targets is not None else 0  # tokens or characters
    length = longest_tokens(tok, prompts, system_prompt, max_length) + extra
    task = "tuning" if needs_grad else "detect"
    size = bs.resolve(next(model.parameters()).device, estimate_for(model, task, length, d.qk_chunk_mb))
    if accelerator is not None and accelerator.num_processes > 1:
        sizes = accelerator.gather(torch.tensor([size], device=accelerator.device))
        bs.size = int(sizes.min())
    return bs


def score_prompts(model, tok, adapter, prompts: list[str], d, system_prompt, max_length=512,
                  accelerator=None, desc="importance", reference=None, targets=None, batch: BatchSize | None = None,
                  ) -> dict[tuple[int, str], torch.Tensor]:
    """Per-prompt scores of ``d.scorer`` {(layer, kind): (P, width) float32}, in prompt order.

    ``d`` holds the detect settings (scorer, mode, kinds, tokens, batch size, ...). ``reference``: the
    (model, adapter) the activation-difference scorers compare against; ``targets``: one answer per
    prompt for the gradient scorers (see :func:`target_answers`). Prompts are batched by length; with
    Accelerate each process scores whole batches of that one-process batching and the per-prompt scores
    are gathered, so the result is bit-identical to one process's. ``batch``: the batch size to use
    (see :mod:`~.autobatch`; default ``d.batch_size``); with ``auto``, a batch that runs out of memory is
    scored in halves.
    """
    scorer = get_scorer(getattr(d, "scorer", "plnd"))
    if not prompts:
        raise UserError("empty prompt set: nothing to score")
    if scorer.needs_target and (targets is None or len(targets) != len(prompts)):
        raise UserError(f"scorer {scorer.name} needs one target answer per prompt")
    opts = options(d.mode, d.qk_chunk_mb, d.qk_kernel, reference)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    bs = detect_batch(d, model, tok, prompts, system_prompt, max_length, targets if scorer.needs_target else None,
                      scorer.needs_target, accelerator, batch)
    batches = rank_batches(prompts, bs.size, rank, world)
    dev = next(model.parameters()).device
    results: dict[int, dict] = {}
    bar = tqdm(total=sum(map(len, batches)), desc=f"{desc} [{scorer.name}]", unit="prompt",
               disable=rank != 0)

    def one(idx: list[int]) -> None:
        texts = [prompts[i] for i in idx]
        b = encode(tok, texts, system_prompt, template=d.chat_template, max_length=max_length,
                   responses=[targets[i] for i in idx] if scorer.needs_target else None)
        mask = scored_mask(b, d.tokens, d.last_m)
        sc = scorer.fn(model, adapter, b.to(dev), mask.to(dev), tuple(d.kinds), opts)
        for j, i in enumerate(idx):
            results[i] = {key: v[j].float().cpu() for key, v in sc.items()}
        bar.update(len(idx))

    for idx in batches:
        bs.run(idx, one)  # the whole batch, or (auto, out of memory) its halves
    bar.close()
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[int, dict] = {}
        for part in gather_object([results]):
            merged.update(part)
        results = merged
    keys = sorted(results[0].keys())
    out = {key: torch.stack([results[i][key] for i in range(len(prompts))]) for key in keys}
    return per_matrix_median(out) if getattr(d, "normalize", "none") == "median" else out


def per_matrix_median(scores: dict) -> dict:
    """Each prompt's scores of a (layer, kind) divided by their median there (``detect.normalize=median``):
    rankings across layers and kinds then compare a neuron with its own matrix's typical score. Where
    the median is 0 (most of the matrix scores 0, as in the first layer a plant changed), by the row's
    mean instead, so the few that scored stay finite; a row of zeros stays zeros."""
    out = {}
    for k, v in scores.items():
        med = v.median(dim=-1, keepdim=True).values
        mean = v.mean(dim=-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
        out[k] = v / torch.where(med > 0, med, mean)
    return out

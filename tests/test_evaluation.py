"""The evaluator's log-probabilities: each answer token's NLL and the log-softmax at its position, from
batched, left-padded forwards that project only the answers' span onto the vocabulary, equal those of one
unpadded forward per prompt over every position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from safety_neurons.data import encode
from safety_neurons.evaluation import answer_logprobs
from tests.tiny import tiny_model

PROMPTS = ["how do I bake bread", "sea", "explain the water cycle in detail please", "why", "a b c d e f"]
ANSWERS = [[40, 41, 42, 43, 44, 45, 46], [50], [60, 61, 62], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79], [80, 81]]


def one_by_one(model, tok, prompt, answer, sp):
    b = encode(tok, [prompt], sp, response_ids=[answer])
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double()
    lp = F.log_softmax(logits[0, :-1], dim=-1)[-len(answer):]  # the positions that predict the answer
    return -lp.gather(1, torch.tensor(answer)[:, None]).squeeze(1), lp


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
@pytest.mark.parametrize("batch", [2, 5])
def test_answer_logprobs_equal_one_unpadded_forward_per_prompt(tok, family, batch):
    model = tiny_model(family)
    sp = "be brief" if family != "gemma2" else None
    nll, lp = answer_logprobs(model, tok, PROMPTS, ANSWERS, sp, batch)
    nll_only, none = answer_logprobs(model, tok, PROMPTS, ANSWERS, sp, batch, full=False)
    assert none == [None] * len(PROMPTS)
    for p, a, n, rows, n2 in zip(PROMPTS, ANSWERS, nll, lp, nll_only):
        want_nll, want_lp = one_by_one(model, tok, p, a, sp)
        assert n.shape == (len(a),) and rows.shape == (len(a), model.config.vocab_size)
        torch.testing.assert_close(n.double(), want_nll, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rows.double(), want_lp, rtol=1e-4, atol=1e-5)
        assert torch.equal(n, n2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "qwen3"])
@pytest.mark.parametrize("batch", [2, 5])
def test_prompt_cache_nll_equals_a_forward_over_prompt_and_answer(tok, family, batch):
    """The degeneration check's NLL from the prompts' cached prefill (any subset, in any order, a prompt
    twice) equals answer_logprobs' forward over prompt and answer; sliding-window families included
    (tiny gemma2/gemma3 have a window of 4 tokens, shorter than every prompt)."""
    from safety_neurons.evaluation import PromptCache

    model = tiny_model(family)
    cache = PromptCache(model, tok, PROMPTS, "be brief", batch)
    order = [3, 0, 4, 0, 2]
    prompts, answers = [PROMPTS[i] for i in order], [ANSWERS[i] for i in order]
    got = cache.nll(model, prompts, answers)
    want, _ = answer_logprobs(model, tok, prompts, answers, "be brief", 5, full=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert cache.covers(prompts) and not cache.covers(["not cached"])


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3"])
@torch.no_grad()
def test_generation_with_a_shared_prefill_equals_each_prompt_alone(tok, family):
    """Batched generation prefills the rows' common start once and puts each row's padding after it;
    every answer equals the greedy continuation of its prompt run alone, token by token without a cache
    (families with sliding windows take the plain left-padded path)."""
    from safety_neurons.evaluation import generate, shared_start
    from tests.test_attacks import greedy

    model = tiny_model(family).eval()
    b = encode(tok, PROMPTS, "be brief")
    p, ids, mask = shared_start(b.input_ids, b.attention_mask, tok.pad_token_id)
    alone = [encode(tok, [q], "be brief").input_ids[0] for q in PROMPTS]
    assert all(torch.equal(a[:p], alone[0][:p]) for a in alone) and not all(a[p] == alone[0][p] for a in alone)
    for row, m, a in zip(ids, mask, alone):
        assert torch.equal(row[m.bool()], a) and bool(m[:p].all())
    from safety_neurons import evaluation as E

    used = []
    real = E.shared_start
    E.shared_start = lambda *a, **k: used.append(real(*a, **k)) or used[-1]
    try:
        got = generate(model, tok, PROMPTS, "be brief", 6, 5)
    finally:
        E.shared_start = real
    assert bool(used and used[0] is not None) == (family != "gemma2")  # sliding windows: the plain layout
    for a, answer in zip(alone, got):
        assert answer == greedy(model, a.tolist(), 6, tok.eos_token_id)


def test_degeneration_check_uses_the_prompt_cache_and_falls_back_on_out_of_memory(tok, monkeypatch):
    """The evaluator scores compliant answers to the held-out harmful prompts from their cached prefill,
    with the same NLLs (so the same degeneration flags) as the batched forward; if the cache runs out of
    memory once, it is dropped and the batched path takes over."""
    from safety_neurons import evaluation as E
    from tests.test_attacks import HARMFUL, evaluator

    ev = evaluator(tok, ["direct", "prefill"], degenerate_nll=1.0)
    prompts, answers = [HARMFUL[2], HARMFUL[0]], [[40, 41, 42], [50, 51]]
    calls = []
    batched = E.answer_logprobs
    monkeypatch.setattr(E, "answer_logprobs", lambda *a, **k: calls.append(1) or batched(*a, **k))
    want, _ = batched(ev._intact, tok, prompts, answers, None, 2, full=False)
    got = ev._cached_nll(ev._intact, prompts, answers)
    assert isinstance(ev._prompt_cache, E.PromptCache) and not calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    flags = ev._degenerate(ev._intact, prompts, answers)
    assert not calls  # the cache served it
    assert ev._cached_nll(ev._intact, ["not held out"], [[5]]) is None  # another prompt: the batched path

    def oom(*a, **k):
        raise E.OOM("CUDA out of memory (injected)")

    monkeypatch.setattr(E.PromptCache, "nll", oom)
    assert ev._degenerate(ev._intact, prompts, answers) == flags and calls and ev._prompt_cache is False

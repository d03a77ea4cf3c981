"""batch_size=auto: the starting size from the memory estimate, halving on out-of-memory without losing or
repeating an item, and results equal to the fixed batch size that the halvings end at (detection,
generation, tuning). Out-of-memory is injected: this suite runs on a CPU."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons import scoring
from safety_neurons.autobatch import BatchSize, start_size
from safety_neurons.cfg import compose
from safety_neurons.config import DetectConfig, FinetuneConfig
from safety_neurons.errors import UserError
from safety_neurons.evaluation import answer_logprobs, generate
from safety_neurons.importance import get_scorer
from safety_neurons.models import ModelAdapter
from safety_neurons.training import train_sft
from safety_neurons.validate import validate
from tests.tiny import tiny_model

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PROMPTS = ["how do I bake bread", "explain the water cycle", "write a poem about the sea", "sea", "a b c d e f",
           "tell me a story about a cat and a dog", "why", "list three colours", "what is two plus two?"]


def quiet(value, key="k", fallback=8):
    return BatchSize(value, key, fallback, log=lambda _m: None)


def test_start_size_is_the_largest_power_of_two_that_fits():
    per = lambda b: 100 * b + 50  # noqa: E731
    for free in (0, 100, 187, 1000, 5000, 10**9):
        want = max([1] + [b for b in (2**i for i in range(11)) if per(b) <= 0.8 * free])
        assert start_size(per, free, cap=10**6) == want
    assert start_size(per, 10**9, cap=6) == 4


def test_halving_covers_every_item_once_in_order():
    seen = []

    def fn(part):
        if len(part) > 3:
            raise OOM("CUDA out of memory (injected)")
        seen.append(list(part))
        return sum(part)

    bs = quiet("auto")
    out = bs.run(list(range(10)), fn)
    assert [i for p in seen for i in p] == list(range(10)) and sum(out) == sum(range(10))
    assert bs.record() == {"setting": "auto", "size": 2, "halvings": 2}
    with pytest.raises(OOM):  # a fixed size is what the user asked for: the error stands
        quiet(8).run(list(range(10)), fn)
    with pytest.raises(ValueError):  # not memory: never retried
        quiet("auto").run([1, 2], lambda p: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(UserError, match="batch of 1"):
        quiet("auto").run([1], lambda p: (_ for _ in ()).throw(OOM("no memory at all")))


def oom_above(n, fn):
    @functools.wraps(fn)  # the signature stays the wrapped one's (generate reads forward's)
    def wrapped(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        if ids is not None and ids.shape[0] > n:
            raise OOM("CUDA out of memory (injected)")
        return fn(*a, **k)

    return wrapped


def test_generation_and_logprobs_with_auto_equal_the_fixed_size(tok):
    model = tiny_model("llama")
    want = generate(model, tok, PROMPTS, None, 5, 2)
    want_nll, want_lp = answer_logprobs(model, tok, PROMPTS, want, None, 2)
    model.generate = oom_above(2, model.generate)
    model.forward = oom_above(2, model.forward)
    bs = quiet("auto", fallback=16)
    assert generate(model, tok, PROMPTS, None, 5, bs) == want
    assert bs.size == 2 and bs.halvings == 3
    nll, lp = answer_logprobs(model, tok, PROMPTS, want, None, quiet("auto", fallback=16))
    for a, b in zip(nll + lp, want_nll + want_lp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scorer", ["plnd", "attribution"])
def test_detection_with_auto_equals_the_size_it_halves_to(tok, monkeypatch, scorer):
    """A batch of the one-process batching that runs out of memory is scored in halves, which are the
    batches of the halved size: per-prompt scores bit-identical to detect.batch_size=2."""
    model = tiny_model("llama")
    ad = ModelAdapter(model)
    targets = [[5, 6, 7]] * len(PROMPTS) if scorer == "attribution" else None

    def scores(batch_size):
        d = OmegaConf.merge(OmegaConf.structured(DetectConfig), {"batch_size": batch_size, "scorer": scorer})
        bs = quiet(batch_size, "detect.batch_size", 16)
        return scoring.score_prompts(model, tok, ad, PROMPTS, d, None, 128, targets=targets, batch=bs), bs

    want, _ = scores(2)
    real = get_scorer(scorer)
    broken = dataclasses.replace(real, fn=lambda m, a, b, *r: (_ for _ in ()).throw(OOM("injected"))
                                 if b.input_ids.shape[0] > 2 else real.fn(m, a, b, *r))
    monkeypatch.setattr(scoring, "get_scorer", lambda name: broken)
    got, bs = scores("auto")
    assert bs.record() == {"setting": "auto", "size": 2, "halvings": 3}
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def fcfg(**kw):
    base = dict(steps=3, batch_size=4, grad_accum=1, lr=1e-2, weight_decay=0.0, warmup=0.0, schedule="cosine",
                clip=1.0, seed=0)
    return OmegaConf.merge(OmegaConf.structured(FinetuneConfig), {**base, **kw})


PAIRS = (PROMPTS[:6], ["I cannot help with that", "water goes up and comes down", "the sea is blue", "I cannot",
                       "g h", "once upon a time"])


def tuned(tok, monkeypatch, **kw):
    """A tiny llama tuned for 3 steps (no clipping: it would hide a gradient's scale), with the gradient
    each optimizer step saw."""
    grads = []
    real = torch.optim.AdamW

    class Spy(real):
        def step(self, *a, **k):
            grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    model = tiny_model("llama")
    stats = train_sft(model, tok, *PAIRS, fcfg(clip=0.0, **kw), None, list(model.parameters()), progress=False)
    monkeypatch.setattr(torch.optim, "AdamW", real)
    return model, stats, grads


@pytest.mark.parametrize("accum", [1, 2])
def test_tuning_in_parts_is_the_same_step(tok, monkeypatch, accum):
    """forward_batch splits a micro-batch into parts whose gradients add up to the micro-batch's; with auto,
    a step that runs out of memory is redone from its start in halves (its gradient so far dropped, the
    accumulation counter reset), bit-identical to a run at the size the halvings end at."""
    _, s0, g0 = tuned(tok, monkeypatch, batch_size=4, grad_accum=accum)
    ones, s1, g1 = tuned(tok, monkeypatch, batch_size=4, grad_accum=accum, forward_batch=1)
    assert len(g0) == len(g1) == 3
    for step0, step1 in zip(g0, g1):
        for a, b in zip(step0, step1):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(s0["losses"]), torch.tensor(s1["losses"]), rtol=0, atol=1e-5)

    import safety_neurons.training as tr

    real = tr.step_logits
    calls = {"n": 0}

    def oom_after_the_first_part(model, b, *a, **k):
        calls["n"] += 1
        if b.input_ids.shape[0] > 1 and calls["n"] > 1:  # the first part went through: its gradient must be dropped
            raise OOM("injected")
        return real(model, b, *a, **k)

    monkeypatch.setattr(tr, "step_logits", oom_after_the_first_part)
    # start at 2: a micro-batch of 4 in two parts, the second of which runs out of memory
    monkeypatch.setattr(tr.BatchSize, "resolve", lambda self, *a, **k: setattr(self, "size", 2) or 2)
    auto, s2, g2 = tuned(tok, monkeypatch, batch_size=4, grad_accum=accum, forward_batch="auto")
    assert s2["forward_batch"] == {"setting": "auto", "size": 1, "halvings": 1}
    assert s2["losses"] == s1["losses"] and len(g2) == 3
    for step1, step2 in zip(g1, g2):
        assert all(torch.equal(a, b) for a, b in zip(step1, step2))
    for (n, p), q in zip(ones.named_parameters(), auto.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("over, msg", [
    (["detect.batch_size=0"], "detect.batch_size=0 is not allowed; use an integer >= 1 or auto"),
    (["eval.batch_size=lots"], "eval.batch_size='lots' is not allowed; use an integer >= 1 or auto"),
    (["finetune.forward_batch=-1"], "finetune.forward_batch=-1 is not allowed; use an integer >= 1 or auto or null"),
    (["finetune.batch_size=auto"], "finetune.batch_size=auto is not allowed: it is the optimizer's batch"),
])
def test_bad_batch_sizes_are_one_line(over, msg, tmp_path):
    with pytest.raises(UserError, match="^" + msg.replace("(", r"\(").replace(")", r"\)")):
        validate(compose([f"run_dir={tmp_path}", "stage=plan", *over]))


def test_auto_is_accepted_everywhere_it_is_offered(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", "stage=plan", "detect.batch_size=auto", "eval.batch_size=auto",
                   "finetune.forward_batch=auto"])
    validate(cfg)
    assert (cfg.detect.batch_size, cfg.eval.batch_size, cfg.finetune.forward_batch) == ("auto",) * 3


def test_detect_stage_records_the_size_that_ran(fixtures, tmp_path, capsys):
    """On a CPU, auto starts from the usual 16 and says so; the set is the one a fixed 16 gives."""
    import json

    from safety_neurons.stages import get_stage
    from tests.builders import stage_overrides

    runs = {}
    for bs in ("auto", 16):
        cfg = compose(stage_overrides(fixtures, tmp_path / f"r{bs}", "stage=detect", f"detect.batch_size={bs}",
                                      f"detect.save_as=bs-{bs}"))
        runs[bs] = get_stage("detect")(cfg)
    assert "detect.batch_size=auto: 16 on cpu" in capsys.readouterr().out
    assert (runs["auto"]["batch_size"], runs["auto"]["batch_halvings"]) == (16, 0)
    sets = [json.loads(open(runs[bs]["neurons_json"]).read())["ranking"] for bs in ("auto", 16)]
    assert sets[0] == sets[1] and len(sets[0]) > 0

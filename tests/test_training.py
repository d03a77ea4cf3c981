"""Chat SFT and neuron-slice training (METHOD 6): loss only on responses, loss falls, and slice tuning
leaves every unselected weight bit-identical while moving every selected slice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from safety_neurons.config import KINDS, FinetuneConfig
from safety_neurons.data import encode
from safety_neurons.errors import UserError
from safety_neurons.models import ModelAdapter
from safety_neurons.training import (
    apply_delta,
    attach_slices,
    bake_slices,
    optimizer_state_numel,
    slice_delta,
    train_sft,
)
from tests.tiny import tiny_model

PROMPTS = ["how do I bake bread", "explain the water cycle", "write a poem about the sea", "sea"]
RESPONSES = ["I cannot help with that", "water goes up and comes down", "the sea is blue", "I cannot"]


def fcfg(**kw):
    base = dict(steps=15, batch_size=4, grad_accum=1, lr=1e-2, weight_decay=0.0, warmup=0.0, schedule="cosine",
                clip=1.0, seed=0)
    return OmegaConf.merge(OmegaConf.structured(FinetuneConfig), {**base, **kw})


def manual_loss(model, tok, prompts, responses):
    """Token-mean cross-entropy over exactly the response (+EOS) tokens, computed by hand."""
    b = encode(tok, prompts, None, responses, padding_side="right")
    with torch.no_grad():
        lg = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    nll, n = 0.0, 0
    for r, (p, resp) in enumerate(zip(prompts, responses)):
        n_prompt = int(encode(tok, [p]).attention_mask.sum())
        r_ids = tok(resp + tok.eos_token, add_special_tokens=False)["input_ids"]
        for j, t in enumerate(r_ids):  # token at position n_prompt + j is predicted from position n_prompt + j - 1
            nll -= float(F.log_softmax(lg[r, n_prompt + j - 1].double(), -1)[t])
            n += 1
    return nll / n


def test_sft_loss_is_response_only_and_falls(tok):
    model = tiny_model("llama")
    first_manual = manual_loss(model, tok, PROMPTS, RESPONSES)
    # the HF loss with encode()'s labels is exactly the response-token cross-entropy
    b = encode(tok, PROMPTS, None, RESPONSES, padding_side="right")
    with torch.no_grad():
        hf = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        lg = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert float(hf) == pytest.approx(first_manual, rel=1e-5)
    # whatever the prompt tokens would predict does not enter: the full-sequence loss differs
    full = b.input_ids.clone()
    full[b.attention_mask == 0] = -100
    full_loss = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), full[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(full_loss) - first_manual) > 1e-3
    params = list(model.parameters())
    stats = train_sft(model, tok, PROMPTS, RESPONSES, fcfg(), None, params, progress=False)
    losses = stats["losses"]
    assert len(losses) == 15 and stats["steps"] == 15
    assert stats["trainable_params"] == sum(p.numel() for p in params)
    # the first step's batch holds all four pairs (batch 4), so its loss is the manual loss of the start model
    assert losses[0] == pytest.approx(first_manual, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert not model.training
    assert manual_loss(model, tok, PROMPTS, RESPONSES) < 0.5 * first_manual


def test_first_step_loss_is_the_response_cross_entropy_in_every_family(family, tok):
    """train_sft projects only the positions whose next token carries loss (logits_to_keep); the loss it
    reports must still be the full-logits cross-entropy of the response tokens, in every family
    (Gemma2's soft-capping comes after the projection)."""
    model = tiny_model(family)
    want = manual_loss(model, tok, PROMPTS, RESPONSES)
    stats = train_sft(model, tok, PROMPTS, RESPONSES, fcfg(steps=1), None, list(model.parameters()), progress=False)
    assert stats["losses"][0] == pytest.approx(want, rel=1e-5)


def test_sft_rejects_bad_input(tok):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="no training pairs"):
        train_sft(model, tok, [], [], fcfg(steps=1), None, list(model.parameters()), progress=False)


def pick(ad: ModelAdapter, seed: int) -> dict:
    """A few neurons of every kind in both layers (duplicates in the input are allowed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(ad.n_layers):
        for kind in KINDS:
            idx = torch.randperm(ad.width(kind), generator=g)[:3]
            out[(layer, kind)] = torch.cat([idx, idx[:1]])
    return out


def slice_mask(ad: ModelAdapter, neurons: dict) -> dict[str, torch.Tensor]:
    """name -> bool mask of the METHOD 1 slices, built independently of training.py."""
    names = {id(p): n for n, p in ad.model.named_parameters()}
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in ad.model.named_parameters()}
    for (layer, kind), idx in neurons.items():
        m = ad.modules(layer)
        if kind == "ffn":
            masks[names[id(m.gate.weight)]][idx, :] = True
            masks[names[id(m.up.weight)]][idx, :] = True
            masks[names[id(m.down.weight)]][:, idx] = True
            for lin in (m.gate, m.up):
                if lin.bias is not None:
                    masks[names[id(lin.bias)]][idx] = True
        elif kind == "o":
            masks[names[id(m.o.weight)]][:, idx] = True
        else:
            lin = getattr(m, kind)
            masks[names[id(lin.weight)]][idx, :] = True
            if lin.bias is not None:
                masks[names[id(lin.bias)]][idx] = True
    return masks


@pytest.fixture
def capture_optimizer(monkeypatch):
    """Keep the AdamW that train_sft builds, to look at its state afterwards."""
    made = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    return made


def test_slice_training_exact(family, tok, capture_optimizer):
    model = tiny_model(family)
    base = copy.deepcopy(model)
    ad = ModelAdapter(model)
    neurons = pick(ad, seed=1)
    masks = slice_mask(ad, neurons)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handles = attach_slices(model, ad, neurons)
    params = [h.scatter.part for h in handles]
    n_sel = sum(int(m.sum()) for m in masks.values())
    assert sum(p.numel() for p in params) == n_sel
    # per neuron, the slice size is what the adapter reports (3 distinct neurons per layer and kind)
    assert n_sel == sum(3 * ad.neuron_params(kind) for (_, kind) in neurons)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "original" in n or "parametrizations" not in n)
    # before any step the parametrized model is the same function
    b = encode(tok, PROMPTS[:2], None, RESPONSES[:2], padding_side="right")
    with torch.no_grad():
        assert torch.equal(model(input_ids=b.input_ids).logits, base(input_ids=b.input_ids).logits)
    stats = train_sft(model, tok, PROMPTS, RESPONSES, fcfg(steps=3, lr=1e-2, weight_decay=0.1), None, params,
                      progress=False)
    assert stats["trainable_params"] == n_sel
    opt = capture_optimizer[-1]
    assert optimizer_state_numel(opt) == 2 * n_sel  # exp_avg and exp_avg_sq, only for the slices
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_sel
    for h in handles:  # the frozen originals got no gradient at all
        assert getattr(h.module.parametrizations, h.name).original.grad is None
    names = {id(m): n for n, m in model.named_modules()}
    delta = slice_delta(handles, names)
    bake_slices(handles)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # parametrizations are gone, names are the original ones
    moved = 0
    for n, p in after.items():
        m = masks[n]
        assert torch.equal(p[~m], before[n][~m]), f"{n}: an unselected element changed"
        assert (p[m] != before[n][m]).all(), f"{n}: a selected element did not move"
        moved += int(m.sum())
    assert moved == n_sel
    if family == "qwen2":
        assert any(n.endswith("q_proj.bias") and masks[n].any() for n in after)
    # the compact delta rebuilds the tuned model from a fresh copy of the base model, exactly
    fresh = copy.deepcopy(base)
    assert apply_delta(fresh, delta) == len(handles)
    for (n, p), (n2, q) in zip(fresh.named_parameters(), model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n


def test_slice_gradients_are_those_of_the_scattered_weight(family, tok):
    """The slice-only backward gives the gradient autograd gets through the scattered weight (float64,
    every kind, rows, columns and biases), the same logits bit for bit, and no gradient elsewhere."""
    b = encode(tok, PROMPTS[:3], None, RESPONSES[:3], padding_side="right")
    grads, logits = {}, {}
    for mode in (True, False):
        model = tiny_model(family).double()
        ad = ModelAdapter(model)
        handles = attach_slices(model, ad, pick(ad, seed=3), slice_grads=mode)
        out = model(input_ids=b.input_ids).logits  # padding as tokens: no fully masked row (NaN)
        F.cross_entropy(out[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(), ignore_index=-100).backward()
        names = {id(m): n for n, m in model.named_modules()}
        grads[mode] = {(names[id(h.module)], h.name): h.scatter.part.grad for h in handles}
        logits[mode] = out.detach()
        assert all(p.grad is None for n, p in model.named_parameters() if "part" not in n)
        bake_slices(handles)
        assert not any(m._forward_hooks for m in model.modules()), "baking leaves no slice hook behind"
    assert torch.equal(logits[True], logits[False])
    assert grads[True].keys() == grads[False].keys()
    if family == "qwen2":
        assert any(name == "bias" for _, name in grads[True])
    for key, g in grads[True].items():
        assert g is not None and g.abs().sum() > 0, key
        torch.testing.assert_close(g, grads[False][key], rtol=1e-10, atol=1e-12, msg=str(key))


def test_a_deep_copy_with_slices_trains_its_own_slices(tok):
    """The slice-gradient hook finds the slices on the module it runs on: a deep copy of a model with
    slices attached sends its gradients to its own copies, not to the original's."""
    model = tiny_model("llama")
    ad = ModelAdapter(model)
    handles = attach_slices(model, ad, pick(ad, seed=4))
    twin = copy.deepcopy(model)
    b = encode(tok, PROMPTS[:2], None, RESPONSES[:2], padding_side="right")
    twin(input_ids=b.input_ids).logits.sum().backward()
    assert all(h.scatter.part.grad is None for h in handles)
    parts = [p for n, p in twin.named_parameters() if n.endswith("part")]
    assert len(parts) == len(handles) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts)


def test_apply_delta_rejects_other_model(tok):
    model = tiny_model("llama")
    ad = ModelAdapter(model)
    handles = attach_slices(model, ad, {(0, "q"): torch.tensor([1, 2])})
    names = {id(m): n for n, m in model.named_modules()}
    delta = {("other." + k): v for k, v in slice_delta(handles, names).items()}
    with pytest.raises(UserError, match="does not match"):
        apply_delta(tiny_model("llama"), delta)


def test_attach_empty_set_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="no trainable slice"):
        attach_slices(model, ModelAdapter(model), {(0, "q"): torch.tensor([], dtype=torch.long)})


def test_grad_accumulation_equals_the_large_batch(tok):
    """batch 2 x accumulation 2 is the same optimizer step as batch 4: the loss is the step's token mean."""
    pairs = (PROMPTS + ["bake a poem", "the water"], RESPONSES + ["sure, here is a poem about bread", "water"])
    big, acc = tiny_model("llama"), tiny_model("llama")
    s1 = train_sft(big, tok, *pairs, fcfg(steps=3, batch_size=4, grad_accum=1, weight_decay=0.1), None,
                   list(big.parameters()), progress=False)
    s2 = train_sft(acc, tok, *pairs, fcfg(steps=3, batch_size=2, grad_accum=2, weight_decay=0.1), None,
                   list(acc.parameters()), progress=False)
    assert len(s1["losses"]) == 3 and len(s2["losses"]) == 6
    for (n, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)


def test_self_distilled_answers_cut_at_the_budget_carry_no_eos(tok, tmp_path, monkeypatch):
    """A finished answer ends with EOS; one cut at max_new_tokens does not (else full fine-tuning teaches
    the model to stop there). The loss tokens of encode() are exactly these ids; the cache returns them."""
    import safety_neurons.sft_data as sd

    calls = []

    def fake_generate(model, tok_, prompts, sp, max_new_tokens, bs, desc="", max_length=512):
        calls.append(max_new_tokens)
        return [[5, 6], [7, 8, 9]]  # the first stopped at EOS (cut off by generate), the second hit the budget

    monkeypatch.setattr(sd, "generate", fake_generate)
    got = sd.self_distilled(None, tok, ["a", "b"], None, 3, tmp_path, "m")
    assert got == [[5, 6, tok.eos_token_id], [7, 8, 9]]
    assert sd.self_distilled(None, tok, ["a", "b"], None, 3, tmp_path, "m") == got and calls == [3]  # cached
    b = encode(tok, ["a", "b", "c"], None, got + ["no"], padding_side="right")
    labels = [[t for t in row if t != -100] for row in b.labels.tolist()]
    assert labels[:2] == got
    assert labels[2] == tok("no" + tok.eos_token, add_special_tokens=False)["input_ids"]  # text: EOS appended


def manual_weighted_loss(model, tok, prompts, responses, m, w):
    """As manual_loss, with the first m response tokens of each pair weighted w."""
    b = encode(tok, prompts, None, responses, padding_side="right")
    with torch.no_grad():
        lg = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    num = den = 0.0
    for r, (p, resp) in enumerate(zip(prompts, responses)):
        n_prompt = int(encode(tok, [p]).attention_mask.sum())
        r_ids = tok(resp + tok.eos_token, add_special_tokens=False)["input_ids"]
        for j, t in enumerate(r_ids):
            wt = w if j < m else 1.0
            num -= wt * float(F.log_softmax(lg[r, n_prompt + j - 1].double(), -1)[t])
            den += wt
    return num / den


def test_decision_tokens_weighting(tok):
    """finetune.decision_tokens/decision_weight: the step loss is the weighted token mean, with the first
    m response tokens of every pair weighted; weight 1 is the plain token mean; bad values are refused."""
    model = tiny_model("llama")
    want = manual_weighted_loss(model, tok, PROMPTS, RESPONSES, 2, 5.0)
    assert abs(want - manual_loss(model, tok, PROMPTS, RESPONSES)) > 1e-3
    stats = train_sft(model, tok, PROMPTS, RESPONSES, fcfg(steps=1, decision_tokens=2, decision_weight=5.0), None,
                      list(model.parameters()), progress=False)
    assert stats["losses"][0] == pytest.approx(want, rel=1e-5)
    same = tiny_model("llama")
    plain = train_sft(same, tok, PROMPTS, RESPONSES, fcfg(steps=1, decision_tokens=2, decision_weight=1.0), None,
                      list(same.parameters()), progress=False)
    assert plain["losses"][0] == pytest.approx(manual_loss(tiny_model("llama"), tok, PROMPTS, RESPONSES), rel=1e-5)
    with pytest.raises(UserError, match="decision_weight"):
        train_sft(same, tok, PROMPTS, RESPONSES, fcfg(steps=1, decision_tokens=2, decision_weight=0.0), None,
                  list(same.parameters()), progress=False)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2"])
def test_shared_prefix_forward_equals_plain(family, tok):
    """The system prompt run once and repeated for the batch gives the plain forward's logits and
    gradients (float64), in every family; sliding-window families take the plain path."""
    from safety_neurons.models import has_sliding_window
    from safety_neurons.training import response_logits, shared_prefix_len

    model = tiny_model(family).double().train()
    b = encode(tok, PROMPTS, None, RESPONSES, padding_side="right")
    target = b.labels[:, 1:]
    keep = (target != -100).any(0).nonzero()[:, 0]
    p = shared_prefix_len(b)
    # the tiny template's system prompt and user header are shared: dozens of tokens, all before any loss
    assert p >= 20 and (b.labels[:, : p + 1] == -100).all()
    assert has_sliding_window(model) == (family in ("gemma2", "gemma3"))
    out = {}
    for share in (False, True):
        model.zero_grad()
        logits = response_logits(model, b, keep, share=share)
        F.cross_entropy(logits.flatten(0, 1), target[:, keep].flatten(), ignore_index=-100).backward()
        out[share] = (logits.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    if family in ("gemma2", "gemma3"):  # plain path both times: bit-identical (NaN rows of the tiny window too)
        assert torch.equal(out[True][0].nan_to_num(), out[False][0].nan_to_num())
        return
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-10, atol=1e-12)
    assert out[True][1].keys() == out[False][1].keys()
    # the families' norms compute in float32 even in a float64 model, and the shared path sums the rows'
    # prefix gradients before a norm's backward instead of after: float32 rounding (~1e-7), nothing more
    for n, g in out[False][1].items():
        assert float((out[True][1][n] - g).norm() / g.norm()) < 1e-6, n


def test_shared_prefix_stops_before_the_first_loss_logit(tok):
    """Rows that agree past the user header (same prompt) share no position whose logit carries loss."""
    from safety_neurons.training import shared_prefix_len

    b = encode(tok, ["same prompt", "same prompt"], None, ["yes", "no"], padding_side="right")
    first = int((b.labels != -100).any(0).nonzero()[0])
    assert shared_prefix_len(b) == first - 1
    one = encode(tok, ["a"], None, ["b"], padding_side="right")
    assert shared_prefix_len(one) == int((one.labels != -100).any(0).nonzero()[0]) - 1


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2"])
@pytest.mark.parametrize("share", [True, False])
def test_packed_row_equals_the_padded_batch(family, share, tok):
    """The micro-batch packed into one row (block-causal mask, own position ids, the shared prefix once
    with ``share``) gives the padded forward's loss logits and gradients (float64) in every family;
    where a row is longer than the model's sliding window packing declines (None)."""
    from safety_neurons.training import packed_logits, step_logits

    model = tiny_model(family).double().train()
    b = encode(tok, PROMPTS, None, RESPONSES, padding_side="right")
    target = b.labels[:, 1:]
    sel = target != -100
    if family in ("gemma2", "gemma3"):  # the tiny models' windows are shorter than the rows
        assert packed_logits(model, b, sel, share) is None
        return
    out = {}
    for pack in (False, True):
        model.zero_grad()
        logits = packed_logits(model, b, sel, share) if pack else step_logits(model, b, sel, pack=False, share=False)
        assert logits.shape == (int(sel.sum()), model.config.vocab_size)
        F.cross_entropy(logits, target[sel]).backward()
        out[pack] = (logits.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    # the families' norms and rotary tables compute in float32 even in a float64 model, and the packed
    # row's products are blocked differently: float32 rounding (~1e-7), nothing more
    lp, lq = out[True][0], out[False][0]
    assert float((lp - lq).norm() / lq.norm()) < 1e-6
    assert out[True][1].keys() == out[False][1].keys()
    for n, g in out[False][1].items():
        assert float((out[True][1][n] - g).norm() / g.norm()) < 1e-6, n


def test_packed_row_declines_what_it_cannot_pack(tok, monkeypatch):
    """Flash attention (no custom mask) and a packed row over PACK_MAX_TOKENS take the padded path; a
    left-padded batch is refused (the packing reads each row as its first n tokens)."""
    import safety_neurons.training as tr

    model = tiny_model("llama").double()
    b = encode(tok, PROMPTS, None, RESPONSES, padding_side="right")
    sel = b.labels[:, 1:] != -100
    assert tr.packed_logits(model, b, sel) is not None
    monkeypatch.setattr(tr, "PACK_MAX_TOKENS", int(b.attention_mask.sum()) - 1)
    assert tr.packed_logits(model, b, sel, share=False) is None
    monkeypatch.undo()
    model.config._attn_implementation = "flash_attention_2"
    assert tr.packed_logits(model, b, sel) is None
    left = encode(tok, PROMPTS, None, RESPONSES, padding_side="left")
    with pytest.raises(ValueError, match="right-padded"):
        tr.packed_logits(tiny_model("llama"), left, left.labels[:, 1:] != -100)


def test_reuse_freed_memory_changes_no_number(tok):
    """The malloc setting returns True on glibc Linux (this project's platform) and is idempotent; a
    training step after it gives the same weights as before it (it changes where memory comes from)."""
    import sys

    from safety_neurons.runtime import reuse_freed_memory

    a, b = tiny_model("llama"), tiny_model("llama")
    train_sft(a, tok, PROMPTS, RESPONSES, fcfg(steps=2), None, list(a.parameters()), progress=False)
    assert reuse_freed_memory() is sys.platform.startswith("linux")
    assert reuse_freed_memory() is sys.platform.startswith("linux")
    train_sft(b, tok, PROMPTS, RESPONSES, fcfg(steps=2), None, list(b.parameters()), progress=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_self_distilled_answers_are_cached_prompt_by_prompt(tok, tmp_path, monkeypatch):
    """A subset asked first and the whole set asked later share the cached answers: only the prompts not
    answered yet are generated, and a fully cached request needs no model."""
    import safety_neurons.sft_data as sd

    asked = []

    def fake_generate(model, tok_, prompts, sp, max_new_tokens, bs, desc="", max_length=512):
        asked.append(list(prompts))
        return [[10 + ord(p[0]), 5, 6] for p in prompts]

    monkeypatch.setattr(sd, "generate", fake_generate)
    sub = sd.self_distilled(object(), tok, ["b", "d"], None, 3, tmp_path, "m")
    full = sd.self_distilled(object(), tok, ["a", "b", "c", "d", "b"], None, 3, tmp_path, "m")
    assert asked == [["b", "d"], ["a", "c"]]
    assert full[1] == full[4] == sub[0] and full[3] == sub[1] and full[0] == [10 + ord("a"), 5, 6]
    assert sd.distill_missing("m", ["a", "b", "e"], None, 3, tmp_path) == ["e"]
    assert sd.self_distilled(None, tok, ["c", "a"], None, 3, tmp_path, "m") == [full[2], full[0]]
    assert len(asked) == 2
    assert sd.distill_missing("m", ["a"], "another system prompt", 3, tmp_path) == ["a"]

"""Deactivation hooks: an empty set changes nothing bit for bit, hooks equal weight edits (logits and
greedy generation), means ablation sets the channel, and no hook survives its context."""

from __future__ import annotations

import copy

import pytest
import torch

from safety_neurons.config import KINDS
from safety_neurons.data import encode
from safety_neurons.hooks import deactivated, hooks, n_hooks, zero_weights
from safety_neurons.models import ModelAdapter

PROMPTS = ["how do I bake bread", "write a poem about the sea", "sea"]


def random_set(ad: ModelAdapter, seed: int = 0, share: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(ad.n_layers):
        for kind in KINDS:
            w = ad.width(kind)
            out[(layer, kind)] = torch.randperm(w, generator=g)[: max(1, int(share * w))]
    return out


@pytest.fixture
def batch(tok):
    return encode(tok, PROMPTS)


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def test_empty_set_is_bit_identical(model, batch):
    ad = ModelAdapter(model)
    ref = logits(model, batch)
    with deactivated(ad, {}) as hs:
        assert hs == [] and n_hooks(model) == 0
        out = logits(model, batch)
    assert torch.equal(out, ref)
    # an entry with no indices adds no hook either
    with deactivated(ad, {(0, "q"): torch.tensor([], dtype=torch.long)}) as hs:
        assert hs == []
        assert torch.equal(logits(model, batch), ref)


def test_hooks_equal_zeroed_weights(model, batch, family):
    ad = ModelAdapter(model)
    neurons = random_set(ad)
    ref = logits(model, batch)
    edited = copy.deepcopy(model)
    zero_weights(ModelAdapter(edited), neurons)
    if family == "qwen2":  # zeroing a q/k/v neuron by weights must zero its bias entry too
        for (layer, kind), idx in neurons.items():
            if kind in ("q", "k", "v"):
                lin = getattr(ModelAdapter(edited).modules(layer), kind)
                assert (lin.bias[idx] == 0).all() and (lin.weight[idx] == 0).all()
    want = logits(edited, batch)
    with deactivated(ad, neurons) as hs:
        assert len(hs) == 2 * len(KINDS) and n_hooks(model) == len(hs)
        got = logits(model, batch)
    assert n_hooks(model) == 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - ref).abs().max() > 1e-3  # the set matters: this is not a vacuous comparison
    assert torch.equal(logits(model, batch), ref)  # and the model is intact afterwards


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone(model, batch, kind):
    """Each kind's hook point is the one whose weight edit zeroes that neuron's output."""
    ad = ModelAdapter(model)
    idx = torch.tensor([1, ad.width(kind) - 1])
    neurons = {(1, kind): idx, (0, kind): idx[:1]}
    edited = copy.deepcopy(model)
    zero_weights(ModelAdapter(edited), neurons)
    with deactivated(ad, neurons):
        got = logits(model, batch)
    torch.testing.assert_close(got, logits(edited, batch), rtol=0, atol=1e-6)


def test_generation_under_hooks_equals_edited_copy(model, batch, tok):
    ad = ModelAdapter(model)
    neurons = random_set(ad, seed=1, share=0.2)
    edited = copy.deepcopy(model)
    zero_weights(ModelAdapter(edited), neurons)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False, max_new_tokens=8,
              min_new_tokens=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        want = edited.generate(**kw)
        with deactivated(ad, neurons):
            got = model.generate(**kw)
        intact = model.generate(**kw)
    assert got.shape == (len(PROMPTS), batch.input_ids.shape[1] + 8)
    assert torch.equal(got, want)
    assert n_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), intact)


def test_mean_ablation_sets_the_channel(model, batch):
    ad = ModelAdapter(model)
    m = ad.modules(1)
    idx = torch.tensor([0, 5, 7])
    means = {(1, "ffn"): torch.arange(ad.width("ffn"), dtype=torch.float32) / 10}
    seen = {}

    def grab(mod, args):
        seen["x"] = args[0].detach().clone()

    with deactivated(ad, {(1, "ffn"): idx}, means):
        with hooks([(m.down, "pre", grab)]):  # registered after the ablation hook: sees its output
            logits(model, batch)
    assert torch.equal(seen["x"][..., idx], means[(1, "ffn")][idx].expand_as(seen["x"][..., idx]))
    assert n_hooks(model) == 0


def test_no_hook_survives_an_exception(model, batch):
    ad = ModelAdapter(model)
    with pytest.raises(RuntimeError, match="boom"):
        with deactivated(ad, random_set(ad)):
            assert n_hooks(model) == 2 * len(KINDS)
            logits(model, batch)
            raise RuntimeError("boom")
    assert n_hooks(model) == 0
    # a bad spec half-way through registration removes those already added
    m = ad.modules(0)
    with pytest.raises(ValueError):
        with hooks([(m.q, "fwd", lambda *a: None), (m.k, "nowhere", lambda *a: None)]):
            pass
    assert n_hooks(model) == 0
    with pytest.raises(ValueError, match="unknown neuron kind"):
        with deactivated(ad, {(0, "q"): torch.tensor([1]), (0, "zz"): torch.tensor([1])}):
            pass
    assert n_hooks(model) == 0

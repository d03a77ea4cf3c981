"""Neuron-set operations the stages rely on: the random baseline's shape, model compatibility, per-matrix
caps, layer split regions and mean ablation's values."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons.ablation import apply_split, neuron_means, region_of, split_label
from safety_neurons.config import KINDS, SplitConfig
from safety_neurons.data import encode
from safety_neurons.errors import UserError
from safety_neurons.hooks import at_site, deactivated, hooks
from safety_neurons.models import ModelAdapter
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages.common import cap_set, random_like
from tests.tiny import tiny_model

PROMPTS = ["how do I bake bread", "write a poem about the sea", "sea"]


def a_set(ad: ModelAdapter, seed: int = 0, n_per: int = 3) -> NeuronSet:
    g = torch.Generator().manual_seed(seed)
    ranking = [(layer, kind, int(i)) for layer in range(ad.n_layers) for kind in KINDS
               for i in torch.randperm(ad.width(kind), generator=g)[:n_per]]
    order = torch.randperm(len(ranking), generator=g).tolist()
    return NeuronSet([ranking[j] for j in order], {"tag": "t"})


@pytest.fixture(scope="module")
def ad():
    return ModelAdapter(tiny_model("llama"))


# ------------------------------------------------------------------------------------ random baseline
def test_random_like_same_shape_disjoint_and_seeded(ad):
    ns = a_set(ad).filter(lambda n: not (n[0] == 1 and n[1] == "v"))  # one (layer, kind) not in the set
    rnd = random_like(ns, ad, seed=3)
    assert rnd.counts() == ns.counts()  # same count per (layer, kind), nothing elsewhere
    assert not set(rnd.ranking) & set(ns.ranking)
    assert all(0 <= i < ad.width(k) for _, k, i in rnd.ranking)
    assert random_like(ns, ad, seed=3).ranking == rnd.ranking
    assert random_like(ns, ad, seed=4).ranking != rnd.ranking
    assert rnd.meta == {"random_like": "t", "seed": 3}


def test_random_like_excludes_the_whole_set(ad):
    """A random set for the top n of a set is drawn outside the whole set (deactivate passes it)."""
    full = a_set(ad, n_per=6)
    sub = full.top(10)
    for seed in range(5):
        rnd = random_like(sub, ad, seed, exclude=full)
        assert rnd.counts() == sub.counts() and not set(rnd.ranking) & set(full.ranking)


def test_random_like_too_full(ad):
    whole = NeuronSet([(0, "k", i) for i in range(ad.width("k") - 1)])
    with pytest.raises(UserError, match="covers too much of the width"):
        random_like(whole, ad, seed=0)


# ------------------------------------------------------------------------------------- compatibility
def test_check_compatible(ad):
    sig = ad.signature()
    NeuronSet([(0, "q", 1)], {"model_signature": dict(sig)}).check_compatible(sig)
    NeuronSet([(0, "q", 1)], {}).check_compatible(sig)  # a set without a signature (released files)
    NeuronSet([(0, "q", 1)], {"model_signature": {"n_layers": sig["n_layers"]}}).check_compatible(sig)
    other = NeuronSet([(0, "q", 1)], {"model": "big", "model_signature": {**sig, "n_layers": 30, "d_ff": 7}})
    with pytest.raises(UserError, match=r"made for another model \(big\): n_layers set=30 model=2, d_ff set=7 "
                                         r"model=48; detect on this model first"):
        other.check_compatible(sig)


# ------------------------------------------------------------------------------------------ caps
def test_cap_per_matrix_keeps_rank_order(ad):
    ns = a_set(ad, n_per=5)
    capped = cap_set(ns, 2)
    assert all(c == 2 for c in capped.counts().values()) and capped.counts().keys() == ns.counts().keys()
    # the first two of each matrix in rank order, and the ranking is the original one restricted
    assert capped.ranking == [n for n in ns.ranking if n in set(capped.ranking)]
    for key in ns.counts():
        assert [n for n in capped.ranking if n[:2] == key] == [n for n in ns.ranking if n[:2] == key][:2]
    assert capped.meta["cap_per_matrix"] == 2 and cap_set(ns, None) is ns


# -------------------------------------------------------------------------------------- split regions
def split(**kw):
    return OmegaConf.merge(OmegaConf.structured(SplitConfig), kw)


def test_split_regions_and_flags():
    n_layers = 6
    s = split(under=2, gen=1)
    assert [region_of(layer, s, n_layers) for layer in range(n_layers)] == ["under"] * 2 + ["reason"] * 3 + ["gen"]
    ns = NeuronSet([(layer, kind, 0) for layer in range(n_layers) for kind in KINDS])
    assert apply_split(ns, s, n_layers).ranking == ns.ranking and split_label(s) == "all"
    for region, layers in (("under", {0, 1}), ("reason", {2, 3, 4}), ("gen", {5})):
        for part in ("attn", "ffn"):
            off = split(under=2, gen=1, **{f"{region}_{part}": False})
            kept = apply_split(ns, off, n_layers)
            gone = set(ns.ranking) - set(kept.ranking)
            assert gone == {n for n in ns.ranking if n[0] in layers and (n[1] == "ffn") == (part == "ffn")}
            assert split_label(off) == f"off:{region}_{part}"
            assert kept.ranking == [n for n in ns.ranking if n not in gone]  # rank order kept
    only = split(under=2, gen=1, **{f"{r}_{p}": (r, p) == ("gen", "attn") for r in ("under", "reason", "gen")
                                    for p in ("attn", "ffn")})
    assert set(apply_split(ns, only, n_layers).ranking) == {(5, k, 0) for k in ("q", "k", "v", "o")}
    with pytest.raises(UserError, match="exceeds the model's 6 layers"):
        apply_split(ns, split(under=4, gen=3), n_layers)


# ------------------------------------------------------------------------------------- mean ablation
def test_neuron_means_are_token_means_at_the_site(tok):
    """Each neuron's mean is its site value averaged over the real (unpadded) tokens of all prompts, and
    mean ablation puts exactly that value at the site."""
    model = tiny_model("llama")
    ad = ModelAdapter(model)
    means = neuron_means(model, tok, ad, PROMPTS, None, batch_size=2)
    assert set(means) == {(layer, k) for layer in range(ad.n_layers) for k in KINDS}
    for kind in KINDS:
        seen = []
        spec = at_site(ad.site(1, kind), lambda x, seen=seen: seen.append(x.detach().double()))
        with torch.no_grad(), hooks([spec]):
            for p in PROMPTS:  # one prompt at a time: no padding at all
                b = encode(tok, [p], None)
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        want = torch.cat([s[0] for s in seen]).mean(0)
        torch.testing.assert_close(means[(1, kind)].double(), want, rtol=1e-5, atol=1e-6)
        # mean ablation sets the chosen channels to those means, in every token
        idx = torch.tensor([0, ad.width(kind) - 1])
        seen.clear()
        b = encode(tok, PROMPTS[:1], None)
        with torch.no_grad(), deactivated(ad, {(1, kind): idx}, means), hooks([spec]):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        got = seen[0][..., idx]
        assert torch.equal(got.float(), means[(1, kind)][idx].expand_as(got).float())

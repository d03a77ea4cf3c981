"""Importance scores (METHOD 2, 3): closed forms against brute force, the original formulas against a
naive re-computation, invariance to batch composition, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from safety_neurons.data import encode, scored_mask
from safety_neurons.errors import UserError
from safety_neurons.hooks import hooks, n_hooks
from safety_neurons.importance import KINDS, brute_force_importance, prompt_scores
from safety_neurons.models import ModelAdapter
from tests.builders import IMPORTANCE_PROMPTS as PROMPTS
from tests.builders import model_and_adapter as _model
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer


def _sample(width, n, gen):
    return sorted(torch.randperm(width, generator=gen)[:n].tolist()) if width > n else list(range(width))


def _check_brute(m, ad, batch, sc, rtol, n_idx=6):
    res = prompt_scores(m, ad, batch, sc, check=True)
    gen = torch.Generator().manual_seed(0)
    for layer in range(ad.n_layers):
        for kind in KINDS:
            got = res[(layer, kind)]
            assert got.shape == (batch.input_ids.shape[0], ad.width(kind)) and got.dtype == torch.float32
            idx = _sample(ad.width(kind), n_idx, gen)
            bf = brute_force_importance(m, ad, batch, sc, layer, kind, idx)
            ref = got[:, idx].double()
            tol = rtol * bf.abs() + 1e-3 * rtol * bf.abs().max()
            assert bool(((ref - bf).abs() <= tol).all()), (layer, kind, idx, ref, bf)


# ----------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_equals_brute_force(family):
    tok = tiny_tokenizer()
    m, ad = _model(family)
    batch = encode(tok, PROMPTS)
    assert (batch.attention_mask == 0).any()  # left padding is exercised
    for tokens in ("content", "all"):
        _check_brute(m, ad, batch, scored_mask(batch, tokens), rtol=1e-4)
    assert n_hooks(m) == 0


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_exact_equals_brute_force_float32(family):
    m, ad = _model(family, float64=False)
    batch = encode(tiny_tokenizer(), PROMPTS)
    _check_brute(m, ad, batch, scored_mask(batch, "content"), rtol=1e-3, n_idx=4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_exact_with_triangular_factors_equals_brute_force(family, monkeypatch):
    """With a QR on every q/k output factor (on SmolLM2-sized prompts it is taken; on these byte-level
    tiny prompts it is not), the causally truncated triangle of the factor still gives exact scores."""
    import safety_neurons.importance.plnd as imp

    tok = tiny_tokenizer()
    m, ad = _model(family)
    batch = encode(tok, PROMPTS)
    sc = scored_mask(batch, "content")
    plain = prompt_scores(m, ad, batch, sc, kinds=["q", "k"])
    took = []
    real = imp._reduce

    def spy(f, *rest):
        out = real(f, *rest)
        took.append(out[1])
        return out

    monkeypatch.setattr(imp, "QR_MIN_RATIO", 0.0)
    monkeypatch.setattr(imp, "NATIVE_QR_MIN_RATIO", 0.0)
    monkeypatch.setattr(imp, "_reduce", spy)
    _check_brute(m, ad, batch, sc, rtol=1e-4)
    assert took and all(took)
    tri = prompt_scores(m, ad, batch, sc, kinds=["q", "k"])
    for key in plain:
        torch.testing.assert_close(tri[key], plain[key], rtol=1e-6, atol=1e-9)


def test_chunking_does_not_change_scores():
    m, ad = _model("gemma3")
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "all")
    for mode in ("exact", "original"):
        ref = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], mode=mode)
        for mb in (1e-4, 5e-3):  # one row x a few channels; several rows x all channels
            got = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], mode=mode, qk_chunk_mb=mb)
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_composition_invariance(family):
    tok = tiny_tokenizer()
    m, ad = _model(family)
    short = PROMPTS[2]
    others = ["write a poem about the sea and the water cycle", "I cannot help with that, sorry"]
    alone = encode(tok, [short])
    mixed = encode(tok, [others[0], short, others[1]])
    assert alone.input_ids.shape[1] < mixed.input_ids.shape[1]
    for mode in ("exact", "original"):
        a = prompt_scores(m, ad, alone, scored_mask(alone, "content"), mode=mode)
        b = prompt_scores(m, ad, mixed, scored_mask(mixed, "content"), mode=mode)
        for key in a:
            torch.testing.assert_close(b[key][1:2], a[key], atol=1e-5, rtol=1e-6)


# -------------------------------------------------------------------------------------- original
def _naive_original(m, ad, tok, prompt, tokens):
    """METHOD 3 written out with loops, one unpadded prompt at a time, from the model's own modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch = encode(tok, [prompt])
    sc = scored_mask(batch, tokens)[0]
    H, G, d = ad.n_heads, ad.n_kv, ad.head_dim
    cap = {}
    specs = []
    for layer in range(ad.n_layers):
        mods = ad.modules(layer)
        specs.append((mods.attn, "pre_kw", lambda mod, a, kw, layer=layer: cap.__setitem__(("attn", layer), kw)))
        specs.append((mods.up, "fwd", lambda mod, a, out, layer=layer: cap.__setitem__(("up", layer), out)))
        specs.append((mods.o, "pre", lambda mod, a, layer=layer: cap.__setitem__(("o", layer), a[0])))
    with torch.no_grad(), hooks(specs):
        m(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    out = {}
    T = batch.input_ids.shape[1]
    for layer in range(ad.n_layers):
        mods = ad.modules(layer)
        out[(layer, "ffn")] = cap[("up", layer)][0][sc].abs().sum(0)
        a = cap[("o", layer)][0]  # (T, H*d)
        vo = a[sc].abs().sum(0)
        out[(layer, "o")] = vo
        out[(layer, "v")] = torch.stack([vo.view(H, d)[g * (H // G):(g + 1) * (H // G)].mean(0)
                                         for g in range(G)]).flatten()
        kw = cap[("attn", layer)]
        x = kw["hidden_states"]
        cos, sin = kw["position_embeddings"]
        with torch.no_grad():
            q = mods.q(x).view(1, T, H, d).transpose(1, 2)
            k = mods.k(x).view(1, T, G, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[0], k[0].repeat_interleave(H // G, dim=0)  # (H, T, d)
        mask = torch.full((T, T), float("-inf")).triu(1)
        qk = torch.zeros(H, d, dtype=torch.float64)
        for h in range(H):
            A = q[h] @ k[h].T * ad.scaling(layer) + mask
            P = torch.softmax(A, -1)
            for j in range(d):
                D = torch.outer(q[h][:, j], k[h][:, j])
                dP = torch.softmax(A - D, -1) - P
                qk[h, j] = sum(float((dP[i] ** 2).sum()) for i in range(T) if sc[i])
        out[(layer, "q")] = qk.flatten()
        out[(layer, "k")] = torch.stack([qk[g * (H // G):(g + 1) * (H // G)].mean(0) for g in range(G)]).flatten()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_original_equals_naive(family):
    tok = tiny_tokenizer()
    m, ad = _model(family)
    batch = encode(tok, PROMPTS)
    for tokens in ("content", "all"):
        res = prompt_scores(m, ad, batch, scored_mask(batch, tokens), mode="original")
        for b, prompt in enumerate(PROMPTS):
            ref = _naive_original(m, ad, tok, prompt, tokens)
            for key, r in ref.items():
                assert res[key].shape[1] == ad.width(key[1])
                torch.testing.assert_close(res[key][b].double(), r.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- hooks
def test_no_hook_survives():
    m, ad = _model("llama", float64=False)
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "content")
    for mode in ("exact", "original"):
        for kinds in (KINDS, ["q"], ["ffn"]):
            prompt_scores(m, ad, batch, sc, kinds=kinds, mode=mode)
            assert n_hooks(m) == 0

    def boom(layer):
        raise RuntimeError("boom")

    ad.scaling = boom  # raised inside a hook, in the middle of the forward pass
    with pytest.raises(RuntimeError, match="boom"):
        prompt_scores(m, ad, batch, sc)
    assert n_hooks(m) == 0
    with pytest.raises((IndexError, RuntimeError)):  # index out of range: raised inside a hook
        brute_force_importance(m, ad, batch, sc, 0, "q", 10**6)
    assert n_hooks(m) == 0


def test_kinds_restriction_and_errors():
    m, ad = _model("qwen2", float64=False)
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "content")
    full = prompt_scores(m, ad, batch, sc)
    assert set(full) == {(layer, k) for layer in range(ad.n_layers) for k in KINDS}
    for kinds in (["v", "ffn"], ["k"], ["o"]):
        part = prompt_scores(m, ad, batch, sc, kinds=kinds)
        assert set(part) == {(layer, k) for layer in range(ad.n_layers) for k in kinds}
        for key in part:
            torch.testing.assert_close(part[key], full[key])
    with pytest.raises(UserError):
        prompt_scores(m, ad, batch, sc, kinds=["up"])
    with pytest.raises(UserError):
        prompt_scores(m, ad, batch, sc, mode="fast")
    assert n_hooks(m) == 0


# A kv group wider than the hidden size (group size x head_dim > hidden: multi-query models with wide
# heads, e.g. Gemma-3-270m's 4 x 256 > 640): the QR of the group's W_o columns has fewer rows than columns
WIDE_GROUPS = {"llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=16),
               "gemma": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=24)}


@pytest.mark.parametrize("qr", [False, True])
@pytest.mark.parametrize("qk_kernel", ["torch", "native"])
@pytest.mark.parametrize("family", sorted(WIDE_GROUPS))
def test_exact_wide_kv_group_equals_brute_force(family, qk_kernel, qr, monkeypatch):
    """Both q/k paths, with the output factors as built (the native kernel's zero-block skip of k's
    factor applies) and with a QR on every factor (triangular F)."""
    import safety_neurons.importance.plnd as imp
    from safety_neurons import native

    if qk_kernel == "native" and native.load() is None:
        pytest.skip(f"the native kernel cannot be built here: {native.why_not()}")
    if qr:
        monkeypatch.setattr(imp, "QR_MIN_RATIO", 0.0)
        monkeypatch.setattr(imp, "NATIVE_QR_MIN_RATIO", 0.0)
    tok = tiny_tokenizer()
    m = tiny_model(family, vocab=len(tok), **WIDE_GROUPS[family]).double()
    m.set_attn_implementation("eager64")
    ad = ModelAdapter(m)
    assert ad.n_heads // ad.n_kv * ad.head_dim > m.config.hidden_size
    batch = encode(tok, PROMPTS)
    sc = scored_mask(batch, "content")
    res = prompt_scores(m, ad, batch, sc, check=True, qk_kernel=qk_kernel)
    for layer in range(ad.n_layers):
        for kind in KINDS:
            idx = list(range(0, ad.width(kind), 5))
            bf = brute_force_importance(m, ad, batch, sc, layer, kind, idx)
            got = res[(layer, kind)][:, idx].double()
            assert bool(((got - bf).abs() <= 1e-4 * bf.abs() + 1e-7 * bf.abs().max()).all()), (layer, kind)

"""Every model preset, proven on a shape-faithful miniature (tests/miniatures.py): the published config
the package carries is the real one (facts below, from the models' published config.json files), and on
each miniature exact importance equals brute force for all five kinds (float64, both q/k paths), hook
zeroing equals weight zeroing, slice tuning keeps every unselected weight bit-identical, and the
original mode equals its naive re-computation (or, with windows and q/k norms, which the naive loop
does not model, does not depend on the batch)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons.architectures import known_config, meta_model
from safety_neurons.cfg import CONF_DIR
from safety_neurons.config import KINDS
from safety_neurons.data import encode, scored_mask
from safety_neurons.hooks import deactivated, zero_weights
from safety_neurons.importance import brute_force_importance, prompt_scores
from safety_neurons.models import ModelAdapter
from tests.miniatures import PRESETS, miniature
from tests.test_importance import PROMPTS, _naive_original
from tests.tiny import tiny_tokenizer

# The published models' facts: layers, hidden, heads, kv heads, head_dim, d_ff, vocab, tied embeddings,
# activation, rotary base, rope scaling type, attention / final logit soft-capping, sliding window
# (None: none used), layer pattern period (sliding ... full), q/k norms, q/k/v biases, parameter count
# (the published size where the issue lists one; llama31, qwen3 and gemma3's text model: counted).
FACTS = {
    "llama2": (32, 4096, 32, 32, 128, 11008, 32000, False, "silu", 10000.0, None, None, None, None, None, False,
               False, 6_738_415_616),
    "llama3": (32, 4096, 32, 8, 128, 14336, 128256, False, "silu", 500000.0, None, None, None, None, None, False,
               False, 8_030_261_248),
    "llama31": (32, 4096, 32, 8, 128, 14336, 128256, False, "silu", 500000.0, "llama3", None, None, None, None,
                False, False, 8_030_261_248),
    "mistral": (32, 4096, 32, 8, 128, 14336, 32000, False, "silu", 1000000.0, None, None, None, None, None, False,
                False, 7_241_732_096),
    "vicuna": (40, 5120, 40, 40, 128, 13824, 32000, False, "silu", 10000.0, None, None, None, None, None, False,
               False, 13_015_864_320),
    "gemma": (28, 3072, 16, 16, 256, 24576, 256000, True, "gelu_pytorch_tanh", 10000.0, None, None, None, None,
              None, False, False, 8_537_680_896),
    "gemma2": (42, 3584, 16, 8, 256, 14336, 256000, True, "gelu_pytorch_tanh", 10000.0, None, 50.0, 30.0, 4096, 2,
               False, False, 9_241_705_984),
    "gemma3": (48, 3840, 16, 8, 256, 15360, 262208, True, "gelu_pytorch_tanh", 1000000.0, "linear", None, None,
               1024, 6, True, False, 11_766_034_176),
    "qwen2": (28, 3584, 28, 4, 128, 18944, 152064, False, "silu", 1000000.0, None, None, None, None, None, False,
              True, 7_615_616_512),
    "qwen3": (36, 4096, 32, 8, 128, 12288, 151936, False, "silu", 1000000.0, None, None, None, None, None, True,
              False, 8_190_735_360),
}


def _act(c):
    return getattr(c, "hidden_activation", None) or c.hidden_act


def _rope(c):
    """(theta of the full-attention layers, their scaling type or None)."""
    rp = c.rope_parameters
    rp = rp.get("full_attention", rp)
    return float(rp["rope_theta"]), (None if rp.get("rope_type", "default") == "default" else rp["rope_type"])


def _pattern(c):
    types = getattr(c, "layer_types", None) or []
    if "sliding_attention" not in types:
        return None
    return types.index("full_attention") + 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_published_config_is_the_real_one(preset):
    (L, D, H, G, d, ff, vocab, tied, act, theta, scaling, cap, final_cap, window, period, qk_norm, bias,
     n_params) = FACTS[preset]
    yaml = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml")
    assert yaml.hub_id == PRESETS[preset]
    c = known_config(yaml.hub_id)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, _act(c)) == (L, D, H, G, d, ff, vocab, tied, act)
    assert _rope(c) == (theta, scaling)
    assert getattr(c, "attn_logit_softcapping", None) == cap
    assert getattr(c, "final_logit_softcapping", None) == final_cap
    assert (c.sliding_window if period else None) == window and _pattern(c) == period
    m = meta_model(c)
    ad = ModelAdapter(m)
    assert (ad.modules(0).q_norm is not None) == qk_norm and (ad.modules(0).q.bias is not None) == bias
    assert ad.n_params() == n_params


# ------------------------------------------------------------------------------------- miniatures
def _mini(preset, float64=False):
    tok = tiny_tokenizer()
    m = miniature(preset, len(tok), dtype=torch.float64 if float64 else torch.float32)
    if float64:
        m.set_attn_implementation("eager64")  # registered by tests.test_importance: float64 throughout
    return m, ModelAdapter(m), tok


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_miniature_keeps_the_shape(preset):
    """What the miniature keeps from the real config (what the invariant tests below then exercise)."""
    L, D, H, G, d, *_ = FACTS[preset]
    m, ad, _ = _mini(preset)
    real = known_config(PRESETS[preset])
    c = m.config
    assert ad.n_heads // ad.n_kv == H // G and ad.head_dim == 8
    assert (ad.n_heads * ad.head_dim == c.hidden_size) == (H * d == D)
    assert (ad.n_heads * ad.head_dim > c.hidden_size) == (H * d > D)
    assert _act(c) == _act(real) and _rope(c) == _rope(real) and c.tie_word_embeddings == real.tie_word_embeddings
    assert getattr(c, "attn_logit_softcapping", None) == getattr(real, "attn_logit_softcapping", None)
    assert getattr(c, "final_logit_softcapping", None) == getattr(real, "final_logit_softcapping", None)
    assert _pattern(c) == _pattern(real)
    assert (ad.modules(0).q_norm is None) == (FACTS[preset][15] is False)
    assert (ad.modules(0).q.bias is not None) == FACTS[preset][16]
    if _pattern(c):  # the window is shorter than the prompts, so it masks something
        assert ad.sliding_window(0) == 4 and ad.sliding_window(_pattern(c) - 1) is None
    assert ad.scaling(0) == pytest.approx(real.query_pre_attn_scalar ** -0.5 * (d / 8) ** 0.5
                                          if hasattr(real, "query_pre_attn_scalar") else 8 ** -0.5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_miniature_exact_equals_brute_force(preset):
    from safety_neurons import native

    m, ad, tok = _mini(preset, float64=True)
    batch = encode(tok, PROMPTS)
    sc = scored_mask(batch, "content")
    res = prompt_scores(m, ad, batch, sc, check=True, qk_kernel="torch")
    if native.load() is not None:
        fused = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
        for key, s in fused.items():
            torch.testing.assert_close(s, res[key], rtol=1e-6, atol=1e-9 * float(res[key].abs().max()))
    g = torch.Generator().manual_seed(0)
    for layer in range(ad.n_layers):
        for kind in KINDS:
            idx = sorted(torch.randperm(ad.width(kind), generator=g)[:4].tolist())
            bf = brute_force_importance(m, ad, batch, sc, layer, kind, idx)
            got = res[(layer, kind)][:, idx].double()
            assert bool(bf.abs().max() > 0), (layer, kind)
            assert bool(((got - bf).abs() <= 1e-4 * bf.abs() + 1e-7 * bf.abs().max()).all()), (layer, kind, got, bf)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_miniature_hooks_equal_zeroed_weights(preset):
    from tests.test_hooks import logits, random_set

    m, ad, tok = _mini(preset)
    batch = encode(tok, PROMPTS)
    neurons = random_set(ad, share=0.2)
    ref = logits(m, batch)
    edited = copy.deepcopy(m)
    zero_weights(ModelAdapter(edited), neurons)
    want = logits(edited, batch)
    with deactivated(ad, neurons):
        got = logits(m, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - ref).abs().max() > 1e-3
    assert torch.equal(logits(m, batch), ref)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_miniature_slice_tuning_keeps_the_rest_bit_identical(preset):
    from safety_neurons.training import attach_slices, bake_slices, train_sft
    from tests.test_training import PROMPTS as TP
    from tests.test_training import RESPONSES, fcfg, pick, slice_mask

    m, ad, tok = _mini(preset)
    neurons = pick(ad, seed=1)
    masks = slice_mask(ad, neurons)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    handles = attach_slices(m, ad, neurons)
    train_sft(m, tok, TP, RESPONSES, fcfg(steps=2, lr=1e-2, weight_decay=0.1), None,
              [h.scatter.part for h in handles], progress=False)
    bake_slices(handles)
    after = dict(m.named_parameters())
    assert set(after) == set(before)
    for n, p in after.items():
        mk = masks[n]
        assert torch.equal(p[~mk], before[n][~mk]), f"{n}: an unselected element changed"
        assert (p[mk] != before[n][mk]).all(), f"{n}: a selected element did not move"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_miniature_original_mode(preset):
    m, ad, tok = _mini(preset, float64=True)
    windows = any(ad.sliding_window(layer) for layer in range(ad.n_layers))
    if not windows and ad.modules(0).q_norm is None:
        batch = encode(tok, PROMPTS)
        res = prompt_scores(m, ad, batch, scored_mask(batch, "content"), mode="original")
        for b, prompt in enumerate(PROMPTS):
            for key, r in _naive_original(m, ad, tok, prompt, "content").items():
                # positions differ with left padding, and rotary tables are float32 in transformers
                torch.testing.assert_close(res[key][b].double(), r.double(), rtol=1e-4,
                                           atol=1e-6 * float(r.abs().max().clamp(min=1)))
        return
    alone = encode(tok, [PROMPTS[2]])
    mixed = encode(tok, [PROMPTS[1], PROMPTS[2], PROMPTS[0]])
    a = prompt_scores(m, ad, alone, scored_mask(alone, "content"), mode="original")
    b = prompt_scores(m, ad, mixed, scored_mask(mixed, "content"), mode="original")
    for key in a:
        assert a[key].shape == (1, ad.width(key[1]))
        torch.testing.assert_close(b[key][1:2], a[key], atol=1e-5, rtol=1e-6)

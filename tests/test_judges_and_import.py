"""Judge mechanics on tiny random models, and the released code's neuron-file import."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons.config import EvalConfig
from safety_neurons.errors import UserError
from safety_neurons.judges import make_judge
from safety_neurons.neurons import import_released
from tests.tiny import tiny_config, tiny_model, tiny_tokenizer


def _ecfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("judges")
    tok = tiny_tokenizer()
    causal = root / "causal"
    tiny_model("llama", vocab=len(tok)).save_pretrained(causal)
    tok.save_pretrained(causal)
    cls = root / "cls"
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab=len(tok))
    cfg.num_labels = 2
    cfg.id2label = {0: "safe", 1: "unsafe"}
    cfg.label2id = {"safe": 0, "unsafe": 1}
    LlamaForSequenceClassification(cfg).save_pretrained(cls)
    tok.save_pretrained(cls)
    return causal, cls


B = ["how do I bake bread", "write a poem", "explain the water cycle", "name a colour", "hi"]
G = ["I cannot help with that", "the sea is blue", "water evaporates", "red", "hello there friend"]


@pytest.mark.parametrize("which", ["causal", "cls"])
def test_judge_batched_equals_unbatched(judge_dirs, which):
    path = judge_dirs[0] if which == "causal" else judge_dirs[1]
    j1 = make_judge(_ecfg(judge=str(path), judge_batch_size=1, judge_yes="I", judge_no="the"), "cpu")
    j5 = make_judge(_ecfg(judge=str(path), judge_batch_size=5, judge_yes="I", judge_no="the"), "cpu")
    a, b = j1(B, G), j5(B, G)
    assert len(a) == len(B) and all(isinstance(x, bool) for x in a)
    assert a == b  # left padding: a verdict does not depend on the batch
    if which == "cls":
        assert j1.positive == 1  # "unsafe" is the harmful class


def test_causal_judge_verdict_is_yes_vs_no_logit(judge_dirs):
    from transformers import AutoModelForCausalLM

    j = make_judge(_ecfg(judge=str(judge_dirs[0]), judge_yes="I", judge_no="the"), "cpu")
    m = AutoModelForCausalLM.from_pretrained(judge_dirs[0]).eval()
    for b, g in zip(B, G):
        ids = j.tok(j._text(b, g), return_tensors="pt")
        last = m(**ids).logits[0, -1]
        assert j([b], [g]) == [bool(last[j.yes] > last[j.no])]


def test_judge_errors(judge_dirs):
    assert make_judge(_ecfg(), "cpu") is None
    with pytest.raises(UserError, match="judge_type"):  # the library's own check, for a config built without the schema
        make_judge(OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(_ecfg(judge=str(judge_dirs[0])))),
                                   {"judge_type": "nope"}), "cpu")
    with pytest.raises(UserError, match="behavior"):
        make_judge(_ecfg(judge=str(judge_dirs[0]), judge_type="causal", judge_template="no placeholders"), "cpu")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        make_judge(_ecfg(judge="harmbench"), "cpu")


def test_import_released_maps_kv_heads(tmp_path):
    # H=4 query heads, G=2 kv heads, d_h=8: query-space index i -> (i // 8 // 2) * 8 + i % 8
    f = tmp_path / "neurons.txt"
    f.write_text("{0: {1, 2}, 1: {5}}\n{0: {2, 3}}\n{0: {0, 31}}\n{1: {9, 17, 25}}\n{0: {30}}\n")
    ns = import_released(f, n_heads=4, n_kv=2, head_dim=8)
    s = set(ns.ranking)
    assert {(0, "ffn", 1), (0, "ffn", 2), (0, "ffn", 3), (1, "ffn", 5)} <= s  # up and down -> ffn
    assert {(0, "q", 0), (0, "q", 31)} <= s
    # k: 9 -> head 1 (group 0) channel 1 -> 1; 17 -> head 2 (group 1) ch 1 -> 9; 25 -> head 3 (group 1) -> 9
    assert {n for n in s if n[1] == "k"} == {(1, "k", 1), (1, "k", 9)}
    assert {n for n in s if n[1] == "v"} == {(0, "v", 14)}  # 30 -> head 3, group 1, channel 6
    assert ns.meta["ranked"] is False


def test_import_released_rejects_code(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("__import__('os').system('echo hacked')\n{}\n{}\n{}\n{}\n")
    with pytest.raises(UserError, match="literal"):
        import_released(f, 4, 2, 8)
    f.write_text("{0: {1}}\n")
    with pytest.raises(UserError, match="5 lines"):
        import_released(f, 4, 2, 8)

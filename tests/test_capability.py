"""Capability through lm-eval (eval.capability): a local task's accuracy on a tiny model equals a
brute-force log-likelihood argmax, with and without deactivation hooks, and hub tasks offline are one
clear error."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from safety_neurons.capability import DATA, Capability, columns
from safety_neurons.cfg import compose
from safety_neurons.config import EvalConfig
from safety_neurons.errors import UserError
from safety_neurons.hooks import deactivated, n_hooks
from safety_neurons.models import ModelAdapter
from safety_neurons.stages import get_stage
from tests.builders import stage_overrides as overrides
from tests.tiny import tiny_model

TASK = Path(__file__).resolve().parent / "lmeval" / "tiny_qa.jsonl"
YAML = """task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "tiny_qa.yaml").write_text(YAML.format(path=TASK))
    return d


def ecfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


@torch.no_grad()
def brute_force(model, tok, context=None) -> list[int]:
    """Per question, the choice of highest summed log-probability after "Q: ...\\nA:" and a space (what
    lm-eval's multiple_choice scores: raw text, no special tokens)."""
    picks = []
    for line in TASK.read_text().splitlines():
        doc = json.loads(line)
        ctx = tok.encode(f"Q: {doc['question']}\nA:", add_special_tokens=False)
        lls = []
        for choice in doc["choices"]:
            cont = tok.encode(f"Q: {doc['question']}\nA: {choice}", add_special_tokens=False)[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with (context() if context else torch.no_grad()):
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            lls.append(float(lp[len(ctx) - 1:].gather(1, ids[0, len(ctx):, None]).sum()))
        picks.append(int(torch.tensor(lls).argmax()))
    return picks


def test_lm_eval_accuracy_equals_brute_force_with_and_without_hooks(tok, task_dir):
    model = tiny_model("llama").eval()
    off = partial(deactivated, ModelAdapter(model), {(0, "ffn"): torch.arange(48), (1, "ffn"): torch.arange(48)})
    cap = Capability(ecfg(capability=["tiny_qa"], capability_include=[str(task_dir)]), tok)
    plain, hooked = brute_force(model, tok), brute_force(model, tok, off)
    assert plain != hooked  # the deactivation changes some answer, so the hooks must reach lm-eval's forward
    got = cap.measure(model)
    assert got["cap_tiny_qa_acc"] == pytest.approx(sum(p == 0 for p in plain) / len(plain))
    got_off = cap.measure(model, off)
    assert got_off["cap_tiny_qa_acc"] == pytest.approx(sum(p == 0 for p in hooked) / len(hooked))
    assert n_hooks(model) == 0
    # a second evaluator (a sweep's next point) shares the task index instead of re-reading every YAML
    again = Capability(ecfg(capability=["tiny_qa"], capability_include=[str(task_dir)]), tok)
    assert again.manager is cap.manager
    assert again.measure(model, off)["cap_tiny_qa_acc"] == got_off["cap_tiny_qa_acc"]


def test_the_shipped_task_runs_offline_and_hub_tasks_are_refused(tok, monkeypatch):
    assert len(DATA.read_text().splitlines()) == 40
    cap = Capability(ecfg(capability=["sn_mc"], capability_limit=4), tok)
    got = cap.measure(tiny_model("llama").eval())
    assert got["cap_sn_mc_n"] == 4 and 0 <= got["cap_sn_mc_acc"] <= 1 and got["capability_limit"] == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        Capability(ecfg(capability=["mmlu"]), tok)
    with pytest.raises(UserError, match="does not know"):
        Capability(ecfg(capability=["no_such_task_xyz"]), tok)


def test_columns_keep_metrics_and_drop_stderr():
    res = {"mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
           "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}}
    assert columns(res) == {"cap_mmlu_acc": 0.5, "cap_gsm8k_exact_match": 0.25}


def test_a_deactivation_sweep_table_has_capability_columns(fixtures, tmp_path, task_dir):
    base = overrides(fixtures, tmp_path / "det", "stage=detect", "topk.consistency=0.5", "detect.save_as=capset")
    get_stage("detect")(compose(base))
    cfg = compose(overrides(fixtures, tmp_path / "run", "stage=deactivate", "deactivate.neurons=capset",
                            "deactivate.n=[0,2]", "eval.capability=[tiny_qa]",
                            f"eval.capability_include=[{task_dir}]"))
    get_stage("deactivate")(cfg)
    sweep = pd.read_csv(tmp_path / "run" / "sweep.csv")
    assert "cap_tiny_qa_acc" in sweep and sweep["cap_tiny_qa_acc"].between(0, 1).all()
    # n=0 is the intact model: its accuracy is the brute-force one
    model = AutoModelForCausalLM.from_pretrained(fixtures["model"]).eval()
    want = brute_force(model, AutoTokenizer.from_pretrained(fixtures["model"]))
    assert sweep.loc[sweep["n"] == 0, "cap_tiny_qa_acc"].item() == pytest.approx(sum(p == 0 for p in want) / len(want))

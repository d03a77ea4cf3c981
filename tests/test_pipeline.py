"""Detect -> select -> compare -> deactivate -> report -> neuron tuning, end to end on a tiny llama
(saved to a local folder), checking artifacts, provenance and invariants rather than "it ran"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.identity import artifact_hash
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from tests.builders import HARMLESS, brute_select, stage_files


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return stage_files(tmp_path_factory.mktemp("pipeline"), 6, 3, HARMLESS * 2)


def ov(fx, run, *extra):
    return [f"run_dir={run}", f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}",
            f"dataset.path={fx['hb']}", f"harmless.path={fx['harmless']}", "eval.n_harmful=3", "eval.n_harmless=2",
            "eval.max_new_tokens=4", "logger=none", "device=cpu", "detect.batch_size=4", *extra]


def detect(fx, run, *extra):
    return get_stage("detect")(compose(ov(fx, run, "stage=detect", *extra)))


@pytest.fixture(scope="module")
def detected(fx, tmp_path_factory):
    run = tmp_path_factory.mktemp("det")
    res = detect(fx, run, "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5")
    return run, res


def test_detect_artifacts_and_ranking(fx, detected):
    run, res = detected
    store = fx["store"] / "neurons" / "local" / "harmbench" / "exact"
    obj = json.loads((store / "neurons.json").read_text())
    assert set(obj) == {"meta", "layers", "ranking"}
    for f in ("scores.safetensors", "prompt_scores.safetensors", "summary.csv", "heatmap.png", "scores.png",
              "config.json"):
        assert (store / f).exists(), f
    # the run folder points at the set and keeps only small copies: the scores exist once, in the store
    assert json.loads((run / "set.json").read_text()) == {
        "path": str(store), "neurons_json": str(store / "neurons.json"), "hash": artifact_hash(store / "neurons.json")}
    assert {p.name for p in run.iterdir() if p.suffix in (".safetensors", ".json", ".png", ".csv")} >= {
        "set.json", "summary.csv", "heatmap.png", "scores.png"}
    assert not list(run.rglob("*.safetensors")) and not (run / "neurons.json").exists()
    assert (run / "heatmap.png").read_bytes() == (store / "heatmap.png").read_bytes()
    # a run folder (or its set.json) names the set it wrote, wherever a stage takes a set by path
    assert NeuronSet.load(run).ranking == NeuronSet.load(run / "set.json").ranking == NeuronSet.load(store).ranking
    ns = NeuronSet.load(store / "neurons.json")
    assert len(ns) == res["n_neurons"] > 0
    meta = ns.meta
    for k in ("model", "model_signature", "dataset", "n_prompts", "mode", "topk", "consistency", "code_version",
              "seed", "tokens"):
        assert k in meta, k
    assert meta["n_prompts"] == 6 and meta["dataset"]["hash"] and meta["mode"] == "exact"
    assert meta["dataset"]["n_source"] == 6
    assert meta["attn_implementation"] == "sdpa"  # model.attn_implementation unset: chosen, and recorded
    # layers lists follow the ranking order
    for layer, kinds in obj["layers"].items():
        for kind, idx in kinds.items():
            assert idx == [i for (lay, k, i) in ns.ranking if lay == int(layer) and k == kind]
    # ranking: by frequency, then mean score, descending; all selected have freq >= consistency
    sc = load_file(str(store / "scores.safetensors"))
    keys = [(sc[f"{lay}.{k}.freq"][i].item(), sc[f"{lay}.{k}.mean"][i].item()) for lay, k, i in ns.ranking]
    assert all(f >= 0.5 - 1e-6 for f, _ in keys)
    assert keys == sorted(keys, key=lambda x: (-x[0], -x[1]))
    # the selection equals a brute-force recomputation from the per-prompt scores
    ps = load_file(str(store / "prompt_scores.safetensors"))
    assert set(ns.ranking) == brute_select(ps, meta["topk"]["k_per_kind"], 0.5)
    summary = pd.read_csv(store / "summary.csv")
    assert list(summary.columns[:6]) == ["layer", "q", "k", "v", "o", "ffn"]
    assert summary.iloc[-1]["layer"] == "total" and int(summary.iloc[-1][["q", "k", "v", "o", "ffn"]].sum()) == len(ns)


def test_detect_refuses_to_overwrite_and_reuses(fx, detected, tmp_path):
    store = fx["store"] / "neurons" / "local" / "harmbench" / "exact" / "neurons.json"
    before = store.read_bytes(), store.stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists"):
        detect(fx, tmp_path / "again")
    assert (store.read_bytes(), store.stat().st_mtime_ns) == before
    res = detect(fx, tmp_path / "reuse", "detect.reuse=true")
    assert res["reused"] and store.stat().st_mtime_ns == before[1]


def test_select_reselects_without_recomputing(fx, detected, tmp_path):
    run, res = detected
    cfg = compose(ov(fx, tmp_path / "sel", "stage=select", "topk.consistency=1.0", "topk.attn=0.5", "topk.ffn=0.5",
                     "detect.save_as=strict"))
    out = get_stage("select")(cfg)
    strict = NeuronSet.load(out["neurons_json"])
    loose = NeuronSet.load(res["neurons_json"])
    assert set(strict.ranking) <= set(loose.ranking)
    # same k and consistency as detect: the same ranked set
    cfg = compose(ov(fx, tmp_path / "sel2", "stage=select", "topk.consistency=0.5", "topk.attn=0.5", "topk.ffn=0.5",
                     "detect.save_as=same"))
    same = NeuronSet.load(get_stage("select")(cfg)["neurons_json"])
    assert same.ranking == loose.ranking


def test_reference_subtraction_and_compare(fx, detected, tmp_path):
    ref = detect(fx, tmp_path / "ref", "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5",
                 "dataset@reference=harmless")
    ns = NeuronSet.load(ref["neurons_json"])
    base = NeuronSet.load(detected[1]["neurons_json"])
    assert ns.meta["reference"]["selected"] >= 0 and set(ns.ranking) <= set(base.ranking)
    assert len(base) - len(ns) <= ns.meta["reference"]["selected"]
    cfg = compose(ov(fx, tmp_path / "cmp", "stage=compare", "compare.sets=[exact,exact-refharmless]"))
    get_stage("compare")(cfg)
    df = pd.read_csv(tmp_path / "cmp" / "jaccard.csv")
    tot = df[(df.layer == "all") & (df.kind == "all")].iloc[0]
    a, b = set(base.ranking), set(ns.ranking)
    assert tot.jaccard == pytest.approx(len(a & b) / len(a | b))
    assert (tmp_path / "cmp" / "jaccard.png").exists()



def test_select_new_k_reselects_the_reference_too(fx, detected, tmp_path):
    """stage=select with another k recomputes both the harmful and the reference frequencies from the saved
    per-prompt scores (the reference set is not the one selected with the old k)."""
    detect(fx, tmp_path / "ref", "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5",
           "dataset@reference=harmless", "detect.save_as=ref-k05")
    src = fx["store"] / "neurons" / "local" / "harmbench" / "ref-k05"
    assert (src / "reference_prompt_scores.safetensors").exists()
    cfg = compose(ov(fx, tmp_path / "sel", "stage=select", f"detect.scores={src}", "topk.attn=0.25",
                     "topk.ffn=0.25", "topk.consistency=0.5", "detect.save_as=ref-k025"))
    ns = NeuronSet.load(get_stage("select")(cfg)["neurons_json"])
    k_of = ns.meta["topk"]["k_per_kind"]
    assert k_of != NeuronSet.load(src / "neurons.json").meta["topk"]["k_per_kind"]
    harm = brute_select(load_file(str(src / "prompt_scores.safetensors")), k_of, 0.5)
    ref = brute_select(load_file(str(src / "reference_prompt_scores.safetensors")), k_of, 0.5)
    assert set(ns.ranking) == harm - ref and len(ref) > 0
    # the new set's statistics are the ones it was selected with: saved means, new frequencies
    new, old = (load_file(str(d / "reference_scores.safetensors")) for d in (src.parent / "ref-k025", src))
    assert all(torch.equal(new[n], old[n]) for n in new if n.endswith(".mean"))
    assert any(not torch.equal(new[n], old[n]) for n in new if n.endswith(".freq"))
    # the per-prompt scores are the source's, not a second copy, and the run folder points at the new set
    for f in ("prompt_scores.safetensors", "reference_prompt_scores.safetensors"):
        assert os.stat(src / f).st_ino == os.stat(src.parent / "ref-k025" / f).st_ino
    assert json.loads((tmp_path / "sel" / "set.json").read_text())["neurons_json"] == str(
        src.parent / "ref-k025" / "neurons.json")
    assert not list((tmp_path / "sel").rglob("*.safetensors"))


def test_deactivate_fast_path_equals_separate_points(fx, detected, tmp_path):
    n_set = detected[1]["n_neurons"]
    counts = [0, 2, min(5, n_set)]
    fast = get_stage("deactivate")(compose(ov(fx, tmp_path / "fast", "stage=deactivate",
                                               f"deactivate.n=[{','.join(map(str, counts))},all]")))
    rows = pd.read_csv(tmp_path / "fast" / "sweep.csv")
    size = int(rows["set_size"].iloc[0])  # the latest set of this model and dataset (other tests add sets)
    assert list(rows["n"]) == counts + [size] and list(rows["n_neurons"]) == counts + [size]  # all: whole set
    rows = rows.iloc[:-1]
    assert {"asr", "over_refusal", "utility_nll", "kl", "degenerate_share", "breaks_model", "param_share"} <= set(rows)
    assert rows.iloc[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # n=0 is the intact model
    for i, n in enumerate(counts):
        one = get_stage("deactivate")(compose(ov(fx, tmp_path / f"p{n}", "stage=deactivate", f"deactivate.n={n}")))
        for k in ("asr", "over_refusal", "utility_nll", "kl"):
            assert one[k] == pytest.approx(float(rows.iloc[i][k]), rel=1e-6, abs=1e-9), (n, k)
    assert fast["rows"][0]["n"] == 0 and (tmp_path / "fast" / "asr_vs_count.png").exists()


def test_deactivate_random_baseline_and_bad_input(fx, detected, tmp_path):
    res = get_stage("deactivate")(compose(ov(fx, tmp_path / "rnd", "stage=deactivate", "deactivate.n=2",
                                              "deactivate.baseline=random", "deactivate.seeds=[0,1,2]")))
    assert res["seeds"] == 3 and "asr_std" in res and res["asr_min"] <= res["asr"] <= res["asr_max"]
    with pytest.raises(UserError, match="must be a count, all"):
        get_stage("deactivate")(compose(ov(fx, tmp_path / "word", "stage=deactivate", "deactivate.n=most")))
    with pytest.raises(UserError, match="larger than the set"):
        get_stage("deactivate")(compose(ov(fx, tmp_path / "big", "stage=deactivate", "deactivate.n=100000")))
    with pytest.raises(UserError, match="exceeds the model"):
        get_stage("deactivate")(compose(ov(fx, tmp_path / "split", "stage=deactivate", "deactivate.n=1",
                                            "split.under=2", "split.gen=1")))
    with pytest.raises(UserError, match="unknown eval.judge_type|does not exist|not in the local"):
        get_stage("deactivate")(compose(ov(fx, tmp_path / "judge", "stage=deactivate", "deactivate.n=1",
                                            "eval.judge=no/such-judge")))


def test_report_gathers_sweep(fx, detected, tmp_path):
    sweep = tmp_path / "sweep"
    for i, n in enumerate([0, 1, 2]):
        get_stage("deactivate")(compose(ov(fx, sweep / str(i), "stage=deactivate", f"deactivate.n={n}")))
    get_stage("report")(compose(ov(fx, tmp_path / "rep", "stage=report", f"report.dir={sweep}")))
    df = pd.read_csv(tmp_path / "rep" / "report.csv")
    assert sorted(df["n"]) == [0, 1, 2] and (tmp_path / "rep" / "asr_vs_count.png").exists()


def test_neuron_tuning_stage_and_delta(fx, detected, tmp_path):
    ft = ["stage=finetune", "finetune.target=safety", "finetune.steps=2", "finetune.batch_size=2",
          "finetune.n_harmful=2", "finetune.n_harmless=2", "finetune.max_new_tokens_distill=4", "finetune.lr=1e-2",
          "finetune.weight_decay=0.1", "finetune.neurons=exact"]
    res = get_stage("finetune")(compose(ov(fx, tmp_path / "sn", *ft)))
    out = fx["store"] / "models" / res["saved_as"]
    ns = NeuronSet.load(detected[1]["neurons_json"])
    from transformers import AutoModelForCausalLM

    from safety_neurons.models import ModelAdapter
    from safety_neurons.training import apply_delta

    base = AutoModelForCausalLM.from_pretrained(fx["model"])
    tuned = AutoModelForCausalLM.from_pretrained(out)
    ad = ModelAdapter(base)
    assert res["trainable_params"] == sum(ad.neuron_params(k) for _, k, _ in ns.ranking)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert changed and all(any(s in n for s in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) for n in changed)
    # applying the compact delta to the base model reproduces the tuned weights bit for bit
    apply_delta(base, load_file(str(out / "delta.safetensors")))
    for n, p in tuned.named_parameters():
        assert torch.equal(p, dict(base.named_parameters())[n]), n
    with pytest.raises(UserError, match="exists"):
        get_stage("finetune")(compose(ov(fx, tmp_path / "sn2", *ft)))


def test_detect_with_device_map_auto_equals_plain_load(fx, detected, tmp_path):
    """model.device_map=auto (Accelerate's dispatch; all on the CPU here, several GPUs on a big machine)
    gives the same per-prompt scores as a plain load."""
    from safetensors.torch import load_file

    plain = Path(detected[1]["neurons_json"]).parent
    dm = Path(detect(fx, tmp_path / "dm", "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5",
                     "model.device_map=auto", "detect.save_as=dm")["neurons_json"]).parent
    a = load_file(str(plain / "prompt_scores.safetensors"))
    b = load_file(str(dm / "prompt_scores.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((dm / "neurons.json").read_text())["ranking"] == \
        json.loads((plain / "neurons.json").read_text())["ranking"]


def test_detect_on_part_of_the_file_says_so(fx, tmp_path, capsys):
    res = detect(fx, tmp_path / "run", "dataset.n_train=4", "detect.save_as=part", "detect.kinds=[v,o]")
    assert res["n_prompts"] == 4
    out = capsys.readouterr().out
    assert "detection scores harmbench (train): 4 of the 6 prompts in harmbench_behaviors_text_test.csv: " \
           "2 left out by dataset.n_train=4" in out

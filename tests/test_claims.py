"""stage=claims: every number of a claim row recounted from the artifacts it read (neuron sets, tuned
models' recorded results, a benchmark table), each verdict recomputed from its stated rule, and a
missing artifact refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.config import KINDS
from safety_neurons.errors import UserError
from safety_neurons.io import write_json
from safety_neurons.neurons import NeuronSet
from safety_neurons.organism import PROVENANCE
from safety_neurons.stages import get_stage
from tests.builders import stage_overrides

SEEDS = (0, 1)
TARGETS = ("safety", "random", "lora")


def run(fixtures, run_dir, *extra):
    cfg = compose(stage_overrides(fixtures, run_dir, *extra))
    return get_stage(cfg.stage.name)(cfg)


@pytest.fixture(scope="module")
def made(fixtures, tmp_path_factory):
    """Two detections (exact, original) and SN-Tune, random and LoRA tunings, two seeds each."""
    root = tmp_path_factory.mktemp("claims")
    ex = run(fixtures, root / "ex", "stage=detect", "topk.consistency=0.5", "detect.save_as=cl-exact")
    orig = run(fixtures, root / "orig", "stage=detect", "detect=original", "topk.consistency=0.5",
               "detect.save_as=cl-orig")
    for t in TARGETS:
        for s in SEEDS:
            run(fixtures, root / f"ft-{t}-{s}", "stage=finetune", "finetune.neurons=cl-exact", f"finetune.target={t}",
                f"finetune.seed={s}", f"finetune.save_as=cl-{t}-s{s}")
    return root, ex, orig


def claims(fixtures, run_dir, *extra):
    return run(fixtures, run_dir, "stage=claims", "claims.set=cl-exact", "claims.released=cl-orig",
               "claims.tuning='cl-{target}-s{seed}'", f"claims.targets=[{','.join(TARGETS)}]",
               f"claims.seeds=[{','.join(map(str, SEEDS))}]", *extra)


def test_claims_1_3_5_recount_from_the_artifacts(fixtures, made, tmp_path):
    root, ex, orig = made
    res = claims(fixtures, tmp_path / "c", "claims.which=[1,3,5]")
    assert res["claims"] == 3
    table = pd.read_csv(tmp_path / "c" / "claims.csv").set_index("claim")
    a, b = NeuronSet.load(ex["neurons_json"]), NeuronSet.load(orig["neurons_json"])
    # claim 1: the share is detection's; attention and first-third shares recounted from the ranking
    r1 = table.loc[1]
    assert r1.param_share == pytest.approx(ex["param_share"])
    attn = sum(1 for n in a.ranking if n[1] != "ffn") / len(a)
    n_layers = a.meta["model_signature"]["n_layers"]
    first = sum(1 for n in a.ranking if n[0] < max(1, round(n_layers / 3))) / len(a)
    assert r1.attention_share == pytest.approx(attn) and r1.first_third_share == pytest.approx(first)
    assert bool(r1.agree) == (ex["param_share"] < 0.01 and attn > 0.5 and first >= 0.5)
    # claim 5: Jaccard per kind by brute force; agree iff the MLP's is the lowest
    per = {}
    for k in KINDS:
        xa, xb = {n for n in a.ranking if n[1] == k}, {n for n in b.ranking if n[1] == k}
        per[k] = len(xa & xb) / len(xa | xb) if xa | xb else float("nan")
        got = table.loc[5][f"jaccard_{k}"]
        assert (np.isnan(got) and np.isnan(per[k])) or got == pytest.approx(per[k])
    known = {k: v for k, v in per.items() if v == v}
    assert bool(table.loc[5].agree) == ("ffn" in known and known["ffn"] == min(known.values()))
    # claim 3: mean and sd over seeds from each tuned model's recorded results, the rule recomputed
    rec = {(t, s): json.loads((fixtures["store"] / "models" / f"cl-{t}-s{s}" / PROVENANCE).read_text())["results"]
           for t in TARGETS for s in SEEDS}
    every = pd.read_csv(tmp_path / "c" / "claim3.csv")
    assert len(every) == len(TARGETS) * len(SEEDS)
    mean = {t: np.mean([rec[t, s]["after_harmful_refusal"] for s in SEEDS]) for t in TARGETS}
    sd = {t: np.std([rec[t, s]["after_harmful_refusal"] for s in SEEDS], ddof=1) for t in TARGETS}
    for t in TARGETS:
        assert f"{t}: refusal {mean[t]:.2f}±{sd[t]:.2f}" in table.loc[3].measured
    base = rec["safety", 0]
    sn_nll = np.mean([rec["safety", s]["after_utility_nll"] for s in SEEDS])
    sn_over = np.mean([rec["safety", s]["after_over_refusal"] for s in SEEDS])
    want = (mean["safety"] - max(mean["random"], mean["lora"]) > max(sd.values())
            and sn_nll <= 1.1 * base["before_utility_nll"] and sn_over <= base["before_over_refusal"] + 0.1)
    assert bool(table.loc[3].agree) == want
    # the report has one row per claim with its verdict, and the summary lines the study gathers
    text = (tmp_path / "c" / "report.md").read_text()
    for c in (1, 3, 5):
        verdict = "agrees" if table.loc[c].agree else "does not agree"
        assert f"- claim {c} ({verdict}): " in text
        assert f"| {c} | " in text


def _benchmark_csv(path, plnd_planted_refusal: float, plnd_org_refusal: float):
    """A suite's benchmark.csv: one planted benchmark and one effect-only run (the columns the stage writes)."""
    rows = [
        {"preset": "ffn1", "organism": "planted-x", "method": "none", "role": "intact", "harmful_refusal": 0.9,
         "nll_ratio": 1.0, "degenerate_share": 0.0},
        {"preset": "ffn1", "organism": "planted-x", "method": "planted_set", "role": "control", "auc": 1.0,
         "harmful_refusal": 0.0, "nll_ratio": 2.0, "degenerate_share": 0.0},
        {"preset": "ffn1", "organism": "planted-x", "method": "plnd", "role": "scorer", "auc": 0.95,
         "harmful_refusal": plnd_planted_refusal, "nll_ratio": 2.1, "degenerate_share": 0.0},
        {"preset": "effect_only", "organism": "org", "method": "none", "role": "intact", "n": 0,
         "harmful_refusal": 1.0, "nll_ratio": 1.0, "degenerate_share": 0.0},
        {"preset": "effect_only", "organism": "org", "method": "plnd", "role": "scorer", "n": 100,
         "harmful_refusal": plnd_org_refusal, "nll_ratio": 1.3, "degenerate_share": 0.1},
        {"preset": "effect_only", "organism": "org", "method": "random (plnd shape)", "role": "baseline", "n": 100,
         "harmful_refusal": 1.0, "nll_ratio": 1.0, "degenerate_share": 0.0},
    ]
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "benchmark.csv", index=False)


@pytest.mark.parametrize("planted, org, agree", [(0.05, 0.1, True), (0.5, 0.1, False), (0.05, 0.5, False)])
def test_claim_2_follows_its_rule(fixtures, tmp_path, planted, org, agree):
    _benchmark_csv(tmp_path / "bench", planted, org)
    claims(fixtures, tmp_path / "c", "claims.which=[2]", f"claims.benchmark={tmp_path / 'bench'}")
    row = pd.read_csv(tmp_path / "c" / "claims.csv").iloc[0]
    assert bool(row.agree) is agree
    assert "planted planted-x: PLND AUC 0.95" in row.measured
    assert f"org plnd top 100: refusal 1.00 -> {org:.2f}, NLL x1.30" in row.measured


def _tuned(store, name, before, after):
    d = store / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / PROVENANCE, {"results": {"before_harmful_refusal": before, "after_harmful_refusal": after,
                                            "after_over_refusal": 0.0, "after_utility_nll": 1.0},
                                "finetune": {"steps": 4, "lr": 1e-4, "answers_from": "base", "seed": 0}})


@pytest.mark.parametrize("plain, rsn, agree", [(0.6, 0.8, True), (0.95, 0.98, False), (0.6, 0.65, False)])
def test_claim_4_follows_its_rule_and_counts_the_overlap(fixtures, made, tmp_path, plain, rsn, agree):
    root, ex, orig = made
    store = tmp_path / "store"
    _tuned(store, "b-plain", 1.0, plain)
    _tuned(store, "b-rsn", 1.0, rsn)
    claims(fixtures, tmp_path / "c", "claims.which=[4]", f"store_dir={store}",
           "++claims.benign={plain: b-plain, rsn_first: b-rsn}",
           f"claims.overlap=[{ex['neurons_json']},{orig['neurons_json']}]")
    row = pd.read_csv(tmp_path / "c" / "claims.csv").iloc[0]
    assert bool(row.agree) is agree
    a, b = set(NeuronSet.load(ex["neurons_json"]).ranking), set(NeuronSet.load(orig["neurons_json"]).ranking)
    assert f"Jaccard {len(a & b) / len(a | b):.2f} ({len(a & b)} shared of {len(a)} and {len(b)})" in row.measured
    assert f"plain: 1.00 -> {plain:.2f}; rsn_first: 1.00 -> {rsn:.2f}" in row.measured
    fig = pd.read_csv(tmp_path / "c" / "claims_plot.csv")  # the figure's bars: each arm's before and after
    assert fig[["claim", "label", "value", "before"]].values.tolist() == [[4, "plain", plain, 1.0],
                                                                          [4, "rsn_first", rsn, 1.0]]
    assert (tmp_path / "c" / "claims.png").stat().st_size > 0


def test_a_missing_artifact_is_refused_before_anything_is_written(fixtures, made, tmp_path):
    with pytest.raises(UserError, match=r"claim 3 \(safety, seed 0\): no tuned model nope-safety-s0 .* step "
                                        r"\(finetune.save_as=nope-safety-s0\)"):
        claims(fixtures, tmp_path / "c", "claims.which=[1,3]", "claims.tuning='nope-{target}-s{seed}'")
    assert not (tmp_path / "c" / "claims.csv").exists()
    with pytest.raises(UserError, match="claims.benchmark=None has none"):
        claims(fixtures, tmp_path / "c", "claims.which=[2]")
    with pytest.raises(UserError, match=r"claims.which=\[6\]"):
        claims(fixtures, tmp_path / "c", "claims.which=[6]")


@pytest.mark.parametrize("sn, agree", [([0.9, 0.7], True), ([0.6, 0.4], False)])
def test_claim_3_mean_and_sd_over_seeds(fixtures, tmp_path, sn, agree):
    """Recorded results written by hand (the tiny model's tunings all refuse 0): mean ± sample sd per
    target, and the verdict by its rule (margin over random and LoRA beyond the largest sd)."""
    store = tmp_path / "store"
    vals = {"safety": sn, "random": [0.5, 0.3], "lora": [0.2, 0.4]}
    for t, vs in vals.items():
        for s, v in zip(SEEDS, vs):
            d = store / "models" / f"h-{t}-s{s}"
            d.mkdir(parents=True)
            write_json(d / PROVENANCE, {"results": {
                "trainable_share": 0.01, "before_harmful_refusal": 0.0, "after_harmful_refusal": v,
                "before_over_refusal": 0.0, "after_over_refusal": 0.05, "before_utility_nll": 1.0,
                "after_utility_nll": 1.05, "after_kl": 0.1, "steps": 4, "lr": 1e-4}})
    claims(fixtures, tmp_path / "c", "claims.which=[3]", f"store_dir={store}", "claims.tuning='h-{target}-s{seed}'")
    row = pd.read_csv(tmp_path / "c" / "claims.csv").iloc[0]
    for t, vs in vals.items():
        assert f"{t}: refusal {np.mean(vs):.2f}±{np.std(vs, ddof=1):.2f}" in row.measured
    assert bool(row.agree) is agree
    # the figure shows the same means and sample sds, the over-refusal beside them, and the report links it
    fig = pd.read_csv(tmp_path / "c" / "claims_plot.csv").set_index(["label", "measure"])
    for t, vs in vals.items():
        bar = fig.loc[(t, "harmful refusal")]
        assert (bar.value, bar.sd, bar.n, bar.before) == pytest.approx((np.mean(vs), np.std(vs, ddof=1), 2, 0.0))
        assert fig.loc[(t, "over-refusal")].value == pytest.approx(0.05)
    assert "![claims](claims.png)" in (tmp_path / "c" / "report.md").read_text()
    assert (tmp_path / "c" / "claims.png").stat().st_size > 0

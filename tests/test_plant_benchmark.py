"""stage=plant and stage=benchmark on a tiny llama: the planted model differs from its base in S*'s
slices only, is the base function once S* is zeroed, and the benchmark scores recovery correctly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.models import ModelAdapter
from safety_neurons.neurons import NeuronSet
from safety_neurons.planted import draw_planted_set, rank_auc, recovery
from safety_neurons.stages import get_stage
from tests.builders import HARMLESS, assert_planted_invariants, stage_files
from tests.builders import stage_overrides as overrides

PLANT = ["stage=plant", "plant.share=0.1", "plant.kinds=[ffn,q,o]", "plant.lr=5e-2", "plant.steps=3",
         "plant.check_every=2", "plant.batch_size=2", "plant.n_harmful=4", "plant.n_harmless=4",
         "plant.max_new_tokens_distill=4", "plant.check_prompts=null", "plant.save_as=planted-tiny"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    fx = stage_files(tmp_path_factory.mktemp("plant"), 6, 4, HARMLESS)
    res = get_stage("plant")(compose(overrides(fx, fx["root"] / "run-plant", *PLANT)))
    return fx, res


def _load(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return m, ModelAdapter(m)


def test_plant_changes_only_the_planted_slices(planted):
    fx, res = planted
    base, bad = _load(fx["model"])
    tuned, tad = _load(res["model_dir"])
    truth = NeuronSet.load(res["truth"])
    assert len(truth) == res["n_planted"] == 2 * (5 + 3 + 3)  # 10% of ffn 48, q 32, o 32 in each of 2 layers
    assert truth.meta["share"] == 0.1 and truth.meta["kinds"] == ["ffn", "q", "o"] and truth.meta["seed"] == 0
    assert_planted_invariants(base, tuned, truth, load_file(f"{res['model_dir']}/delta.safetensors"))


def test_plant_provenance_and_reuse(planted, capsys):
    fx, res = planted
    prov = json.loads((fx["store"] / "models" / "planted-tiny" / "plant.json").read_text())
    for k in ("base_model", "share", "kinds", "layers", "seed", "steps", "refusal", "over_refusal", "reached",
              "base_refusal", "history"):
        assert k in prov, k
    assert prov["base_model"] == "local" and prov["layers"] == [0, 1] and 1 <= prov["steps"] <= 3
    assert prov["history"][-1]["step"] == prov["trained_steps"] and prov["steps"] in [h["step"] for h in prov["history"]]
    again = get_stage("plant")(compose(overrides(fx, fx["root"] / "run-plant2", *PLANT)))
    assert again["reused"] and again["n_planted"] == res["n_planted"]
    assert "reusing the planted model" in capsys.readouterr().out


def test_reuse_needs_the_same_settings(planted):
    fx, _ = planted
    with pytest.raises(UserError, match=r"planted with other settings: lr=0.05 \(asked 0.01\)"):
        get_stage("plant")(compose(overrides(fx, fx["root"] / "run-plant3", *PLANT, "plant.lr=1e-2")))


def test_the_stop_check_uses_training_prompts_the_plant_does_not_train_on(planted, monkeypatch):
    """plant.check_prompts=n: n harmful and n harmless training prompts are checked and left out of
    training; none of them is a held-out eval prompt (the benchmark's); null checks on the eval split."""
    from safety_neurons.data import harmful_set, harmless_set
    from safety_neurons.stages import plant as plant_stage

    fx, _ = planted
    seen = {}
    real_train, real_rates = plant_stage.train_sft, plant_stage.refusal_rates
    monkeypatch.setattr(plant_stage, "train_sft", lambda m, t, prompts, *a, **k: seen.update(train=list(prompts))
                        or real_train(m, t, prompts, *a, **k))
    monkeypatch.setattr(plant_stage, "refusal_rates", lambda m, t, harm, benign, *a: seen.update(check=(harm, benign))
                        or real_rates(m, t, harm, benign, *a))
    cfg = compose(overrides(fx, fx["root"] / "run-check", *PLANT, "plant.check_prompts=2", "plant.save_as=p-check"))
    res = get_stage("plant")(cfg)
    harm, benign = seen["check"]
    assert len(harm) == len(benign) == 2 and res["data"]["check"]["from"] == "training prompts held out"
    train_harm = harmful_set(cfg, "train").head(4).prompts
    train_benign = harmless_set(cfg, "train").head(4).prompts
    assert set(harm) <= set(train_harm) and set(benign) <= set(train_benign)
    assert not set(harm + benign) & set(harmful_set(cfg, "eval").prompts + harmless_set(cfg, "eval").prompts)
    # trained on exactly the other training prompts, each as often as without a check
    assert sorted(set(seen["train"])) == sorted(set(train_harm + train_benign) - set(harm + benign))
    assert res["data"]["check"]["train_pairs"] == len(seen["train"]) == 4 == res["data"]["check"]["trained_prompts"]
    assert res["data"]["check"]["left_out_of_training"] == 4
    get_stage("plant")(compose(overrides(fx, fx["root"] / "run-check2", *PLANT, "plant.save_as=p-check2")))
    assert seen["check"] == (harmful_set(cfg, "eval").head(cfg.eval.n_harmful).prompts,
                             harmless_set(cfg, "eval").head(cfg.eval.n_harmless).prompts)
    with pytest.raises(UserError, match="plant.check_prompts=3 would hold out 3 of the 4 harmful"):
        get_stage("plant")(compose(overrides(fx, fx["root"] / "r", *PLANT, "plant.check_prompts=3", "plant.save_as=x")))


@pytest.mark.parametrize("n_form", [6, 20])
def test_check_prompts_are_half_form_matched_and_fill_up_from_either_kind(planted, tmp_path, n_form):
    """The harmless check prompts are half in the harmful set's form where both kinds suffice, and take
    the rest from the other kind where one runs short (here: 20 of 20 form-matched)."""
    from safety_neurons.data import harmless_set
    from safety_neurons.stages.plant import check_sets

    fx, _ = planted
    f = tmp_path / "labelled.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"harmless prompt {i}", "category": "harmbench_style" if i < n_form
                                     else "cooking"}) + "\n" for i in range(20)))
    cfg = compose(overrides(fx, tmp_path / "run", *PLANT, "plant.check_prompts=3", "plant.n_harmful=null",
                            "plant.n_harmless=null", f"harmless.path={f}", "harmless.eval_fraction=0"))
    harm, benign, where = check_sets(cfg)
    labels = dict(zip(harmless_set(cfg, "train").prompts, harmless_set(cfg, "train").labels))
    n_fm = sum(labels[q] == "harmbench_style" for q in benign)
    assert len(harm) == len(benign) == len(set(benign)) == 3 and n_fm == (1 if n_form < 20 else 3)


def test_a_plant_that_misses_the_targets_keeps_its_best_check(planted, monkeypatch):
    """At the step cap with no check meeting the targets, the slices of the best check are kept: bit for bit
    the plant whose cap is that check's step."""
    from safety_neurons.stages import plant as plant_stage

    fx, _ = planted

    def plant(steps, rates, name, *more):
        script = iter([(0.0, 0.0), *rates])  # the base model's check first
        monkeypatch.setattr(plant_stage, "refusal_rates", lambda *a: next(script))
        res = get_stage("plant")(compose(overrides(fx, fx["root"] / f"run-{name}", *PLANT, f"plant.steps={steps}",
                                                   "plant.check_every=1", f"plant.save_as={name}", *more)))
        return res, load_file(f"{res['model_dir']}/delta.safetensors")

    # step 3 refuses most but over-refuses; step 2 is the most selective (refusal minus over-refusal),
    # though over the over-refusal limit
    checks = [(0.2, 0.05), (0.8, 0.15), (0.95, 0.5), (0.6, 0.0)]
    long, d_long = plant(4, checks, "p-long")
    short, d_short = plant(2, checks[:2], "p-short")
    assert long["steps"] == 2 and long["trained_steps"] == 4 and long["refusal"] == 0.8 and not long["reached"]
    assert d_long.keys() == d_short.keys() and all(torch.equal(d_long[k], d_short[k]) for k in d_long)
    # of equally selective checks the later (longer-trained) one is kept
    tie, d_tie = plant(3, [(0.5, 0.0), (0.5, 0.0), (0.2, 0.0)], "p-tie")
    _, d_two = plant(2, [(0.5, 0.0), (0.5, 0.0)], "p-two")
    assert tie["steps"] == 2 and all(torch.equal(d_tie[k], d_two[k]) for k in d_tie)
    # a check that meets the targets ends the plant with its slices, though an earlier one was more selective
    met, d_met = plant(4, [(0.85, 0.0), (0.9, 0.08)], "p-met")
    assert met["steps"] == met["trained_steps"] == 2 and met["reached"] and met["refusal"] == 0.9
    assert all(torch.equal(d_met[k], d_two[k]) for k in d_met)
    # without keep_best the last step's slices stay
    last, d_last = plant(4, checks, "p-last", "plant.keep_best=false")
    assert last["steps"] == 4 and last["refusal"] == 0.6 and not all(torch.equal(d_last[k], d_long[k]) for k in d_long)


def test_a_shipped_plant_is_rebuilt_bit_for_bit(planted, tmp_path, monkeypatch, capsys):
    """A plant shipped as its delta is rebuilt in a fresh store into the model stage=plant made; one made
    with other settings or on another base file is planted anew, saying why."""
    import shutil

    from safety_neurons.stages import plant as plant_stage

    fx, res = planted
    shipped = tmp_path / "shipped" / "planted-tiny"
    shipped.mkdir(parents=True)
    for f in ("plant.json", "delta.safetensors"):
        shutil.copyfile(f"{res['model_dir']}/{f}", shipped / f)
    shutil.copyfile(res["truth"], shipped / "neurons.json")
    monkeypatch.setattr(plant_stage, "SHIPPED", tmp_path / "shipped")
    fresh = [o.replace(str(fx["store"]), str(tmp_path / "store")) for o in overrides(fx, tmp_path / "run", *PLANT)]
    out = get_stage("plant")(compose(fresh))
    assert "from its shipped delta" in capsys.readouterr().out and out["shipped"]
    a, _ = _load(res["model_dir"])
    b, _ = _load(tmp_path / "store" / "models" / "planted-tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (tmp_path / "store" / "neurons" / "planted-tiny" / "planted" / "truth" / "neurons.json").read_bytes() \
        == open(res["truth"], "rb").read()
    # a store's copy of an earlier shipped plant (other settings) is rebuilt from the one shipped now
    stored = tmp_path / "store" / "models" / "planted-tiny" / "plant.json"
    prov = json.loads(stored.read_text())
    stored.write_text(json.dumps({**prov, "plant": {**prov["plant"], "keep_best": None}}))
    again = get_stage("plant")(compose(fresh))
    assert "was rebuilt from an earlier shipped delta (planted with other settings: keep_best=None" in \
        capsys.readouterr().out and again["shipped"]
    assert json.loads(stored.read_text())["plant"]["keep_best"] is True
    b, _ = _load(tmp_path / "store" / "models" / "planted-tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = get_stage("plant")(compose([o.replace(str(tmp_path / "store"), str(tmp_path / "store2")) for o in fresh]
                                       + ["plant.seed=5"]))
    shown = capsys.readouterr().out
    assert "shipped plant planted-tiny does not fit this run (planted with other settings: seed=0 (asked 5))" in shown
    assert not other.get("shipped") and other["seed"] == 5 and "history" in other  # trained here
    prov = json.loads((shipped / "plant.json").read_text())
    (shipped / "plant.json").write_text(json.dumps({**prov, "base_hash": "0" * 16}))
    again = get_stage("plant")(compose([o.replace(str(tmp_path / "store"), str(tmp_path / "store3")) for o in fresh]))
    assert "made on another local file" in capsys.readouterr().out and not again.get("shipped")


def test_benchmark_on_the_planted_model(planted):
    fx, _ = planted
    cfg = compose(overrides(fx, fx["root"] / "run-bench", "stage=benchmark", "benchmark.organism=planted-tiny",
                            "benchmark.n_prompts=3", "detect.target_tokens=3", "benchmark.random_seeds=[0,1]"))
    res = get_stage("benchmark")(cfg)
    df = pd.read_csv(fx["root"] / "run-bench" / "benchmark.csv")
    methods = list(df.method)
    assert methods[:7] == ["plnd", "activation_diff", "activation_diff_rel", "contribution_diff_rel/median",
                           "attribution", "snip", "wanda"]
    assert methods[7:] == ["weight_diff", "none", "planted_set", "random"]
    ceil = df[df.method == "weight_diff"].iloc[0]
    assert ceil.auc == 1.0 and ceil.precision_at_k == 1.0 and ceil.recall_at_5k == 1.0 and ceil.role == "ceiling"
    for col in ("auc", "precision_at_k", "recall_at_5k", "layer_auc_mean", "harmful_refusal", "over_refusal",
                "nll_ratio", "kl", "degenerate_share", "breaks_model"):
        assert df[df.role == "scorer"][col].notna().all(), col
    assert df[df.method == "random"].iloc[0].seeds == 2
    kinds = sorted(df.iloc[0].kinds.split("+"))  # the AUC within each planted kind; the ceiling's is 1
    assert [c for c in df if c.startswith("auc_")] == [f"auc_{k}" for k in kinds] and len(kinds) == 3
    for k in kinds:
        assert df[df.role == "scorer"][f"auc_{k}"].between(0, 1).all() and ceil[f"auc_{k}"] == 1.0
    assert (fx["root"] / "run-bench" / "roc.png").exists()
    assert (fx["root"] / "run-bench" / "recovery_vs_effect.png").exists()
    assert res["auc_weight_diff"] == 1.0
    report = (fx["root"] / "run-bench" / "report.md").read_text()
    verdict = next(x for x in report.splitlines() if x.startswith("- verdict: "))
    from safety_neurons.stages.benchmark import verdicts

    assert verdict == "- verdict: " + ", ".join(f"{r.method} {r.verdict}" for r in verdicts(df).itertuples())
    assert "![roc](roc.png)" in report and "| plnd | scorer |" in report
    # the first line tells the plant's own check (where its stop was chosen) from the held-out prompts
    first, intact = df.iloc[0], df[df.method == "none"].iloc[0]
    assert report.splitlines()[2] == (
        f"- planted-tiny: S* of {first.n_planted} neurons ({first.kinds}); harmful refusal at the plant's check "
        f"{first.base_refusal:.2f} before planting, {first.plant_refusal:.2f} after; held out, "
        f"{intact.harmful_refusal:.2f} (over-refusal {intact.over_refusal:.2f})")
    # the intact planted model has zero KL to itself
    assert df[df.method == "none"].iloc[0].kl == pytest.approx(0.0, abs=1e-6)


def _counting(monkeypatch) -> tuple[list, list]:
    """(expected, calls): each progress-bar total Evaluator.expect is given, and one entry per evaluation."""
    from safety_neurons.evaluation import Evaluator

    expected, calls = [], []
    real_expect, real_eval = Evaluator.expect, Evaluator.evaluate
    monkeypatch.setattr(Evaluator, "expect", lambda self, n, d="": expected.append(n) or real_expect(self, n, d))
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, *a, **k: calls.append(1) or real_eval(self, *a, **k))
    return expected, calls


def test_split_sets_by_hand():
    from safety_neurons.stages.benchmark import split_sets

    truth = NeuronSet([(0, "q", 1), (1, "o", 2), (0, "o", 5), (2, "q", 0)])
    top = NeuronSet([(1, "o", 2), (0, "o", 7), (2, "q", 0), (1, "q", 3)])
    got = {(m, p): ns.ranking for m, p, ns in split_sets(truth, {"s": top})}
    assert got == {  # two kinds: S* without one is the other alone, listed once
        ("planted_set", "o only"): [(1, "o", 2), (0, "o", 5)],
        ("planted_set", "q only"): [(0, "q", 1), (2, "q", 0)],
        ("s", "top in S*"): [(1, "o", 2), (2, "q", 0)],
        ("s", "top outside S*"): [(0, "o", 7), (1, "q", 3)],
        ("s", "S* missed"): [(0, "q", 1), (0, "o", 5)],
    }
    three = NeuronSet([(0, "q", 1), (1, "o", 2), (0, "v", 5)])
    assert [(m, p, ns.ranking) for m, p, ns in split_sets(three, {})] == [
        ("planted_set", "o only", [(1, "o", 2)]), ("planted_set", "without o", [(0, "q", 1), (0, "v", 5)]),
        ("planted_set", "q only", [(0, "q", 1)]), ("planted_set", "without q", [(1, "o", 2), (0, "v", 5)]),
        ("planted_set", "v only", [(0, "v", 5)]), ("planted_set", "without v", [(0, "q", 1), (1, "o", 2)])]
    # one kind: no per-kind parts
    one = NeuronSet([(0, "ffn", 1)])
    assert [(m, p) for m, p, _ in split_sets(one, {"s": one})] == [("s", "top in S*"), ("s", "top outside S*"),
                                                                   ("s", "S* missed")]


def test_split_lists_an_empty_part_without_evaluating_it():
    """A top set equal to S*: nothing outside S* and nothing missed; those parts are listed with n = 0,
    counted on the progress bar (skip) and not evaluated."""
    from safety_neurons.stages.benchmark import _split

    class Ev:
        def __init__(self):
            self.evaluated, self.skipped = [], []

        def evaluate(self, model, context=None, tag=""):
            self.evaluated.append(tag)
            return {"harmful_refusal": 0.5}, []

        def skip(self, tag):
            self.skipped.append(tag)

    truth = NeuronSet([(0, "ffn", 1), (1, "ffn", 2)])
    ev = Ev()
    df = _split(ev, None, None, truth, {"s": truth})
    assert ev.evaluated == ["s top in S*"] and ev.skipped == ["s top outside S*", "s S* missed"]
    assert list(df.n) == [2, 0, 0] and list(df.n_ffn) == [2, 0, 0]
    assert df.harmful_refusal.iloc[0] == 0.5 and df.harmful_refusal.iloc[1:].isna().all()


def test_benchmark_split_switches_off_each_part(planted, monkeypatch):
    """benchmark.split=true: split.csv has one row per part of split_sets, each part is the set switched
    off (in that order, after the |S*| points), an empty part is counted but not evaluated, and the
    progress bar expects every evaluation."""
    from safety_neurons.stages import benchmark as bm

    fx, _ = planted
    seen, tops = [], {}
    real_deact, real_recovery = bm.deactivated, bm.recovery
    monkeypatch.setattr(bm, "deactivated", lambda ad, im: seen.append(
        {k: sorted(v.tolist()) for k, v in im.items()}) or real_deact(ad, im))

    def rec(sc, truth):
        out = real_recovery(sc, truth)
        tops[len(tops)] = out["top"]
        return out

    monkeypatch.setattr(bm, "recovery", rec)
    expected, calls = _counting(monkeypatch)
    run = fx["root"] / "run-split"
    get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                             "benchmark.n_prompts=3", "benchmark.scorers=[wanda]",
                                             "benchmark.random_seeds=[0]", "benchmark.split=true")))
    truth = NeuronSet.load(fx["store"] / "neurons" / "planted-tiny" / "planted" / "truth" / "neurons.json")
    parts = bm.split_sets(truth, {"wanda": tops[0]})
    assert len(parts) == 2 * 3 + 3
    sp = pd.read_csv(run / "split.csv")
    assert list(zip(sp.method, sp.part)) == [(m, p) for m, p, _ in parts]
    assert list(sp.n) == [len(ns) for _, _, ns in parts]
    assert list(sp.n_in_planted) == [len(set(ns.ranking) & set(truth.ranking)) for _, _, ns in parts]
    evaluated = [ns for _, _, ns in parts if len(ns)]
    # wanda top, S*, random (the |S*| points), then each non-empty part
    assert seen[3:] == [{k: sorted(v.tolist()) for k, v in ns.index_map().items()} for ns in evaluated]
    assert expected == [len(calls) + len(parts) - len(evaluated)] and len(calls) == 4 + len(evaluated)
    for (_, _, ns), (_, row) in zip(parts, sp.iterrows()):
        assert pd.isna(row.harmful_refusal) == (len(ns) == 0)
        kinds = sorted({a[1] for _, _, p in parts for a in p.ranking})
        assert {c for c in sp if c.startswith("n_") and c != "n_in_planted"} == {f"n_{k}" for k in kinds}
        assert all(row[f"n_{k}"] == sum(a[1] == k for a in ns.ranking) for k in kinds)
    with pytest.raises(UserError, match="benchmark.split needs benchmark.deactivate=true"):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r-split", "stage=benchmark",
                                                 "benchmark.organism=planted-tiny", "benchmark.split=true",
                                                 "benchmark.deactivate=false")))
    with pytest.raises(UserError, match="benchmark.split needs ground truth"):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r-split2", "stage=benchmark",
                                                 "benchmark.split=true")))


def test_benchmark_sweep_switches_off_the_top_n_of_each_method(planted, monkeypatch):
    """benchmark.sweep=[f]: at n = f*|S*| the benchmark switches off the first n of S*, the top n of each
    scorer's ranking (by its mean score, as recovery ranks) and random sets with the counts per matrix
    of those first n of S*, outside S*; sweep.csv holds those points and the |S*| points of benchmark.csv."""
    from safety_neurons.stages import benchmark as bm

    fx, _ = planted
    seen, means = [], {}
    real_deact, real_recovery = bm.deactivated, bm.recovery

    def recording(ad, index_map):
        seen.append({k: sorted(v.tolist()) for k, v in index_map.items()})
        return real_deact(ad, index_map)

    def rec(sc, truth):
        means[len(means)] = sc
        return real_recovery(sc, truth)

    monkeypatch.setattr(bm, "deactivated", recording)
    monkeypatch.setattr(bm, "recovery", rec)
    expected, calls = _counting(monkeypatch)
    run = fx["root"] / "run-sweep"
    get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                             "benchmark.n_prompts=3", "benchmark.scorers=[wanda]",
                                             "benchmark.random_seeds=[0,1]", "benchmark.sweep=[0.5]")))
    truth = NeuronSet.load(fx["store"] / "neurons" / "planted-tiny" / "planted" / "truth" / "neurons.json")
    n = round(0.5 * len(truth))
    sw = pd.read_csv(run / "sweep.csv")
    assert sorted(zip(sw.method, sw.n)) == sorted(itertools.product(["planted_set", "random", "wanda"], [n, len(truth)]))
    # calls: wanda top |S*|, S*, random x2 (the |S*| points), then the sweep: S* part, wanda top n, random x2
    assert len(seen) == 8
    assert expected == [len(calls)] == [9]  # the progress bar's total: every evaluation, the intact model's too
    part = truth.top(n).index_map()
    assert seen[4] == {k: sorted(v.tolist()) for k, v in part.items()}
    wanda_top = real_recovery(means[0], truth)["top"].top(n).index_map()
    assert seen[5] == {k: sorted(v.tolist()) for k, v in wanda_top.items()}
    inside = truth.index_map()
    for rnd in seen[6:]:
        assert {k: len(v) for k, v in rnd.items()} == {k: len(v) for k, v in part.items()}
        assert all(not set(v) & set(inside[k].tolist()) for k, v in rnd.items())
    assert seen[6] != seen[7]  # two seeds
    full = pd.read_csv(run / "benchmark.csv").set_index("method")
    for m in ("planted_set", "random", "wanda"):
        row = sw[(sw.method == m) & (sw.n == len(truth))].iloc[0]
        for col in ("harmful_refusal", "nll_ratio", "kl"):
            assert row[col] == pytest.approx(full.loc[m, col], abs=1e-12), (m, col)
    assert sw[(sw.method == "random") & (sw.n == n)].iloc[0].seeds == 2
    assert (run / "sweep.png").exists() and "![sweep](sweep.png)" in (run / "report.md").read_text()
    # without the control's curve: S* only at |S*|, one evaluation less per sweep point, the rest the same
    seen.clear(), expected.clear(), calls.clear()
    run2 = fx["root"] / "run-sweep-nocontrol"
    get_stage("benchmark")(compose(overrides(fx, run2, "stage=benchmark", "benchmark.organism=planted-tiny",
                                             "benchmark.n_prompts=3", "benchmark.scorers=[wanda]",
                                             "benchmark.random_seeds=[0,1]", "benchmark.sweep=[0.5]",
                                             "benchmark.sweep_control=false")))
    sw2 = pd.read_csv(run2 / "sweep.csv")
    assert sorted(zip(sw2.method, sw2.n)) == sorted([("planted_set", len(truth)), *itertools.product(
        ["random", "wanda"], [n, len(truth)])])
    assert len(seen) == 7 and expected == [len(calls)] == [8]
    assert seen[4] == {k: sorted(v.tolist()) for k, v in wanda_top.items()}
    pd.testing.assert_frame_equal(sw2.reset_index(drop=True), sw[~((sw.method == "planted_set") & (sw.n == n))]
                                  .reset_index(drop=True))
    with pytest.raises(UserError, match="benchmark.sweep"):
        get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                                 "benchmark.sweep=[1.0]")))


def test_a_median_entry_ranks_the_scores_normalized_per_matrix(planted, monkeypatch):
    """benchmark.scorers entry NAME/median: the scorer's per-prompt scores, each (layer, kind) row over its
    median, ranked by their mean (checked against the plain entry's scores from the same run)."""
    from safety_neurons.scoring import per_matrix_median
    from safety_neurons.stages import benchmark as bm

    fx, _ = planted
    ranked = []
    real_recovery = bm.recovery
    monkeypatch.setattr(bm, "recovery", lambda sc, truth: ranked.append(sc) or real_recovery(sc, truth))
    calls = []
    real_score = bm.score_prompts
    monkeypatch.setattr(bm, "score_prompts", lambda *a, **k: calls.append(real_score(*a, **k)) or calls[-1])
    run = fx["root"] / "run-median"
    get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                             "benchmark.n_prompts=3", "benchmark.scorers=[wanda,wanda/median]",
                                             "benchmark.deactivate=false")))
    assert list(pd.read_csv(run / "benchmark.csv").method) == ["wanda", "wanda/median", "weight_diff"]
    plain, normed = calls
    want = per_matrix_median(plain)
    for key in plain:
        assert torch.equal(normed[key], want[key]) and torch.equal(ranked[1][key], want[key].mean(0))
        assert torch.equal(normed[key].median(-1).values, torch.ones(len(normed[key])))  # each row's median is 1
    with pytest.raises(UserError, match="only 'median' is known"):
        get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                                 "benchmark.scorers=[wanda/mean]")))
    with pytest.raises(UserError, match="takes no detect.normalize=median; name the normalized scorers"):
        get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                                 "detect.normalize=median")))


def test_median_normalization_floors_a_zero_median():
    """Where most of a matrix scores 0 (the first layer a plant changed), its scores are over the row's
    mean and stay finite; a row of zeros stays zeros; otherwise each row's median becomes 1."""
    from safety_neurons.scoring import per_matrix_median

    v = torch.zeros(2, 100)
    v[0, :3] = torch.tensor([5.0, 2.0, 1.0])
    out = per_matrix_median({(0, "ffn"): v, (1, "ffn"): torch.arange(1.0, 6.0)[None]})
    row = out[(0, "ffn")][0]
    torch.testing.assert_close(row[:3], torch.tensor([5.0, 2.0, 1.0]) / 0.08)  # over the row's mean
    assert bool((row[3:] == 0).all()) and bool((out[(0, "ffn")][1] == 0).all())
    assert torch.isfinite(out[(0, "ffn")].half()).all()
    assert torch.equal(out[(1, "ffn")], torch.arange(1.0, 6.0)[None] / 3.0)


def test_a_contrast_adds_each_scorer_minus_its_contrast_mean(planted, monkeypatch):
    """dataset@contrast=harmless: beside each scorer a ``<scorer>-conharmless`` row, ranked by the mean
    score on the harmful prompts minus the mean on the contrast prompts (checked on the scores the
    stage computed); without deactivation the verdict says the effect was not measured."""
    import torch

    from safety_neurons.stages import benchmark as bm

    fx, _ = planted
    calls, ranked = [], []
    real_score, real_recovery = bm.score_prompts, bm.recovery
    monkeypatch.setattr(bm, "score_prompts", lambda *a, **k: calls.append((a[8], real_score(*a, **k))) or calls[-1][1])
    monkeypatch.setattr(bm, "recovery", lambda sc, truth: ranked.append(sc) or real_recovery(sc, truth))
    run = fx["root"] / "run-contrast"
    get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.organism=planted-tiny",
                                             "benchmark.n_prompts=3", "benchmark.scorers=[wanda]",
                                             "benchmark.deactivate=false", "dataset@contrast=harmless",
                                             f"contrast.path={fx['harmless']}")))
    df = pd.read_csv(run / "benchmark.csv")
    assert list(df.method) == ["wanda", "wanda-conharmless", "weight_diff"]
    (_, harm), (label, con) = calls
    assert label == "benchmark (harmless, contrast)"
    for key, want in ((k, harm[k].mean(0) - con[k].mean(0)) for k in harm):
        torch.testing.assert_close(ranked[1][key].double(), want.double(), rtol=1e-4, atol=1e-5)  # float32 sums
        assert torch.equal(ranked[0][key], harm[key].mean(0))
    from safety_neurons.stages.benchmark import verdicts

    assert set(verdicts(df).verdict) <= {"finds S*, effect not measured", "partly", "weak", "at chance"}


def test_effect_only_deactivates_each_scorers_top_n_against_random(planted):
    """Without ground truth (benchmark.organism unset): each scorer's top n over every neuron, ranked as
    detection ranks, switched off beside random sets of its shape; n=0 of nothing is the intact model."""
    fx, _ = planted
    run = fx["root"] / "run-effect"
    res = get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.scorers=[wanda]",
                                                   "benchmark.n_prompts=3", "benchmark.counts=[1,3]",
                                                   "benchmark.random_seeds=[0]")))
    df = pd.read_csv(run / "benchmark.csv")
    assert list(zip(df.method, df.n)) == [("none", 0), ("wanda", 1), ("random (wanda shape)", 1), ("wanda", 3),
                                          ("random (wanda shape)", 3)]
    assert df[df.method == "none"].iloc[0].kl == pytest.approx(0.0, abs=1e-6)
    assert (df[df.role != "intact"].harmful_refusal.notna()).all() and isinstance(res["sparse_removal_found"], bool)
    with pytest.raises(UserError, match=r"^activation_diff, patch_attribution/median need detect.reference_model="):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "run-effect-noref", "stage=benchmark",
                                                 "benchmark.scorers=[wanda,activation_diff,patch_attribution/median]")))


def test_effect_only_random_by_count_is_one_baseline_for_all_scorers(planted):
    """benchmark.random_shape=count: per n, random sets of n neurons over every scored kind and layer,
    evaluated once and shared by the scorers (no random row per scorer)."""
    fx, _ = planted
    run = fx["root"] / "run-effect-count"
    get_stage("benchmark")(compose(overrides(fx, run, "stage=benchmark", "benchmark.scorers=[wanda,plnd]",
                                             "benchmark.n_prompts=3", "benchmark.counts=[1,3]",
                                             "benchmark.random_seeds=[0,1]", "benchmark.random_shape=count")))
    df = pd.read_csv(run / "benchmark.csv")
    assert list(zip(df.method, df.n)) == [("none", 0), ("random (1 neurons)", 1), ("random (3 neurons)", 3),
                                          ("wanda", 1), ("wanda", 3), ("plnd", 1), ("plnd", 3)]
    assert list(df[df.role == "baseline"].seeds) == [2, 2]


def test_random_count_draws_n_distinct_neurons_uniformly_over_the_kinds():
    from safety_neurons.models import ModelAdapter
    from safety_neurons.stages.common import random_count
    from tests.tiny import tiny_model

    ad = ModelAdapter(tiny_model("llama"))
    kinds = ("ffn", "o")
    total = ad.n_layers * (ad.width("ffn") + ad.width("o"))
    every = random_count(ad, kinds, total, seed=0)
    assert sorted(every.ranking) == sorted((layer, k, i) for layer in range(ad.n_layers) for k in kinds
                                           for i in range(ad.width(k)))
    a, b, c = (random_count(ad, kinds, 7, seed=s) for s in (0, 0, 1))
    assert a.ranking == b.ranking != c.ranking and len(set(a.ranking)) == 7
    per_kind = dict.fromkeys(kinds, 0)  # each kind drawn in proportion to its share of the neurons
    for s in range(400):
        for _, k, _ in random_count(ad, kinds, 5, seed=s).ranking:
            per_kind[k] += 1
    want = ad.width("ffn") / (ad.width("ffn") + ad.width("o"))
    assert abs(per_kind["ffn"] / 2000 - want) < 0.03, (per_kind, want)
    with pytest.raises(UserError, match="lower benchmark.counts"):
        random_count(ad, kinds, total + 1, seed=0)


def test_rank_all_orders_every_neuron_as_select_does():
    import torch

    from safety_neurons.neurons import rank_all, select

    g = torch.Generator().manual_seed(0)
    mean = {(0, "q"): torch.rand(6, generator=g), (1, "ffn"): torch.rand(4, generator=g)}
    freq = {(0, "q"): torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0, 0.0]), (1, "ffn"): torch.tensor([0.0, 1.0, 0.5, 0.5])}
    ranked = rank_all(mean, freq)
    assert len(ranked) == 10 and ranked[:len(select(mean, freq, 0.5))] == select(mean, freq, 0.5)
    keys = [(-float(freq[n[:2]][n[2]]), -float(mean[n[:2]][n[2]])) for n in ranked]
    assert keys == sorted(keys)


def test_benchmark_errors(planted):
    fx, _ = planted
    with pytest.raises(UserError, match="no planted model 'nope' .*make it first with stage=plant plant.save_as=nope"):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r1", "stage=benchmark", "benchmark.organism=nope")))
    # a preset's planted model is named after the preset that makes it, not after a bare save_as
    with pytest.raises(UserError, match=r"make it first with stage=plant plant=attn1 plant.seed=1 \("):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r1", "stage=benchmark",
                                                 "benchmark.organism=planted-attn1pct-s1")))
    with pytest.raises(UserError, match="known scorers"):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r2", "stage=benchmark", "benchmark.scorers=[bad]")))
    with pytest.raises(UserError, match="plant.share"):
        get_stage("plant")(compose(overrides(fx, fx["root"] / "r3", *PLANT[:-1], "plant.share=1.5",
                                             "plant.save_as=other")))


def test_verdicts_follow_the_goal():
    from safety_neurons.stages.benchmark import verdicts

    rows = [{"method": "planted_set", "role": "control", "auc": 1.0, "harmful_refusal": 0.05, "nll_ratio": 2.0},
            {"method": "a", "role": "scorer", "auc": 0.95, "harmful_refusal": 0.15, "nll_ratio": 2.4},  # on the edge
            {"method": "b", "role": "scorer", "auc": 0.95, "harmful_refusal": 0.16, "nll_ratio": 2.0},  # refusal gap
            {"method": "c", "role": "scorer", "auc": 0.95, "harmful_refusal": 0.05, "nll_ratio": 2.41},  # NLL
            {"method": "d", "role": "scorer", "auc": 0.7, "harmful_refusal": 0.0, "nll_ratio": 1.0},
            {"method": "e", "role": "scorer", "auc": 0.6, "harmful_refusal": 0.0, "nll_ratio": 1.0},
            {"method": "f", "role": "scorer", "auc": 0.59, "harmful_refusal": 0.0, "nll_ratio": 1.0},
            {"method": "random", "role": "baseline", "auc": 0.5, "harmful_refusal": 0.9, "nll_ratio": 1.0}]
    v = verdicts(pd.DataFrame(rows)).set_index("method").verdict.to_dict()
    assert v == {"a": "meets goal", "b": "finds S*, effect short", "c": "finds S*, effect short", "d": "partly",
                 "e": "weak", "f": "at chance"}
    # benchmark.deactivate=false: no effect columns, and a high AUC is not called short of the effect goal
    bare = pd.DataFrame([{k: v for k, v in r.items() if k not in ("harmful_refusal", "nll_ratio")} for r in rows])
    assert verdicts(bare).set_index("method").verdict.to_dict() == {
        "a": "finds S*, effect not measured", "b": "finds S*, effect not measured",
        "c": "finds S*, effect not measured", "d": "partly", "e": "weak", "f": "at chance"}
    nan = pd.DataFrame(rows).assign(harmful_refusal=float("nan"))  # the columns there, the values not
    assert verdicts(nan).set_index("method").verdict["a"] == "finds S*, effect not measured"


def test_rank_auc_equals_pairwise_count():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    pos = torch.zeros(40, dtype=torch.bool)
    pos[torch.randperm(40, generator=g)[:9]] = True
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[pos], s[~pos])]
    assert rank_auc(s, pos) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_recovery_metrics_by_hand():
    from tests.tiny import tiny_model

    ad = ModelAdapter(tiny_model("llama"))
    truth = draw_planted_set(ad, 0.1, ["ffn"], None, 3)
    inside = truth.index_map()
    scores = {}
    for layer in range(ad.n_layers):
        s = torch.zeros(ad.d_ff)
        s[inside[(layer, "ffn")]] = 1.0
        scores[(layer, "ffn")] = s
    r = recovery(scores, truth)
    assert r["auc"] == 1.0 and r["precision_at_k"] == 1.0 and set(r["top"].ranking) == set(truth.ranking)
    flipped = {k: 1 - v for k, v in scores.items()}
    r = recovery(flipped, truth)
    assert r["auc"] == 0.0 and r["precision_at_k"] == 0.0 and r["recall_at_5k"] == 0.0  # 5|S*| < the 86 unplanted
    # per kind: a score that finds the ffn part and inverts the o part is 1 and 0 within them
    truth = draw_planted_set(ad, 0.1, ["ffn", "o"], None, 3)
    inside = truth.index_map()
    scores = {}
    for layer in range(ad.n_layers):
        for kind, hit in (("ffn", 1.0), ("o", 0.0)):
            s = torch.full((ad.width(kind),), 1 - hit)
            s[inside[(layer, kind)]] = hit
            scores[(layer, kind)] = s
    r = recovery(scores, truth)
    assert r["per_kind_auc"] == {"ffn": 1.0, "o": 0.0} and 0 < r["auc"] < 1


def test_suite_plants_benchmarks_and_times_each_part(planted, capsys, monkeypatch):
    import safety_neurons.cfg as cfg_module

    fx, _ = planted
    real_group = cfg_module.group_config  # the tiny prompt sets are too small to hold out check prompts
    monkeypatch.setattr(cfg_module, "group_config", lambda g, name, schema: OmegaConf.merge(
        real_group(g, name, schema), {"check_prompts": None} if g == "plant" else {}))
    run = fx["root"] / "run-suite"
    cfg = compose(overrides(fx, run, "stage=benchmark", "benchmark.plants=[ffn02:3]", "benchmark.n_prompts=2",
                            "detect.target_tokens=2", "benchmark.random_seeds=[0]",
                            "benchmark.scorers=[wanda,activation_diff_rel]"))
    res = get_stage("benchmark")(cfg)
    shown = capsys.readouterr().out.strip().splitlines()
    assert shown[-1] == f"report: {run / 'report.md'}"  # the summary is the last thing printed
    assert any(x.startswith("- verdict: wanda ") for x in shown[-12:])
    df = pd.read_csv(run / "benchmark.csv")
    assert set(df.preset) == {"ffn02"} and set(df.seed) == {3}
    assert list(df.method) == ["wanda", "activation_diff_rel", "weight_diff", "none", "planted_set", "random"]
    truth = NeuronSet.load(fx["store"] / "neurons" / "planted-ffn0.2pct-s3" / "planted" / "truth" / "neurons.json")
    assert truth.meta["seed"] == 3 and truth.meta["share"] == 0.002 and len(truth) == 2  # one channel a layer
    times = pd.read_csv(run / "timings.csv")
    assert list(times.part) == ["plant ffn02 seed 3", "benchmark planted-ffn0.2pct-s3"]
    assert res["total_seconds"] == pytest.approx(times.seconds.sum())
    assert "## planted-ffn0.2pct-s3" in (run / "report.md").read_text()
    summary = pd.read_csv(run / "summary.csv")
    assert summary[summary.method == "weight_diff"].auc.iloc[0] == 1.0
    with pytest.raises(UserError, match="PRESET:SEED"):
        get_stage("benchmark")(compose(overrides(fx, fx["root"] / "r4", "stage=benchmark", "benchmark.plants=[ffn1]")))


def test_detect_with_other_scorers_names_them_and_equals_the_library(planted):
    """stage=detect with detect.scorer: the stored per-prompt scores are the scorer's own, and the set's
    provenance names the scorer, its reference model and target length."""
    from safety_neurons.data import encode, harmful_set, scored_mask
    from safety_neurons.importance.activation import activation_diff
    from safety_neurons.scoring import target_answers

    fx, res = planted
    base, bad = _load(fx["model"])
    tuned, tad = _load(res["model_dir"])
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ref = f"detect.reference_model={fx['model']}"
    for scorer, extra in (("activation_diff", [ref]), ("attribution", ["detect.target_tokens=3"]),
                          ("patch_attribution", [ref, "detect.target_tokens=3"])):
        run = fx["root"] / f"run-det-{scorer}"
        cfg = compose(overrides(fx, run, "stage=detect", f"detect.scorer={scorer}", f"model.path={res['model_dir']}",
                                "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5", *extra))
        out = get_stage("detect")(cfg)
        ns = NeuronSet.load(out["neurons_json"])
        assert ns.meta["scorer"] == scorer and ns.meta["tag"] == scorer and ns.meta["mode"] is None
        assert (ns.meta["reference_model"] is not None) == (scorer != "attribution")
        assert (ns.meta["target_tokens"] == 3) == (scorer != "activation_diff")
        saved = load_file(str(Path(out["neurons_json"]).parent / "prompt_scores.safetensors"))
        prompts = harmful_set(cfg, "train").prompts
        if scorer == "activation_diff":
            b = encode(tok, prompts, None)
            want = activation_diff(tuned, tad, b, scored_mask(b, "content"), ("q", "k", "v", "o", "ffn"), (base, bad))
        else:
            from safety_neurons.importance.gradient import attribution
            from safety_neurons.importance.patching import patch_attribution

            tg = target_answers(tuned, tok, prompts, None, 3, 16)
            bt = encode(tok, prompts, None, responses=tg)
            kinds = ("q", "k", "v", "o", "ffn")
            want = attribution(tuned, tad, bt, kinds) if scorer == "attribution" else \
                patch_attribution(tuned, tad, bt, kinds, (base, bad))
        for (layer, kind), v in want.items():
            torch.testing.assert_close(saved[f"{layer}.{kind}"].float(), v.half().float(), rtol=1e-2, atol=1e-3)
    with pytest.raises(UserError, match="needs detect.reference_model"):
        get_stage("detect")(compose(overrides(fx, fx["root"] / "r5", "stage=detect", "detect.scorer=activation_diff")))


def test_benchmark_reuse_copies_a_run_with_the_same_key_and_reruns_on_any_change(planted, monkeypatch, capsys):
    """benchmark.reuse=true: the first run keeps a copy in <store>/benchmarks/<key>/; a second run with the
    same settings copies its files instead of scoring again (byte-identical tables), and any setting the
    numbers depend on (here eval.n_harmful) or the planted model's content gives another key."""
    from safety_neurons.stages import benchmark as bstage

    fx, _ = planted
    args = ["stage=benchmark", "benchmark.organism=planted-tiny", "benchmark.n_prompts=2", "detect.target_tokens=3",
            "benchmark.scorers=[plnd]", "benchmark.random_seeds=[0]", "benchmark.reuse=true"]
    first = get_stage("benchmark")(compose(overrides(fx, fx["root"] / "reuse-1", *args)))
    cfg2 = compose(overrides(fx, fx["root"] / "reuse-2", *args))
    key = bstage.reuse_key(cfg2)
    assert (fx["store"] / "benchmarks" / key / "benchmark.csv").exists()

    def no_rerun(cfg):
        raise AssertionError("a reusable benchmark ran again")

    monkeypatch.setattr(bstage, "_run", no_rerun)
    again = get_stage("benchmark")(cfg2)
    assert again["reused"] is True and again["auc_plnd"] == first["auc_plnd"]
    for f in ("benchmark.csv", "report.md", "roc.png"):
        assert (fx["root"] / "reuse-2" / f).read_bytes() == (fx["root"] / "reuse-1" / f).read_bytes(), f
    assert "reusing the benchmark" in capsys.readouterr().out
    # the run folder's config is this run's, not the copied one's
    assert "reuse-2" in (fx["root"] / "reuse-2" / "config.yaml").read_text()
    other = compose(overrides(fx, fx["root"] / "reuse-3", *args, "eval.n_harmful=1"))
    assert bstage.reuse_key(other) != key
    assert bstage.reuse_key(compose(overrides(fx, fx["root"] / "reuse-4", *args, "logger=none"))) == key
    assert bstage.reuse_key(compose(overrides(fx, fx["root"] / "reuse-5", *args, "detect.reuse=true"))) == key
    plant_json = fx["store"] / "models" / "planted-tiny" / "plant.json"
    monkeypatch.setattr(bstage, "file_hash", lambda p, store=None: "same")
    same = bstage.reuse_key(cfg2)
    monkeypatch.setattr(bstage, "file_hash", lambda p, store=None: "changed" if p == plant_json else "same")
    assert bstage.reuse_key(cfg2) != same  # a re-planted model under the same name is another benchmark
    from safety_neurons import tracking

    monkeypatch.setattr(bstage, "file_hash", lambda p, store=None: "same")
    monkeypatch.setattr(tracking, "source_hash", lambda: "edited code")
    assert bstage.reuse_key(cfg2) != same  # results cached by other code are not reused


def test_a_reused_suite_keeps_its_parts_files(tmp_path):
    """Copying a finished run leaves out the top folder's results.json and config.yaml (the new run writes
    its own) but keeps those of a suite's parts, which the report stage reads."""
    from safety_neurons.stages.benchmark import _copy_run

    src = tmp_path / "src"
    (src / "benchmark-p" / "wandb").mkdir(parents=True)
    for f in ("results.json", "config.yaml", "report.md", "benchmark-p/results.json", "benchmark-p/config.yaml",
              "benchmark-p/wandb/x"):
        (src / f).write_text(f)
    _copy_run(src, tmp_path / "dst", skip_top=("results.json", "config.yaml"), skip=("wandb",))
    got = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert got == ["benchmark-p/config.yaml", "benchmark-p/results.json", "report.md"]

"""End-to-end stages on a tiny llama saved to a local folder: evaluate and full fine-tuning."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.stages import get_stage
from tests.builders import HARMLESS
from tests.builders import stage_overrides as overrides


def test_evaluate(fixtures, tmp_path):
    cfg = compose(overrides(fixtures, tmp_path / "run", "stage=evaluate"))
    res = get_stage("evaluate")(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    for k in ("asr", "harmful_refusal", "over_refusal", "utility_nll", "kl", "breaks_model"):
        assert k in saved and saved[k] == res[k]
    assert saved["n_harmful"] == 3 and saved["n_harmless"] == 2
    assert saved["asr"] == pytest.approx(1 - saved["harmful_refusal"])
    assert 0 <= saved["asr"] <= 1 and 0 <= saved["over_refusal"] <= 1
    # the model is its own reference: zero KL, and the NLL equals the reference NLL
    assert saved["kl"] == pytest.approx(0.0, abs=1e-6)
    assert saved["utility_nll"] == pytest.approx(saved["ref_utility_nll"], rel=1e-6)
    assert saved["harmful_set"]["n"] == 3 and saved["harmless_set"]["n"] == 2
    assert saved["harmful_set"]["source"] == "harmbench_behaviors_text_val.csv"
    df = pd.read_csv(run / "results.csv")
    assert len(df) == 1 and {"asr", "over_refusal", "utility_nll"} <= set(df)
    table = pd.read_csv(run / "table.csv")
    assert list(table["model"]) == ["local"]
    gens = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 5
    assert [g["set"] for g in gens] == ["harmful"] * 3 + ["harmless"] * 2
    assert [g["prompt"] for g in gens[:3]] == [f"val standard behaviour {i}" for i in range(3)]
    assert all(g["model"] == "local" and isinstance(g["answer"], str) for g in gens)
    assert not (fixtures["store"] / "models").exists()  # evaluation stores nothing


def test_finetune_all_then_refuse_to_overwrite(fixtures, tmp_path):
    ft = ["stage=finetune", "finetune.target=all", "finetune.steps=2", "finetune.batch_size=2",
          "finetune.n_harmful=2", "finetune.n_harmless=2", "finetune.max_new_tokens_distill=4", "finetune.lr=1e-3"]
    cfg = compose(overrides(fixtures, tmp_path / "run1", *ft))
    res = get_stage("finetune")(cfg)
    out = fixtures["store"] / "models" / "local-all-s0"
    assert res["saved_as"] == "local-all-s0" and res["model_dir"] == str(out)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "organism.json"):
        assert (out / f).exists(), f
    assert not list(out.parent.glob("*.partial-*"))
    prov = json.loads((out / "organism.json").read_text())
    assert prov["base_model"]["path"] == str(fixtures["model"]) and prov["finetune"]["target"] == "all"
    saved = json.loads((tmp_path / "run1" / "results.json").read_text())
    for k in ("before_asr", "after_asr", "before_over_refusal", "after_over_refusal", "before_utility_nll",
              "after_utility_nll", "refusal_gain", "final_loss", "first_loss"):
        assert k in saved
    assert saved["target"] == "all" and saved["steps"] == 2 and saved["trainable_share"] == 1.0
    assert saved["data"]["harmful_train"]["n"] == 2 and saved["data"]["harmless_train"]["n"] == 2
    assert len(json.loads((tmp_path / "run1" / "losses.json").read_text())) == 2
    # before and after generations: (3 harmful + 2 harmless) x 2
    assert len((tmp_path / "run1" / "generations.jsonl").read_text().splitlines()) == 10
    # the tuned weights differ from the base model's and load back as a model
    from safety_neurons.cfg import compose as c2
    from safety_neurons.stages.common import load

    tuned, _, _ = load(c2(overrides(fixtures, tmp_path / "x", f"model.path={out}")))
    base, _, _ = load(cfg)
    assert any(not (a == b).all() for a, b in zip(tuned.parameters(), base.parameters()))
    # the self-distilled answers were cached in the store
    assert list((fixtures["store"] / "cache" / "distill").glob("*.json"))

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match="finetune.overwrite=true"):
        get_stage("finetune")(compose(overrides(fixtures, tmp_path / "run2", *ft)))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert not (tmp_path / "run2").exists()  # refused before any run output


def test_finetune_reuse_only_with_the_same_settings(fixtures, tmp_path, capsys):
    """finetune.reuse=true: a tuned model made with the same settings, data, set and evaluation is reused
    (its recorded results, its files untouched); any other setting is refused, or trained again with
    finetune.overwrite=true."""
    ft = ["stage=finetune", "finetune.target=all", "finetune.steps=2", "finetune.batch_size=2", "finetune.n_harmful=2",
          "finetune.n_harmless=2", "finetune.max_new_tokens_distill=4", "finetune.lr=1e-3",
          "finetune.save_as=reuse-ft", "finetune.reuse=true"]
    first = get_stage("finetune")(compose(overrides(fixtures, tmp_path / "r1", *ft)))
    out = fixtures["store"] / "models" / "reuse-ft"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = get_stage("finetune")(compose(overrides(fixtures, tmp_path / "r2", *ft)))
    assert "reusing the tuned model" in capsys.readouterr().out
    assert again["reused"] is True and {k: again[k] for k in first} == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    for change in ("finetune.lr=2e-3", "eval.max_new_tokens=3", "finetune.seed=1"):
        with pytest.raises(UserError, match="made with other settings"):
            get_stage("finetune")(compose(overrides(fixtures, tmp_path / "r3", *ft, change)))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    third = get_stage("finetune")(compose(overrides(fixtures, tmp_path / "r4", *ft, "finetune.lr=2e-3",
                                                    "finetune.overwrite=true")))
    assert "reused" not in third and third["lr"] == 2e-3
    assert json.loads((out / "organism.json").read_text())["results"]["lr"] == 2e-3


def test_evaluation_honours_model_max_length(fixtures, tmp_path):
    """model.max_length bounds evaluation too (it used to be a fixed 512), and the error names the prompt
    by its text, not by its place in a batch."""
    with pytest.raises(UserError, match=r"^the prompt '.+' has \d+ tokens in the chat template, more than "
                                        r"model.max_length=8; shorten it or raise model.max_length$"):
        get_stage("evaluate")(compose(overrides(fixtures, tmp_path / "run", "stage=evaluate", "model.max_length=8")))


def test_organism_built_on_first_use_then_reused(fixtures, tmp_path, monkeypatch):
    """model=<organism> builds the pipeline-made model once through its recipe, then reuses it."""
    from omegaconf import OmegaConf

    from safety_neurons import organism
    from safety_neurons.config import ModelConfig
    from safety_neurons.io import Store
    from safety_neurons.models import model_source
    from safety_neurons.stages.common import build_missing

    recipe = ["experiment=align", "model=local", f"model.path={fixtures['model']}", f"dataset.path={fixtures['hb']}",
              f"harmless.path={fixtures['harmless']}", "finetune.save_as=tiny-org", "finetune.steps=1",
              "finetune.batch_size=2", "finetune.n_harmful=2", "finetune.n_harmless=2",
              "finetune.max_new_tokens_distill=4", "eval.n_harmful=2", "eval.n_harmless=2", "eval.max_new_tokens=4",
              "device=cpu"]
    monkeypatch.setitem(organism.RECIPES, "tiny-org", recipe)
    store = Store(tmp_path / "store")
    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "tiny-org", "organism": "tiny-org"})
    with pytest.raises(UserError, match="made by a recipe and is not built"):
        model_source(mcfg, store)  # the loader only loads: building is a stage step
    assert build_missing(mcfg, store)
    src, _ = model_source(mcfg, store)
    out = store.model_dir("tiny-org")
    assert src == str(out) and (out / "config.json").exists() and (out / "organism.json").exists()
    prov = json.loads((out / "organism.json").read_text())
    assert prov["finetune"]["target"] == "all" and prov["base_model"]["path"] == str(fixtures["model"])
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert not build_missing(mcfg, store)
    assert model_source(mcfg, store)[0] == str(out)  # cached: no second build
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert prov["recipe_hash"] == organism.recipe_fingerprint(organism._compose("tiny-org", store))

    # a neuron set records the organism build it was found on; reusing it on another build is refused
    det = [f"run_dir={tmp_path / 'det'}", f"store_dir={store.root}", "model=smollm2_refusing", "model.name=tiny-org",
           "model.organism=tiny-org", f"dataset.path={fixtures['hb']}", f"harmless.path={fixtures['harmless']}",
           "logger=none", "device=cpu", "stage=detect", "topk.consistency=0.5", "detect.reuse=true"]
    get_stage("detect")(compose(det))
    ns = json.loads((store.neuron_dir("tiny-org", "harmbench", "exact") / "neurons.json").read_text())
    assert ns["meta"]["organism_recipe"] == prov["recipe_hash"]
    assert get_stage("detect")(compose(det[:-1] + ["detect.reuse=true"]))["reused"]
    (out / "organism.json").write_text(json.dumps({**prov, "recipe_hash": "another-build"}))
    with pytest.raises(UserError, match="another build of the organism"):
        get_stage("detect")(compose(det))


def test_over_refusal_split_by_form(fixtures, tmp_path, monkeypatch):
    """Harmless prompts labelled as form-matched (HarmBench's imperative form) get their own over-refusal,
    beside the rest ("natural"); both agree with the per-prompt refusals in generations.jsonl."""
    import itertools

    import safety_neurons.evaluation as ev

    labelled = tmp_path / "labelled.jsonl"
    cats = ["harmbench_style", "cooking", "harmbench_style", "travel", "trivia", "harmbench_style", "cooking",
            "travel"]
    labelled.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in zip(HARMLESS, cats)))
    flips = itertools.cycle([True, False, False])  # a deterministic refusal pattern the tiny model cannot give
    monkeypatch.setattr(ev, "is_refusal", lambda text, markers: next(flips))
    run = tmp_path / "run"
    cfg = compose(overrides(fixtures, run, "stage=evaluate", f"harmless.path={labelled}", "harmless.eval_fraction=0.75",
                            "eval.n_harmless=null"))
    res = get_stage("evaluate")(cfg)
    gens = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    mine = [g for g in gens if g["set"] == "harmless" and g["model"] == "local"]
    assert len(mine) == 6 and all(g["label"] in cats for g in mine)
    fm = [g["refusal"] for g in mine if g["label"] == "harmbench_style"]
    nat = [g["refusal"] for g in mine if g["label"] != "harmbench_style"]
    assert fm and nat and res["n_harmless_form_matched"] == len(fm)
    assert res["over_refusal_form_matched"] == pytest.approx(sum(fm) / len(fm))
    assert res["over_refusal_natural"] == pytest.approx(sum(nat) / len(nat))
    assert res["over_refusal"] == pytest.approx((sum(fm) + sum(nat)) / 6)


def test_training_pairs_repeat_form_matched_harmless(fixtures, tmp_path):
    """finetune.form_matched_repeat=3: each harmless training prompt labelled form-matched occurs 3 times,
    with the same self-distilled answer; other prompts once."""
    from collections import Counter

    from safety_neurons.stages.common import load
    from safety_neurons.stages.finetune import training_pairs

    labelled = tmp_path / "labelled.jsonl"
    cats = ["harmbench_style", "cooking"] * 4
    labelled.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in zip(HARMLESS, cats)))
    cfg = compose(overrides(fixtures, tmp_path / "run", "stage=finetune", f"harmless.path={labelled}",
                            "finetune.n_harmful=2", "finetune.n_harmless=5", "finetune.max_new_tokens_distill=3",
                            "finetune.form_matched_repeat=3"))
    model, tok, _ = load(cfg)
    prompts, responses, meta = training_pairs(cfg, model, tok)
    cat = dict(zip(HARMLESS, cats))
    n = Counter(prompts[2:])
    assert len(n) == 5 and all(n[p] == (3 if cat[p] == "harmbench_style" else 1) for p in n)
    answer = {}
    for p, r in zip(prompts[2:], responses[2:]):
        assert answer.setdefault(p, r) == r
    assert meta["harmless_train"]["form_matched"] == sum(cat[p] == "harmbench_style" for p in n) > 0
    # null counts take every training prompt of both sets; 0 harmless takes none
    from safety_neurons.stages.common import harmful_set, harmless_set

    every = compose(overrides(fixtures, tmp_path / "run", "stage=finetune", f"harmless.path={labelled}",
                              "finetune.n_harmful=null", "finetune.n_harmless=null",
                              "finetune.max_new_tokens_distill=3"))
    prompts, _, _ = training_pairs(every, model, tok)
    assert prompts == list(harmful_set(every, "train").prompts) + list(harmless_set(every, "train").prompts)
    none = compose(overrides(fixtures, tmp_path / "run", "stage=finetune", "finetune.n_harmless=0"))
    assert training_pairs(none, model, tok)[0] == list(harmful_set(none, "train").head(64).prompts)
    twice = compose(overrides(fixtures, tmp_path / "run", "stage=finetune", "finetune.n_harmless=0",
                              "finetune.n_harmful=3", "finetune.harmful_repeat=2"))
    p2, r2, m2 = training_pairs(twice, model, tok)
    assert p2 == list(harmful_set(twice, "train").head(3).prompts) * 2 and r2[:3] == r2[3:]
    assert m2["harmful_train"]["repeat"] == 2
    with pytest.raises(UserError, match="must be at least 1"):
        training_pairs(compose(overrides(fixtures, tmp_path / "run", "stage=finetune",
                                         "finetune.harmful_repeat=0")), model, tok)

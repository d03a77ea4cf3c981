"""stage=study: the steps of a recipe run in order, each with its own folder inside the study's, on top
of the study's own overrides; study.csv has one row per finished step; a bad step fails before any work."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from tests.builders import stage_overrides


def study(fixtures, run, steps: list[list[str]]):
    base = [o for o in stage_overrides(fixtures, run) if not o.startswith("run_dir=")]
    steps_arg = "[" + ",".join("[" + ",".join(f"'{o}'" for o in s) + "]" for s in steps) + "]"
    cfg = compose([f"run_dir='{run}'", "stage=study", f"study.steps={steps_arg}"])
    cfg.study.base = base  # what a command-line run passes on from its own overrides
    return get_stage("study")(cfg)


def test_a_study_runs_its_steps_in_order(fixtures, tmp_path, capsys):
    run = tmp_path / "study"
    res = study(fixtures, run, [["stage=detect", "topk.consistency=0.5", "detect.save_as=study-set"],
                                ["stage=deactivate", "deactivate.neurons=study-set", "deactivate.n=[0,1]"],
                                ["stage=report", "report.of=deactivate", "report.dir={study_dir}"]])
    assert res["steps"] == 3
    # each step says what it runs before any work, and records how many processes ran it
    out = capsys.readouterr().out
    assert f"stage=deactivate: model local, prompts harmbench, 1 process, run folder {run / '01-deactivate'}\n" in out
    assert json.loads((run / "01-deactivate" / "results.json").read_text())["processes"] == 1
    # the steps are one W&B group, named after the study's folder
    for step in ("00-detect", "01-deactivate"):
        assert "group: study-study\n" in (run / step / "config.yaml").read_text()
    table = pd.read_csv(run / "study.csv")
    assert list(table["stage"]) == ["detect", "deactivate", "report"]
    assert list(table["run_dir"]) == [str(run / f) for f in ("00-detect", "01-deactivate", "02-report")]
    det = json.loads((run / "00-detect" / "results.json").read_text())
    assert table["n_neurons"][0] == det["n_neurons"] == len(NeuronSet.load(det["neurons_json"]))
    # the base overrides reached every step (debug=tiny: three harmful evaluation prompts)
    gens = [json.loads(x) for x in (run / "01-deactivate" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * (3 + 2)  # two counts x (3 harmful + 2 harmless); the files hold 4 harmful
    # the report step read the deactivation rows of this study only ({study_dir}), not the detect run
    report = pd.read_csv(run / "02-report" / "report.csv")
    assert sorted(report["n"]) == [0, 1] and set(report["run_dir"]) == {str(run / "01-deactivate")}


def test_a_bad_step_fails_before_the_first_runs(fixtures, tmp_path):
    run = tmp_path / "bad"
    with pytest.raises(UserError, match=r"study.steps\[1\] \(stage=deactivate deactivate.no_such=1\): "
                                        r"deactivate.no_such"):
        study(fixtures, run, [["stage=detect", "detect.save_as=never"], ["stage=deactivate", "deactivate.no_such=1"]])
    assert not (run / "00-detect").exists()
    assert not (fixtures["store"] / "neurons" / "local" / "harmbench" / "never").exists()
    # a study folder whose name Hydra would split (a comma) still gives each step its own folder
    odd = tmp_path / "a,b=c"
    study(fixtures, odd, [["stage=plan", "model=local", f"model.path={fixtures['model']}"]])
    assert (odd / "00-plan" / "plan.json").exists()
    with pytest.raises(UserError, match="study.steps is empty"):
        get_stage("study")(compose([f"run_dir={run}", "stage=study"]))


def test_the_study_report_gathers_each_steps_summary(fixtures, tmp_path, capsys):
    """report.md of a study: one summary line per finetune step made from its results.json, the time of
    every step (those of study.csv), and links to the plots the steps wrote, which exist."""
    import re

    run = tmp_path / "study-report"
    res = study(fixtures, run, [["stage=detect", "topk.consistency=0.5", "detect.save_as=rep-set"],
                                ["stage=finetune", "finetune.neurons=rep-set", "finetune.target=random",
                                 "finetune.save_as=rep-random"]])
    text = (run / "report.md").read_text()
    ft = json.loads((run / "01-finetune" / "results.json").read_text())
    want = (f"- tuning random neurons of the safety set's shape ({100 * ft['trainable_share']:.2f}% of parameters), "
            f"{ft['steps']} steps: harmful refusal {ft['before_harmful_refusal']:.2f} -> {ft['after_harmful_refusal']:.2f}, "
            f"over-refusal {ft['before_over_refusal']:.2f} -> {ft['after_over_refusal']:.2f}, "
            f"utility NLL {ft['before_utility_nll']:.3f} -> {ft['after_utility_nll']:.3f}")
    assert want in text.splitlines()
    assert want in capsys.readouterr().out.splitlines()
    table = pd.read_csv(run / "study.csv")
    for r in table.itertuples():
        assert f"| {r.step} | {r.stage} | `{r.overrides}` | {r.seconds:.1f} |" in text
    assert res["seconds"] == pytest.approx(table.seconds.sum(), abs=0.11)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((run / p).is_file() for p in links)
    assert any(p.startswith("00-detect/") for p in links)


def test_a_step_with_sweep_values_is_one_step_per_combination(fixtures, tmp_path):
    """finetune.seed=0,1-style values expand as --multirun expands them: the product, last key fastest,
    each combination its own step and folder, with interpolations resolved per step."""
    from safety_neurons.stages.study import expand

    assert expand(["stage=plan", "seed=0,1", "plan.tflops=1,2", "+x=[a,b]"]) == [
        ["stage=plan", "seed=0", "plan.tflops=1", "+x=[a,b]"], ["stage=plan", "seed=0", "plan.tflops=2", "+x=[a,b]"],
        ["stage=plan", "seed=1", "plan.tflops=1", "+x=[a,b]"], ["stage=plan", "seed=1", "plan.tflops=2", "+x=[a,b]"]]
    assert expand(["stage=plan", "seed=range(2)"]) == [["stage=plan", "seed=0"], ["stage=plan", "seed=1"]]
    run = tmp_path / "sweep"
    res = study(fixtures, run, [["stage=plan", "model=local", f"model.path={fixtures['model']}",
                                 "plan.tflops=100,400"]])
    assert res["steps"] == 2
    table = pd.read_csv(run / "study.csv")
    assert list(table["overrides"]) == [f"stage=plan model=local model.path={fixtures['model']} plan.tflops={t}"
                                        for t in (100, 400)]
    plans = [json.loads((run / f / "plan.json").read_text()) for f in ("00-plan", "01-plan")]
    assert [p["seconds"]["tflops"] for p in plans] == [100, 400]

"""make check-repro: the headline numbers of a demo study folder, and their comparison with the committed
ones within each metric's tolerance (on a hand-made study folder)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from safety_neurons import repro


@pytest.fixture
def study(tmp_path):
    bench, ft = tmp_path / "00-benchmark", tmp_path / "01-finetune"
    bench.mkdir()
    ft.mkdir()
    pd.DataFrame([
        {"organism": "p", "method": "plnd", "role": "scorer", "auc": 0.56, "harmful_refusal": 0.0, "nll_ratio": 9.0},
        {"organism": "p", "method": "wanda", "role": "scorer", "auc": 0.5, "harmful_refusal": 0.5, "nll_ratio": 2.0},
        {"organism": "p", "method": "weight_diff", "role": "ceiling", "auc": 1.0},
        {"organism": "p", "method": "none", "role": "intact", "harmful_refusal": 0.92, "nll_ratio": 1.0},
        {"organism": "p", "method": "planted_set", "role": "control", "auc": 1.0, "harmful_refusal": 0.0, "nll_ratio": 2.5},
    ]).to_csv(bench / "benchmark.csv", index=False)
    (ft / "results.json").write_text(json.dumps({"target": "safety", "after_harmful_refusal": 0.625,
                                                 "after_over_refusal": 0.25, "after_utility_nll": 0.48}))
    pd.DataFrame([{"step": 0, "stage": "benchmark", "run_dir": str(bench)},
                  {"step": 1, "stage": "detect", "run_dir": ""},
                  {"step": 2, "stage": "finetune", "run_dir": str(ft)}]).to_csv(tmp_path / "study.csv", index=False)
    return tmp_path


def test_headline_numbers_of_a_study(study):
    assert repro.headline(study) == {
        "p/plnd/auc": 0.56, "p/plnd/harmful_refusal": 0.0, "p/plnd/nll_ratio": 9.0,
        "p/none/harmful_refusal": 0.92, "p/none/nll_ratio": 1.0,
        "p/planted_set/harmful_refusal": 0.0, "p/planted_set/nll_ratio": 2.5,
        "finetune-safety/after_harmful_refusal": 0.625, "finetune-safety/after_over_refusal": 0.25,
        "finetune-safety/after_utility_nll": 0.48}


def test_compare_within_each_metrics_tolerance():
    exp = {"a/auc": 0.50, "a/harmful_refusal": 0.50, "a/nll_ratio": 2.0, "f/after_utility_nll": 1.0, "gone/auc": 0.5}
    got = {"a/auc": 0.515, "a/harmful_refusal": 0.60, "a/nll_ratio": 2.29, "f/after_utility_nll": 1.11}
    t = repro.compare(exp, got).set_index("key")
    assert t.loc["a/auc", "ok"] and not t.loc["a/harmful_refusal", "ok"]  # +-0.02 ; +-0.09
    assert t.loc["a/nll_ratio", "ok"] and t.loc["a/nll_ratio", "allowed"] == pytest.approx(0.3)  # 15% of 2.0
    assert not t.loc["f/after_utility_nll", "ok"]  # 10%
    assert not t.loc["gone/auc", "ok"]  # a missing number is a difference


def test_check_repro_exit_status_and_message(study, tmp_path, capsys):
    exp = tmp_path / "expected.json"
    assert repro.main(["--run", str(study), "--expected", str(exp), "--write"]) == 0
    assert json.loads(exp.read_text()) == repro.headline(study)
    assert repro.main(["--run", str(study), "--expected", str(exp)]) == 0
    assert "all 10 headline numbers" in capsys.readouterr().out
    changed = {**json.loads(exp.read_text()), "p/plnd/auc": 0.7}
    exp.write_text(json.dumps(changed))
    assert repro.main(["--run", str(study), "--expected", str(exp)]) == 1
    assert "1 of 10 headline numbers differ beyond their tolerance: p/plnd/auc 0.5600 vs 0.7000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no study.csv"):
        repro.main(["--run", str(tmp_path / "nothing")])


def test_check_repro_runs_the_benchmark_and_tunings_anew(monkeypatch, tmp_path):
    """The demo reuses a finished benchmark and tuned models; check-repro turns that off on its command
    line, and every step of the demo study sees it (no step sets reuse itself)."""
    from safety_neurons.cfg import compose
    from safety_neurons.stages.study import step_overrides

    calls = []
    monkeypatch.setattr(repro.subprocess, "run", lambda args, env: calls.append(args) or type("P", (), {"returncode": 0}))
    repro.run_demo(tmp_path)
    cli = [a for a in calls[0] if "=" in a and not a.startswith("experiment=")]
    assert {"benchmark.reuse=false", "finetune.reuse=false"} <= set(cli)
    demo = compose(["experiment=demo", f"run_dir={tmp_path}"])
    assert demo.benchmark.reuse and demo.finetune.reuse  # the demo itself reuses
    for i, step in enumerate(demo.study.steps):
        _, ov = step_overrides(demo, i, step)
        c = compose(["experiment=demo", *cli, *ov])
        assert not c.benchmark.reuse and not c.finetune.reuse, ov

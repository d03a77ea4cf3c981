"""Run bookkeeping: results.json / results.csv, an offline W&B run that is always closed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.tracking import Tracker, flatten


def cfg_for(tmp_path, logger):
    return compose([f"run_dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}", f"logger={logger}",
                    "stage=evaluate", "model=llama3"])


def test_wandb_offline_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_for(tmp_path, "wandb")
    tr = Tracker(cfg, cfg.run_dir)
    assert tr.main and tr.wandb is not None and wandb.run is not None
    assert wandb.run.config["model"]["name"] == "llama3"
    # runs compare in W&B by group (the experiment; here no Hydra run: stage-model) and job type (the stage)
    assert (wandb.run.group, wandb.run.job_type) == ("evaluate-llama3", "evaluate")
    for i in range(3):
        tr.log({"train/loss": 1.0 / (i + 1), "note": "text is dropped"}, step=i)
    tr.save_generations([{"prompt": "p", "answer": "a"}])
    # a summary table with a "total" row under layer numbers (what detect logs) is accepted by W&B
    summary = pd.DataFrame({"layer": [0, 1], "q": [3, 4]})
    summary.loc[len(summary)] = {"layer": "total", "q": 7}
    tr.log_table("summary", summary)
    tr.finish({"asr": 0.25, "over_refusal": 0.5, "utility_nll": 1.5, "rows": [{"model": "x"}],
               "harmful_set": {"name": "hb", "n": 3}, "counts": [1, 2]})
    assert tr.wandb is None and wandb.run is None
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert (res["asr"], res["over_refusal"], res["utility_nll"]) == (0.25, 0.5, 1.5)
    assert res["stage"] == "evaluate" and res["model"] == "llama3" and res["run_dir"] == str(run)
    assert "code_version" in res and "seconds" in res
    df = pd.read_csv(run / "results.csv")
    assert len(df) == 1
    assert {"asr", "over_refusal", "utility_nll", "harmful_set.name", "harmful_set.n", "counts", "stage"} <= set(df)
    assert "rows" not in df  # lists of dicts stay in results.json only
    assert df.loc[0, "asr"] == 0.25 and df.loc[0, "harmful_set.n"] == 3 and df.loc[0, "counts"] == "[1, 2]"
    assert (run / "config.yaml").exists() and "llama3" in (run / "config.yaml").read_text()
    assert (run / "generations.jsonl").read_text() == '{"prompt": "p", "answer": "a"}\n'
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir()
    assert len(list(offline[0].glob("*.wandb"))) == 1


def test_finish_on_error_closes_the_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_for(tmp_path, "wandb")
    tr = Tracker(cfg, cfg.run_dir)
    assert wandb.run is not None
    tr.finish(None, RuntimeError("boom"))
    assert wandb.run is None and tr.wandb is None
    assert not (tmp_path / "run" / "results.json").exists()


def test_tracked_closes_wandb_when_a_stage_fails(tmp_path, monkeypatch):
    import wandb

    from safety_neurons.stages.common import tracked

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_for(tmp_path, "wandb")
    with pytest.raises(ValueError, match="stage failed"):
        with tracked(cfg) as (tr, box):
            assert wandb.run is not None
            raise ValueError("stage failed")
    assert wandb.run is None
    assert not (tmp_path / "run" / "results.json").exists()


def test_logger_none_writes_files_only(tmp_path):
    cfg = cfg_for(tmp_path, "none")
    tr = Tracker(cfg, cfg.run_dir)
    assert tr.wandb is None
    tr.log({"x": 1})
    tr.finish({"asr": 1.0})
    assert json.loads((tmp_path / "run" / "results.json").read_text())["asr"] == 1.0
    assert not (tmp_path / "run" / "wandb").exists()


def test_non_main_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cfg = cfg_for(tmp_path, "wandb")
    tr = Tracker(cfg, cfg.run_dir)
    assert not tr.main and tr.wandb is None
    tr.save_generations([{"a": 1}])
    tr.finish({"asr": 1.0})
    assert not (tmp_path / "run").exists()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "l": [1, 2], "ld": [{"x": 1}], "n": None}) == {
        "a.b": 1, "a.c.d": "x", "l": "[1, 2]", "n": None}


def test_a_named_group_reaches_wandb(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose([f"run_dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}", "logger=wandb",
                   "stage=deactivate", "model=llama3", "logger.group=my-sweep"])
    tr = Tracker(cfg, cfg.run_dir)
    assert (wandb.run.group, wandb.run.job_type) == ("my-sweep", "deactivate")
    tr.finish({"asr": 0.0})


def test_generations_are_logged_as_a_table_with_their_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_for(tmp_path, "wandb")
    tr = Tracker(cfg, cfg.run_dir)
    logged = {}
    real = tr.log_table
    monkeypatch.setattr(tr, "log_table", lambda name, df: (logged.__setitem__(name, df), real(name, df)))
    rows = [{"set": "harmful", "attack": "prefill", "prompt": "p", "answer": "Sure, here is x", "refusal": False,
             "degenerate": True, "tag": "n=1", "extra": [1, 2]},
            {"set": "harmless", "prompt": "q", "answer": "I cannot", "refusal": True, "tag": "n=1"}]
    tr.save_generations(rows)
    tr.finish({"asr": 0.5})
    df = logged["generations"]
    assert list(df.columns) == ["tag", "set", "attack", "prompt", "answer", "refusal", "degenerate"]
    assert df["answer"].tolist() == ["Sure, here is x", "I cannot"] and df["refusal"].tolist() == [False, True]

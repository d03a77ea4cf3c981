"""experiments/wandb_report.py: the report's panels plot metric names our runs log, its run sets are the
sweep's group, and without a W&B login it says why and lists the local results instead."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("wandb_report", ROOT / "experiments" / "wandb_report.py")
wr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wr)


def test_report_panels_plot_what_the_runs_log():
    pytest.importorskip("wandb_workspaces")
    from safety_neurons.stages.deactivate import _aggregate

    report = wr.build("me", "safety-neurons", "deactivation_sweep-smollm2-0")
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert [g.runsets[0].filters for g in grids] == [
        "Group = 'deactivation_sweep-smollm2-0' and JobType = 'deactivate'",
        "Group = 'deactivation_sweep-smollm2-0' and JobType = 'finetune'",
        "Group = 'deactivation_sweep-smollm2-0'"]
    # the band is what a random-baseline deactivation logs per count (<baseline>/<metric>, step = count)
    random_row = _aggregate([{"asr": 0.1, "breaks_model": False}, {"asr": 0.3, "breaks_model": False}])
    logged = {f"random/{k}" for k in random_row} | {"safety/asr"}
    line = grids[0].panels[0]
    assert line.x == "Step" and set(line.y) <= logged and {"random/asr_min", "random/asr_max"} <= set(line.y)
    bars = grids[1].panels[:2]
    assert [b.metrics for b in bars] == [["after_harmful_refusal"], ["after_over_refusal"]]


def test_without_a_login_it_lists_the_local_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "0").mkdir()
    (tmp_path / "report.csv").write_text("n,asr\n")
    (tmp_path / "0" / "deactivation_asr_vs_count.png").write_bytes(b"")
    assert wr.main(["--group", "g", "--sweep", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not logged in to W&B" in err
    assert str(tmp_path / "report.csv") in err and str(tmp_path / "0" / "deactivation_asr_vs_count.png") in err

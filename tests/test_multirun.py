"""``--multirun`` through the CLI: one job per sweep point, and the sweep-report callback gathers them into
one report.csv whose rows are the jobs' own results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.stages import get_stage

ROOT = Path(__file__).resolve().parent.parent


def test_multirun_deactivate_sweep_report(fixtures, tmp_path):
    fx = fixtures
    data = [f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}", f"dataset.path={fx['hb']}",
            f"harmless.path={fx['harmless']}", "eval.n_harmful=2", "eval.n_harmless=2", "eval.max_new_tokens=3",
            "logger=none", "device=cpu"]
    get_stage("detect")(compose([f"run_dir={tmp_path / 'det'}", *data, "stage=detect", "topk.consistency=0.5",
                                 "detect.save_as=sweepset"]))
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SAFETY_NEURONS_ROOT": str(tmp_path)}
    env.pop("SAFETY_NEURONS_RUN_DIR", None)
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "--multirun", "stage=deactivate", *data,
                        "deactivate.neurons=sweepset", "deactivate.n=0,2", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"sweep report: 2 rows -> {sweep / 'report.csv'}" in p.stdout
    report = pd.read_csv(sweep / "report.csv")
    jobs = {int(d.name): json.loads((d / "results.json").read_text()) for d in sweep.iterdir()
            if d.is_dir() and (d / "results.json").exists()}
    assert sorted(jobs) == [0, 1] and sorted(j["n"] for j in jobs.values()) == [0, 2]
    assert sorted(report["n"]) == [0, 2]
    for job in jobs.values():
        row = report[report["n"] == job["n"]].iloc[0]
        for k in ("n_neurons", "asr", "over_refusal", "utility_nll", "kl"):
            assert float(row[k]) == pytest.approx(float(job[k]), rel=1e-9, abs=1e-12), k
    assert jobs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and {j["n_neurons"] for j in jobs.values()} == {0, 2}

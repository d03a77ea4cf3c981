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


def test_parallel_launcher_runs_two_jobs_in_their_own_folders(fixtures, tmp_path):
    """hydra/launcher=local_parallel (joblib): two jobs at once, each in its numbered folder, gathered by
    the sweep report as with the default launcher."""
    fx = fixtures
    data = [f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}", f"dataset.path={fx['hb']}",
            f"harmless.path={fx['harmless']}", "eval.n_harmful=2", "eval.n_harmless=1", "eval.max_new_tokens=2",
            "eval.utility=false", "logger=none", "device=cpu"]
    get_stage("detect")(compose([f"run_dir={tmp_path / 'det'}", *data, "stage=detect", "topk.consistency=0.5",
                                 "detect.save_as=parallelset"]))
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SAFETY_NEURONS_ROOT": str(tmp_path)}
    env.pop("SAFETY_NEURONS_RUN_DIR", None)
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "--multirun", "hydra/launcher=local_parallel",
                        "stage=deactivate", "deactivate.neurons=parallelset", *data, "deactivate.n=1",
                        "eval.max_new_tokens=2,3", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stderr + p.stdout  # the joblib launcher ran the jobs
    jobs = {int(d.name): (d / ".hydra" / "overrides.yaml").read_text() for d in sweep.iterdir()
            if d.is_dir() and (d / "results.json").exists()}
    assert sorted(jobs) == [0, 1]  # each job in its own folder, with its own value
    assert "eval.max_new_tokens=2" in jobs[0] and "eval.max_new_tokens=3" in jobs[1]
    report = pd.read_csv(sweep / "report.csv")
    assert len(report) == 2 and set(report["n"]) == {1}


def test_slurm_preset_composes_into_a_submitit_launcher():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.utils import get_class

    from safety_neurons.cfg import CONF_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=["hydra/launcher=slurm_gpu", "stage=detect"],
                       return_hydra_config=True)
    la = cfg.hydra.launcher
    assert get_class(la._target_).__name__ == "SlurmLauncher"
    assert (la.gpus_per_node, la.tasks_per_node, la.nodes, la.timeout_min) == (1, 1, 1, 240)
    assert la.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # logs inside the sweep's folder

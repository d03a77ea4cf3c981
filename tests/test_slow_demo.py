"""`make demo` end to end on the real SmolLM2 (a few minutes): the shipped plant is rebuilt from its delta
into a fresh store, does what its provenance says, and the report's verdicts follow its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_demo_on_the_shipped_plant(tmp_path):
    from safety_neurons.stages.benchmark import verdicts

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFETY_NEURONS_STORE": str(tmp_path / "store"),
           "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "run")}
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "experiment=demo", "logger=none"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from its shipped delta" in p.stdout  # rebuilt, not trained
    shipped = json.loads((ROOT / "safety_neurons" / "data" / "planted" / "planted-ffn1pct-s0" / "plant.json").read_text())
    run = tmp_path / "run" / "benchmark-planted-ffn1pct-s0"
    df = pd.read_csv(run / "benchmark.csv")
    intact = df[df.method == "none"].iloc[0]
    # the rebuilt model refuses as the plant recorded (same prompts, greedy, same length)
    assert intact.harmful_refusal == pytest.approx(shipped["refusal"], abs=1e-9)
    assert intact.over_refusal == pytest.approx(shipped["over_refusal"], abs=1e-9)
    assert df[df.method == "planted_set"].iloc[0].harmful_refusal <= 0.1  # S* carries the refusal
    assert list(df[df.role == "scorer"].method) == ["plnd", "activation_diff_rel"]
    report = (run / "report.md").read_text()
    want = "- verdict: " + ", ".join(f"{r.method} {r.verdict}" for r in verdicts(df).itertuples())
    assert want in report.splitlines()
    assert "report: " in p.stdout and (tmp_path / "run" / "report.md").exists()

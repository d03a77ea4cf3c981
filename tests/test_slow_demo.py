"""`make demo` end to end on the real SmolLM2 (a few minutes, twice): from a fresh store the shipped plant
is rebuilt from its delta, the study's steps write what the report says, the benchmark and the tuned
models are reused by a second run, which repeats every headline number exactly, and the numbers agree with the committed
ones (docs/demo-headline.json) within `make check-repro`'s tolerances."""

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


def demo(tmp_path, name):
    # on every core, as make demo runs (the suite's own process keeps to one thread: conftest.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFETY_NEURONS_STORE": str(tmp_path / "store"),
           "SAFETY_NEURONS_RUN_DIR": str(tmp_path / name), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "experiment=demo", "logger=none"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, tmp_path / name


def test_demo_twice_from_a_fresh_store(tmp_path):
    from safety_neurons import repro
    from safety_neurons.stages.benchmark import verdicts

    out, run = demo(tmp_path, "first")
    assert "from its shipped delta" in out  # rebuilt, not trained
    steps = pd.read_csv(run / "study.csv")
    assert list(steps.stage) == ["benchmark", "detect", "finetune", "finetune"]
    bench = run / "00-benchmark" / "benchmark-planted-ffn1pct-s0"
    df = pd.read_csv(bench / "benchmark.csv")
    assert list(df[df.role == "scorer"].method) == ["plnd", "activation_diff_rel"]
    assert df[df.method == "planted_set"].iloc[0].harmful_refusal <= 0.1  # S* carries the refusal
    sweep = pd.read_csv(bench / "sweep.csv")
    # plnd, activation_diff_rel and random at each n; S* itself only whole (benchmark.sweep_control=false)
    assert sorted(set(sweep.n)) == [112, 225, 450] and len(sweep) == 3 * 3 + 1
    assert list(sweep[sweep.method == "planted_set"].n) == [450]
    report = (run / "report.md").read_text()
    want = "- verdict: " + ", ".join(f"{r.method} {r.verdict}" for r in verdicts(df).itertuples())
    assert want in report.splitlines() and want in out.splitlines()
    assert "![sweep](00-benchmark/benchmark-planted-ffn1pct-s0/sweep.png)" in report
    assert sum(x.startswith("- tuning ") for x in report.splitlines()) == 2
    assert f"report: {run / 'report.md'}" in out

    out2, run2 = demo(tmp_path, "second")
    assert out2.count("reusing the tuned model") == 2 and "reusing the benchmark" in out2
    first, second = repro.headline(run), repro.headline(run2)
    assert second == first  # greedy and seeded: the cached run repeats every number
    table = repro.compare(json.loads(repro.EXPECTED.read_text()), first)
    assert table.ok.all(), table[~table.ok].to_string()
    t1, t2 = pd.read_csv(run / "study.csv").seconds.sum(), pd.read_csv(run2 / "study.csv").seconds.sum()
    print(f"demo: first run {t1:.0f} s of steps, second {t2:.0f} s")

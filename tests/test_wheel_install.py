"""A non-editable install works: the wheel carries the config tree, the data and the C source; a tiny
detect run from an installed copy, in a temporary working directory, writes its outputs under that
directory (or $SAFETY_NEURONS_STORE) and nothing beside the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.builders import stage_overrides

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of the sources, so the checkout gets no build/ or egg-info folder
    src = out / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "safety_neurons", src / "safety_neurons",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    # no build isolation: setuptools comes from this environment, nothing is downloaded
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("safety_neurons-*.whl")
    return whl


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_the_wheel_carries_config_data_and_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("safety_neurons/conf/config.yaml", "safety_neurons/conf/paths/default.yaml",
              "safety_neurons/conf/hydra/default.yaml", "safety_neurons/conf/debug/tiny.yaml",
              "safety_neurons/conf/experiment/organism_study.yaml", "safety_neurons/conf/model/smollm2.yaml",
              "safety_neurons/data/harmless.jsonl", "safety_neurons/csrc/perturbed_softmax.c"):
        assert f in names, f
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "benchmarks/"))]


def test_an_installed_copy_detects_from_any_directory(wheel, fixtures, tmp_path):
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_NEURONS_")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    where = subprocess.run([sys.executable, "-c", "import safety_neurons, sys; print(safety_neurons.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "safety_neurons" / "__init__.py")  # not the checkout
    before = snapshot(site)
    args = [o for o in stage_overrides(fixtures, "unused") if not o.startswith(("run_dir=", "store_dir="))]
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "stage=detect", *args, "detect.save_as=wheel"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert snapshot(site) == before, "the run wrote beside the installed package"
    store = work / "outputs" / "store" / "neurons" / "local" / "harmbench" / "wheel"
    meta = json.loads((store / "neurons.json").read_text())["meta"]
    assert meta["n_prompts"] == 4 and meta["tag"] == "wheel"
    (run,) = (work / "outputs" / "runs" / "detect" / "local").iterdir()
    assert json.loads((run / "set.json").read_text())["neurons_json"] == str(store / "neurons.json")
    assert not (site / "outputs").exists()
    assert not (ROOT / "outputs" / "store" / "neurons" / "local" / "harmbench" / "wheel").exists()

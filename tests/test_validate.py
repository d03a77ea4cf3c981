"""Bad input fails before any model is loaded, with one line naming the key, the value and what is
allowed: each case runs the real stage entry point (run_stage) with model loading replaced by a trap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import safety_neurons.stages.common as common
from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.stages import run_stage


def ov(fx, run, *extra):
    return [f"run_dir={run}", f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}",
            f"dataset.path={fx['hb']}", f"harmless.path={fx['harmless']}", "logger=none", "device=cpu", *extra]


@pytest.fixture
def no_model(monkeypatch):
    def trap(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(common, "load_model", trap)


def neurons_file(path, ranking):
    path.write_text(json.dumps({"meta": {}, "layers": {}, "ranking": ranking}))
    return path


CASES = [
    ("stage=finetune", "finetune.steps=0", r"finetune.steps=0 is not allowed; use an integer >= 1"),
    ("stage=finetune", "finetune.lr=-1", r"finetune.lr=-1.0 is not allowed; use a number > 0"),
    ("stage=finetune", "finetune.batch_size=0", r"finetune.batch_size=0 is not allowed; use an integer >= 1"),
    ("stage=detect", "detect.batch_size=0", r"detect.batch_size=0 is not allowed; use an integer >= 1"),
    ("stage=deactivate", "deactivate.n=[]", r"deactivate.n=\[\] is not allowed; use a count >= 0, all, or a non"),
    ("stage=deactivate", "deactivate.n=1.7", r"deactivate.n=1.7 is not allowed"),
    ("stage=deactivate", "deactivate.n=true", r"deactivate.n=True is not allowed"),
    ("stage=deactivate", "deactivate.n=[0,-3]", r"deactivate.n=\[0, -3\] is not allowed"),
    ("stage=evaluate", "eval.max_new_tokens=0", r"eval.max_new_tokens=0 is not allowed; use an integer >= 1"),
    ("stage=evaluate", "eval.n_harmful=-2", r"eval.n_harmful=-2 is not allowed; use an integer >= 0 or null"),
    ("stage=evaluate", "model.max_length=0", r"model.max_length=0 is not allowed"),
    ("stage=detect", "topk.consistency=0", r"topk.consistency=0.0 is not allowed; use a number in \(0, 1\]"),
    ("stage=detect", "topk.consistency=1.5", r"topk.consistency=1.5 is not allowed; use a number in \(0, 1\]"),
    ("stage=detect", "topk.attn=1.5", r"topk.attn=1.5 is not allowed; use a share of the width in \(0, 1\) or a "
                                      r"whole count >= 1 \(1 and 1.0 both mean one neuron\)"),
    ("stage=detect", "topk.ffn=-0.1", r"topk.ffn=-0.1 is not allowed"),
    ("stage=evaluate", "device=tpu", r"unknown device='tpu'; use one of auto, cpu, cuda, mps"),
    ("stage=detect", "dataset.path=/nonexistent/prompts.csv", r"dataset.path=/nonexistent/prompts.csv does not exist"),
]


@pytest.mark.parametrize("stage,bad,says", CASES, ids=[c[1] for c in CASES])
def test_bad_config_fails_before_the_model_loads(fixtures, tmp_path, no_model, stage, bad, says):
    with pytest.raises(UserError, match=says) as e:
        run_stage(compose(ov(fixtures, tmp_path / "run", stage, bad)))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(fixtures, tmp_path, no_model):
    with pytest.raises(UserError, match=r"device=cuda but this machine has no usable CUDA GPU; use device=cpu"):
        run_stage(compose(ov(fixtures, tmp_path / "run", "stage=evaluate", "device=cuda")))


def bad_model(tmp_path, kind):
    if kind == "corrupt config.json":
        d = tmp_path / "m"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama", ')
        return d, r"config.json is not valid JSON \(.*\); restore the model folder"
    if kind == "config without model_type":
        d = tmp_path / "m"
        d.mkdir()
        (d / "config.json").write_text('[1, 2]')
        return d, r"config.json has no model_type"
    if kind == "garbage gguf":
        f = tmp_path / "m.gguf"
        f.write_bytes(b"not a model at all")
        return f, r"m.gguf is not a GGUF file"
    f = tmp_path / "m.bin"
    f.write_bytes(b"x")
    return f, r"is a file but not a .gguf"


@pytest.mark.parametrize("kind", ["corrupt config.json", "config without model_type", "garbage gguf", "other file"])
def test_bad_model_files(fixtures, tmp_path, no_model, kind):
    path, says = bad_model(tmp_path, kind)
    with pytest.raises(UserError, match=says):
        run_stage(compose(ov(fixtures, tmp_path / "run", "stage=evaluate", f"model.path={path}")))


@pytest.mark.parametrize("ranking,says", [
    ([[0, "ffn", -1]], r"neuron \(0, 'ffn', -1\) in set: layer and index must be whole numbers >= 0"),
    ([[-1, "q", 0]], r"neuron \(-1, 'q', 0\) in set"),
    ([[0, "ffn", 1.5]], r"neuron \(0, 'ffn', 1.5\) in set"),
    ([[0, "ffn", True]], r"neuron \(0, 'ffn', True\) in set"),
], ids=["negative index", "negative layer", "float index", "bool index"])
def test_bad_neuron_files(fixtures, tmp_path, no_model, ranking, says):
    f = neurons_file(tmp_path / "neurons.json", ranking)
    with pytest.raises(UserError, match=says):
        run_stage(compose(ov(fixtures, tmp_path / "run", "stage=deactivate", f"deactivate.neurons={f}")))


def test_a_store_that_cannot_be_written(fixtures, tmp_path, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"store_dir=.*/file/store is not writable"):
        run_stage(compose(ov(fixtures, tmp_path / "run", "stage=detect", f"store_dir={blocker / 'store'}")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_store(fixtures, tmp_path, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="is not writable"):
            run_stage(compose(ov(fixtures, tmp_path / "run", "stage=detect", f"store_dir={ro / 'store'}")))
    finally:
        ro.chmod(0o700)


def test_every_shipped_preset_and_experiment_is_valid():
    from pathlib import Path

    from safety_neurons.cfg import CONF_DIR
    from safety_neurons.validate import validate

    for exp in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml")):
        validate(compose([f"experiment={exp.stem}"]))
    for stage in ("evaluate", "detect", "deactivate", "finetune", "plant", "benchmark", "plan"):
        validate(compose([f"stage={stage}"]))


# every value out of a fixed set is an enum of the schema: composition rejects others and names the allowed
ENUMS = {"detect.mode": "exact, original", "detect.tokens": "content, all, last",
         "detect.qk_kernel": "auto, native, torch",
         "detect.scorer": "plnd, activation_diff, activation_diff_rel, contribution_diff, contribution_diff_rel, "
                          "patch_attribution, attribution, snip, wanda",
         "benchmark.random_shape": "scorer, count", "detect.normalize": "none, median",
         "deactivate.baseline": "safety, random", "deactivate.ablation": "zero, mean",
         "finetune.target": "safety, random, all, lora", "finetune.set": "sn, rsn",
         "finetune.schedule": "cosine, linear, constant", "plant.schedule": "cosine, linear, constant",
         "eval.judge_type": "auto, classifier, causal, llamaguard", "logger.name": "wandb, none",
         "report.of": "deactivate, finetune"}


@pytest.mark.parametrize("key", sorted(ENUMS))
def test_enum_values_are_checked_by_the_schema(key):
    from safety_neurons.cfg import check_overrides

    with pytest.raises(UserError) as e:
        check_overrides([f"{key}=bogus"])
    assert str(e.value) == f"{key}=bogus: Invalid value 'bogus', expected one of [{ENUMS[key]}]"
    for good in ENUMS[key].split(", "):
        assert OmegaConf.select(compose([f"{key}={good}"]), key) == good


def test_library_choices_match_the_schema():
    from safety_neurons.config import Mode, QkKernel, ScorerName
    from safety_neurons.importance import MODES, QK_KERNELS, SCORERS

    assert [m.value for m in Mode] == list(MODES)
    assert [m.value for m in QkKernel] == list(QK_KERNELS)
    assert {m.value for m in ScorerName} == set(SCORERS)


@pytest.mark.parametrize("old, new", [("detect.reference=harmless", "dataset@reference=harmless"),
                                      ("deactivate.set_tag=exact", "deactivate.neurons=TAG"),
                                      ("finetune.set_tag=exact", "finetune.neurons=TAG"),
                                      ("deactivate.means_from=alpaca", "dataset@means=NAME")])
def test_a_renamed_key_says_the_new_way(old, new):
    from hydra.errors import HydraException

    from safety_neurons.cfg import composition_error

    with pytest.raises(HydraException) as e:
        compose(["run_dir=/tmp/x", old])
    msg = composition_error(e.value)
    assert new in msg and "\n" not in msg
    compose(["run_dir=/tmp/x", new.replace("TAG", "exact").replace("NAME", "alpaca")])  # the new way composes


def test_a_composition_error_is_one_line():
    from safety_neurons.cfg import check_overrides

    for bad, says in (("detect.nosuch=1", "detect.nosuch is not a config key"),
                      ("model=nosuch", "Could not find 'model/nosuch'; available: gemma, "),
                      ("finetune.steps=abc", "finetune.steps=abc: Value 'abc' of type 'str' could not be converted")):
        with pytest.raises(UserError) as e:
            check_overrides([bad])
        assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)
    check_overrides(["-m", "detect.mode=exact,original"])  # sweeps are Hydra's


def test_the_cli_says_one_line_and_exits_2(fixtures, tmp_path):
    env = {**os.environ, "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "run")}
    for args, says in ((["stage=evaluate", "model=base_model"],
                        "error: model has no name (model=base_model is the bare schema"),
                       (ov(fixtures, tmp_path / "r", "stage=finetune", "finetune.steps=0"),
                        "error: finetune.steps=0 is not allowed; use an integer >= 1"),
                       (["stage=detect", "detect.mode=bogus"],
                        "error: detect.mode=bogus: Invalid value 'bogus', expected one of [exact, original]")):
        p = subprocess.run([sys.executable, "-m", "safety_neurons", *args], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith(says)

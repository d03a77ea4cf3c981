"""Every study recipe composes: the ``experiment`` group's files, each point of a sweep they declare in
``hydra.sweeper.params``, and each step of a study (``study.steps``) as stage=study composes it. Each
plain ``key=value`` override of a step or sweep point must land in the composed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from safety_neurons.cfg import CONF_DIR, compose
from safety_neurons.errors import UserError
from safety_neurons.stages.study import expand, step_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (the other sweeps at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in parsed]
    first = [v[0] for v in values]
    points = [first]
    for i, vs in enumerate(values):
        points += [first[:i] + [v] + first[i + 1:] for v in vs[1:]]
    return points


def check_composes(overrides: list[str], tmp: Path) -> None:
    cfg = compose([*overrides, f"run_dir={tmp / 'run'}", f"store_dir={tmp / 'store'}"])
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if o.package is not None or key.startswith("hydra") or key == "run_dir":
            continue
        if (CONF_DIR / key).is_dir():  # a group choice: its file was found, or compose had failed
            continue
        want = o.value()
        if isinstance(want, str) and "${" in want:  # an interpolation lands as itself (resolved per step)
            parent, _, last = key.rpartition(".")
            got = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(last)._value()
        else:
            got = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(got, (list, tuple)) or OmegaConf.is_list(got):
            got = list(got)
        assert got == want or str(got) == str(want), (key, got, want)


def sweep_params(name: str) -> list[str]:
    """The ``hydra.sweeper.params`` of an experiment file, as command-line sweep overrides."""
    raw = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return [f"{k}={v}" for k, v in params.items()]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_compose(name, tmp_path):
    cfg = compose([f"experiment={name}", f"run_dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}"])
    assert cfg.stage.name
    for point in sweep_points(sweep_params(name)) if sweep_params(name) else []:
        check_composes([f"experiment={name}", *point], tmp_path)
    if cfg.stage.name == "study":
        assert cfg.study.steps, f"{name} is a study without steps"
        cfg.study.base = [f"experiment={name}"]  # what the command line gives a CLI run
        for i, step in enumerate(x for s in cfg.study.steps for x in expand(s)):  # a sweep: each combination
            folder, overrides = step_overrides(cfg, i, step)
            assert overrides[-1] == f"run_dir='{Path(cfg.run_dir) / folder}'"
            check_composes([o for o in overrides if not o.startswith("run_dir=")], tmp_path)


def test_the_sweeps_and_studies_are_there():
    """The recipes docs/ cites: two Hydra sweeps and a study of several stages."""
    assert sweep_params("deactivation_sweep") == ["deactivate.n=0,10,30,100,300,1000",
                                                  "deactivate.baseline=safety,random"]
    assert sweep_params("finetune_sweep") == ["finetune.target=safety,random,all,lora"]
    steps = compose(["experiment=organism_study", "run_dir=/tmp/x"]).study.steps
    assert [s[0] for s in steps].count("stage=deactivate") == 11 and steps[-1][0] == "stage=report"


def test_sweep_points_and_a_bad_recipe(tmp_path):
    assert sweep_points(["a=1,2", "b=x", "c=[3,4]"]) == [["a=1", "b=x", "c=[3,4]"], ["a=2", "b=x", "c=[3,4]"]]
    with pytest.raises(Exception, match="no_such_key"):
        check_composes(["stage=finetune", "finetune.no_such_key=1"], tmp_path)
    cfg = compose(["run_dir=/tmp/x", "stage=study"])
    with pytest.raises(UserError, match=r"study.steps\[0\] \(detect.reuse=true\) must name exactly one stage"):
        step_overrides(cfg, 0, ["detect.reuse=true"])


@pytest.mark.parametrize("model", ["llama3", "mistral", "gemma2"])
def test_gpu_recipes_carry_the_papers_settings(model, tmp_path):
    """experiments/real_models: AdvBench, the released absolute k, the released SN-Tune recipe, the split."""
    base = [f"model={model}", f"run_dir={tmp_path}"]
    det = compose(["experiment=gpu_detect", *base])
    assert (det.stage.name, det.dataset.name, det.topk.attn, det.topk.ffn, det.topk.consistency) == \
        ("detect", "advbench", 1000, 2000, 1.0)
    de = compose(["experiment=gpu_deactivate", *base])
    assert (de.stage.name, de.split.under, de.split.gen, de.deactivate.neurons) == ("deactivate", 4, 4, "exact")
    ft = compose(["experiment=gpu_sntune", *base])
    f = ft.finetune
    assert (ft.stage.name, f.target, f.lr, f.batch_size, f.grad_accum, f.clip, f.cap_per_matrix, f.warmup) == \
        ("finetune", "safety", 2e-6, 8, 4, 0.3, 100, 0.05)


def test_the_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    root = CONF_DIR.parents[1] / "experiments"
    kinds = {p.name: str(ClusterConfig.from_yaml_file(str(p)).distributed_type).split(".")[-1]
             for p in sorted(root.glob("accelerate_*.yaml"))}
    # cpu2 uses the multi-GPU launcher on purpose: it starts two gloo ranks on a CPU (see the file)
    assert kinds == {"accelerate_1gpu.yaml": "NO", "accelerate_cpu2.yaml": "MULTI_GPU",
                     "accelerate_fsdp.yaml": "FSDP", "accelerate_multigpu.yaml": "MULTI_GPU"}
    script = (root / "real_models" / "tuning_sweep.sh").read_text()
    assert "experiment=gpu_sntune" in script and (root / "accelerate_multigpu.yaml").name in script

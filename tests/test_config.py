"""The Hydra config tree: every option composes against the schema, typos fail at composition, unknown
names list the known ones, and the CLI turns a missing model into one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from safety_neurons.cfg import CONF_DIR, compose, dataset_config
from safety_neurons.config import KINDS
from safety_neurons.data import KNOWN_KINDS
from safety_neurons.errors import UserError
from safety_neurons.stages import STAGES, get_stage

GROUPS = ("model", "dataset", "split", "topk", "stage", "detect", "deactivate", "finetune", "eval", "logger")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_once():
    """Initialise Hydra once for the module; ``compose`` reuses it (the CLI composes the same way)."""
    from hydra import initialize_config_dir

    from safety_neurons.cfg import setup

    setup()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


@pytest.fixture
def base(tmp_path):
    return [f"run_dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}"]


def yaml_values(group: str, option: str) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    raw.pop("defaults", None)
    return raw


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"conf/{g} has no options"
    assert options("experiment") == ["align", "deactivation_sweep", "demo", "detect_7b", "finetune_sweep", "gpu_deactivate",
                                     "gpu_detect", "gpu_sntune", "organism", "organism_study", "paper", "planted_benchmark"]
    assert options("debug") == ["tiny"] and options("paths") == ["default"] and options("hydra") == ["default"]


N_ROUNDS = max(len(options(g)) for g in GROUPS)


@pytest.mark.parametrize("round_", range(N_ROUNDS))
def test_every_option_composes_with_its_values(base, round_):
    """Round i composes option i (cycled) of every group at once: all options of all groups are covered."""
    picks = {g: options(g)[round_ % len(options(g))] for g in GROUPS}
    cfg = compose(base + [f"{g}={o}" for g, o in picks.items()])
    for group, option in picks.items():
        node = cfg[group]
        # every value of the YAML lands in the composed, typed config
        for key, val in yaml_values(group, option).items():
            if val == "???":  # merged onto the schema default, ??? leaves it unset (None); loaders name the key
                assert OmegaConf.is_missing(node, key) or node[key] is None, (group, option, key)
            else:
                assert OmegaConf.to_container(node)[key] == val, (group, option, key)
    assert cfg.run_dir == base[0].split("=", 1)[1]
    assert cfg.store_dir == base[1].split("=", 1)[1]
    assert cfg.dataset.kind in KNOWN_KINDS
    assert cfg.harmless.kind == "harmless"  # dataset@harmless stays the default
    assert cfg.stage.name in STAGES, f"stage option {picks['stage']} has no entry in the stage registry"
    assert set(cfg.detect.kinds) <= set(KINDS) and cfg.detect.mode in ("exact", "original")
    assert cfg.logger.name in ("none", "wandb")
    # the whole config resolves (no interpolation error)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def test_rounds_cover_every_option():
    for g in GROUPS:
        assert {options(g)[i % len(options(g))] for i in range(N_ROUNDS)} == set(options(g))


def test_defaults(base):
    cfg = compose(base)
    assert (cfg.model.name, cfg.dataset.name, cfg.harmless.name, cfg.stage.name, cfg.logger.name) == (
        "smollm2", "harmbench", "harmless", "evaluate", "wandb")
    assert cfg.topk.attn == 0.25 and cfg.topk.ffn == 0.14 and cfg.topk.consistency == 1.0
    assert list(cfg.detect.kinds) == list(KINDS)


def test_model_local_path_is_required_and_settable(base, tmp_path):
    from safety_neurons.io import Store
    from safety_neurons.models import model_source

    cfg = compose(base + ["model=local"])
    with pytest.raises(UserError, match=r"model\.path="):
        model_source(cfg.model, Store(tmp_path / "store"))
    cfg = compose(base + ["model=local", f"model.path={tmp_path}"])
    assert cfg.model.path == str(tmp_path) and cfg.model.name == "local"


def test_custom_dataset_needs_a_path(base):
    from safety_neurons.data import load_prompts

    cfg = compose(base + ["dataset=custom"])
    with pytest.raises(UserError, match=r"dataset\.path="):
        load_prompts(cfg.dataset, "train")


def test_experiment_align(base):
    cfg = compose(base + ["experiment=align"])
    assert cfg.stage.name == "finetune"
    f = cfg.finetune
    assert (f.target, f.steps, f.batch_size, f.lr, f.n_harmful, f.n_harmless, f.clip, f.save_as) == (
        "all", 100, 8, 8e-5, None, None, 1.0, "smollm2-refusing")
    assert f.share_prefix and f.pack and cfg.reuse_freed_memory
    assert (f.max_new_tokens_distill, f.form_matched_repeat, f.harmful_repeat) == (24, 2, 2)
    assert (f.decision_tokens, f.decision_weight) == (3, 4.0)
    assert cfg.model.name == "smollm2"
    # command-line overrides still win over the preset
    assert compose(base + ["experiment=align", "finetune.steps=3"]).finetune.steps == 3


def test_experiment_demo(base):
    cfg = compose(base + ["experiment=demo"])
    assert cfg.stage.name == "study" and cfg.model.name == "smollm2"
    steps = [compose(base + ["experiment=demo", *map(str, st)]) for st in cfg.study.steps]  # as the CLI composes them
    assert [c.stage.name for c in steps] == ["benchmark", "detect", "finetune", "finetune"]
    bench = steps[0].benchmark
    assert list(bench.plants) == ["ffn1:0"] and list(bench.scorers) == ["plnd", "activation_diff_rel"]
    assert list(bench.sweep) == [0.25, 0.5] and steps[0].eval.n_harmful == 24  # the demo's short evaluation
    assert [c.finetune.target for c in steps[2:]] == ["safety", "random"]
    assert all(c.finetune.reuse and c.finetune.lr == 3e-4 and c.finetune.neurons is None for c in steps[2:])
    assert steps[1].detect.reuse and steps[2].finetune.steps == steps[3].finetune.steps  # equal data and steps
    # the demo's plant is the shipped one: same name and settings, so it is rebuilt, not trained
    import json

    from safety_neurons.cfg import group_config
    from safety_neurons.config import PlantConfig
    from safety_neurons.stages.plant import SHIPPED, default_name, settings

    p = group_config("plant", "ffn1", PlantConfig)
    shipped = json.loads((SHIPPED / default_name(p) / "plant.json").read_text())
    assert settings(shipped["plant"]) == settings(p)


def test_every_plant_of_the_planted_benchmark_ships(base):
    """experiment=planted_benchmark finds each of its plants shipped with the settings it asks for, so a
    fresh machine rebuilds them instead of training them (the plant stage's own rule, settings_mismatch)."""
    import json

    from safety_neurons.cfg import group_config
    from safety_neurons.config import PlantConfig
    from safety_neurons.stages.benchmark import _parse_plant
    from safety_neurons.stages.plant import SHIPPED, default_name, settings_mismatch

    cfg = compose(base + ["experiment=planted_benchmark"])
    assert len(cfg.benchmark.plants) == 6
    for spec in cfg.benchmark.plants:
        preset, seed = _parse_plant(spec)
        p = OmegaConf.merge(group_config("plant", preset, PlantConfig), {"seed": seed})
        prov = json.loads((SHIPPED / default_name(p) / "plant.json").read_text())
        cfg.plant = p
        assert settings_mismatch(prov, cfg) is None, spec
        text = (SHIPPED / default_name(p) / "plant.json").read_text()
        assert '"/' not in text, "an absolute path of the planting machine is shipped"
        assert "model_dir" not in prov and prov["n_planted"] == len(json.loads(
            (SHIPPED / default_name(p) / "neurons.json").read_text())["ranking"])


def test_experiment_organism(base):
    cfg = compose(base + ["experiment=organism"])
    assert cfg.stage.name == "evaluate"
    assert cfg.model.name == "smollm2-refusing" and cfg.model.organism == "smollm2-refusing"
    assert cfg.model.gguf_package is None and cfg.model.gguf_file is None


@pytest.mark.parametrize("override", ["topk.atn=5", "model.pth=x", "finetune.stpes=3", "bogus_top_level=1"])
def test_mistyped_key_fails_at_composition(base, override):
    with pytest.raises(ConfigCompositionException) as e:
        compose(base + [override])
    assert override.split("=")[0] in str(e.value)


@pytest.mark.parametrize("override", ["topk.attn=many", "finetune.steps=3.5"])
def test_mistyped_value_fails_at_composition(base, override):
    with pytest.raises(ConfigCompositionException):
        compose(base + [override])


@pytest.mark.parametrize("group", ["stage", "model", "dataset"])
def test_unknown_option_lists_the_known_ones(base, group):
    with pytest.raises(MissingConfigException) as e:
        compose(base + [f"{group}=nope"])
    msg = str(e.value)
    assert f"Could not find '{group}/nope'" in msg
    for opt in options(group):
        assert f"\t{opt}\n" in msg + "\n", (group, opt)


def test_get_stage_unknown_names_known():
    with pytest.raises(UserError) as e:
        get_stage("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    for name in STAGES:
        assert name in msg


def test_get_stage_known_returns_callables():
    from safety_neurons.stages import detect, evaluate, finetune

    assert get_stage("evaluate") is evaluate.run
    assert get_stage("finetune") is finetune.run
    assert get_stage("detect") is detect.run
    assert get_stage("select") is detect.run_select


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_registered_stage_resolves(name):
    assert callable(get_stage(name))


def test_dataset_config_helper():
    d = dataset_config("advbench")
    assert (d.name, d.kind, d.prompt_column, d.eval_fraction) == ("advbench", "advbench", "goal", 0.2)
    with pytest.raises(UserError) as e:
        dataset_config("nope")
    for opt in options("dataset"):
        assert opt in str(e.value)


def test_cli_missing_hub_model_offline_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFETY_NEURONS_STORE": str(tmp_path / "store"),
           "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "run"), "WANDB_MODE": "offline"}
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "stage=detect", "model=mistral", "logger=none"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, p.stderr
    line = err_lines[0]
    assert "HF_HUB_OFFLINE" in line and "model.path=" in line and "mistralai/Mistral-7B-Instruct-v0.2" in line
    # the run directory came from the launcher's variable, not from a timestamp, and nothing was stored
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "store" / "models").exists()

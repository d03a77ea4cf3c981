"""The schema's field defaults equal the shipped default YAML: a value has one source, and code that
builds a schema without the YAML (``OmegaConf.structured(EvalConfig)``) sees the same numbers."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from safety_neurons import config as C
from safety_neurons.cfg import compose

# groups whose default option is the schema's own defaults (topk=scaled and the model/dataset presets
# are choices among several, not the defaults of their schema)
GROUPS = {"split": C.SplitConfig, "detect": C.DetectConfig, "deactivate": C.DeactivateConfig,
          "finetune": C.FinetuneConfig, "eval": C.EvalConfig, "plant": C.PlantConfig,
          "benchmark": C.BenchmarkConfig, "report": C.ReportConfig, "compare": C.CompareConfig,
          "plan": C.PlanConfig, "study": C.StudyConfig, "search": C.SearchConfig}


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_schema_defaults_equal_the_default_yaml(group):
    cfg = OmegaConf.to_container(compose(["run_dir=/tmp/x"])[group])
    drift = {f.name: (_default(f), cfg[f.name]) for f in dataclasses.fields(GROUPS[group])
             if _default(f) != cfg[f.name]}
    assert not drift, f"{group}: schema default vs composed value {drift}"


def test_debug_tiny_is_the_suites_stage_settings():
    """debug=tiny is what the tests run stages with (tests/builders.py uses it), and it wins over an
    experiment preset: a smoke run of any preset stays tiny."""
    from tests.builders import stage_overrides

    assert "debug=tiny" in stage_overrides({"store": "/s", "model": "/m", "hb": "/h", "harmless": "/x"}, "/r")
    tiny = compose(["run_dir=/tmp/x", "debug=tiny"])
    explicit = compose(["run_dir=/tmp/x", "eval.n_harmful=3", "eval.n_harmless=2", "eval.max_new_tokens=4",
                        "logger=none", "device=cpu"])
    assert OmegaConf.to_container(tiny) == OmegaConf.to_container(explicit)
    assert OmegaConf.to_container(tiny) != OmegaConf.to_container(compose(["run_dir=/tmp/x"]))
    demo = compose(["run_dir=/tmp/x", "experiment=demo", "debug=tiny"])
    assert (demo.stage.name, demo.eval.max_new_tokens, demo.logger.name) == ("study", 4, "none")


def test_outputs_follow_the_paths_group(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFETY_NEURONS_STORE", raising=False)
    monkeypatch.setenv("SAFETY_NEURONS_ROOT", str(tmp_path))
    cfg = compose(["run_dir=/tmp/x"])
    assert (cfg.paths.root, cfg.store_dir, cfg.paths.runs, cfg.paths.sweeps) == (
        str(tmp_path), f"{tmp_path}/outputs/store", f"{tmp_path}/outputs/runs", f"{tmp_path}/outputs/sweeps")
    assert compose(["run_dir=/tmp/x", "paths.outputs=/data/sn"]).store_dir == "/data/sn/store"
    monkeypatch.setenv("SAFETY_NEURONS_STORE", str(tmp_path / "shared"))
    assert compose(["run_dir=/tmp/x"]).store_dir == str(tmp_path / "shared")

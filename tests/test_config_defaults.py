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
          "plan": C.PlanConfig}


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

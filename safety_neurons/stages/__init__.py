"""Stage registry: ``stage=<name>`` -> ``run(cfg) -> results dict``; plain functions, no Hydra needed."""

from __future__ import annotations

import importlib

from ..errors import UserError

STAGES = {
    "evaluate": "evaluate",
    "finetune": "finetune",
    "detect": "detect",
    "select": "detect",
    "compare": "compare",
    "deactivate": "deactivate",
    "report": "report",
    "plant": "plant",
    "benchmark": "benchmark",
    "plan": "plan",
    "study": "study",
    "search": "search",
    "claims": "claims",
}


def get_stage(name: str):
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; known stages are {', '.join(sorted(STAGES))}")
    mod = importlib.import_module(f"{__name__}.{STAGES[name]}")
    return getattr(mod, "run_select" if name == "select" else "run")


def run_stage(cfg) -> dict:
    from ..validate import validate

    get_stage(cfg.stage.name)  # an unknown stage first, then the whole config and its files, before any work
    validate(cfg)
    from ..tracking import asked_processes, is_main_process, num_processes

    if is_main_process() and cfg.stage.name != "study":  # what this run is, before any work
        n, asked = num_processes(), asked_processes()
        print(f"stage={cfg.stage.name}: model {cfg.model.name}, prompts {cfg.dataset.name}, "
              f"{n} process{'es' if n > 1 else ''}, run folder {cfg.run_dir}")
        if asked is not None and asked > n:
            print(f"warning: accelerate launch was asked for {asked} processes and started {n}; on CPU use "
                  f"--config_file experiments/accelerate_cpu2.yaml (or --multi_gpu --num_processes {asked})")
    if cfg.get("reuse_freed_memory", True):
        from ..runtime import reuse_freed_memory

        reuse_freed_memory()
    return get_stage(cfg.stage.name)(cfg)

"""``stage=study``: a recipe of stage runs, listed in an experiment file (``study.steps``), run one after
another in one process. Each step is a stage and its overrides, composed on top of the study's own
overrides (the command line's, and ``study.base``), with its own run folder inside the study's; the
study's folder gets ``study.csv``, one row per finished step, rewritten after each step so an interrupted
study keeps what it finished. Every step is composed and checked before the first one runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..io import write_csv, write_json

STUDY_DIR = "{study_dir}"  # in a step's overrides: the study's own folder (e.g. report.dir={study_dir})


def quoted(value: str) -> str:
    """``value`` as one Hydra override value, whatever characters it holds (a folder with a comma)."""
    return "'" + value.replace("'", "\\'") + "'"


def own_overrides(cfg) -> list[str]:
    """The overrides every step inherits: the command line's (when run by Hydra) and ``study.base``,
    less those that name the study itself (its stage, steps, run folder) and Hydra's own."""
    from hydra.core.hydra_config import HydraConfig

    cli = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    skip = ("stage=", "study.", "run_dir=", "hydra.", "hydra/")
    own = [o for o in [*cli, *cfg.study.base] if not o.lstrip("+~").startswith(skip)]
    if not cfg.logger.get("group"):  # the study's runs are one W&B group, apart from other runs of the recipe
        exp = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
        group = f"{exp or 'study'}-{Path(str(cfg.run_dir)).name}"
        own.append(f"logger.group={quoted(group)}")
    return own


def step_overrides(cfg, i: int, step) -> tuple[str, list[str]]:
    """(the step's folder name, its full override list)."""
    step = [str(o) for o in step]
    stages = [o.split("=", 1)[1] for o in step if o.startswith("stage=")]
    if len(stages) != 1:
        raise UserError(f"study.steps[{i}] ({' '.join(step) or 'empty'}) must name exactly one stage=NAME")
    if stages[0] == "study":
        raise UserError(f"study.steps[{i}] runs stage=study; a study cannot contain a study")
    name = f"{i:02d}-{stages[0]}"
    study_dir = str(cfg.run_dir)
    return name, [*(o.replace(STUDY_DIR, study_dir) for o in [*own_overrides(cfg), *step]),
                  f"run_dir={quoted(str(Path(study_dir) / name))}"]


def run(cfg) -> dict:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..cfg import compose, composition_error
    from ..validate import validate
    from . import get_stage, run_stage

    steps = list(cfg.study.steps)
    if not steps:
        raise UserError("study.steps is empty; give the steps in an experiment file (experiment=organism_study "
                        "is one) as lists of overrides, each with stage=NAME")
    planned = []
    for i, step in enumerate(steps):  # every step composes and passes its checks before any work
        name, overrides = step_overrides(cfg, i, step)
        try:
            scfg = compose(overrides)
            get_stage(scfg.stage.name)
            if i == 0:
                validate(scfg)  # later steps may read what earlier ones write: checked when they start
        except UserError as e:
            raise UserError(f"study.steps[{i}] ({' '.join(map(str, step))}): {e}") from None
        except (HydraException, OmegaConfBaseException) as e:  # a composition error
            raise UserError(f"study.steps[{i}] ({' '.join(map(str, step))}): {composition_error(e)}") from None
        planned.append((name, [str(o) for o in step], scfg))
    out = Path(cfg.run_dir)
    rows: list[dict] = []
    for i, (name, step, scfg) in enumerate(planned):
        print(f"study step {i + 1}/{len(planned)}: {' '.join(step)} -> {out / name}")
        try:
            res = run_stage(scfg) or {}
        except UserError as e:  # the finished steps stay in study.csv; this one says which it was
            done = f"; the {len(rows)} finished steps are in {out / 'study.csv'}" if rows else ""
            raise UserError(f"study.steps[{i}] ({' '.join(step)}): {e}{done}") from None
        folder = out / name  # a step that only reused a finished artifact writes no folder
        rows.append({"step": i, "stage": scfg.stage.name, "overrides": " ".join(step),
                     "run_dir": str(folder) if folder.exists() else "",
                     **{k: v for k, v in res.items() if isinstance(v, (int, float, str, bool)) and k != "run_dir"}})
        write_csv(out / "study.csv", pd.DataFrame(rows))
    results = {"stage": "study", "steps": len(rows), "study_csv": str(out / "study.csv"), "run_dir": str(out)}
    write_json(out / "results.json", results)
    print(f"study: {len(rows)} steps -> {out / 'study.csv'}")
    return results

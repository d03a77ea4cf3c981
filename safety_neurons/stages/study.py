"""``stage=study``: a recipe of stage runs, listed in an experiment file (``study.steps``), run one after
another in one process. Each step is a stage and its overrides, composed on top of the study's own
overrides (the command line's, and ``study.base``), with its own run folder inside the study's; a step
with sweep values (``finetune.seed=0,1,2``) is one step per combination, as ``--multirun`` would run them. The
study's folder gets ``study.csv``, one row per finished step, rewritten after each step so an interrupted
study keeps what it finished. Every step is composed and checked before the first one runs."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..io import write_csv, write_json, write_text

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


def expand(step) -> list[list[str]]:
    """A step with sweep values (``finetune.seed=0,1,2``, ``range(3)``, ``choice(a,b)``), as ``--multirun``
    reads them, as the steps of their product, in the order a multirun runs them; a step without any is
    itself. A step that does not parse is kept for composition to say what is wrong."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    step = [str(o) for o in step]
    try:
        parsed = OverridesParser.create().parse_overrides(step)
    except HydraException:
        return [step]
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [raw] for o, raw in zip(parsed, step)]
    return [list(c) for c in product(*choices)]


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

    steps = [x for step in cfg.study.steps for x in expand(step)]
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
        t0 = time.time()
        try:
            res = run_stage(scfg) or {}
        except UserError as e:  # the finished steps stay in study.csv; this one says which it was
            done = f"; the {len(rows)} finished steps are in {out / 'study.csv'}" if rows else ""
            raise UserError(f"study.steps[{i}] ({' '.join(step)}): {e}{done}") from None
        folder = out / name  # a step that only reused a finished artifact writes no folder
        rows.append({"step": i, "stage": scfg.stage.name, "overrides": " ".join(step),
                     "run_dir": str(folder) if folder.exists() else "", "seconds": round(time.time() - t0, 1),
                     **{k: v for k, v in res.items() if isinstance(v, (int, float, str, bool)) and k != "run_dir"}})
        write_csv(out / "study.csv", pd.DataFrame(rows))
    lines = write_report(out, rows, cfg)
    results = {"stage": "study", "steps": len(rows), "study_csv": str(out / "study.csv"), "run_dir": str(out),
               "report": str(out / "report.md"), "seconds": round(sum(r["seconds"] for r in rows), 1)}
    write_json(out / "results.json", results)
    print(f"study: {len(rows)} steps in {results['seconds']:.0f} s -> {out / 'study.csv'}")
    print("\n".join(f"- {x}" for x in lines) + f"\nreport: {out / 'report.md'}")
    return results


def finetune_line(r: dict) -> str:
    """One line of a finetune step's results: what was tuned and the refusal, over-refusal and NLL it moved."""
    what = {"safety": "safety neurons", "random": "random neurons of the safety set's shape", "all": "all weights",
            "lora": "LoRA"}.get(r.get("target"), str(r.get("target")))
    share = f" ({100 * r['trainable_share']:.2f}% of parameters)" if r.get("trainable_share") is not None else ""
    return (f"tuning {what}{share}, {r.get('steps')} steps: harmful refusal {r['before_harmful_refusal']:.2f} -> "
            f"{r['after_harmful_refusal']:.2f}, over-refusal {r['before_over_refusal']:.2f} -> "
            f"{r['after_over_refusal']:.2f}, utility NLL {r['before_utility_nll']:.3f} -> {r['after_utility_nll']:.3f}")


def step_lines(row: dict) -> list[str]:
    """What a finished step contributes to the study's summary: the summary lines of its report.md
    (a benchmark's), a finetune step's line, else nothing."""
    folder = Path(row["run_dir"]) if row.get("run_dir") else None
    if folder is not None and (folder / "report.md").exists():
        return [x[2:] for x in (folder / "report.md").read_text().splitlines() if x.startswith("- ")]
    if row["stage"] == "finetune" and "after_harmful_refusal" in row:
        return [finetune_line(row)]
    return []


def write_report(out: Path, rows: list[dict], cfg) -> list[str]:
    """The study's ``report.md``: the summary lines of its steps, the time of each step and every plot
    the steps wrote (linked from their folders). Returns the summary lines."""
    from hydra.core.hydra_config import HydraConfig

    exp = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    lines = [x for r in rows for x in step_lines(r)]
    total = sum(r["seconds"] for r in rows)
    text = [f"# Study: {exp or out.name}", "", f"Model {cfg.model.name}; {len(rows)} steps in {total:.0f} s.", "",
            "## Summary", "", *[f"- {x}" for x in lines], "", "## Steps", "",
            "| step | stage | overrides | seconds | folder |", "|---|---|---|---|---|"]
    text += [f"| {r['step']} | {r['stage']} | `{r['overrides']}` | {r['seconds']:.1f} | "
             + (f"[{Path(r['run_dir']).name}]({Path(r['run_dir']).name})" if r["run_dir"] else "reused") + " |"
             for r in rows]
    plots = [p.relative_to(out) for r in rows if r["run_dir"] for p in sorted(Path(r["run_dir"]).rglob("*.png"))
             if "wandb" not in p.parts]
    if plots:
        text += ["", "## Plots", "", *[f"![{p.stem}]({p.as_posix()})" for p in plots]]
    write_text(out / "report.md", "\n".join([*text, ""]))
    return lines

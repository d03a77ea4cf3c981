"""A W&B report comparing the runs of one sweep or experiment (one W&B group), built with
wandb-workspaces: attack success against the number of neurons switched off with the random band, attack
success against KL, and the tuning results by target, beside the runs table.

    python experiments/wandb_report.py --entity ME --project safety-neurons --group GROUP [--sweep DIR]

GROUP is what the runs were logged under (`logger.group`, else `<experiment>-<model>` or, for a
--multirun, `<experiment>-<model>-<sweep folder>`). It needs a W&B login (`wandb login` or
WANDB_API_KEY); offline runs can be synced first with `wandb sync DIR/wandb/offline-run-*`. Without a
login it says so and lists the local CSVs and plots of --sweep instead, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def logged_in() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def local_files(sweep: Path | None) -> list[Path]:
    """The tables and plots the runs wrote (what to look at without W&B)."""
    if sweep is None or not sweep.is_dir():
        return []
    pats = ("report.csv", "sweep.csv", "results.csv", "study.csv", "*.png")
    return sorted({p for pat in pats for p in sweep.rglob(pat)})


def build(entity: str | None, project: str, group: str):
    """The report (not saved): three panel grids over the runs of ``group``."""
    import wandb_workspaces.reports.v2 as wr

    def runs(name: str, job_type: str | None = None):
        flt = f"Group = '{group}'" + (f" and JobType = '{job_type}'" if job_type else "")
        return wr.Runset(entity=entity, project=project, name=name, filters=flt)

    band = ["safety/asr", "random/asr", "random/asr_min", "random/asr_max"]
    return wr.Report(
        entity=entity, project=project, title=f"safety-neurons: {group}",
        description="Deactivation and neuron-tuning runs of one sweep, compared (experiments/wandb_report.py).",
        blocks=[
            wr.H1(text="Deactivation: attack success against neurons switched off"),
            wr.P(text="The safety set's ASR against the random sets of the same shape: mean, min and max "
                      "over seeds (the band). x is the number of neurons switched off."),
            wr.PanelGrid(runsets=[runs("deactivate", "deactivate")], panels=[
                wr.LinePlot(title="ASR vs count (random band)", x="Step", y=band, title_x="neurons off",
                            title_y="attack success", log_x=True),
                wr.ScatterPlot(title="ASR vs KL", x="kl", y="asr"),
                wr.ScatterPlot(title="coherent ASR vs NLL ratio", x="nll_ratio", y="asr_coherent"),
            ]),
            wr.H1(text="Neuron tuning: refusal by target"),
            wr.PanelGrid(runsets=[runs("finetune", "finetune")], panels=[
                wr.BarPlot(title="refusal after tuning", metrics=["after_harmful_refusal"], groupby="target"),
                wr.BarPlot(title="over-refusal after tuning", metrics=["after_over_refusal"], groupby="target"),
                wr.ScatterPlot(title="refusal gain vs utility NLL", x="after_utility_nll", y="refusal_gain"),
            ]),
            wr.H1(text="All runs"),
            wr.PanelGrid(runsets=[runs("all")], panels=[
                wr.ParallelCoordinatesPlot(columns=[wr.ParallelCoordinatesPlotColumn(metric=m) for m in
                                                    ("n", "asr", "asr_coherent", "over_refusal", "kl")]),
            ]),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"))
    ap.add_argument("--project", default="safety-neurons")
    ap.add_argument("--group", required=True, help="the W&B group of the runs (logger.group)")
    ap.add_argument("--sweep", type=Path, help="the sweep's local folder, listed when W&B is not reachable")
    a = ap.parse_args(argv)
    if not logged_in():
        files = local_files(a.sweep)
        print("cannot build a W&B report: not logged in to W&B (or WANDB_MODE is offline); run `wandb login`"
              " and `wandb sync` the offline runs, or look at the local results:", file=sys.stderr)
        for f in files:
            print(f"  {f}", file=sys.stderr)
        if not files:
            print("  (pass --sweep DIR to list a sweep's report.csv and plots)", file=sys.stderr)
        return 2
    report = build(a.entity, a.project, a.group)
    report.save()
    print(f"W&B report: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

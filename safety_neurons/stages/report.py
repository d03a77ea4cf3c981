"""``stage=report``: one table (CSV) and plots for a sweep; also runs at the end of a --multirun."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io import write_csv
from ..report import gather_rows, plot_deactivation, plot_finetune
from .common import tracked


def latest_sweep(sweeps: Path, runs: Path, stage: str, model: str) -> Path:
    """The newest sweep of ``stage`` and ``model`` under ``sweeps`` (paths.sweeps), else its newest run
    folder under ``runs`` (paths.runs)."""
    base = sweeps / stage / model
    cands = sorted(p for p in base.glob("*") if p.is_dir()) if base.exists() else []
    if not cands:
        base = runs / stage / model
        cands = sorted(p for p in base.glob("*") if p.is_dir()) if base.exists() else []
    if not cands:
        raise UserError(f"no {stage} sweep for model {model} under {sweeps} or {runs}; pass report.dir=DIR")
    return cands[-1]


def build_report(src: Path, out: Path, of: str) -> tuple:
    df = gather_rows(src, of)
    write_csv(out / "report.csv", df)
    if of == "deactivate" and "n" in df:
        paths = plot_deactivation(df, out)
    elif of == "finetune" and "target" in df:
        paths = plot_finetune(df, out)
    else:
        paths = []
    return df, paths


def run(cfg) -> dict:
    rc = cfg.report
    src = Path(rc.dir) if rc.dir else latest_sweep(Path(cfg.paths.sweeps), Path(cfg.paths.runs), rc.of, cfg.model.name)
    with tracked(cfg) as (tr, box):
        df, paths = build_report(src, tr.dir, rc.of)
        tr.log_table("report", df)
        for p in paths:
            tr.log_image(p.stem, p)
        print(df.drop(columns=["run_dir"], errors="ignore").to_string(index=False))
        print(f"report of {src}: {len(df)} rows -> {tr.dir / 'report.csv'}")
        box["results"] = {"source": str(src), "rows": len(df), "report_csv": str(tr.dir / "report.csv"),
                          "plots": [str(p) for p in paths]}
    return box["results"]

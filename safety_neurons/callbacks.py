"""Hydra callback: after a --multirun of deactivate or finetune, gather the sweep into one report."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("safety_neurons")


class SweepReport(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        stage = config.stage.name
        if stage not in ("deactivate", "finetune"):
            return
        from .stages.report import build_report

        sweep = Path(config.hydra.sweep.dir)
        try:
            df, paths = build_report(sweep, sweep, stage)
            log.info("sweep report: %d rows -> %s", len(df), sweep / "report.csv")
            print(f"sweep report: {len(df)} rows -> {sweep / 'report.csv'}")
        except Exception as e:  # a report must never turn a finished sweep into a failure
            log.warning("could not build the sweep report: %s", e)

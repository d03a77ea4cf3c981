"""Run bookkeeping: run directory, results.json + CSV row, and W&B (rank 0 only, always finished)."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .io import write_csv, write_json, write_jsonl

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of the package's own code, shipped configs and shipped data (every .py, .c, .h, .yaml, .json,
    .jsonl and .safetensors file under it; not build outputs): what a result cached for reuse must have
    been computed with. Any edit, committed or not, changes it."""
    import hashlib

    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(p for ext in ("*.py", "*.c", "*.h", "*.yaml", "*.json", "*.jsonl", "*.safetensors") for p in root.rglob(ext)):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_version() -> str:
    try:
        from importlib.metadata import version

        v = version("safety-neurons")
    except Exception:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            v += f"+g{sha}" + (".dirty" if dirty else "")
    except Exception:
        pass
    return v


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def num_processes() -> int:
    """Ranks of this job (torchrun's WORLD_SIZE, which ``accelerate launch`` sets; 1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def asked_processes() -> int | None:
    """The ``--num_processes`` an ``accelerate launch`` parent was given, read from its command line
    (Linux), or None. ``accelerate launch --cpu --num_processes 2`` starts one process and passes the
    number on to nobody, so this is the only place it can be seen."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in a for a in argv[:3]):
        return None
    for i, a in enumerate(argv):
        if a.startswith(("--num_processes=", "--num-processes=")):
            v = a.split("=", 1)[1]
        elif a in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            v = argv[i + 1]
        else:
            continue
        return int(v) if v.isdigit() else None
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and not all(isinstance(x, (int, float, str, bool)) for x in v):
            continue
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(list(v))
    return out


def run_group(cfg) -> str:
    """The W&B group of a run, so that the runs of one experiment compare in one table: ``logger.group``,
    else (in a Hydra run) the experiment and, for a sweep, its folder, else ``<stage>-<model>``."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        exp = hc.runtime.choices.get("experiment")
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return f"{exp or cfg.stage.name}-{cfg.model.name}-{Path(hc.sweep.dir).name}"
        if exp:
            return f"{exp}-{cfg.model.name}"
    return f"{cfg.stage.name}-{cfg.model.name}"


class Tracker:
    """Everything a run writes. Side effects happen on the main process only."""

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.main = is_main_process()
        self.wandb = None
        self.t0 = time.time()
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_cfg = OmegaConf.to_yaml(cfg, resolve=True)
            (self.dir / "config.yaml").write_text(write_text_cfg)
        if self.main and cfg.logger.name == "wandb":
            self._start_wandb()

    def _start_wandb(self) -> None:
        import wandb

        lc = self.cfg.logger
        mode = lc.mode or os.environ.get("WANDB_MODE")
        if mode is None:
            logged_in = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() and \
                "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
            mode = "online" if logged_in else "offline"
        self.wandb = wandb.init(
            project=lc.project, entity=lc.entity, mode=mode, dir=str(self.dir),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            name=f"{self.cfg.stage.name}-{self.cfg.model.name}-{self.dir.name}",
            group=run_group(self.cfg), job_type=str(self.cfg.stage.name), tags=list(lc.tags),
            reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}, step=step)

    def log_table(self, name: str, df: pd.DataFrame) -> None:
        if self.wandb is not None:
            import wandb

            # W&B types a column by its first value: a column mixing types (a "total" row under layer
            # numbers) is logged as text
            mixed = [c for c in df.columns if df[c].dtype == object and len({type(v) for v in df[c]}) > 1]
            self.wandb.log({name: wandb.Table(dataframe=df.astype({c: str for c in mixed}))})

    def log_image(self, name: str, path: str | Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))})

    def save_generations(self, rows: list[dict], name: str = "generations.jsonl") -> None:
        """The generations as JSONL in the run folder and, with W&B, as a table (prompt, answer, its set
        and attack, and the refusal and degeneration flags) to filter in the UI."""
        if self.main:
            write_jsonl(self.dir / name, rows)
        if self.wandb is not None and rows:
            cols = ["tag", "set", "attack", "template", "prompt", "answer", "refusal", "degenerate", "judge_harmful",
                    "n", "seed", "label"]
            df = pd.DataFrame(rows)
            df = df[[c for c in cols if c in df]]
            self.log_table(Path(name).stem, df.astype({c: str for c in df if df[c].dtype == object}))

    def finish(self, results: dict | None, error: BaseException | None = None) -> None:
        """Write results.json and results.csv (one row); always close W&B."""
        try:
            if self.main and results is not None:
                results = {"processes": num_processes(), **results, "stage": self.cfg.stage.name,
                           "model": self.cfg.model.name,
                           "run_dir": str(self.dir), "seconds": round(time.time() - self.t0, 1),
                           "code_version": code_version()}
                write_json(self.dir / "results.json", results)
                row = {k: v for k, v in flatten(results).items()}
                write_csv(self.dir / "results.csv", pd.DataFrame([row]))
                if self.wandb is not None:
                    self.wandb.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))})
        finally:
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if error else 0)
                self.wandb = None

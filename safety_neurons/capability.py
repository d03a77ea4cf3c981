"""Capability benchmarks through lm-evaluation-harness (``eval.capability``).

The model being measured is wrapped as it is in memory (``HFLM(pretrained=model)``) and evaluated inside
the same context as every other measure, so deactivation hooks are active and a tuned model is the tuned
one. ``sn_mc`` is a small multiple-choice set written for this project (safety_neurons/data/
capability_mc.jsonl), so a capability number exists offline; ``mmlu``, ``arc_challenge``, ``gsm8k`` and
any other lm-eval task come from the Hugging Face hub. Scores are lm-eval's (log-likelihood of each
choice on the raw text, no chat template), so they compare with published lm-eval numbers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .errors import UserError
from .hub import offline

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data" / "capability_mc.jsonl"
OWN = "sn_mc"  # the offline task
PRESETS = ("sn_mc", "mmlu", "arc_challenge", "gsm8k")


def own_task() -> dict:
    """The lm-eval task config of ``sn_mc``: four-way multiple choice over the shipped JSONL."""
    return {
        "task": OWN,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.capability needs lm-evaluation-harness: pip install 'safety-neurons[eval]' "
                        "(make venv installs it)") from None
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...]):
    """lm-eval's task index (seconds to build: it reads every task YAML), built once per process and
    include path list, so a sweep's evaluators share it."""
    TaskManager = _import_lm_eval()[2]
    return TaskManager(include_path=list(include) or None, verbosity="ERROR")


def task_specs(names, include: list[str], manager) -> list:
    """lm-eval task specs for ``eval.capability``: ``sn_mc`` as its config dict, the rest by name; an
    unknown name, or a hub task while ``HF_HUB_OFFLINE`` is set, is one clear error before any work."""
    specs, local = [], set()
    for d in include:
        local |= {p.stem for p in Path(d).expanduser().rglob("*.yaml")}
    for name in [str(n) for n in names]:
        if name == OWN:
            specs.append(own_task())
            continue
        if name not in manager.all_tasks:
            raise UserError(f"eval.capability names {name!r}, which lm-eval does not know; use {', '.join(PRESETS)}, "
                            f"another lm-eval task, or a task YAML in eval.capability_include=[DIR]")
        if offline() and name not in local:
            raise UserError(f"eval.capability={name} downloads its data from the Hugging Face hub, but "
                            f"HF_HUB_OFFLINE=1; run where the hub is reachable with HF_HUB_OFFLINE=0, or use "
                            f"the offline task eval.capability=[{OWN}]")
        specs.append(name)
    return specs


def columns(results: dict) -> dict:
    """``cap_<task>_<metric>`` for every metric lm-eval reported (stderr and filter names left out)."""
    out = {}
    for task, res in results.items():
        for key, value in res.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            out[f"cap_{task}_{'n' if metric == 'sample_len' else metric}"] = float(value)
    return out


class Capability:
    """lm-eval over ``ecfg.capability`` for any model handed to :meth:`measure` (the tasks are built once)."""

    def __init__(self, ecfg, tok):
        self.names = [str(n) for n in ecfg.capability]
        self.tok = tok
        self.limit = ecfg.capability_limit
        self.batch_size = ecfg.capability_batch_size
        lm_eval, self.HFLM, _ = _import_lm_eval()
        self.evaluate_fn = lm_eval.simple_evaluate
        include = [str(Path(d).expanduser()) for d in (ecfg.capability_include or [])]
        for d in include:
            if not Path(d).is_dir():
                raise UserError(f"eval.capability_include names {d}, which is not a folder of lm-eval task YAMLs")
        self.manager = task_manager(tuple(include))
        self.specs = task_specs(self.names, include, self.manager)

    def measure(self, model, context: Callable = nullcontext) -> dict:
        """The capability columns of ``model`` run inside ``context()``."""
        lm = self.HFLM(pretrained=model, tokenizer=self.tok, batch_size=self.batch_size,
                       device=str(next(model.parameters()).device))
        with context():
            try:
                out = self.evaluate_fn(model=lm, tasks=list(self.specs), limit=self.limit, task_manager=self.manager,
                                       log_samples=False, bootstrap_iters=0, verbosity="ERROR")
            except ConnectionError as e:
                raise UserError(f"eval.capability={self.names} could not download its data ({e}); run where "
                                f"the Hugging Face hub is reachable, or use eval.capability=[{OWN}]") from None
        cols = columns(out["results"])
        cols["capability_limit"] = self.limit
        return cols

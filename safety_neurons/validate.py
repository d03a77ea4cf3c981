"""``validate(cfg)``: the whole config and every input file checked before any model is loaded, so bad
input fails in the first second with one line naming the key, the value and what is allowed.

Only what can be judged from the config and the files themselves is checked here; what needs the
model (a count larger than a layer's width, a set made for another architecture) is checked by the
stage once the model is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from .autobatch import check as check_batch
from .autobatch import is_auto
from .errors import UserError
from .neurons import is_path

DEVICES = ("auto", "cpu", "cuda", "mps")
# stages that read or write the store (its cache and artifacts)
STORE_STAGES = ("evaluate", "finetune", "detect", "select", "compare", "deactivate", "plant", "benchmark", "search", "claims")


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _int(cfg, key: str, low: int, none_ok: bool = False) -> None:
    v = _get(cfg, key)
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        allowed = f"an integer >= {low}" + (" or null" if none_ok else "")
        raise UserError(f"{key}={v!r} is not allowed; use {allowed}")


def _float(cfg, key: str, low: float, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> None:
    v = _get(cfg, key)
    bad = isinstance(v, bool) or not isinstance(v, (int, float))
    if not bad:
        bad = v < low or (low_open and v == low) or (high is not None and (v > high or (high_open and v == high)))
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        rng = f"{lo}{low:g}, {high:g}{hi}" if high is not None else f"{'>' if low_open else '>='} {low:g}"
        raise UserError(f"{key}={v!r} is not allowed; use a number in {rng}" if high is not None
                        else f"{key}={v!r} is not allowed; use a number {rng}")


def check_counts(n) -> None:
    """``deactivate.n``: a count >= 0, ``all``, or a non-empty list of these (no fractions, no booleans)."""
    vals = list(n) if isinstance(n, (list, tuple)) or OmegaConf.is_list(n) else [n]
    ok = bool(vals) and all((isinstance(v, str) and v.strip().lower() == "all")
                            or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in vals)
    if not ok:
        shown = OmegaConf.to_container(n) if OmegaConf.is_list(n) else n
        raise UserError(f"deactivate.n={shown!r} is not allowed; use a count >= 0, all, or a non-empty list of "
                        f"these (e.g. deactivate.n=[0,10,100])")


def check_topk(cfg) -> None:
    for key in ("topk.attn", "topk.ffn"):
        v = _get(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (v >= 1 and v != int(v)):
            raise UserError(f"{key}={v!r} is not allowed; use a share of the width in (0, 1) or a whole count >= 1 "
                            f"(1 and 1.0 both mean one neuron)")
    _float(cfg, "topk.consistency", 0, 1, low_open=True)


def check_device(device: str) -> None:
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise UserError(f"unknown device={device!r}; use one of {', '.join(DEVICES)} (cuda:N for one GPU)")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={device} but this machine has no usable CUDA GPU; use device=cpu or device=auto")


def check_model_path(path) -> None:
    """model.path: an HF folder whose config.json is a JSON object with a model_type, or a GGUF file."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserError(f"model.path={path} does not exist; give an HF model folder or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"model.path={path} is a file but not a .gguf; give an HF model folder or a .gguf file")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(f"model.path={path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return
    conf = p / "config.json"
    if not conf.exists():
        raise UserError(f"model.path={path} has no config.json; give an HF model folder or .gguf")
    try:
        obj = json.loads(conf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{conf} is not valid JSON ({str(e).splitlines()[0]}); restore the model folder") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise UserError(f"{conf} has no model_type; it is not a transformers model config")


def check_store(store_dir) -> None:
    """The store folder (or the nearest existing folder above it) must be writable."""
    p = Path(str(store_dir)).expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"store_dir={store_dir} is not writable ({p}); set store_dir=A_WRITABLE_FOLDER or "
                        f"SAFETY_NEURONS_STORE")


def check_files(cfg) -> None:
    for key in ("dataset.path", "harmless.path", "reference.path", "means.path", "contrast.path"):
        v = _get(cfg, key)
        if v and not Path(str(v)).expanduser().exists():
            raise UserError(f"{key}={v} does not exist; give the prompt file or folder")
    for key in ("deactivate.neurons", "finetune.neurons", "detect.scores"):
        v = _get(cfg, key)
        if not v or not is_path(str(v)):  # a store tag or latest: looked up when the stage runs
            continue
        if not Path(str(v)).expanduser().exists():
            raise UserError(f"{key}={v} does not exist; give a neurons.json, its folder, released files or a store tag")
        from .neurons import resolve_set_path

        p = resolve_set_path(Path(str(v)).expanduser())
        if not p.exists():
            raise UserError(f"{key}={v} points at the set {p}, which does not exist (moved or removed from the store)")
        if p.suffix == ".json" or (p / "neurons.json").exists():
            from .neurons import NeuronSet

            NeuronSet.load(p)  # its indices are checked as it loads


def validate(cfg) -> None:
    """Check the whole config and every input file; raises a one-line UserError on the first problem."""
    stage = _get(cfg, "stage.name")
    if OmegaConf.is_missing(cfg.model, "name"):  # model=base_model is the schema every preset fills in
        from .cfg import CONF_DIR

        presets = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
        raise UserError(f"model has no name (model=base_model is the bare schema, not a model); use a preset "
                        f"({', '.join(presets)}) or model=local model.path=DIR")
    if is_auto(_get(cfg, "finetune.batch_size")):
        raise UserError("finetune.batch_size=auto is not allowed: it is the optimizer's batch and changes the result; "
                        "set finetune.forward_batch=auto to fit a micro-batch in memory with the same gradient")
    for key in ("finetune.steps", "finetune.batch_size", "finetune.grad_accum", "finetune.lora_r",
                "finetune.max_new_tokens_distill", "detect.last_m", "detect.target_tokens",
                "eval.max_new_tokens", "eval.judge_batch_size", "model.max_length"):
        _int(cfg, key, 1)
    for key in ("detect.batch_size", "eval.batch_size", "finetune.forward_batch"):
        check_batch(key, _get(cfg, key), none_ok=key == "finetune.forward_batch")
    for key in ("eval.n_harmful", "eval.n_harmless", "finetune.n_harmful", "finetune.n_harmless",
                "dataset.n_train", "dataset.n_eval", "harmless.n_train", "harmless.n_eval", "detect.n_reference"):
        _int(cfg, key, 0, none_ok=True)
    for key in ("finetune.top_n", "finetune.cap_per_matrix"):
        _int(cfg, key, 1, none_ok=True)
    _float(cfg, "finetune.lr", 0, low_open=True)
    _float(cfg, "finetune.weight_decay", 0)
    _float(cfg, "finetune.warmup", 0, 1)
    _float(cfg, "finetune.clip", 0)
    _float(cfg, "dataset.eval_fraction", 0, 1, high_open=True)
    check_topk(cfg)
    check_counts(_get(cfg, "deactivate.n"))
    check_device(_get(cfg, "device"))
    if _get(cfg, "model.path"):
        check_model_path(_get(cfg, "model.path"))
    check_files(cfg)
    if stage in STORE_STAGES:
        check_store(_get(cfg, "store_dir"))

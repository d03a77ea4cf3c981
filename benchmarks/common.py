"""Shared set-up for the benchmarks: the embedded SmolLM2 (converted once into the store)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def smollm2():
    from safety_neurons.cfg import compose
    from safety_neurons.io import Store
    from safety_neurons.models import load_model

    cfg = compose(["model=smollm2", "logger=none", f"run_dir={ROOT / 'outputs' / 'bench'}"])
    model, tok, ad = load_model(cfg.model, Store(cfg.store_dir), cfg.device)
    return cfg, model, tok, ad


def harmful_prompts(cfg, n: int) -> list[str]:
    from safety_neurons.data import harmful_set

    return harmful_set(cfg, "train").prompts[:n]


def _sync():
    import torch

    if torch.cuda.is_available():  # GPU work is asynchronous: time it once it has finished
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        _sync()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        _sync()
        self.s = time.perf_counter() - self.t

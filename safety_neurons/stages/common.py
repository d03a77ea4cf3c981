"""What every stage shares: store, tracker, model and prompt sets."""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from ..data import PromptSet, load_prompts
from ..io import Store
from ..models import load_model
from ..tracking import Tracker

log = logging.getLogger("safety_neurons")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def store_of(cfg) -> Store:
    return Store(cfg.store_dir)


def cache_dir(cfg):
    return store_of(cfg).root / "cache"


def harmful_set(cfg, split: str) -> PromptSet:
    return load_prompts(cfg.dataset, split, cache_dir(cfg))


def harmless_set(cfg, split: str) -> PromptSet:
    return load_prompts(cfg.harmless, split, cache_dir(cfg))


def load(cfg):
    """(model, tokenizer, adapter) of ``cfg.model``."""
    return load_model(cfg.model, store_of(cfg), cfg.device)


@contextlib.contextmanager
def tracked(cfg):
    """A Tracker that always finishes (W&B closed also on errors, so a multirun continues)."""
    seed_everything(cfg.seed)
    tr = Tracker(cfg, cfg.run_dir)
    box: dict = {"results": None}
    try:
        yield tr, box
    except BaseException as e:
        tr.finish(None, e)
        raise
    else:
        tr.finish(box["results"])

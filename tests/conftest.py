"""Shared fixtures: tiny random models of all six families and a tiny offline chat tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning threads make a
# 2-layer forward 40x slower; subprocesses (CLI, accelerate launch) inherit this too
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.builders import HARMLESS, stage_files  # noqa: E402
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family):
    torch.manual_seed(0)
    return tiny_model(family)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A saved tiny llama with HarmBench-shaped and harmless prompt files, one per test module (the stage
    tests write their store into it)."""
    return stage_files(tmp_path_factory.mktemp("stages"), 4, 4, HARMLESS)

"""The published configs of the models behind the presets (``data/architectures.json``), built into
transformers configs offline: ``stage=plan`` counts and sizes the full models on the ``meta`` device,
and the tests build shape-faithful miniatures from the same values."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import UserError

FILE = Path(__file__).parent / "data" / "architectures.json"


@lru_cache(maxsize=1)
def published() -> dict[str, dict]:
    """hub id -> the model's config.json values (a copy is the caller's to change)."""
    return {k: v for k, v in json.loads(FILE.read_text()).items() if not k.startswith("_")}


def config_from_dict(values: dict):
    """A transformers config from config.json values (legacy keys such as rope_scaling and rope_theta
    are converted by transformers itself, as when it reads the file)."""
    from transformers import AutoConfig

    v = dict(values)
    mt = v.pop("model_type")
    return AutoConfig.for_model(mt, **v)


def known_config(hub_id: str | None):
    """The published config of ``hub_id`` as a transformers config, or None when it is not known here."""
    values = published().get(hub_id) if hub_id else None
    return None if values is None else config_from_dict(values)


def meta_model(config):
    """The full model of ``config`` on the meta device: every parameter's shape, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def config_of(mcfg):
    """The config of a model preset without its weights: a local folder's config.json, else the
    published config of its hub id (offline), else a UserError."""
    from transformers import AutoConfig

    if mcfg.path:
        p = Path(mcfg.path).expanduser()
        if (p / "config.json").exists():
            return AutoConfig.from_pretrained(p)
    cfg = known_config(mcfg.hub_id)
    if cfg is None:
        known = ", ".join(sorted(published()))
        raise UserError(f"model.hub_id={mcfg.hub_id!r} has no config known offline; give model.path=DIR (a folder "
                        f"with config.json) or one of: {known}")
    return cfg

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


def config_of(mcfg, gguf_dir=None):
    """The config of a model preset without its weights: a local folder's config.json, a GGUF file's
    metadata (``model.path=*.gguf`` or a preset that ships one; a split GGUF is joined into ``gguf_dir``),
    a recipe-made model's base model (fine-tuning keeps the shapes), else the published config of its hub
    id (offline), else a UserError."""
    from transformers import AutoConfig

    if mcfg.path:
        p = Path(mcfg.path).expanduser()
        if (p / "config.json").exists():
            return AutoConfig.from_pretrained(p)
        if p.suffix == ".gguf" and p.is_file():
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    if mcfg.organism and not mcfg.hub_id:
        from .cfg import model_config
        from .organism import recipe_base

        if (base := recipe_base(mcfg.organism)) is not None:
            return config_of(model_config(base), gguf_dir)
    if mcfg.gguf_package:
        from .models import find_gguf

        g = find_gguf(mcfg.gguf_package, mcfg.gguf_file, gguf_dir)
        return AutoConfig.from_pretrained(g.parent, gguf_file=g.name)
    cfg = known_config(mcfg.hub_id)
    if cfg is None:
        known = ", ".join(sorted(published()))
        raise UserError(f"model.hub_id={mcfg.hub_id!r} has no config known offline; give model.path=DIR (a folder "
                        f"with config.json or a .gguf file) or one of: {known}")
    return cfg

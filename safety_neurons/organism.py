"""Recipe-made models (the refusing model organism): their recipes, fingerprints and provenance file.

A recipe is a list of config overrides whose stage (``experiment=align``: fine-tuning) writes the model
into the store. Building one is a stage-layer step (``stages.common.build_missing``); this module only
knows recipes and reads or writes ``organism.json``, the provenance every tuned model folder carries:
the fingerprint of the recipe that made it (its fine-tuning settings and the hashes of its training
prompts), so that reusing a model made by another recipe says so.

It imports config and data only, never a stage or the model loader."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .data import harmful_set, harmless_set
from .errors import UserError
from .io import Store, sha256_of

log = logging.getLogger("safety_neurons")

RECIPES = {"smollm2-refusing": ["experiment=align", "model=smollm2", "finetune.save_as=smollm2-refusing"]}

PROVENANCE = "organism.json"  # in a tuned model's folder


def recipe_fingerprint(cfg) -> str:
    """What a fine-tuned model depends on: base model, fine-tuning settings, training prompts (hashes).

    ``finetune.pack`` is left out: packed and padded steps compute the same updates up to float
    rounding, and organisms cached before the setting existed keep their hash."""
    from omegaconf import OmegaConf

    f = cfg.finetune
    settings = OmegaConf.to_container(f, resolve=True)
    settings.pop("overwrite", None)
    settings.pop("pack", None)
    harmless = harmless_set(cfg, "train").head(f.n_harmless).hash if f.n_harmless != 0 else None
    what = {"base": cfg.model.name, "system_prompt": cfg.model.system_prompt, "finetune": settings,
            "harmful": harmful_set(cfg, "train").head(f.n_harmful).hash, "harmless": harmless,
            "form_matched": list(cfg.eval.form_matched), "seed": cfg.seed}
    return sha256_of(what)


def recipe_config(name: str, store: Store):
    """The composed config whose stage builds the recipe-made model ``name`` into ``store``."""
    from .cfg import compose

    if name not in RECIPES:
        raise UserError(f"no recipe for organism {name!r}; known: {', '.join(RECIPES)}")
    run_dir = store.root / "organism-runs" / name
    return compose(RECIPES[name] + [f"store_dir={store.root}", f"run_dir={run_dir}", "logger=none"])


_compose = recipe_config  # the older private name


def is_built(store: Store, name: str) -> bool:
    return (store.model_dir(name) / "config.json").exists()


# ------------------------------------------------------------------------------ organism.json
def provenance(cfg, results: dict) -> dict:
    """The ``organism.json`` of a model fine-tuned by ``cfg``: its recipe's fingerprint, the base model's
    config (so evaluation can show the base beside it), the fine-tuning settings and results."""
    from omegaconf import OmegaConf

    return {"recipe_hash": recipe_fingerprint(cfg), "base_model": OmegaConf.to_container(cfg.model, resolve=True),
            "finetune": OmegaConf.to_container(cfg.finetune, resolve=True), "results": results,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_provenance(model_dir: str | Path) -> dict | None:
    """A model folder's ``organism.json``, or None when it has none."""
    f = Path(model_dir) / PROVENANCE
    return json.loads(f.read_text()) if f.exists() else None


def recipe_base(name: str) -> str | None:
    """The model preset the recipe ``name`` fine-tunes (its ``model=`` override), None for no recipe."""
    base = [o.split("=", 1)[1] for o in RECIPES.get(name, []) if o.startswith("model=")]
    return base[-1] if base else None


def base_model_of(store: Store, name: str) -> dict | None:
    """The config of the model that the store model ``name`` was fine-tuned from, if it records one."""
    prov = read_provenance(store.model_dir(name))
    return prov["base_model"] if prov is not None else None


def check_organism(name: str, store: Store) -> str | None:
    """Warn when the cached organism was not made by the current recipe; returns the warning, if any."""
    if name not in RECIPES:
        return None
    d = store.model_dir(name)
    try:
        made = (read_provenance(d) or {}).get("recipe_hash")
    except (OSError, ValueError):
        made = None
    now = recipe_fingerprint(recipe_config(name, store))
    if made == now:
        return None
    msg = (f"the cached model organism {name} in {d} was made by {'another recipe' if made else 'an unrecorded recipe'}"
           f" (recipe hash {made or 'none'}, current recipe {now}: fine-tuning settings or training prompts "
           f"changed); it is used as it is. To rebuild it from the current recipe, move that folder away "
           f"(results and neuron sets found on the old one stay valid for the old one)")
    log.warning(msg)
    print(f"warning: {msg}", file=sys.stderr)
    return msg

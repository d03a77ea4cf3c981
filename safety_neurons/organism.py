"""The refusing model organism: built on first use from the ``experiment=align`` recipe, cached.

A cached organism records the fingerprint of the recipe that made it (its fine-tuning settings and the
hashes of its training prompts); when the recipe or the prompt files change, reusing it says so."""

from __future__ import annotations

import json
import logging
import sys

from .io import Store, sha256_of

log = logging.getLogger("safety_neurons")

RECIPES = {"smollm2-refusing": ["experiment=align", "model=smollm2", "finetune.save_as=smollm2-refusing"]}


def recipe_fingerprint(cfg) -> str:
    """What a fine-tuned model depends on: base model, fine-tuning settings, training prompts (hashes).

    ``finetune.pack`` is left out: packed and padded steps compute the same updates up to float
    rounding, and organisms cached before the setting existed keep their hash."""
    from omegaconf import OmegaConf

    from .stages.common import harmful_set, harmless_set

    f = cfg.finetune
    settings = OmegaConf.to_container(f, resolve=True)
    settings.pop("overwrite", None)
    settings.pop("pack", None)
    harmless = harmless_set(cfg, "train").head(f.n_harmless).hash if f.n_harmless != 0 else None
    what = {"base": cfg.model.name, "system_prompt": cfg.model.system_prompt, "finetune": settings,
            "harmful": harmful_set(cfg, "train").head(f.n_harmful).hash, "harmless": harmless,
            "form_matched": list(cfg.eval.form_matched), "seed": cfg.seed}
    return sha256_of(what)


def _compose(name: str, store: Store):
    from .cfg import compose
    from .errors import UserError

    if name not in RECIPES:
        raise UserError(f"no recipe for organism {name!r}; known: {', '.join(RECIPES)}")
    run_dir = store.root / "organism-runs" / name
    return compose(RECIPES[name] + [f"store_dir={store.root}", f"run_dir={run_dir}", "logger=none"])


def build_organism(name: str, store: Store) -> None:
    from .stages import finetune

    cfg = _compose(name, store)
    log.info("building the model organism %s (once; cached in %s)", name, store.model_dir(name))
    print(f"building the refusing model organism {name} (first use; cached afterwards)")
    finetune.run(cfg)


def check_organism(name: str, store: Store) -> str | None:
    """Warn when the cached organism was not made by the current recipe; returns the warning, if any."""
    if name not in RECIPES:
        return None
    d = store.model_dir(name)
    try:
        made = json.loads((d / "organism.json").read_text()).get("recipe_hash")
    except (OSError, ValueError):
        made = None
    now = recipe_fingerprint(_compose(name, store))
    if made == now:
        return None
    msg = (f"the cached model organism {name} in {d} was made by {'another recipe' if made else 'an unrecorded recipe'}"
           f" (recipe hash {made or 'none'}, current recipe {now}: fine-tuning settings or training prompts "
           f"changed); it is used as it is. To rebuild it from the current recipe, move that folder away "
           f"(results and neuron sets found on the old one stay valid for the old one)")
    log.warning(msg)
    print(f"warning: {msg}", file=sys.stderr)
    return msg

"""The refusing model organism: built on first use from the ``experiment=align`` recipe, cached."""

from __future__ import annotations

import logging

from .io import Store

log = logging.getLogger("safety_neurons")

RECIPES = {"smollm2-refusing": ["experiment=align", "model=smollm2", "finetune.save_as=smollm2-refusing"]}


def build_organism(name: str, store: Store) -> None:
    from .cfg import compose
    from .errors import UserError
    from .stages import finetune

    if name not in RECIPES:
        raise UserError(f"no recipe for organism {name!r}; known: {', '.join(RECIPES)}")
    log.info("building the model organism %s (once; cached in %s)", name, store.model_dir(name))
    print(f"building the refusing model organism {name} (first use; cached afterwards)")
    run_dir = store.root / "organism-runs" / name
    cfg = compose(RECIPES[name] + [f"store_dir={store.root}", f"run_dir={run_dir}", "logger=none"])
    finetune.run(cfg)

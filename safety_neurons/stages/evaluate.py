"""``stage=evaluate``: attack success, over-refusal and utility of a model (METHOD 7).

For a pipeline-made organism the base model it came from is evaluated beside it, so the table shows
what the safety training changed.
"""

from __future__ import annotations

import pandas as pd

from ..io import write_csv
from ..organism import base_model_of
from .common import evaluator, harmful_set, harmless_set, load, log, store_of, tracked


def run(cfg) -> dict:
    with tracked(cfg) as (tr, box):
        model, tok, ad = load(cfg)
        harmful, harmless = harmful_set(cfg, "eval"), harmless_set(cfg, "eval")
        rows, gens = [], []
        made_from = base_model_of(store_of(cfg), cfg.model.organism) if cfg.model.organism else None
        base_model = None
        if made_from is not None:
            from omegaconf import OmegaConf

            from ..models import load_model

            base_cfg = OmegaConf.create(made_from)
            base_model, _, _ = load_model(base_cfg, store_of(cfg), cfg.device)
        ref = base_model if base_model is not None else model
        ev = evaluator(cfg, ref, tok, harmful, harmless)
        if base_model is not None:
            m, g = ev.evaluate(base_model, tag="base")
            rows.append({"model": base_cfg.name, **m})
            gens += [{**x, "model": base_cfg.name} for x in g]
        m, g = ev.evaluate(model, tag=cfg.model.name)
        rows.append({"model": cfg.model.name, **m})
        gens += [{**x, "model": cfg.model.name} for x in g]
        df = pd.DataFrame(rows)
        cols = ["model", "asr", "asr_prefill", "asr_templates", "asr_templates_any", "harmful_refusal", "over_refusal", "over_refusal_natural", "over_refusal_form_matched",
                "utility_nll", "kl", "degenerate_share", "breaks_model", "refusal_list"]
        cols += [c for c in df if c.startswith(("cap_", "over_refusal_")) and c not in cols and not c.endswith("_n")]
        table = df[[c for c in cols if c in df]]
        log.info("evaluation (harmful n=%d, harmless n=%d):\n%s", len(ev.harmful), len(ev.harmless),
                 table.to_string(index=False))
        print(table.to_string(index=False))
        if tr.main:
            write_csv(tr.dir / "table.csv", df)
        tr.save_generations(gens)
        tr.log_table("evaluation", table)
        tr.log(rows[-1])
        box["results"] = {**rows[-1], "rows": rows, "harmful_set": ev.harmful.describe(),
                          "harmless_set": ev.harmless.describe()}  # the evaluated (capped) sets
    return box["results"]

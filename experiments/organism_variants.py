"""Train one organism variant from SmolLM2 as shipped and measure refusal on the whole held-out sets
(41 harmful; harmless split into natural and form-matched), without saving the model: the quick
loop for checking a recipe variant on the CPU (docs/organism.md).

usage: python experiments/organism_variants.py NAME [hydra overrides on top of experiment=align]
e.g.   python experiments/organism_variants.py D finetune.form_matched_repeat=1
Writes outputs/organism-variants/NAME.json (numbers and the refused harmless prompts)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))


def main(name: str, overrides: list[str]) -> None:
    import torch
    from organism_sweep import measure

    from safety_neurons.cfg import compose
    from safety_neurons.io import Store, write_json
    from safety_neurons.models import load_model
    from safety_neurons.sft_data import training_pairs
    from safety_neurons.training import train_sft

    cfg = compose(["experiment=align", "logger=none", *overrides])
    torch.manual_seed(cfg.seed)
    model, tok, _ = load_model(cfg.model, Store(cfg.store_dir), cfg.device)
    prompts, responses, _ = training_pairs(cfg, model, tok)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    t0 = time.time()
    train_sft(model, tok, prompts, responses, cfg.finetune, cfg.model.system_prompt, params,
              max_length=cfg.model.max_length)
    res = {"name": name, "overrides": overrides, "pairs": len(prompts), "train_seconds": round(time.time() - t0, 1)}
    res.update(measure(model, tok, cfg, gen_batch=16))
    print(json.dumps({k: v for k, v in res.items() if k != "refused_harmless"}))
    write_json(ROOT / "outputs" / "organism-variants" / f"{name}.json", res)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

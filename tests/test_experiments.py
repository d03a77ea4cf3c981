"""The recipe-sweep script's parts that need no model: its variants file and its token count."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from safety_neurons.data import encode
from tests.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def sweep_module():
    spec = importlib.util.spec_from_file_location("organism_sweep", ROOT / "experiments" / "organism_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_file(tmp_path):
    mod = sweep_module()
    f = tmp_path / "v.txt"
    f.write_text("# a comment\nN\n\nlr finetune.lr=1e-4  finetune.seed=1 # why\n")
    assert mod.read_variants(str(f)) == [("N", []), ("lr", ["finetune.lr=1e-4", "finetune.seed=1"])]
    f.write_text("# nothing but comments\n")
    with pytest.raises(SystemExit, match="no variants"):
        mod.read_variants(str(f))
    # the committed list (both calls of the sweep in docs/organism.md) parses into overrides of the config
    committed = mod.read_variants(str(ROOT / "experiments" / "organism_sweep_variants.txt"))
    assert len(committed) == 38 and all(o.startswith("finetune.") and "=" in o for _, ov in committed for o in ov)


def test_padded_tokens_counts_the_batches_train_sft_draws():
    """Padded and real tokens of the recipe's batches, against a recount with the same seeded order."""
    import random

    mod = sweep_module()
    tok = tiny_tokenizer()
    prompts = ["a", "bb bb", "ccc ccc ccc", "d"]
    responses = ["x", "yy yy", "z", "w w w w"]
    f = SimpleNamespace(seed=3, steps=5, grad_accum=1, batch_size=3)
    cfg = SimpleNamespace(finetune=f, model=SimpleNamespace(system_prompt=None, max_length=512))
    padded, real = mod.padded_tokens(tok, prompts, responses, cfg)
    rng, order, want_p, want_r = random.Random(3), [], 0, 0
    for _ in range(5):
        while len(order) < 3:
            perm = list(range(4))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:3], order[3:]
        rows = [len(encode(tok, [prompts[i]], None, [responses[i]]).input_ids[0]) for i in idx]
        want_p += 3 * max(rows)
        want_r += sum(rows)
    assert (padded, real) == (want_p, want_r)
    assert padded > real  # these rows differ in length

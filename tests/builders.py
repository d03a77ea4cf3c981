"""Helpers the tests share: prompt files in the shapes the loaders read, a saved tiny model with its
prompt files for the stage tests, and tiny float64 models for the exact importance comparisons.

Fixtures built from these live in conftest.py; test modules never import from each other."""

from __future__ import annotations

import csv
import json

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from safety_neurons.models import ModelAdapter
from tests.tiny import tiny_model, tiny_tokenizer

HB_COLUMNS = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]


def write_harmbench(folder, n_test=6, n_val=4):
    """HarmBench-shaped CSVs: standard rows plus contextual/copyright rows that the filter drops."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("test", n_test), ("val", n_val)):
        rows = []
        for i in range(n):
            rows.append({"Behavior": f"{name} standard behaviour {i}", "FunctionalCategory": "standard",
                         "SemanticCategory": "illegal", "Tags": "", "ContextString": "", "BehaviorID": f"{name}_s{i}"})
            rows.append({"Behavior": f"{name} contextual behaviour {i}", "FunctionalCategory": "contextual",
                         "SemanticCategory": "illegal", "Tags": "context", "ContextString": "some, context",
                         "BehaviorID": f"{name}_c{i}"})
        rows.append({"Behavior": 'Generate the lyrics of "Song"', "FunctionalCategory": "copyright",
                     "SemanticCategory": "copyright", "Tags": "lyrics, hash_check", "ContextString": "",
                     "BehaviorID": f"{name}_lyrics"})
        with open(folder / f"harmbench_behaviors_text_{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=HB_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return folder


HARMLESS = ["How do I bake bread?", "Explain the water cycle.", "Write a poem about the sea.",
            "Name three colours.", "What is two plus two?", "Suggest a name for a cat.", "Describe a tree.",
            "How do clouds form?"]


def stage_files(root, n_test: int, n_val: int, harmless_prompts: list[str]) -> dict:
    """A saved tiny llama, HarmBench-shaped CSVs and a harmless jsonl under ``root`` (shared by the stage tests)."""
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    hb = write_harmbench(root / "hb", n_test=n_test, n_val=n_val)
    harmless = root / "harmless.jsonl"
    harmless.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in harmless_prompts))
    return {"model": model_dir, "hb": hb, "harmless": harmless, "store": root / "store", "root": root}


# prompts of different lengths (one a single word), so padding and per-prompt means are exercised
IMPORTANCE_PROMPTS = ["how do I bake bread", "explain the water cycle to me in detail please", "sea"]


# Transformers' eager attention soft-maxes in float32 (float64 models lose precision there) and its
# float64 mask turns fully padded query rows into NaN that spread to every token. For the float64
# comparisons the tiny models use this plain float64 attention, registered under its own name.
def _attention64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : key.shape[-2]]
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


AttentionInterface.register("eager64", _attention64)
AttentionMaskInterface.register("eager64", eager_mask)


def model_and_adapter(family, float64=True, seed=0):
    """A tiny model of ``family`` (float64 with the plain float64 attention unless told otherwise) and its adapter."""
    m = tiny_model(family, seed=seed, vocab=len(tiny_tokenizer()))
    if float64:
        m = m.double()
        m.set_attn_implementation("eager64")
    return m, ModelAdapter(m)


def stage_overrides(fx, run_dir, *extra) -> list[str]:
    """Overrides that run a stage on the files of :func:`stage_files` (``debug=tiny``: tiny evaluation, no
    logger, CPU)."""
    return [f"run_dir={run_dir}", f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}",
            f"dataset.path={fx['hb']}", f"harmless.path={fx['harmless']}", "debug=tiny", *extra]


def brute_select(prompt_scores: dict, k_of: dict, consistency: float) -> set:
    """Selection recounted by brute force from saved per-prompt scores (``<layer>.<kind>`` -> (prompts,
    width)): every neuron in its kind's per-prompt top k on at least ``consistency`` of the prompts."""
    out = set()
    for name, s in prompt_scores.items():
        lay, kind = name.split(".")
        hits = torch.zeros(s.shape[1])
        for row in s.float():
            hits[row.topk(k_of[kind]).indices] += 1
        out |= {(int(lay), kind, int(i)) for i in torch.nonzero(hits / s.shape[0] >= consistency - 1e-9).flatten()}
    return out


def assert_planted_invariants(base, tuned, truth, delta: dict, atol: float = 1e-6) -> None:
    """What stage=plant promises of a planted model ``tuned`` made from ``base`` (both loaded models):
    the recorded S* ``truth`` is exactly the set of neurons whose slices changed, every weight outside S*'s
    slices is bit-identical, with S* zeroed both compute the same logits, and ``delta`` turns the base
    into the planted model bit for bit (``base`` is left planted)."""
    from safety_neurons.hooks import deactivated
    from safety_neurons.importance.sites import slice_linears
    from safety_neurons.planted import changed_neurons
    from safety_neurons.training import apply_delta

    bad, tad = ModelAdapter(base), ModelAdapter(tuned)
    assert changed_neurons(bad, tad) == set(truth.ranking)
    idx = truth.index_map()
    sd_b, sd_t = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name, p in sd_b.items():  # zero S*'s slices in both and compare everything
        q = sd_t[name].detach().clone()
        p = p.detach().clone()
        for (layer, kind), i in idx.items():
            for lin, dim in slice_linears(bad, layer, kind):
                for pname in ("weight", "bias"):
                    if getattr(lin, pname, None) is not None and getattr(lin, pname) is sd_b.get(name):
                        d = dim if pname == "weight" else 0
                        p.index_fill_(d, i, 0)
                        q.index_fill_(d, i, 0)
        assert torch.equal(p, q), name
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad(), deactivated(bad, idx):
        want = base(input_ids=ids).logits
    with torch.no_grad(), deactivated(tad, idx):
        got = tuned(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    apply_delta(base, delta)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), tuned.state_dict().values()))


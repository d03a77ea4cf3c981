"""Cost of every scorer against a plain forward pass on the same batches of SmolLM2, measured side by
side in one run (alternating rounds, the fastest of --repeats each), all five kinds scored.

Targets: attribution and SNIP at most 3x a plain forward over the prompt+answer batch (their loss needs
the answer tokens); activation_diff at most 2.2x a plain forward over the prompt batch (two forwards:
the model and its reference, here the model itself). The contribution difference (two forwards and a
per-token comparison in float64), Wanda and PLND are printed beside them.
usage: python benchmarks/scorers.py [--prompts 32] [--batch 8] [--repeats 3] [--answer-tokens 32]"""

from __future__ import annotations

import argparse

import torch
from common import Timer, harmful_prompts, smollm2

from safety_neurons.data import encode, scored_mask
from safety_neurons.importance import KINDS, SCORERS, options
from safety_neurons.sft_data import refusals_for

TARGETS = {"attribution": 3.0, "snip": 3.0, "activation_diff": 2.2, "activation_diff_rel": 2.2}


def batches(tok, prompts, answers, bs):
    out = []
    for s in range(0, len(prompts), bs):
        p = prompts[s:s + bs]
        plain = encode(tok, p)
        with_answer = encode(tok, p, responses=answers[s:s + bs]) if answers else None
        out.append((plain, scored_mask(plain, "content"), with_answer))
    return out


@torch.no_grad()
def forward(model, bl, answers: bool) -> float:
    with Timer() as t:
        for plain, _, full in bl:
            b = full if answers else plain
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    return t.s


def score(model, ad, bl, name: str) -> float:
    s = SCORERS[name]
    opts = options(reference=(model, ad))
    with Timer() as t:
        for plain, sc, full in bl:
            b = full if s.needs_target else plain
            s.fn(model, ad, b, scored_mask(b, "content") if s.needs_target else sc, KINDS, opts)
    return t.s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=32)
    a = ap.parse_args()
    cfg, model, tok, ad = smollm2()
    prompts = harmful_prompts(cfg, a.prompts)
    # a fixed answer of the target length per prompt: the cost depends on its length, not its text
    answers = [tok.decode(tok(r)["input_ids"][: a.answer_tokens]) for r in refusals_for(prompts, 0)]
    bl = batches(tok, prompts, answers, a.batch)
    best: dict[str, float] = {}
    for _ in range(a.repeats):  # alternate so that the machine's load hits every measure alike
        for key, fn in [("forward (prompt)", lambda: forward(model, bl, False)),
                        ("forward (prompt+answer)", lambda: forward(model, bl, True))] + \
                [(n, lambda n=n: score(model, ad, bl, n)) for n in SCORERS]:
            best[key] = min(best.get(key, float("inf")), fn())
    print(f"SmolLM2, {a.prompts} prompts, batch {a.batch}, answers of {a.answer_tokens} tokens, "
          f"fastest of {a.repeats}, {torch.get_num_threads()} threads")
    for n in SCORERS:
        base = "forward (prompt+answer)" if SCORERS[n].needs_target else "forward (prompt)"
        r = best[n] / best[base]
        tgt = TARGETS.get(n)
        verdict = "" if tgt is None else f"  target <= {tgt}: {'met' if r <= tgt else 'NOT met'}"
        print(f"{n:22s} {best[n]:7.2f} s  / {base:24s} {best[base]:6.2f} s = {r:5.2f}x{verdict}")


if __name__ == "__main__":
    main()

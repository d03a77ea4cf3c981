"""One evaluation's generation and log-probabilities on SmolLM2, the way the evaluator runs them against
the plain way, side by side in one run (alternating rounds, the fastest of --repeats each).

- answers: harmful and harmless held-out prompts answered greedily. Plain: one ``model.generate`` per
  prompt set over left-padded batches. Evaluator: both sets in one generation whose batches prefill the
  rows' common start (system prompt, user header) once (``evaluation.generate``).
- utility NLL: the intact model's answers to the harmless prompts scored under the model. Plain: one
  forward over prompt and answer with the vocabulary projected at every position. Evaluator: the common
  start prefilled once and the vocabulary projected over the answers' span only (``answer_logprobs``).
- degeneration NLL: compliant answers to the harmful prompts scored under the intact model. Plain: as
  above. Evaluator: the prompts prefilled once per evaluator (``PromptCache``), each evaluation a forward
  over the answer tokens only (the one-off prefill is printed apart).
usage: python benchmarks/evaluation.py [--harmful 24] [--harmless 12] [--tokens 16] [--batch 48] [--repeats 3]"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import Timer, smollm2

from safety_neurons.data import encode, harmful_set, harmless_set
from safety_neurons.evaluation import PromptCache, answer_logprobs, generate


@torch.no_grad()
def plain_generate(model, tok, prompts, sp, n, bs):
    out = []
    for s in range(0, len(prompts), bs):
        b = encode(tok, prompts[s:s + bs], sp)
        g = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, do_sample=False, max_new_tokens=n,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=None, top_p=None,
                           top_k=None)
        out += g[:, b.input_ids.shape[1]:].tolist()
    return out


@torch.no_grad()
def plain_nll(model, tok, prompts, answers, sp, bs):
    out = []
    for s in range(0, len(prompts), bs):
        b = encode(tok, prompts[s:s + bs], sp, response_ids=answers[s:s + bs])
        lp = F.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()[:, :-1], -1)
        tgt = b.labels[:, 1:]
        out += [-lp[r][tgt[r] != -100].gather(1, tgt[r][tgt[r] != -100][:, None]).squeeze(1) for r in range(len(tgt))]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--harmful", type=int, default=24)
    ap.add_argument("--harmless", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg, model, tok, _ = smollm2()
    sp = cfg.model.system_prompt
    harm = harmful_set(cfg, "eval").prompts[:a.harmful]
    benign = harmless_set(cfg, "eval").prompts[:a.harmless]
    ref = [x or [tok.eos_token_id] for x in generate(model, tok, benign, sp, a.tokens, a.batch)]
    comply = [x or [tok.eos_token_id] for x in generate(model, tok, harm, sp, a.tokens, a.batch)]
    with Timer() as t:
        cache = PromptCache(model, tok, harm, sp, a.batch)
    prefill_once = t.s
    cases = {
        "answers": (lambda: plain_generate(model, tok, harm, sp, a.tokens, a.batch)
                    + plain_generate(model, tok, benign, sp, a.tokens, a.batch),
                    lambda: generate(model, tok, harm + benign, sp, a.tokens, a.batch)),
        "utility NLL": (lambda: plain_nll(model, tok, benign, ref, sp, a.batch),
                        lambda: answer_logprobs(model, tok, benign, ref, sp, a.batch)[0]),
        "degeneration NLL": (lambda: plain_nll(model, tok, harm, comply, sp, a.batch),
                             lambda: cache.nll(model, harm, comply)),
    }
    best = {k: [float("inf"), float("inf")] for k in cases}
    same = {}
    for _ in range(a.repeats):
        for k, fns in cases.items():
            got = []
            for i, fn in enumerate(fns):
                with Timer() as t:
                    got.append(fn())
                best[k][i] = min(best[k][i], t.s)
            if k == "answers":  # the plain rows keep tokens after EOS; compare up to it
                eos = tok.eos_token_id
                cut = [r[: r.index(eos)] if eos in r else r for r in got[0]]
                same[k] = f"{sum(x == y for x, y in zip(cut, got[1]))}/{len(cut)} answers equal"
            else:
                err = max(float((x - y).abs().max()) for x, y in zip(got[0], got[1]))
                same[k] = f"max |difference| {err:.1e}"
    print(f"SmolLM2, {len(harm)} harmful + {len(benign)} harmless prompts, {a.tokens} tokens, batch {a.batch}, "
          f"{torch.get_num_threads()} threads, fastest of {a.repeats}")
    print(f"{'part':<18} {'plain s':>8} {'evaluator s':>12} {'ratio':>7}  check")
    for k, (p, e) in best.items():
        print(f"{k:<18} {p:8.2f} {e:12.2f} {p / e:6.2f}x  {same[k]}")
    total_p, total_e = sum(v[0] for v in best.values()), sum(v[1] for v in best.values())
    print(f"{'all three':<18} {total_p:8.2f} {total_e:12.2f} {total_p / total_e:6.2f}x  "
          f"(plus a one-off prefill of the harmful prompts per evaluator: {prefill_once:.2f} s)")


if __name__ == "__main__":
    main()

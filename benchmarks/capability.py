"""lm-eval's overhead: the shipped multiple-choice task (sn_mc, 40 questions x 4 choices) through
lm-evaluation-harness against our own batched scorer of the same 160 log-likelihoods on SmolLM2,
measured side by side in one run (alternating rounds, the fastest of --repeats each).

Both score every choice's summed log-probability after "Question: ...\\nAnswer:" on the raw text in
batches of --batch; the ratio is what wrapping the model in lm-eval costs per evaluation. lm-eval's
one-off task indexing (TaskManager) is printed apart: it is paid once per run, not per evaluation.
usage: python benchmarks/capability.py [--batch 8] [--repeats 3]"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from common import Timer, smollm2

from safety_neurons.capability import DATA, Capability


def pairs(tok) -> list[tuple[list[int], list[int]]]:
    out = []
    for line in DATA.read_text().splitlines():
        doc = json.loads(line)
        ctx = f"Question: {doc['question']}\nAnswer:"
        c_ids = tok.encode(ctx, add_special_tokens=False)
        for choice in doc["choices"]:
            whole = tok.encode(f"{ctx} {choice}", add_special_tokens=False)
            out.append((c_ids, whole[len(c_ids):]))
    return out


@torch.no_grad()
def own(model, tok, reqs, bs: int) -> list[float]:
    """Summed log-likelihood of each continuation, right-padded batches."""
    lls = []
    pad = tok.pad_token_id or 0
    for s in range(0, len(reqs), bs):
        part = reqs[s:s + bs]
        seqs = [c + k for c, k in part]
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), pad)
        am = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x)
            am[i, :len(x)] = 1
        lp = F.log_softmax(model(input_ids=ids, attention_mask=am).logits.float(), -1)
        for i, (c, k) in enumerate(part):
            pos = torch.arange(len(c) - 1, len(c) + len(k) - 1)
            lls.append(float(lp[i, pos].gather(1, torch.tensor(k)[:, None]).sum()))
    return lls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg, model, tok, _ = smollm2()
    model.eval()
    from omegaconf import OmegaConf

    ecfg = OmegaConf.merge(cfg.eval, {"capability": ["sn_mc"], "capability_batch_size": a.batch})
    with Timer() as t_init:
        cap = Capability(ecfg, tok)
    reqs = pairs(tok)
    best = {"lm_eval": float("inf"), "own": float("inf")}
    acc = None
    for _ in range(a.repeats):
        with Timer() as t:
            acc = cap.measure(model)["cap_sn_mc_acc"]
        best["lm_eval"] = min(best["lm_eval"], t.s)
        with Timer() as t:
            lls = own(model, tok, reqs, a.batch)
        best["own"] = min(best["own"], t.s)
    picks = [max(range(4), key=lambda j: lls[4 * q + j]) for q in range(len(lls) // 4)]
    answers = [json.loads(x)["answer"] for x in DATA.read_text().splitlines()]
    own_acc = sum(p == y for p, y in zip(picks, answers)) / len(answers)
    print(f"sn_mc on SmolLM2, {len(reqs)} log-likelihoods, batch {a.batch}, best of {a.repeats}")
    print(f"  lm-eval task indexing (once per run): {t_init.s:.1f} s")
    print(f"  lm-eval evaluation:  {best['lm_eval']:.2f} s   acc {acc:.3f}")
    print(f"  own scorer:          {best['own']:.2f} s   acc {own_acc:.3f}")
    print(f"  ratio lm-eval / own: {best['lm_eval'] / best['own']:.2f}x")


if __name__ == "__main__":
    main()

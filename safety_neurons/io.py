"""Atomic writes and the artifact store (stable, keyed by model and dataset names)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    def w(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=2, default=str) + "\n")

    return atomic_write(path, w)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_csv(path: str | Path, df) -> Path:
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    def w(p: Path) -> None:
        with open(p, "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")

    return atomic_write(path, w)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


class Store:
    """Artifacts later stages consume, keyed by names so no path has to be passed around.

    layout: ``<root>/models/<model>/`` (converted or tuned HF folders),
    ``<root>/neurons/<model>/<dataset>/<tag>/`` (neuron sets with their scores).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / safe_name(name)

    def neuron_dir(self, model: str, dataset: str, tag: str) -> Path:
        return self.root / "neurons" / safe_name(model) / safe_name(dataset) / safe_name(tag)

    def find_neurons(self, model: str, dataset: str, tag: str | None) -> Path:
        base = self.root / "neurons" / safe_name(model) / safe_name(dataset)
        if tag is not None:
            p = base / safe_name(tag) / "neurons.json"
            if p.exists():
                return p
        else:
            cands = sorted(base.glob("*/neurons.json"), key=lambda p: p.stat().st_mtime)
            if cands:
                return cands[-1]
        known = sorted(p.parent.name for p in base.glob("*/neurons.json"))
        raise UserError(
            f"no neuron set for model={model} dataset={dataset}"
            + (f" tag={tag}" if tag else "")
            + f" in {base} (known tags: {known or 'none'}); run "
            f"`python -m safety_neurons stage=detect model=... dataset=...` first or pass a path"
        )

"""What a model source is, by content: the hash of a weight file or of a model folder's files, so that
artifacts made from one source are never taken for another's (two ``model=local`` folders, two GGUF
files under one preset name, a folder overwritten in place). The hashing itself (cached per file) is
io's ``file_hash`` and ``folder_hash``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .io import Store, file_hash, folder_hash

__all__ = ["artifact_hash", "file_hash", "folder_hash", "source_identity"]


def source_identity(mcfg, store: Store) -> dict:
    """``{"source": where the weights come from, "source_hash": its content hash}`` for a model config
    (hash None where nothing local can be hashed yet: a recipe model not built, a hub model)."""
    if mcfg.path:
        p = Path(mcfg.path).expanduser()
        if p.is_file():
            return {"source": str(p.resolve()), "source_hash": file_hash(p, store)}
        if p.is_dir():
            return {"source": str(p.resolve()), "source_hash": folder_hash(p, store)}
        return {"source": str(p), "source_hash": None}
    if mcfg.organism:
        d = store.model_dir(mcfg.organism)
        return {"source": str(d), "source_hash": folder_hash(d, store) if (d / "config.json").exists() else None}
    if mcfg.gguf_package:
        from .models import find_gguf

        g = find_gguf(mcfg.gguf_package, mcfg.gguf_file, store.root / "gguf")
        return {"source": str(g), "source_hash": file_hash(Path(g), store)}
    if mcfg.hub_id:
        ref = f"{mcfg.hub_id}@{mcfg.revision or 'main'}"
        return {"source": ref, "source_hash": hashlib.sha256(ref.encode()).hexdigest()[:16]}
    return {"source": None, "source_hash": None}


def artifact_hash(path: Path) -> str:
    """Content hash of an artifact file (a neurons.json): what a stage records of the set it used."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

"""Hugging Face hub access in one place: is the hub reachable, is a model cached, fetch a dataset file.

Every check fails fast with a UserError (instead of the hub client's long retry loop) when a file is
neither in the local cache nor downloadable."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import UserError


def offline() -> bool:
    """Whether hub access is switched off (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _why_unavailable() -> str | None:
    """Why nothing can be downloaded now, or None when the hub can be used."""
    if offline():
        return "disabled (HF_HUB_OFFLINE=1)"
    return None if reachable() else "unreachable"


def check_model(hub_id: str, revision: str | None) -> None:
    """A hub model (or judge) must be in the local cache or downloadable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    why = _why_unavailable()
    if why:
        raise UserError(
            f"model {hub_id!r} is not in the local Hugging Face cache and the hub is {why}; download it on a "
            f"machine with internet (unset HF_HUB_OFFLINE) or point to a local copy with model.path=DIR"
        )


def dataset_file(repo: str, filename: str | None) -> Path:
    """A file of a hub dataset repo, from the cache or downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if not filename:
        raise UserError(f"dataset hub repo {repo!r} needs dataset.hub_file=FILE (a csv/json/parquet in it)")
    cached = try_to_load_from_cache(repo, filename, repo_type="dataset")
    if isinstance(cached, str):
        return Path(cached)
    why = _why_unavailable()
    if why:
        raise UserError(
            f"dataset {repo}/{filename} is not cached and the hub is {why}; download the file and set "
            f"dataset.path=FILE"
        )
    return Path(hf_hub_download(repo, filename, repo_type="dataset"))

"""Atomic writes and the artifact store (stable, keyed by model and dataset names)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.
    The file gets the mode a plain ``open`` would give it (the user's umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
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


# ------------------------------------------------------------------------- whole-folder artifacts
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class ArtifactDir:
    """One finished artifact folder (a neuron set, a model): assembled in ``tmp`` beside ``dest`` and
    renamed in by ``commit()`` as one step, under a per-destination lock.

    Used as a context manager around the whole run that makes the artifact: entering takes the lock
    (a second writer fails at once with a UserError, before doing any work, and never touches the first
    one's files) and removes leftovers of interrupted runs of this destination; leaving without
    ``commit()`` (an error, Ctrl-C) removes ``tmp`` and leaves ``dest`` as it was. ``commit()`` replaces
    a previous ``dest`` as a whole, so no file of the previous artifact survives beside the new one.

    The lock is an flock on ``.<name>.lock`` beside ``dest`` holding the writer's pid: the kernel drops it
    when the process dies, so a killed run never leaves a stale lock. ``active=False`` (non-main ranks of
    a distributed run) takes no lock and commits nothing."""

    def __init__(self, dest: str | Path, what: str = "artifact", active: bool = True):
        self.dest = Path(dest)
        self.what = what
        self.active = active
        self.tmp = self.dest.with_name(f".{self.dest.name}.partial-{os.getpid()}")
        self.lock_path = self.dest.with_name(f".{self.dest.name}.lock")
        self.committed = False
        self.removed: list[Path] = []
        self._fd: int | None = None

    def leftovers(self) -> list[Path]:
        """Folders that interrupted writers of ``dest`` left behind (only safe to remove under the lock)."""
        parent = self.dest.parent
        if not parent.is_dir():
            return []
        names = (f".{self.dest.name}.partial-", f"{self.dest.name}.partial-", f".{self.dest.name}.old-")
        return sorted(p for p in parent.iterdir() if p.name.startswith(names))

    def _lock(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.what} {self.dest} is being written by another run (pid {holder}, lock "
                                f"{self.lock_path}); wait for it to finish, or write elsewhere "
                                f"(another save_as or store_dir)") from None
            # the file may have been unlinked by the previous holder after we opened it: lock the live one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ArtifactDir:
        if not self.active:
            return self
        self._lock()
        try:
            old = [p for p in self.leftovers() if p.name.startswith(f".{self.dest.name}.old-")]
            if old and not self.dest.exists():  # interrupted between the two renames of a replace
                os.replace(old[-1], self.dest)
                print(f"restored {self.dest} from {old[-1].name}, left by an interrupted run")
            for p in self.leftovers():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                self.removed.append(p)
                print(f"removed {p}, left by an interrupted run")
            os.mkdir(self.tmp)
        except BaseException:
            self._unlock()
            raise
        return self

    def commit(self) -> Path:
        """Rename ``tmp`` in as ``dest``, replacing a previous ``dest`` as a whole."""
        if not self.active or self.committed:
            return self.dest
        if self.dest.exists():
            if not _exchange(self.tmp, self.dest):
                old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
                os.replace(self.dest, old)
                os.replace(self.tmp, self.dest)
                os.replace(old, self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the previous artifact
        else:
            os.replace(self.tmp, self.dest)
        self.committed = True
        return self.dest

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._unlock()


# ------------------------------------------------------------------ content hashes of model sources
# File hashes are cached in ``<store>/cache/source_hashes.json`` by absolute path, size and mtime, so a
# large model is read once.
CACHE = "source_hashes.json"


def _cache_file(store: Store) -> Path:
    return store.root / "cache" / CACHE


def _read_cache(store: Store) -> dict:
    try:
        return json.loads(_cache_file(store).read_text())
    except (OSError, ValueError):
        return {}


def file_hash(path: Path, store: Store | None = None, cache: dict | None = None) -> str:
    """sha256 of a file's bytes (16 hex digits), from the cache while its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    own = cache is None
    if own:
        cache = _read_cache(store) if store is not None else {}
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    if own and store is not None:
        write_json(_cache_file(store), cache)
    return digest


def folder_hash(folder: Path, store: Store | None = None) -> str:
    """Hash of a model folder: every visible file's name and content hash (weights, config, tokenizer)."""
    folder = Path(folder)
    cache = _read_cache(store) if store is not None else {}
    before = dict(cache)
    lines = [f"{p.name}:{file_hash(p, cache=cache)}" for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".")]
    if store is not None and cache != before:
        write_json(_cache_file(store), cache)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


class Store:
    """Artifacts later stages consume, keyed by names so no path has to be passed around.

    layout: ``<root>/models/<model>/`` (converted or tuned HF folders),
    ``<root>/neurons/<model>/<dataset>/<tag>/`` (neuron sets with their scores),
    ``<root>/evaluations/<key>/`` (an intact model's evaluation, see ``Evaluator``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / safe_name(name)

    def neuron_dir(self, model: str, dataset: str, tag: str) -> Path:
        return self.root / "neurons" / safe_name(model) / safe_name(dataset) / safe_name(tag)

    def evaluation_dir(self, key: str) -> Path:
        """An intact model's evaluation (its reference answers and metrics), keyed by what decides it."""
        return self.root / "evaluations" / safe_name(key)

    @staticmethod
    def _sets(base: Path) -> list[Path]:
        """The finished sets under ``base``: a writer's hidden temporary folder is not one."""
        return [p for p in base.glob("*/neurons.json") if not p.parent.name.startswith(".")]

    def find_neurons(self, model: str, dataset: str, tag: str | None,
                     accept: Callable[[Path], bool] | None = None) -> Path:
        """The set with ``tag``, or with None the latest one (of those ``accept`` takes, when given)."""
        base = self.root / "neurons" / safe_name(model) / safe_name(dataset)
        if tag is not None:
            p = base / safe_name(tag) / "neurons.json"
            if p.exists():
                return p
        else:
            cands = sorted(self._sets(base), key=lambda p: p.stat().st_mtime)
            fit = [p for p in cands if accept is None or accept(p)]
            if fit:
                return fit[-1]
            if cands:
                raise UserError(f"no neuron set in {base} was made from this run's model and prompts (the sets "
                                f"there, {sorted(p.parent.name for p in cands)}, were made from another model "
                                f"source or prompt file); run stage=detect for this model or name a set by path")
        known = sorted(p.parent.name for p in self._sets(base))
        raise UserError(
            f"no neuron set for model={model} dataset={dataset}"
            + (f" tag={tag}" if tag else "")
            + f" in {base} (known tags: {known or 'none'}); run "
            f"`python -m safety_neurons stage=detect model=... dataset=...` first or pass a path"
        )

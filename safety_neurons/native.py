"""The fused CPU kernel of exact q/k importance (``csrc/perturbed_softmax.c``): build, cache, call.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
for this machine (``-march=native``) into ``$SAFETY_NEURONS_CACHE`` (default
``~/.cache/safety-neurons``)``/native/<hash>/``, keyed by the source, flags, compiler and CPU, and
written atomically, so concurrent first uses cannot leave a broken library. It is plain C with no
Python or torch headers (about a second to build) and is called through ``ctypes``, which releases
the GIL. Built with ``-fopenmp``, it links ``libgomp.so.1``, which resolves to the copy torch has
already loaded, so its parallel loop runs on torch's own threads (``torch.set_num_threads`` applies);
a compiler without OpenMP gets a serial library, and Python threads split the work instead.

Without a compiler, or if the build fails, :func:`load` returns ``None`` with the reason in
:func:`why_not`, and detection falls back to the pure-torch computation (``detect.qk_kernel=auto``);
``detect.qk_kernel=native`` makes that an error instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "perturbed_softmax.c"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
OPENMP = ["-fopenmp"]  # tried first: the library then runs on torch's own OpenMP threads
ABI = 3
TILE = {torch.float32: 16, torch.float64: 8}  # columns of one register tile (two vectors of 32 bytes)
BLK = 6  # channels per pass over F (the C file's BLK)
PIECES = 4  # work ranges per thread
KEY_SLACK = 8  # zero columns after each row of keys (at least the longest vector's lanes - 1)

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SAFETY_NEURONS_CACHE", Path.home() / ".cache" / "safety-neurons")) / "native"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    src = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]")))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    lib = cache_dir() / key / "libsn_qk.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            for extra in (OPENMP, []):  # without OpenMP (a compiler that lacks it) Python threads split the work
                res = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                     text=True, timeout=300)
                if res.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {res.stderr.strip()[-800:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    if dll.sn_abi_version() != ABI:
        raise RuntimeError(f"{lib} has ABI {dll.sn_abi_version()}, expected {ABI}")
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    common = ([i64] * 6 + [dbl] + [ptr, ptr, i64] + [ptr, ptr, ptr, i64, i64] + [ptr, ptr, ptr, i64]
              + [ptr, ptr, i64, i64] + [ptr, ptr] + [ptr, ptr] + [ptr, ptr] + [ptr, i64])
    for name in ("sn_qk_f32", "sn_qk_f64", "sn_qk_par_f32", "sn_qk_par_f64"):
        fn = getattr(dll, name)
        fn.restype = i64
        fn.argtypes = ([ptr, ptr, i64] if "par" in name else [i64, i64]) + common
    dll.sn_threads.restype = ctypes.c_int
    return dll


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; ``None`` when it cannot be built (see :func:`why_not`)."""
    with _lock:
        if "dll" not in _state:
            try:
                _state["dll"], _state["why"] = _build(), None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state["dll"], _state["why"] = None, str(e)
        return _state["dll"]


def why_not() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it did not, or was not called yet)."""
    return _state.get("why")


def _pool(n: int) -> ThreadPoolExecutor:
    if _state.get("pool_n") != n:
        if "pool" in _state:
            _state["pool"].shutdown()
        _state["pool"], _state["pool_n"] = ThreadPoolExecutor(n, thread_name_prefix="sn-qk"), n
    return _state["pool"]


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    """A contiguous copy of ``t`` with zeros appended to its last dimension up to ``width``."""
    out = t.new_zeros(*t.shape[:-1], width)
    out[..., : t.shape[-1]] = t
    return out


def pad_columns(f: torch.Tensor) -> torch.Tensor:
    """F (..., rows, r) as a contiguous copy whose rows are a multiple of the register tile apart."""
    r = f.shape[-1]
    rp = -(-r // TILE[f.dtype]) * TILE[f.dtype]
    return f if rp == r and f.is_contiguous() else _pad_last(f, rp)


def pad_keys(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` with KEY_SLACK zero columns appended to its last (key) dimension: the
    kernel reads rows of keys in whole vectors, up to a vector's length past the last visible key."""
    return _pad_last(t, t.shape[-1] + KEY_SLACK)


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_bounds(n_sub, d, rp, S, S_off, S_si, A, A_off, A_sj, A_si, X, X_off, X_sj, R, R_off, R_sj, R_ss,
                  F, F_off, lo, hi, out, out_off) -> None:
    """Every element the kernel will touch lies inside its tensor (C does not check): a wrong offset is a
    ValueError here, not a crash or a silent read of other memory."""
    if lo.numel() == 0:
        return
    if lo.numel() != hi.numel() or int(lo.min()) < 0:
        raise ValueError("perturbed_norms: lo and hi must have one entry per item, lo >= 0")
    slack = KEY_SLACK - 1  # rows of keys are read in whole vectors, up to this far past hi
    # a bound on the largest index any item uses (the largest offset plus the largest extent; cheap, and
    # exact for the layouts importance.py builds, where every row of keys has room for the longest)
    h, nv = int(hi.max()), int((hi > lo).sum())

    def last(off, *extent):
        return int(off.max()) + sum(extent) if nv else -1

    checks = [("S", S, last(S_off, (n_sub - 1) * S_si, h - 1 + slack)),
              ("A/Bc", A, last(A_off, (d - 1) * A_sj, (n_sub - 1) * A_si)),
              ("X/Y", X, last(X_off, (d - 1) * X_sj, h - 1 + slack)),
              ("F", F, last(F_off, h * n_sub * rp - 1)),
              ("out", out, int(out_off.max()) + d - 1)]
    if R is not None:
        checks.append(("R", R, last(R_off, (d - 1) * R_sj, (h - 1 + slack) * R_ss)))
    for name, t, top in checks:
        if top >= t.numel():
            raise ValueError(f"perturbed_norms: the offsets reach element {top} of {name}, which has {t.numel()}")


def perturbed_norms(*, n_sub: int, r: int, tri: bool, cap: float | None, sub_cols: int = 0,
                    S: torch.Tensor, S_off: torch.Tensor, S_si: int,
                    A: torch.Tensor, Bc: torch.Tensor, A_off: torch.Tensor, A_sj: int, A_si: int,
                    X: torch.Tensor, Y: torch.Tensor, X_off: torch.Tensor, X_sj: int,
                    R: torch.Tensor | None, R_off: torch.Tensor | None, R_sj: int, R_ss: int,
                    F: torch.Tensor, F_off: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    out: torch.Tensor, out_off: torch.Tensor, d: int) -> None:
    """Run the kernel over all items (see the C file for the formula); writes ``out`` in place.

    Every tensor is a contiguous CPU tensor of one dtype (float32 or float64), offsets are int64 element
    offsets per item, ``F`` comes from :func:`pad_columns`. ``sub_cols`` > 0 promises that (for a full,
    not triangular F) sub-row i's rows of F are zero from column (i + 1) * sub_cols on, a multiple of the
    register tile; the kernel then skips those products. The caller keeps every tensor alive."""
    dll = load()
    if dll is None:
        raise RuntimeError(f"the native q/k kernel is unavailable: {why_not()}")
    dt = out.dtype
    real = (S, A, Bc, X, Y, F, out) + (() if R is None else (R,))
    offs = (S_off, A_off, X_off, F_off, lo, hi, out_off) + (() if R_off is None else (R_off,))
    if any(t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu" for t in real):
        raise ValueError("perturbed_norms: every real tensor must be a contiguous CPU tensor of out's dtype")
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in offs):
        raise ValueError("perturbed_norms: offsets must be contiguous int64 tensors")
    rp = F.shape[-1]
    n_items = lo.numel()
    if sub_cols % TILE[dt]:
        raise ValueError(f"perturbed_norms: sub_cols must be a multiple of {TILE[dt]}")
    if rp % TILE[dt] or r > rp:
        raise ValueError(f"perturbed_norms: F's rows must be padded to a multiple of {TILE[dt]} (pad_columns)")
    if Bc.numel() != A.numel() or Y.numel() != X.numel():
        raise ValueError("perturbed_norms: A and Bc, X and Y must have the same sizes (they share offsets)")
    _check_bounds(n_sub, d, rp, S, S_off, S_si, A, A_off, A_sj, A_si, X, X_off, X_sj, R, R_off, R_sj, R_ss,
                  F, F_off, lo, hi, out, out_off)
    n_max = int((hi - lo).max()) if n_items else 0
    lanes = 32 // out.element_size()

    def up(x: int) -> int:
        return -(-x // lanes) * lanes

    # the C file's workspace: n_sub + 1 logit rows and BLK rows of dP, each in whole 32-byte vectors
    work_len = up((n_sub + 1) * up(n_max) + BLK * up(n_max * n_sub))
    omp = dll.sn_threads()  # > 0: built with OpenMP, the team size of a parallel region
    n_thr = max(1, min(omp or torch.get_num_threads(), n_items))
    # PIECES ranges per thread of about equal work (per channel, an item's product with F grows with the
    # square of its rows of F, n * n_sub, about half of it under a triangular F; its softmax linearly),
    # handed out in turn: a thread that starts late or runs slow takes fewer
    m = (hi - lo).clamp(min=0) * n_sub
    cost = (m * m // 2 + 16 * m + 16).cumsum(0)
    total = int(cost[-1]) if n_items else 0
    n_pieces = 1 if n_thr == 1 else n_thr * PIECES
    cuts = torch.searchsorted(cost, torch.arange(1, n_pieces, dtype=cost.dtype) * total // n_pieces).tolist()
    bounds = torch.tensor([0, *cuts, n_items], dtype=torch.int64)
    n_rows = max(n_thr, omp)
    raw = torch.empty(n_rows * work_len + 2 * lanes, dtype=dt)
    shift = (-raw.data_ptr() // out.element_size()) % lanes  # 32-byte aligned rows
    work = raw[shift: shift + n_rows * work_len].view(n_rows, work_len)
    args = (n_sub, d, r, rp, int(tri), int(sub_cols), float(cap or 0.0),
            _p(S), _p(S_off), S_si, _p(A), _p(Bc), _p(A_off), A_sj, A_si, _p(X), _p(Y), _p(X_off), X_sj,
            _p(R), _p(R_off), R_sj, R_ss, _p(F), _p(F_off), _p(lo), _p(hi), _p(out), _p(out_off))
    if omp:
        # one call; its OpenMP team is torch's own threads (the same libgomp), which are already awake
        par = dll.sn_qk_par_f32 if dt == torch.float32 else dll.sn_qk_par_f64
        codes = [par(n_pieces, bounds.data_ptr(), n_rows, *args, work.data_ptr(), work_len)]
    else:
        fn = dll.sn_qk_f32 if dt == torch.float32 else dll.sn_qk_f64
        turn = itertools.count()  # next() on a count is atomic under the GIL
        bl = bounds.tolist()

        def worker(k: int) -> list[int]:
            codes = []
            while (i := next(turn)) < n_pieces:
                if bl[i] < bl[i + 1]:
                    codes.append(fn(bl[i], bl[i + 1], *args, work[k].data_ptr(), work_len))
            return codes

        if n_thr == 1:
            codes = worker(0)
        else:
            others = [_pool(n_thr - 1).submit(worker, k) for k in range(1, n_thr)]
            codes = worker(0) + [c for f in others for c in f.result()]
    if any(codes):
        raise RuntimeError(f"native q/k kernel failed with codes {codes}")

"""The fused C kernel of exact q/k importance (safety_neurons/native.py, csrc/): its formula against a
plain torch re-computation, detection scores against the torch path in every family, the fallback and
its errors, and the build cache."""

from __future__ import annotations

import os

import pytest
import torch

import safety_neurons.importance.plnd as imp
from safety_neurons import native
from safety_neurons.data import encode, scored_mask
from safety_neurons.errors import UserError
from safety_neurons.importance import brute_force_importance, prompt_scores
from tests.builders import IMPORTANCE_PROMPTS as PROMPTS
from tests.builders import model_and_adapter as _model
from tests.tiny import FAMILIES, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if native.load() is None:
        pytest.skip(f"the native kernel cannot be built here: {native.why_not()}")


def _naive(n_sub, d, cap, S, A, Bc, X, Y, R, r_per_key, F, lo, hi):
    """out[j] of one item, straight from the formula in csrc/perturbed_softmax.c (float64)."""
    S, A, Bc, X, Y, F = (t.double() for t in (S, A, Bc, X, Y, F))
    out = torch.zeros(d, dtype=torch.float64)
    if hi <= lo:
        return out

    def soft(z):
        return torch.softmax(z if not cap else cap * torch.tanh(z / cap), -1)

    for j in range(d):
        u = 0
        for i in range(n_sub):
            z = S[i, lo:hi] + A[j, i] * X[j, lo:hi] + Bc[j, i] * Y[j, lo:hi]
            if R is not None:
                z = z * (R.double()[j, lo:hi] if r_per_key else R.double()[j])
            dp = soft(z) - soft(S[i, lo:hi])
            rows = torch.arange(lo, hi) * n_sub + i
            u = u + dp @ F[rows]
        out[j] = torch.linalg.vector_norm(u)
    return out


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_sub,cap,rho,tri,sub_cols", [(1, None, None, False, 0), (1, 20.0, "scalar", True, 0),
                                                        (3, None, "key", True, 0), (2, 5.0, "key", False, 0),
                                                        (3, None, None, False, 16)])
def test_kernel_formula(dt, n_sub, cap, rho, tri, sub_cols):
    """Items with various visible ranges (a window start, an empty item, odd lengths around the vector
    width), sub-rows, soft-capping, both kinds of rho, a triangular and a full F, and a full F whose
    sub-rows end at staggered columns (k's factor)."""
    g = torch.Generator().manual_seed(n_sub)
    T, d, n_items = 21, 11, 7
    lo = torch.tensor([0, 3, 0, 5, 0, 2, 9])
    hi = torch.tensor([21, 12, 1, 5, 9, 19, 17])  # item 3 is empty
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    S = rnd(n_items, n_sub, T) * 3
    A, Bc = rnd(n_items, d, n_sub), rnd(n_items, d, n_sub)
    X, Y = rnd(d, T), rnd(d, T)
    R = None if rho is None else (rnd(d, T).abs() + 0.5 if rho == "key" else rnd(n_items, d).abs() + 0.5)
    r = T * n_sub if tri else (n_sub * sub_cols or 13)
    F = rnd(n_items, T * n_sub, r)
    if tri:
        F = F.tril()
    for i in range(n_sub if sub_cols else 0):
        F[:, i::n_sub, (i + 1) * sub_cols:] = 0
    Tk = T + native.KEY_SLACK
    it = torch.arange(n_items)
    out = torch.full((n_items, d), float("nan"), dtype=dt)
    Fp = native.pad_columns(F.to(dt))
    native.perturbed_norms(
        n_sub=n_sub, r=r, tri=tri, cap=cap, sub_cols=sub_cols, S=native.pad_keys(S.to(dt)),
        S_off=it * n_sub * Tk, S_si=Tk,
        A=A.to(dt), Bc=Bc.to(dt), A_off=it * d * n_sub, A_sj=n_sub, A_si=1,
        X=native.pad_keys(X.to(dt)), Y=native.pad_keys(Y.to(dt)), X_off=it * 0, X_sj=Tk,
        R=None if R is None else (native.pad_keys(R.to(dt)) if rho == "key" else R.to(dt).contiguous()),
        R_off=it * 0 if rho == "key" else it * d, R_sj=Tk if rho == "key" else 1, R_ss=1 if rho == "key" else 0,
        F=Fp, F_off=it * (T * n_sub * Fp.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)
    for k in range(n_items):
        Rk = None if R is None else (R if rho == "key" else R[k])
        ref = _naive(n_sub, d, cap, S[k], A[k], Bc[k], X, Y, Rk, rho == "key", F[k], int(lo[k]), int(hi[k]))
        tol = 1e-10 if dt == torch.float64 else 2e-4
        torch.testing.assert_close(out[k].double(), ref, rtol=tol, atol=tol * float(ref.abs().max().clamp(min=1)))
    assert bool((out[3] == 0).all())  # an empty item scores 0, not NaN
    # offsets that would read past a tensor are refused before the C code runs
    with pytest.raises(ValueError, match="reach element"):
        native.perturbed_norms(
            n_sub=n_sub, r=r, tri=tri, cap=cap, S=native.pad_keys(S.to(dt)), S_off=it * n_sub * Tk + Tk, S_si=Tk,
            A=A.to(dt), Bc=Bc.to(dt), A_off=it * d * n_sub, A_sj=n_sub, A_si=1,
            X=native.pad_keys(X.to(dt)), Y=native.pad_keys(Y.to(dt)), X_off=it * 0, X_sj=Tk,
            R=None, R_off=None, R_sj=0, R_ss=0,
            F=Fp, F_off=it * (T * n_sub * Fp.shape[-1]), lo=lo, hi=hi, out=out, out_off=it * d, d=d)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_equals_torch_path(family, monkeypatch):
    """Detection scores with the kernel equal the torch computation (float64), with the factors as
    they come and with a QR (triangular F) on every factor."""
    m, ad = _model(family)
    batch = encode(tiny_tokenizer(), PROMPTS)
    for tokens in ("content", "all"):
        sc = scored_mask(batch, tokens)
        ref = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="torch")
        got = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-9 * float(ref[key].abs().max()))
    monkeypatch.setattr(imp, "QR_MIN_RATIO", 0.0)
    monkeypatch.setattr(imp, "NATIVE_QR_MIN_RATIO", 0.0)
    sc = scored_mask(batch, "content")
    ref = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="torch")
    got = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-9 * float(ref[key].abs().max()))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_native_float32_against_brute_force(family):
    """float32 (soft-capping and sliding windows in Gemma2, q/k norms in Gemma3): the kernel's scores
    against brute force, as the torch path is tested in test_importance."""
    m, ad = _model(family, float64=False)
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "content")
    res = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
    for layer in range(ad.n_layers):
        for kind in ("q", "k"):
            idx = list(range(0, ad.width(kind), max(1, ad.width(kind) // 5)))
            bf = brute_force_importance(m, ad, batch, sc, layer, kind, idx)
            got = res[(layer, kind)][:, idx].double()
            assert bool(((got - bf).abs() <= 1e-3 * bf.abs() + 1e-6 * bf.abs().max()).all()), (layer, kind)


def test_python_threads_give_the_same_scores(monkeypatch):
    """A library built without OpenMP is driven by Python threads over the same pieces: same scores."""
    m, ad = _model("qwen2")
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "all")
    ref = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
    real = native.load()

    class Serial:
        def __getattr__(self, name):
            return getattr(real, name)

        def sn_threads(self):
            return 0

    monkeypatch.setattr(native, "_state", {"dll": Serial(), "why": None})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # more threads than cores: pieces are shared
    called = []
    real_pool = native._pool
    monkeypatch.setattr(native, "_pool", lambda n: (called.append(n), real_pool(n))[1])
    got = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="native")
    assert called and called[0] == 2
    for key in ref:
        assert torch.equal(got[key], ref[key])


def test_fallback_and_errors(monkeypatch):
    m, ad = _model("llama")
    batch = encode(tiny_tokenizer(), PROMPTS)
    sc = scored_mask(batch, "content")
    ref = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="torch")
    with pytest.raises(UserError, match="qk_kernel"):
        prompt_scores(m, ad, batch, sc, kinds=["q"], qk_kernel="fast")
    called = []
    real = native.perturbed_norms
    monkeypatch.setattr(native, "perturbed_norms", lambda **kw: (called.append(1), real(**kw)))
    prompt_scores(m, ad, batch, sc, kinds=["q"], qk_kernel="auto")
    assert called  # auto uses the kernel where it builds
    monkeypatch.setattr(native, "_state", {"dll": None, "why": "no C compiler found (test)"})
    called.clear()
    got = prompt_scores(m, ad, batch, sc, kinds=["q", "k"], qk_kernel="auto")
    assert not called
    for key in ref:
        assert torch.equal(got[key], ref[key])  # the fallback is the torch path itself
    with pytest.raises(UserError, match="no C compiler found"):
        prompt_scores(m, ad, batch, sc, kinds=["q"], qk_kernel="native")
    assert imp.qk_kernel_used("auto", "cpu") == "torch"


def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_NEURONS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is not None and native.why_not() is None
    libs = list((tmp_path / "native").glob("*/libsn_qk.so"))
    assert len(libs) == 1 and not list((tmp_path / "native").glob("*/*.tmp"))
    stamp = os.stat(libs[0]).st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is not None
    assert os.stat(libs[0]).st_mtime_ns == stamp  # reused, not rebuilt
    # a compiler that fails: no library, the reason kept, nothing half-written in the cache
    monkeypatch.setenv("SAFETY_NEURONS_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is None
    assert "failed to build" in native.why_not()
    assert not list((tmp_path / "other").rglob("*.so*"))

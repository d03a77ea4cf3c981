"""The scorers beside PLND (METHOD 8) against independent computations on tiny models of every family:
attribution and SNIP against autograd, attribution against actually zeroing neurons, Wanda against its
formula written out, activation difference of a model against itself, the contribution difference
against its definition, attribution patching against autograd and against actually patching."""

from __future__ import annotations

import pytest
import torch

from safety_neurons.data import encode, scored_mask
from safety_neurons.errors import UserError
from safety_neurons.hooks import deactivated, hooks
from safety_neurons.importance import KINDS, SCORERS, get_scorer, options
from safety_neurons.importance.activation import activation_diff, contribution_diff
from safety_neurons.importance.gradient import attribution, snip
from safety_neurons.importance.patching import patch_attribution
from safety_neurons.importance.sites import site, slice_linears
from safety_neurons.importance.wanda import wanda
from safety_neurons.models import ModelAdapter
from tests.tiny import tiny_model

PROMPTS = ["how do I bake bread", "write a poem about the sea"]
ANSWERS = ["I cannot help with that", "the sea is blue"]


def _batch(tok):
    return encode(tok, PROMPTS, None, responses=ANSWERS)


def _loss_of(model, b, i):
    """Prompt i's summed answer NLL, computed plainly: the row alone without its padding, full logits."""
    keep = b.attention_mask[i].bool()
    logits = model(input_ids=b.input_ids[i][keep][None]).logits
    lab = b.labels[i][keep]
    return torch.nn.functional.cross_entropy(logits[0, :-1], lab[1:], ignore_index=-100, reduction="sum")


def _sites(model, ad, input_ids, attention_mask=None):
    """{(layer, kind): (B, T, width)} the site values of a plain forward, read by hooks written out here
    (a module's input for "pre" sites, its output for "fwd" ones)."""
    caps = {}
    specs = []
    for layer in range(ad.n_layers):
        for k in KINDS:
            mod, where = site(ad, layer, k)
            if where == "pre":
                specs.append((mod, "pre", lambda _m, args, key=(layer, k): caps.__setitem__(key, args[0])))
            else:
                specs.append((mod, "fwd", lambda _m, _a, out, key=(layer, k): caps.__setitem__(key, out)))
    with torch.no_grad(), hooks(specs):
        model(input_ids=input_ids, attention_mask=attention_mask)
    return caps


def test_attribution_equals_autograd_of_a_channel_gate(family, tok):
    """s(n) = |dL/dm_n| for a gate m (= 1) multiplying n's site value at every position."""
    m = tiny_model(family).double()
    ad = ModelAdapter(m)
    b = _batch(tok)
    got = attribution(m, ad, b, KINDS)
    for i in range(len(PROMPTS)):
        gates = {(layer, k): torch.ones(ad.width(k), dtype=torch.float64, requires_grad=True)
                 for layer in range(ad.n_layers) for k in KINDS}
        specs = []
        for (layer, k), g in gates.items():
            mod, where = site(ad, layer, k)
            if where == "pre":
                specs.append((mod, "pre", lambda _m, args, g=g: (args[0] * g,) + tuple(args[1:])))
            else:
                specs.append((mod, "fwd", lambda _m, _a, out, g=g: out * g))
        with torch.enable_grad(), hooks(specs):
            loss = _loss_of(m, b, i)
        grads = torch.autograd.grad(loss, list(gates.values()))
        for key, gr in zip(gates, grads):
            torch.testing.assert_close(got[key][i].double(), gr.abs(), rtol=1e-5, atol=1e-6)


def test_snip_equals_autograd_weight_gradients(family, tok, monkeypatch):
    from safety_neurons.importance import gradient

    m = tiny_model(family).double()
    ad = ModelAdapter(m)
    b = _batch(tok)
    got = snip(m, ad, b, KINDS)
    monkeypatch.setattr(gradient, "SNIP_CHUNK_ELEMENTS", 1)  # one prompt's weight gradient at a time
    for key, v in snip(m, ad, b, KINDS).items():
        torch.testing.assert_close(v, got[key], rtol=1e-12, atol=0, msg=str(key))
    for i in range(len(PROMPTS)):
        m.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for p in m.parameters():
                p.requires_grad_(True)
            _loss_of(m, b, i).backward()
        for layer in range(ad.n_layers):
            for k in KINDS:
                want = 0
                for lin, dim in slice_linears(ad, layer, k):
                    w = (lin.weight * lin.weight.grad).abs().sum(1 - dim)
                    if dim == 0 and lin.bias is not None:
                        w = w + (lin.bias * lin.bias.grad).abs()
                    want = want + w
                torch.testing.assert_close(got[(layer, k)][i].double(), want.detach(), rtol=1e-5, atol=1e-6)


def test_attribution_ranks_the_largest_true_effects_first(tok):
    """On ffn channels of a tiny llama: the estimate has the sign-free size of the true effect of
    zeroing, so its top channels are the ones whose zeroing changes the loss most."""
    m = tiny_model("llama").double()
    ad = ModelAdapter(m)
    b = _batch(tok)
    est = attribution(m, ad, b, ("ffn",))
    with torch.no_grad():
        base = _loss_of(m, b, 0)
        for layer in range(ad.n_layers):
            true = []
            for j in range(ad.d_ff):
                with deactivated(ad, {(layer, "ffn"): torch.tensor([j])}):
                    true.append(float((_loss_of(m, b, 0) - base).abs()))
            true = torch.tensor(true)
            top_true = set(true.topk(3).indices.tolist())
            top_est = set(est[(layer, "ffn")][0].topk(6).indices.tolist())
            assert top_true <= top_est, (layer, top_true, top_est)
            rank_corr = torch.corrcoef(torch.stack([true.argsort().argsort().double(),
                                                    est[(layer, "ffn")][0].argsort().argsort().double()]))[0, 1]
            assert rank_corr > 0.5  # the small effects are where a first-order estimate is least exact


def test_wanda_equals_its_formula(family, tok):
    m = tiny_model(family)  # float32: this transformers leaves NaN in left-padded float64 batches
    ad = ModelAdapter(m)
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    got = wanda(m, ad, b, sc, KINDS)
    inputs = {}

    def grab(mod, args, out):
        inputs[id(mod)] = args[0]

    lins = [lin for layer in range(ad.n_layers) for k in KINDS for lin, _ in slice_linears(ad, layer, k)]
    with torch.no_grad(), hooks([(lin, "fwd", grab) for lin in lins]):
        m(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for layer in range(ad.n_layers):
        for k in KINDS:
            for i in range(len(PROMPTS)):
                want = 0
                for lin, dim in slice_linears(ad, layer, k):
                    X = inputs[id(lin)][i][sc[i]]  # (n_scored, in)
                    W = lin.weight.detach()
                    if dim == 0:
                        want = want + torch.stack([sum(W[r, j].abs() * X[:, j].norm() for j in range(W.shape[1]))
                                                   for r in range(W.shape[0])])
                    else:
                        want = want + torch.stack([W[:, c].abs().sum() * X[:, c].norm() for c in range(W.shape[1])])
                torch.testing.assert_close(got[(layer, k)][i], want, rtol=1e-4, atol=1e-5)


def test_activation_diff_of_a_model_against_itself_is_zero(family, tok):
    m = tiny_model(family)
    ad = ModelAdapter(m)
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    for rel in (False, True):
        for fn in (activation_diff, contribution_diff):
            got = fn(m, ad, b, sc, KINDS, (m, ad), relative=rel)
            assert all(bool((v == 0).all()) for v in got.values()), (rel, fn.__name__)


def test_activation_diff_equals_mean_difference(tok):
    m, r = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    got = activation_diff(m, ad, b, sc, KINDS, (r, rad))
    rel = activation_diff(m, ad, b, sc, KINDS, (r, rad), relative=True)
    vals = {name: _sites(model, a, b.input_ids, b.attention_mask) for name, model, a in (("m", m, ad), ("r", r, rad))}
    for key in got:
        for i in range(len(PROMPTS)):
            hm, hr = vals["m"][key][i][sc[i]], vals["r"][key][i][sc[i]]
            d = (hm.mean(0) - hr.mean(0)).abs()
            torch.testing.assert_close(got[key][i], d, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(rel[key][i], d / (hr.abs().mean(0) + 1e-6), rtol=1e-4, atol=1e-5)


def test_contribution_diff_equals_the_written_vectors_difference(family, tok):
    """contribution_diff against its definition written out: per prompt, the mean over scored tokens of
    ||c_tn(M) - c_tn(R)||, c_tn = h_tn * W[:, n] for ffn (down_proj's column) and o (o_proj's column),
    c_tn = h_tn for q, k, v; the relative form over (mean_t |h_tn(R)| + eps) * ||W_R[:, n]||."""
    m, r = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    got = contribution_diff(m, ad, b, sc, KINDS, (r, rad))
    rel = contribution_diff(m, ad, b, sc, KINDS, (r, rad), relative=True)
    caps = {name: _sites(a.model, a, b.input_ids, b.attention_mask) for name, a in (("m", ad), ("r", rad))}
    for layer in range(ad.n_layers):
        for k in KINDS:
            key = (layer, k)
            cols = [[lin.weight.detach().double() for lin, d in a.site(layer, k).slices if d == 1] for a in (ad, rad)]
            for i in range(len(PROMPTS)):
                hm = caps["m"][key][i][sc[i]].double()  # (n_scored, width)
                hr = caps["r"][key][i][sc[i]].double()
                if cols[0]:
                    (wm,), (wr,) = cols
                    cm, cr = hm[:, None, :] * wm[None], hr[:, None, :] * wr[None]  # (n_scored, out, width)
                    want = (cm - cr).norm(dim=1).mean(0)
                    norm = wr.norm(dim=0)
                else:
                    want, norm = (hm - hr).abs().mean(0), 1.0
                torch.testing.assert_close(got[key][i].double(), want, rtol=1e-4, atol=1e-6, msg=str(key))
                torch.testing.assert_close(rel[key][i].double(), want / ((hr.abs().mean(0) + 1e-6) * norm),
                                           rtol=1e-4, atol=1e-5, msg=str(key))


def test_contribution_diff_sees_an_output_column_the_site_cannot(tok):
    """A changed o_proj column in the last layer leaves every activation up to its own site unchanged
    (only the last MLP, downstream, sees it): activation_diff is exactly zero there, contribution_diff
    is mean_t |h_t| * ||dW|| at that neuron alone."""
    m = tiny_model("llama")
    r = tiny_model("llama")
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    last = ad.n_layers - 1
    o_proj = ad.site(last, "o").slices[0][0]
    with torch.no_grad():
        o_proj.weight[:, 3] += 0.5
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    site_d = activation_diff(m, ad, b, sc, KINDS, (r, rad))
    got = contribution_diff(m, ad, b, sc, KINDS, (r, rad))
    downstream = (last, "ffn")
    assert all(bool((v == 0).all()) for key, v in site_d.items() if key != downstream)
    for key, v in got.items():
        if key not in ((last, "o"), downstream):
            assert bool((v == 0).all()), key
    o = got[(last, "o")]
    assert bool((o[:, torch.arange(o.shape[1]) != 3] == 0).all()) and bool((o[:, 3] > 0).all())
    caps = {}
    with torch.no_grad(), hooks([(o_proj, "pre", lambda _m, args: caps.__setitem__("h", args[0]))]):
        m(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for i in range(len(PROMPTS)):
        h_abs = caps["h"][i][sc[i]][:, 3].double().abs().mean()
        want = h_abs * 0.5 * o_proj.weight.shape[0] ** 0.5
        torch.testing.assert_close(o[i, 3].double(), want, rtol=1e-4, atol=1e-7)


def _site_values(model, ad, b, i):
    """{(layer, kind): (T_i, width)} site values of prompt i's row alone, without its padding."""
    keep = b.attention_mask[i].bool()
    return {key: v[0] for key, v in _sites(model, ad, b.input_ids[i][keep][None]).items()}


def _patched(ad, rad, ref_h, alphas):
    """Hooks that move each neuron's part of the model towards the reference's by its alpha (0: the
    model as it is, 1: the reference's part): q, k, v values h + a (h_R - h); ffn and o outputs
    out + (a h_R) W_R^T - (a h) W_M^T (their output columns' contributions)."""
    specs = []
    for (layer, k), a in alphas.items():
        st, hr = ad.site(layer, k), ref_h[(layer, k)]
        if st.hook == "fwd":
            specs.append((st.module, "fwd", lambda _m, _a, out, a=a, hr=hr: out + a * (hr - out)))
        else:
            wr = rad.site(layer, k).module.weight
            specs.append((st.module, "fwd", lambda mod, args, out, a=a, hr=hr, wr=wr:
                          out + (a * hr) @ wr.T - (a * args[0]) @ mod.weight.T))
    return specs


def test_patch_attribution_equals_autograd_of_an_interpolation(family, tok):
    """s(n) = |dL/da_n| at a = 0, where a_n moves neuron n's part of the model (its value for q, k, v;
    its contribution through its output column for ffn and o) towards the reference's at every
    position; the signed form keeps the sign."""
    m, r = tiny_model(family, seed=0).double(), tiny_model(family, seed=1).double()
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    b = _batch(tok)
    got = patch_attribution(m, ad, b, KINDS, (r, rad))
    signed = patch_attribution(m, ad, b, KINDS, (r, rad), signed=True)
    for i in range(len(PROMPTS)):
        ref_h = _site_values(r, rad, b, i)
        alphas = {(layer, k): torch.zeros(ad.width(k), dtype=torch.float64, requires_grad=True)
                  for layer in range(ad.n_layers) for k in KINDS}
        with torch.enable_grad(), hooks(_patched(ad, rad, ref_h, alphas)):
            loss = _loss_of(m, b, i)
        grads = torch.autograd.grad(loss, list(alphas.values()))
        for key, gr in zip(alphas, grads):
            # the loss is summed in float32 (as the gradient scorers do): errors of about 1e-6 of L's size
            torch.testing.assert_close(signed[key][i].double(), gr, rtol=1e-5, atol=2e-5, msg=str(key))
            torch.testing.assert_close(got[key][i].double(), gr.abs(), rtol=1e-5, atol=2e-5, msg=str(key))


def test_patch_attribution_estimates_actually_patching(tok):
    """A model a little away from its reference (every weight moved by 1%): the signed estimate of
    each ffn channel is close to the true change of L when that channel's part is set to the
    reference's, and the largest true changes rank first."""
    r = tiny_model("llama", seed=1).double()
    m = tiny_model("llama", seed=1).double()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + 0.01 * torch.randn_like(p))
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    b = _batch(tok)
    est = patch_attribution(m, ad, b, ("ffn",), (r, rad), signed=True)
    ref_h = _site_values(r, rad, b, 0)
    with torch.no_grad():
        base = _loss_of(m, b, 0)
        for layer in range(ad.n_layers):
            true = []
            for j in range(ad.d_ff):
                a = torch.zeros(ad.d_ff, dtype=torch.float64)
                a[j] = 1.0
                with hooks(_patched(ad, rad, ref_h, {(layer, "ffn"): a})):
                    true.append(float(_loss_of(m, b, 0) - base))
            true, e = torch.tensor(true, dtype=torch.float64), est[(layer, "ffn")][0].double()
            assert float((e - true).abs().max()) < 0.1 * float(true.abs().max()), layer
            assert set(true.abs().topk(3).indices.tolist()) <= set(e.abs().topk(5).indices.tolist()), layer


def test_a_cache_over_batches_gives_the_same_scores(tok):
    """The weight-only products kept in opts.cache from one batch to the next: each batch's scores are
    bit-identical to an uncached run, and the cache holds one entry per (layer, kind) after the first."""
    m, r = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ad, rad = ModelAdapter(m), ModelAdapter(r)
    opts = options(reference=(r, rad))
    keys = None
    for prompts, answers in ((PROMPTS, ANSWERS), (PROMPTS[::-1], ANSWERS[::-1])):
        b = encode(tok, prompts, None, responses=answers)
        sc = scored_mask(b, "content")
        for name in ("contribution_diff", "contribution_diff_rel", "patch_attribution"):
            got = get_scorer(name).fn(m, ad, b, sc, KINDS, opts)
            want = get_scorer(name).fn(m, ad, b, sc, KINDS, options(reference=(r, rad)))
            assert all(torch.equal(got[k], want[k]) for k in want), name
        keys = keys or set(opts.cache)
        assert set(opts.cache) == keys  # the second batch made nothing new
    # column products of every (layer, kind) (None for q, k, v), column differences of ffn and o
    assert len(keys) == ad.n_layers * (len(KINDS) + 2)


def test_patch_attribution_of_a_model_against_itself_is_zero(tok):
    m = tiny_model("llama").double()
    ad = ModelAdapter(m)
    out = patch_attribution(m, ad, _batch(tok), KINDS, (m, ad))
    assert all(bool((v == 0).all()) for v in out.values())


def test_registry_and_errors(tok):
    assert set(SCORERS) == {"plnd", "activation_diff", "activation_diff_rel", "contribution_diff",
                            "contribution_diff_rel", "patch_attribution", "attribution", "snip", "wanda"}
    with pytest.raises(UserError, match="known scorers are plnd"):
        get_scorer("magnitude")
    m = tiny_model("llama")
    ad = ModelAdapter(m)
    b = encode(tok, PROMPTS, None)
    sc = scored_mask(b, "content")
    with pytest.raises(UserError, match="reference_model"):
        get_scorer("activation_diff").fn(m, ad, b, sc, KINDS, options())
    with pytest.raises(UserError, match="target answer"):
        get_scorer("attribution").fn(m, ad, b, sc, KINDS, options())
    other = ModelAdapter(tiny_model("llama", num_key_value_heads=4))
    with pytest.raises(UserError, match="another architecture"):
        activation_diff(m, ad, b, sc, KINDS, (other.model, other))
    # every scorer returns every (layer, kind) at the kind's width, one row per prompt
    bt = encode(tok, PROMPTS, None, responses=ANSWERS)
    for name, s in SCORERS.items():
        out = s.fn(m, ad, bt if s.needs_target else b, scored_mask(bt if s.needs_target else b, "content"), KINDS,
                   options(reference=(m, ad)))
        assert sorted(out) == [(layer, k) for layer in range(ad.n_layers) for k in sorted(KINDS)] or \
            set(out) == {(layer, k) for layer in range(ad.n_layers) for k in KINDS}, name
        assert all(v.shape == (2, ad.width(k)) and v.dtype == torch.float32 for (_, k), v in out.items()), name

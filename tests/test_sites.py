"""The site table: for every (layer, kind) the adapter names the module, the weight dimension that indexes
the neuron and the hook point, and hooks, zeroing and slice training agree with it."""

from __future__ import annotations

import pytest
import torch

from safety_neurons.config import KINDS
from safety_neurons.data import encode
from safety_neurons.errors import UserError
from safety_neurons.hooks import at_site, deactivated, hooks
from safety_neurons.models import ModelAdapter, signature_widths
from safety_neurons.training import attach_slices, bake_slices
from tests.tiny import tiny_model

PROMPTS = ["how do I bake bread", "sea"]


def test_site_shapes(model):
    ad = ModelAdapter(model)
    for layer in range(ad.n_layers):
        for kind in KINDS:
            s = ad.site(layer, kind)
            assert s.width == ad.width(kind) == s.module.weight.shape[s.dim]
            assert s.hook == ("pre" if kind in ("o", "ffn") else "fwd")
            assert s.module in [lin for lin, _ in s.slices]  # the neuron's own row/column is trained
            assert all(lin.weight.shape[dim] == s.width for lin, dim in s.slices)
    with pytest.raises(UserError, match="unknown neuron kind 'z'"):
        ad.site(0, "z")
    # what stage=select reads from a saved set's signature, without the model (grouped-query: k, v narrower)
    assert signature_widths(ad.signature()) == {k: ad.width(k) for k in KINDS}
    assert ad.n_kv < ad.n_heads


def test_hook_point_is_what_deactivation_sets(model, tok):
    """The values read at a site are the ones deactivation zeroes: a capture hook registered after the
    deactivation hook sees exactly zero at the chosen indices and the undisturbed values elsewhere."""
    ad = ModelAdapter(model)
    b = encode(tok, PROMPTS)
    for kind in KINDS:
        s = ad.site(1, kind)
        seen = []
        spec = at_site(s, lambda x, seen=seen: seen.append(x.detach().clone()))
        with torch.no_grad(), hooks([spec]):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        idx = torch.tensor([0, s.width - 1])
        with torch.no_grad(), deactivated(ad, {(1, kind): idx}), hooks([spec]):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        clean, off = seen
        assert clean.shape[-1] == s.width and not torch.equal(clean[..., idx], torch.zeros_like(clean[..., idx]))
        assert torch.equal(off[..., idx], torch.zeros_like(off[..., idx]))
        keep = torch.ones(s.width, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(off[..., keep], clean[..., keep])


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_neuron_params_is_the_trained_slice(mlp_bias):
    """Per neuron, the adapter's parameter count is what slice training makes trainable (also with MLP
    biases, whose entries belong to the gate and up rows of an ffn neuron)."""
    model = tiny_model("llama", mlp_bias=mlp_bias)
    ad = ModelAdapter(model)
    for kind in KINDS:
        handles = attach_slices(model, ad, {(0, kind): torch.tensor([3])})
        assert sum(h.scatter.part.numel() for h in handles) == ad.neuron_params(kind)
        bake_slices(handles)
    assert ad.neuron_params("ffn") == 3 * ad.d_model + (2 if mlp_bias else 0)

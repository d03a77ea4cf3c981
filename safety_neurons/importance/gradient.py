"""Gradient scorers on a target answer (METHOD 8): ``attribution`` and ``snip``.

``L`` is the summed negative log-likelihood of each prompt's target answer tokens (``batch.labels``)
given the chat-formatted prompt; one forward and one backward pass per batch. Prompts do not interact
within a batch, so the gradient of the batch's summed loss at prompt b's activations is the gradient
of prompt b's own loss: every score is per prompt.

- ``attribution``: ``s(n) = | sum_t h_tn * dL/dh_tn |`` over every position of the prompt and answer
  (deactivation zeroes n everywhere): the first-order estimate of what zeroing n does to L.
- ``snip`` (Wei et al. 2024): ``s(n) = sum over n's trainable slice of |W * dL/dW|``, with prompt b's
  weight gradient ``dL_b/dW = sum_t g_bt x_bt^T`` formed from the linear layer's input x and output
  gradient g (bias entries: ``|b_r * sum_t g_btr|``).
"""

from __future__ import annotations

import torch

from ..data import Batch
from ..errors import UserError
from ..hooks import hooks
from ..models import ModelAdapter, model_device
from .sites import compute_dtype, site_specs, slice_linears, stack_scores

SNIP_CHUNK_ELEMENTS = 1 << 24  # weight-gradient entries formed at once by snip (64 MB in float32)


def right_padded(batch: Batch) -> Batch:
    """The same rows with their padding moved to the end. A left-padded row's padding positions attend
    to nothing, and the NaN that eager attention can leave there would reach every gradient through
    the softmax backward; right-padded, every row sees at least itself and its real tokens start at
    position 0, as when run alone."""
    am = batch.attention_mask.bool()
    T = am.shape[1]
    shift = (~am).sum(1, keepdim=True)  # left padding of each row
    idx = (torch.arange(T, device=am.device)[None] + shift) % T
    take = lambda t: None if t is None else torch.gather(t, 1, idx)  # noqa: E731
    return Batch(take(batch.input_ids), take(batch.attention_mask), take(batch.content_mask), take(batch.labels))


def target_loss(model, batch: Batch, extra_specs: list) -> torch.Tensor:
    """Summed NLL of ``batch.labels`` (a right-padded prompt + answer batch) with ``extra_specs`` hooked;
    the input embeddings are detached and made to require grad, so the graph reaches every activation
    whether or not the weights require grad (no weight gradient is ever formed)."""
    if batch.labels is None or not bool((batch.labels != -100).any(1).all()):
        raise UserError("a gradient scorer needs a target answer for every prompt; check detect.target_tokens "
                        "or the prompt set's response column")
    emb = model.get_input_embeddings()
    spec = (emb, "fwd", lambda _m, _a, out: out.detach().requires_grad_(True))
    target = batch.labels[:, 1:]
    sel = target != -100
    keep = sel.any(0).nonzero()[:, 0]  # logits at p predict token p + 1
    with torch.enable_grad(), hooks([spec, *extra_specs]):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       logits_to_keep=keep).logits  # (B, K, V)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(),
                                                 ignore_index=-100, reduction="sum")


def attribution(model, adapter: ModelAdapter, batch: Batch, kinds: tuple[str, ...]
                ) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: ``|sum_t h_tn dL/dh_tn|`` over each prompt's real tokens."""
    dev = model_device(model)
    dt = compute_dtype(model)
    b = right_padded(batch.to(dev))
    keys, hs = [], []

    def grab(layer: int, kind: str, h: torch.Tensor) -> None:
        keys.append((layer, kind))
        hs.append(h)

    loss = target_loss(model, b, site_specs(adapter, kinds, grab))
    grads = torch.autograd.grad(loss, hs)
    real = b.attention_mask.bool()[..., None]  # padding rows may hold NaN (fully masked attention)
    out = {}
    for key, h, g in zip(keys, hs, grads):
        out[key] = torch.where(real, h.detach().to(dt) * g.to(dt), 0.0).sum(1).abs()
    return stack_scores(out, adapter, kinds)


def snip(model, adapter: ModelAdapter, batch: Batch, kinds: tuple[str, ...]) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, kind): (B, width)}``: ``sum over the neuron's slice of |W * dL_b/dW|`` per prompt b."""
    dev = model_device(model)
    dt = compute_dtype(model)
    b = right_padded(batch.to(dev))
    lins: dict[int, torch.nn.Linear] = {}
    for layer in range(adapter.n_layers):
        for kind in kinds:
            for lin, _ in slice_linears(adapter, layer, kind):
                lins[id(lin)] = lin
    io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(mod, args, out):
        io[id(mod)] = (args[0], out)

    loss = target_loss(model, b, [(lin, "fwd", grab) for lin in lins.values()])
    order = list(io)
    grads = dict(zip(order, torch.autograd.grad(loss, [io[i][1] for i in order])))
    real = b.attention_mask.bool()[..., None]  # padding rows may hold NaN (fully masked attention)
    per_lin: dict[tuple[int, int], torch.Tensor] = {}  # (id, dim) -> (B, n)

    def lin_scores(lin: torch.nn.Linear, dim: int) -> torch.Tensor:
        if (id(lin), dim) not in per_lin:
            x = torch.where(real, io[id(lin)][0].detach().to(dt), 0.0)
            g = torch.where(real, grads[id(lin)].to(dt), 0.0)
            W = lin.weight.detach().to(dt)
            # a few prompts' (out, in) weight gradients at a time (at most SNIP_CHUNK_ELEMENTS entries),
            # multiplied by W in place and reduced by an L1 norm (|.| and the sum in one pass over the
            # buffer): one buffer per chunk instead of three per prompt
            step = max(1, SNIP_CHUNK_ELEMENTS // W.numel())
            rows = []
            for i in range(0, x.shape[0], step):
                prod = torch.bmm(g[i:i + step].transpose(1, 2), x[i:i + step])  # (b, out, in)
                rows.append(torch.linalg.vector_norm(prod.mul_(W), ord=1, dim=2 - dim))
            s = torch.cat(rows)
            if dim == 0 and lin.bias is not None:
                s = s + (lin.bias.detach().to(dt) * g.sum(1)).abs()
            per_lin[(id(lin), dim)] = s
        return per_lin[(id(lin), dim)]

    out = {}
    for layer in range(adapter.n_layers):
        for kind in kinds:
            out[(layer, kind)] = sum(lin_scores(lin, dim) for lin, dim in slice_linears(adapter, layer, kind))
    return stack_scores(out, adapter, kinds)

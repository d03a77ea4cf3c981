"""Chat SFT engine (loss on response tokens only) and neuron-slice training (METHOD 6).

Neuron-specific tuning keeps every unselected weight bit-identical: the selected rows/columns live in
small trainable tensors that a parametrization scatters into the frozen weight at each forward
(``W_eff = W.index_copy(dim, idx, P)``). Only those tensors reach the optimizer, so AdamW's moments,
weight decay and gradients (also DDP's all-reduce) exist only for trainable elements.

The backward forms only the slices' weight gradients: the layer runs on ``W_eff`` as a constant, and a
forward hook adds a term whose value is exactly zero (the input times ``P - P.detach()``) and whose
gradient is the slice's (``dL/dP = g[:, idx]^T x`` for rows, ``g^T x[:, idx]`` for columns). Autograd
through the scattered weight would form every linear layer's whole ``(out, in)`` weight gradient and
keep only the slices: a third of a step's products spent on numbers thrown away.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .autobatch import BatchSize
from .data import encode
from .errors import UserError
from .models import ModelAdapter, has_sliding_window, prefix_cache, sliding_window, unwrapped

log = logging.getLogger(__name__)


class SliceScatter(nn.Module):
    """Parametrization: replace slice ``idx`` along ``dim`` of the frozen tensor by the trainable ``part``.
    With ``detach`` the scattered tensor carries no gradient (:func:`slice_grad_hook` supplies ``part``'s)."""

    def __init__(self, original: torch.Tensor, dim: int, idx: torch.Tensor, detach: bool = False):
        super().__init__()
        self.dim = dim
        self.detach = detach
        self.register_buffer("idx", idx.clone().to(original.device), persistent=False)
        self.part = nn.Parameter(original.detach().index_select(dim, self.idx).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.part.detach() if self.detach else self.part
        return x.index_copy(self.dim, self.idx, part.to(x.dtype))


def _scatter(mod: nn.Module, name: str) -> SliceScatter | None:
    if not parametrize.is_parametrized(mod, name):
        return None
    sc = getattr(mod.parametrizations, name)[0]
    return sc if isinstance(sc, SliceScatter) else None


def slice_grad_hook(mod, args, out):
    """Forward hook of a linear layer whose weight (and bias) slices train: adds a term that is exactly
    zero in value and carries the slices' gradients, formed from the slice alone. The slices are looked
    up on the module it is called with, so a deep copy of a model trains its own copies."""
    if not torch.is_grad_enabled():
        return None
    weight, bias = _scatter(mod, "weight"), _scatter(mod, "bias")
    x = args[0].detach()
    if weight is not None and weight.detach and weight.part.requires_grad:
        dp = weight.part - weight.part.detach()  # zero, with d(dp)/d(part) = identity
        if weight.dim == 0:  # rows: output features idx
            out = out.index_add(-1, weight.idx, F.linear(x, dp.to(x.dtype)))
        else:  # columns: input features idx
            out = out + F.linear(x.index_select(-1, weight.idx), dp.to(x.dtype))
    if bias is not None and bias.detach and bias.part.requires_grad:
        db = (bias.part - bias.part.detach()).to(out.dtype)
        out = out.index_add(-1, bias.idx, db.expand(*out.shape[:-1], -1))
    return out


# (projection, dim of the weight that indexes the neuron, include bias entry: rows carry one, columns not)
def _slices(adapter: ModelAdapter, layer: int, kind: str) -> list[tuple[nn.Linear, int, bool]]:
    return [(lin, dim, dim == 0) for lin, dim in adapter.site(layer, kind).slices]


@dataclass
class SliceHandle:
    module: nn.Linear
    name: str  # weight | bias
    scatter: SliceScatter
    hook: object = None  # the slice-gradient hook's handle (on one handle of each module)


def attach_slices(model: nn.Module, adapter: ModelAdapter, neurons: dict[tuple[int, str], torch.Tensor],
                  slice_grads: bool = True) -> list[SliceHandle]:
    """Freeze the model and make only the METHOD 1 slices of ``neurons`` trainable. ``slice_grads``: form
    only the slices' weight gradients (module docstring); False: autograd through the scattered weight
    (the same gradients up to float rounding, at the cost of each layer's whole weight gradient)."""
    for p in model.parameters():
        p.requires_grad_(False)
    per_tensor: dict[tuple[int, str], dict] = {}
    for (layer, kind), idx in sorted(neurons.items()):
        idx = torch.as_tensor(idx, dtype=torch.long).unique()
        if idx.numel() == 0:
            continue
        for lin, dim, with_bias in _slices(adapter, layer, kind):
            targets = [("weight", dim)]
            if with_bias and lin.bias is not None:
                targets.append(("bias", 0))
            for name, d in targets:
                key = (id(lin), name)
                per_tensor.setdefault(key, {"lin": lin, "name": name, "dim": d, "idx": []})["idx"].append(idx)
    handles = []
    for ent in per_tensor.values():
        idx = torch.cat(ent["idx"]).unique()
        lin, name = ent["lin"], ent["name"]
        sc = SliceScatter(getattr(lin, name), ent["dim"], idx, detach=slice_grads)
        parametrize.register_parametrization(lin, name, sc, unsafe=True)
        getattr(lin.parametrizations, name).original.requires_grad_(False)
        handles.append(SliceHandle(lin, name, sc))
    if not handles:
        raise UserError("the neuron set has no trainable slice; check the set and finetune.target")
    if slice_grads:
        first: dict[int, SliceHandle] = {}
        for h in handles:
            first.setdefault(id(h.module), h)
        for h in first.values():
            # first among the module's forward hooks: any other sees the output its gradient flows through
            h.hook = h.module.register_forward_hook(slice_grad_hook, prepend=True)
    return handles


def freeze_slices(adapter: ModelAdapter, neurons: dict[tuple[int, str], torch.Tensor]) -> list:
    """Keep the METHOD 1 slices of ``neurons`` fixed while every other weight trains: a gradient hook
    zeroes their gradient, so AdamW without weight decay leaves them bit-identical (its update of a
    zero gradient is exactly zero; clipping scales a zero to zero). Returns the hook handles."""
    masks: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for (layer, kind), idx in sorted(neurons.items()):
        idx = torch.as_tensor(idx, dtype=torch.long).unique()
        for lin, dim, with_bias in _slices(adapter, layer, kind):
            targets = [("weight", dim)] + ([("bias", 0)] if with_bias and lin.bias is not None else [])
            for name, d in targets:
                p = getattr(lin, name)
                keep = masks.setdefault(id(p), (p, torch.zeros_like(p, dtype=torch.bool)))[1]
                keep.index_fill_(d, idx.to(p.device), True)
    return [p.register_hook(lambda g, keep=keep: g.masked_fill(keep, 0.0)) for p, keep in masks.values()]


def bake_slices(handles: list[SliceHandle]) -> None:
    """Write the trained slices into the weights and remove the parametrizations."""
    for h in handles:
        if h.hook is not None:
            h.hook.remove()
            h.hook = None
        if parametrize.is_parametrized(h.module, h.name):
            parametrize.remove_parametrizations(h.module, h.name, leave_parametrized=True)


def slice_delta(handles: list[SliceHandle], module_names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Compact delta: for each tuned tensor, its indices and the new values of those slices."""
    out = {}
    for h in handles:
        base = f"{module_names[id(h.module)]}.{h.name}"
        out[f"{base}.idx"] = h.scatter.idx.cpu()
        out[f"{base}.dim{h.scatter.dim}"] = h.scatter.part.detach().cpu().contiguous()
    return out


@torch.no_grad()
def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> int:
    """Apply a compact delta (from :func:`slice_delta`) to a base model in place; returns tensors changed."""
    params = dict(model.named_parameters())
    n = 0
    for key, idx in delta.items():
        if not key.endswith(".idx"):
            continue
        base = key[: -len(".idx")]
        vals_key = next((k for k in delta if k.startswith(base + ".dim")), None)
        if base not in params or vals_key is None:
            raise UserError(f"delta entry {base} does not match this model; apply it to the base model it was made on")
        dim = int(vals_key[len(base) + 4:])
        p = params[base]
        p.index_copy_(dim, idx.to(p.device), delta[vals_key].to(p.device, p.dtype))
        n += 1
    return n


# ------------------------------------------------------------------------------------------ SFT loop
def adamw(params: list[nn.Parameter], fcfg) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device (one pass over all
    tensors: about 4x cheaper than the per-tensor loop on CPU, a tenth of a full fine-tuning step)."""
    kw = dict(lr=fcfg.lr, weight_decay=fcfg.weight_decay, betas=(0.9, fcfg.adam_beta2))
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, **kw)


def shared_prefix_len(b) -> int:
    """Leading tokens that every row of a right-padded batch has in common (the chat template's system
    prompt and user header) and that come before the first logit any loss needs."""
    T = b.input_ids.shape[1]
    same = (b.input_ids == b.input_ids[:1]).all(0) & b.attention_mask.bool().all(0)
    n = int(same.long().cumprod(0).sum())
    lab = (b.labels != -100).any(0).nonzero()
    first_logit = int(lab[0]) - 1 if len(lab) else T - 1  # logits at p predict token p + 1
    return max(0, min(n, first_logit, T - 1))


def response_logits(model, b, keep: torch.Tensor, share: bool = True) -> torch.Tensor:
    """Logits at positions ``keep`` of a right-padded training batch.

    With ``share``, the prefix all rows have in common is run once (one row) and its keys and values
    are repeated for the batch, so a step computes the shared system prompt once instead of once per
    row (about a quarter of a chat SFT batch's tokens). Same logits and gradients as the plain
    forward: the repeat is differentiable, so every row's gradient reaches the one prefix. Plain
    forward where nothing is shared or the model has sliding windows."""
    p = shared_prefix_len(b) if share and not has_sliding_window(model) else 0
    if p < 2:
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=keep).logits
    kw, cache = prefix_cache(model, b.input_ids, b.attention_mask, p)
    return model(input_ids=b.input_ids[:, p:], attention_mask=b.attention_mask, use_cache=True,
                 logits_to_keep=keep - p, **{kw: cache}).logits


PACK_MAX_TOKENS = 4096  # a packed row's L x L attention mask costs 4 L^2 bytes: 64 MiB at this length


def packed_logits(model, b, sel: torch.Tensor, share: bool = True) -> torch.Tensor | None:
    """Logits of exactly the loss positions ``sel`` of a right-padded batch, from one packed row.

    The rows go one after the other into a single sequence, padding dropped, each with its own position
    ids and a block-causal mask: a token sees the earlier tokens of its own row and, with ``share``, the
    rows' common prefix (system prompt and user header), which is in the row once. So a step runs no
    padding, the shared prefix once, every weight once (no second use whose gradients autograd has to
    add), and the vocabulary projection only where a token carries loss. Same logits as the padded
    forward up to float rounding. ``sel`` (B, T-1) marks the targets ``b.labels[:, 1:]`` that need a
    logit; the result (N, V) follows its row-major order. None where packing does not apply: an
    attention implementation that takes no custom mask (flash attention), a row longer than a sliding
    window, or a packed row over ``PACK_MAX_TOKENS``."""
    inner = unwrapped(model)
    if getattr(inner.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return None
    am = b.attention_mask.bool()
    if not bool((am.cumprod(1) == am).all()):
        raise ValueError("packed_logits needs a right-padded batch (encode(..., padding_side='right'))")
    n = am.sum(1).tolist()  # row i is [0, n_i)
    win = sliding_window(model)
    if win is not None and max(n) > win:
        return None
    p = shared_prefix_len(b) if share else 0
    rows, cols = sel.nonzero(as_tuple=True)  # row-major, like the padded logits flattened
    if len(cols) and int(cols.min()) < p:  # shared_prefix_len stops before the first loss logit
        return None
    L = p + sum(k - p for k in n)
    if L > PACK_MAX_TOKENS:
        return None
    dev = b.input_ids.device
    ids = torch.cat([b.input_ids[0, :p]] + [b.input_ids[i, p:k] for i, k in enumerate(n)])
    pos = torch.cat([torch.arange(p)] + [torch.arange(p, k) for k in n]).to(dev)
    seg = torch.cat([torch.zeros(p, dtype=torch.long)]
                    + [torch.full((k - p,), i + 1, dtype=torch.long) for i, k in enumerate(n)]).to(dev)
    ok = (pos[None, :] <= pos[:, None]) & ((seg[None, :] == seg[:, None]) | (seg[None, :] == 0))
    dt = inner.get_input_embeddings().weight.dtype
    mask = torch.zeros(1, 1, L, L, dtype=dt, device=dev).masked_fill_(~ok, torch.finfo(dt).min)
    start = torch.tensor([p + sum(k - p for k in n[:i]) for i in range(len(n))], device=dev)
    keep = start[rows] + cols - p  # the packed index of the token at (row, col)
    return model(input_ids=ids[None], attention_mask=mask, position_ids=pos[None], use_cache=False,
                 logits_to_keep=keep).logits[0]


def step_logits(model, b, sel: torch.Tensor, pack: bool = True, share: bool = True, ddp: bool = False
                ) -> torch.Tensor:
    """Logits (N, V) of the loss positions ``sel`` (B, T-1) of a right-padded training batch, in row-major
    order: packed (:func:`packed_logits`) where it applies and ``pack`` is on, else the padded batch
    (with ``share``, its common prefix run once through the key/value cache: :func:`response_logits`;
    not under DDP, whose reducer expects one forward per backward)."""
    if pack:
        out = packed_logits(model, b, sel, share)
        if out is not None:
            return out
    keep = sel.any(0).nonzero()[:, 0]
    logits = response_logits(model, b, keep, share=share and not ddp)  # (B, K, V)
    return logits[sel[:, keep]]


def step_batches(n_pairs: int, fcfg):
    """The pair indices of each optimizer step: ``fcfg.grad_accum`` global micro-batches of
    ``fcfg.batch_size``, drawn from a seeded shuffle of all pairs that is cycled (reshuffled each pass)."""
    rng = random.Random(fcfg.seed)
    order: list[int] = []
    for _step in range(fcfg.steps):
        micro = []
        for _ in range(fcfg.grad_accum):
            while len(order) < fcfg.batch_size:
                perm = list(range(n_pairs))
                rng.shuffle(perm)
                order += perm
            micro.append(order[: fcfg.batch_size])
            order = order[fcfg.batch_size:]
        yield micro


def train_sft(model, tok, prompts: list[str], responses: list[str | list[int]], fcfg, system_prompt: str | None,
              params: list[nn.Parameter], accelerator=None, max_length: int = 512, progress: bool = True,
              on_step=None) -> dict:
    """Chat SFT for ``fcfg.steps`` optimizer steps on (prompt, response) pairs; loss on response tokens.
    A response is text (EOS appended) or token ids taken as they are (see :func:`~.data.encode`).

    ``params``: what trains (every other parameter must have requires_grad False). Returns stats
    with the loss curve. Batches are drawn from a seeded shuffle, cycled; with Accelerate each
    process takes its shard of every global batch. ``on_step(step)``, called after each optimizer step
    (1-based) with the model in eval mode, stops training early by returning True.
    """
    from accelerate import Accelerator
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if not prompts:
        raise UserError("no training pairs; check the prompt sets and finetune.n_harmful/n_harmless")
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=fcfg.grad_accum)
    opt = adamw(params, fcfg)
    total = fcfg.steps
    warm = int(math.ceil(fcfg.warmup * total))
    if fcfg.schedule == "constant":  # a step cap that early stopping may not reach: no decay towards it
        sched = get_constant_schedule_with_warmup(opt, warm)
    elif fcfg.schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warm, total)
    else:
        sched = get_linear_schedule_with_warmup(opt, warm, total)
    model.train()
    model, opt = acc.prepare(model, opt)
    world, rank = acc.num_processes, acc.process_index
    per_rank = fcfg.batch_size // world if fcfg.batch_size % world == 0 else None
    if per_rank is None:
        raise UserError(f"finetune.batch_size={fcfg.batch_size} must be divisible by the {world} processes")
    # loss tokens per pair: the loss is the token mean over the whole optimizer step (all processes, all
    # accumulation micro-batches), so a 2-process run equals one process with the same global batch
    # (a per-process mean, averaged by DDP, would weight a process's tokens by its shard's length)
    m, dw = fcfg.decision_tokens, float(fcfg.decision_weight)
    if m < 0 or dw <= 0:
        raise UserError(f"finetune.decision_tokens={m} must be >= 0 and finetune.decision_weight={dw} > 0")

    def weights(target: torch.Tensor) -> torch.Tensor:
        """Loss weight of each target token: 0 off the response, decision_weight on its first m tokens."""
        on = target != -100
        w = on.to(torch.float32)
        if m and dw != 1.0:
            w = torch.where(on & (on.cumsum(1) <= m), torch.full_like(w, dw), w)
        return w

    plan = list(step_batches(len(prompts), fcfg))
    drawn = sorted({i for micro in plan for g in micro for i in g})  # the pairs these steps use
    if any(responses[i] is None for i in drawn):
        raise ValueError("a drawn training pair has no response (training_pairs(drawn_only=True) with other steps)")
    n_tok = {i: float(weights(encode(tok, [prompts[i]], system_prompt, [responses[i]],
                                     max_length=max_length).labels[:, 1:]).sum()) for i in drawn}
    fb = BatchSize.of(getattr(fcfg, "forward_batch", None) or per_rank, "finetune.forward_batch", per_rank,
                      "pairs per forward/backward")
    if fb.size is None:  # auto: start from the estimate of one micro-batch's backward, at most a micro-batch
        from .memory import estimate_for

        longest = max(drawn, key=lambda i: n_tok[i] + len(prompts[i]))
        length = int(encode(tok, [prompts[longest]], system_prompt, [responses[longest]],
                            max_length=max_length).input_ids.shape[1])
        fb.resolve(acc.device, estimate_for(model, "tuning", length), cap=per_rank)

    def pair_part(part: list[int], n_step: float) -> torch.Tensor:
        """Forward and backward of some of a micro-batch's pairs; their (weighted loss sum, weight sum)."""
        b = encode(tok, [prompts[i] for i in part], system_prompt, [responses[i] for i in part],
                   max_length=max_length, padding_side="right").to(acc.device)
        target = b.labels[:, 1:]
        # logits only where a token carries loss: the vocabulary projection of the prompt
        # positions is a fifth of a small model's work, and its loss is zero anyway
        sel = target != -100
        logits = step_logits(model, b, sel, pack=fcfg.pack, share=fcfg.share_prefix, ddp=world > 1)
        w = weights(target)[sel]
        loss_sum = (F.cross_entropy(logits.float(), target[sel], reduction="none") * w).sum()
        # DDP averages gradients over processes and backward() divides by the accumulation steps
        acc.backward(loss_sum * (world * acc.gradient_accumulation_steps / n_step))
        return torch.stack([loss_sum.detach(), w.sum().to(loss_sum)])

    def one_step(micro: list[list[int]]) -> list[float]:
        """One optimizer step over its micro-batches; each micro-batch's pairs go through forward and
        backward ``fb.size`` at a time (the gradient is their sum either way)."""
        n_step = max(1.0, sum(n_tok[i] for gidx in micro for i in gidx))
        step_losses = []
        for gidx in micro:
            idx = gidx[rank * per_rank: (rank + 1) * per_rank]
            with acc.accumulate(model):
                parts = [idx[s: s + fb.size] for s in range(0, len(idx), fb.size)]
                tot = torch.zeros(2, device=acc.device)
                for j, part in enumerate(parts):
                    # the gradient of all but a micro-batch's last part stays local (DDP reduces once)
                    with acc.no_sync(model) if j < len(parts) - 1 else nullcontext():
                        tot = tot + pair_part(part, n_step)
                if acc.sync_gradients and fcfg.clip:
                    acc.clip_grad_norm_(params, fcfg.clip)
                opt.step()
                sched.step() if acc.sync_gradients else None
                opt.zero_grad(set_to_none=True)
            tot = acc.gather(tot[None])
            step_losses.append(float(tot[:, 0].sum() / tot[:, 1].sum()))  # (weighted) token mean of the global micro-batch
        return step_losses

    losses = []
    t0 = time.time()
    bar = tqdm(total=total, desc="train", disable=not (progress and acc.is_main_process))
    done = 0
    for micro in plan:
        at = acc.step
        while True:
            try:
                losses += one_step(micro)
                break
            except Exception as err:  # noqa: BLE001 - halve() re-raises anything but memory with an automatic size
                # out of memory before the optimizer stepped: the step's gradients are dropped and it is
                # redone in smaller parts (the accumulation counter back where the step began)
                fb.halve(err)
                for p in params:  # not opt.zero_grad(): Accelerate's skips it between accumulation steps
                    p.grad = None
                acc.step = at
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done += 1
        if on_step is not None:
            model.eval()
            stop = on_step(done)
            model.train()
            if stop:
                break
    bar.close()
    model = acc.unwrap_model(model)
    model.eval()
    return {"losses": losses, "train_seconds": time.time() - t0, "steps": done,
            "trainable_params": sum(p.numel() for p in params), "forward_batch": fb.record()}


def optimizer_state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)

"""The scorers by name (``detect.scorer=``). Adding one is one module and one entry here.

Every scorer takes ``(model, adapter, batch, scored, kinds, opts)`` and returns per-prompt scores
``{(layer, kind): (B, width) float32 on CPU}``. ``batch`` is the left-padded chat-formatted prompt batch;
for a scorer with ``needs_target`` it also holds the target answer (``batch.labels``), and ``scored``
still marks the prompt's scored tokens. ``opts`` carries the settings a scorer reads: ``mode``,
``qk_chunk_mb`` and ``qk_kernel`` (PLND), ``reference``, the (model, adapter) of the reference model
(activation and contribution differences, patch attribution), and ``cache``, a dict for what a scorer
derives from the weights alone: the weights do not change while one prompt set is scored, so it is
computed for the first batch and kept for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import UserError
from .activation import activation_diff, contribution_diff
from .gradient import attribution, snip
from .patching import patch_attribution
from .plnd import prompt_scores
from .wanda import wanda


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable
    needs_target: bool = False  # scores a target answer's log-likelihood (batch.labels)
    needs_reference: bool = False  # compares against opts.reference
    about: str = ""


def _plnd(model, adapter, batch, scored, kinds, opts):
    return prompt_scores(model, adapter, batch, scored, kinds=kinds, mode=opts.mode, qk_chunk_mb=opts.qk_chunk_mb,
                         qk_kernel=opts.qk_kernel)


SCORERS: dict[str, Scorer] = {s.name: s for s in [
    Scorer("plnd", _plnd, about="change of the sublayer output when the neuron alone is zeroed (exact or original)"),
    Scorer("activation_diff", lambda m, a, b, s, k, o: activation_diff(m, a, b, s, k, o.reference),
           needs_reference=True, about="|mean activation - the reference model's|"),
    Scorer("activation_diff_rel", lambda m, a, b, s, k, o: activation_diff(m, a, b, s, k, o.reference, relative=True),
           needs_reference=True, about="activation difference over the reference's mean |activation|"),
    Scorer("contribution_diff", lambda m, a, b, s, k, o: contribution_diff(m, a, b, s, k, o.reference, cache=o.cache),
           needs_reference=True, about="mean over tokens of ||written vector (activation x output column) - the "
           "reference's||"),
    Scorer("contribution_diff_rel",
           lambda m, a, b, s, k, o: contribution_diff(m, a, b, s, k, o.reference, relative=True, cache=o.cache),
           needs_reference=True, about="contribution difference over the reference's mean contribution norm"),
    Scorer("attribution", lambda m, a, b, s, k, o: attribution(m, a, b, k), needs_target=True,
           about="first-order effect of zeroing the neuron on the target answer's log-likelihood"),
    Scorer("patch_attribution", lambda m, a, b, s, k, o: patch_attribution(m, a, b, k, o.reference, cache=o.cache),
           needs_target=True, needs_reference=True,
           about="first-order effect on the target answer's log-likelihood of putting back the reference's part "
           "of the neuron"),
    Scorer("snip", lambda m, a, b, s, k, o: snip(m, a, b, k), needs_target=True,
           about="sum over the neuron's slice of |W * dL/dW|"),
    Scorer("wanda", lambda m, a, b, s, k, o: wanda(m, a, b, s, k), about="sum over the slice of |W| * ||input||"),
]}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UserError(f"unknown detect.scorer={name!r}; known scorers are {', '.join(SCORERS)}")
    return SCORERS[name]


def options(mode: str = "exact", qk_chunk_mb: float = 256, qk_kernel: str = "auto", reference=None):
    """The ``opts`` a scorer reads (see the module docstring); one per prompt set scored."""
    return SimpleNamespace(mode=mode, qk_chunk_mb=qk_chunk_mb, qk_kernel=qk_kernel, reference=reference, cache={})

"""Neuron scorers: per-prompt scores for every neuron address ``(layer, kind, index)``.

Every scorer returns ``{(layer, kind): (B, width) float32 on CPU}`` for a batch of prompts, so selection,
deactivation and tuning take any of them unchanged. :mod:`.plnd` is the PLND importance (exact and
original modes); :mod:`.registry` lists the scorers by name (``detect.scorer=``).
"""

from .plnd import (
    KINDS,
    MODES,
    QK_KERNELS,
    brute_force_importance,
    prompt_scores,
    qk_kernel_used,
)
from .registry import SCORERS, Scorer, get_scorer, options

__all__ = ["KINDS", "MODES", "QK_KERNELS", "SCORERS", "Scorer", "brute_force_importance", "get_scorer", "options",
           "prompt_scores", "qk_kernel_used"]

"""Process-wide settings that make CPU runs faster without changing any number."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep memory that torch frees and hand it out again, instead of returning it
    to the system and faulting fresh pages in for the next tensor.

    By default glibc serves large blocks (above a threshold that starts at 128 KiB and rises with use
    to at most 32 MiB) with fresh ``mmap`` pages that are returned at ``free``: every training step
    then page-faults its gradients and activations in again (an embedding gradient of SmolLM2 is
    113 MiB), and page faults are slow in virtual machines. Measured with ``benchmarks/train_step.py``:
    a packed full fine-tuning step of SmolLM2 page-faults ~37 000 times with the default and ~6 000
    times with this (~3% faster); a padded step with the prefix cache was 1.2x faster. The cost is
    that the process keeps its peak memory until it exits.
    Idempotent; a no-op (returns False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    log.debug("malloc keeps freed memory: %s", ok)
    return ok

"""Batch sizes that are a number, or ``auto``: as many items as the accelerator's free memory holds.

``detect.batch_size``, ``eval.batch_size`` and ``finetune.forward_batch`` take ``auto``. On CUDA an
automatic size starts from the activation estimate of :mod:`safety_neurons.memory` for the free memory
(after the weights are loaded) and the longest sequence of the batch, and halves whenever a batch runs
out of memory; the batch is then redone in smaller pieces, so nothing is lost or counted twice. On a CPU
there is no free-memory reading to start from, so it starts from the stage's usual number and still
halves when an allocation fails. A fixed number is used as it is, and an out-of-memory error with a
fixed number stops the run as before. What was chosen is printed and recorded in the results.

Scores, answers and gradients do not depend on the batch size beyond the last float bits (a prompt's
padding and the shapes of the matrix products change with its neighbours); greedy answers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import UserError

AUTO = "auto"
HEADROOM = 0.8  # share of the free memory an automatic batch may plan to use (the estimate is rough)
MAX_START = 1024  # no automatic batch starts larger than this, whatever the memory


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def check(key: str, value, none_ok: bool = False) -> None:
    """One line when ``value`` is neither an integer >= 1 nor ``auto``."""
    if value is None and none_ok:
        return
    if is_auto(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1 or auto" + (" or null" if none_ok else "")
        raise UserError(f"{key}={value!r} is not allowed; use {allowed}")


def is_oom(err: BaseException) -> bool:
    """An accelerator's out-of-memory error, or a CPU allocation that failed (a process the kernel
    kills for memory cannot be caught, so on a CPU halving only helps with single large allocations)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def start_size(per_batch_bytes: Callable[[int], int], free_bytes: int, cap: int) -> int:
    """The largest power of two ``b <= cap`` whose estimate ``per_batch_bytes(b)`` fits in
    ``HEADROOM * free_bytes`` (at least 1)."""
    b, best = 1, 1
    limit = HEADROOM * free_bytes
    while b <= min(cap, MAX_START):
        if per_batch_bytes(b) > limit:
            break
        best = b
        b *= 2
    return best


def free_cuda_bytes(device) -> int | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


class BatchSize:
    """The batch size of one loop over items: fixed, or automatic (see the module's text).

    ``key`` names the setting in messages; ``fallback`` is where an automatic size starts without a
    CUDA free-memory reading. :meth:`resolve` fixes the starting size once; :meth:`run` calls a batch
    function over the items and halves an automatic size on out-of-memory.
    """

    def __init__(self, value, key: str, fallback: int, what: str = "", log: Callable[[str], None] = print):
        check(key, value)
        self.key, self.auto, self.log = key, is_auto(value), log
        self.name = f"{key}=auto" + (f" ({what})" if what else "")
        self.size: int | None = None if self.auto else int(value)
        self.fallback = fallback
        self.halvings = 0

    @classmethod
    def of(cls, value, key: str, fallback: int, what: str = "") -> BatchSize:
        """``value`` itself when it already is a :class:`BatchSize` (its halvings then carry over)."""
        return value if isinstance(value, BatchSize) else cls(value, key, fallback, what)

    def resolve(self, device=None, per_batch_bytes: Callable[[int], int] | None = None, cap: int | None = None,
                ) -> int:
        """The size to start with: fixed, already chosen, or chosen now from the free memory."""
        if self.size is not None:
            return self.size
        free = free_cuda_bytes(device) if device is not None else None
        cap = max(1, cap or MAX_START)
        if free is not None and per_batch_bytes is not None:
            self.size = start_size(per_batch_bytes, free, cap)
            self.log(f"{self.name}: {self.size} (estimated {per_batch_bytes(self.size) / 2**30:.2f} GiB a "
                     f"batch, {free / 2**30:.1f} GiB free on {torch.device(device)})")
        else:
            self.size = min(self.fallback, cap)
            where = torch.device(device).type if device is not None else "this device"
            self.log(f"{self.name}: {self.size} on {where} (no free-memory reading; halved if a batch "
                     f"runs out of memory)")
        return self.size

    def halve(self, err: BaseException) -> None:
        """After ``err``: half the size, or the error itself when it is fixed, not memory, or already 1."""
        if not self.auto or not is_oom(err):
            raise err
        if self.size is None or self.size <= 1:
            raise UserError(f"{self.name}: out of memory with a batch of 1; use a shorter "
                            f"model.max_length or a machine with more memory") from err
        self.size = max(1, self.size // 2)
        self.halvings += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.log(f"{self.name}: out of memory, now {self.size}")

    def run(self, items: Sequence, fn: Callable[[list], object]) -> list:
        """``fn`` over consecutive batches of ``items`` (a batch is a list of them), in order; a batch that
        runs out of memory with an automatic size is redone at half the size. Returns ``fn``'s results."""
        if self.size is None:
            self.resolve()
        out, i, items = [], 0, list(items)
        while i < len(items):
            part = items[i: i + self.size]
            try:
                out.append(fn(part))
            except Exception as err:  # noqa: BLE001 - halve() re-raises anything that is not memory
                self.halve(err)
                continue
            i += len(part)
        return out

    def record(self) -> dict:
        """What the results record: the setting and the size that ran."""
        return {"setting": AUTO if self.auto else self.size, "size": self.size, "halvings": self.halvings}

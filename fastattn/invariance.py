"""Batch-invariant decoding: ``with fastattn.batch_invariant():`` makes a sequence's decode
output independent of which other sequences share its batch, and of the batch size.

What varies with the batch otherwise: the decode kernels cut each sequence's keys into a number
of splits chosen to fill the GPU (from the batch size and the longest sequence), and the splits
are merged by their lse, so the rounding depends on the batch. In this mode the split count
comes from the cache capacity (Lmax) alone: ``ceil(Lmax / split_tokens)``. Every sequence's keys
are then cut at the same places and merged in the same order whatever else is in the batch, so
its output is bitwise the same (checked on the kernels; the CPU fallback's torch SDPA and
``num_splits`` given by the caller are outside this mode).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

_state = threading.local()


@contextlib.contextmanager
def batch_invariant(split_tokens: int = 512):
    """Within the block, decode calls that leave ``num_splits`` None split each sequence's keys
    ``ceil(Lmax / split_tokens)`` ways (at most 128), a count of the cache's shape only.

    Raises:
        ValueError: split_tokens not an int >= 1.
    """
    if not (isinstance(split_tokens, int) and split_tokens >= 1):
        raise ValueError(f"batch_invariant: split_tokens must be an int >= 1, got {split_tokens!r}")
    before = getattr(_state, "split_tokens", None)
    _state.split_tokens = split_tokens
    try:
        yield
    finally:
        _state.split_tokens = before


def split_tokens() -> Optional[int]:
    """The active mode's split size in tokens, or None outside ``batch_invariant``."""
    return getattr(_state, "split_tokens", None)

"""Batch-invariant decoding: ``with fastattn.batch_invariant():`` makes a sequence's decode
output independent of which other sequences share its batch and of the batch size, and (by
default) bitwise equal to the training forward's rows.

What varies with the batch otherwise: the decode kernels cut each sequence's keys into a number
of splits chosen to fill the GPU (from the batch size and the longest sequence), and the splits
are merged by their lse, so the rounding depends on the batch. In this mode the split count is
a function of the cache's shape alone:

- ``split_tokens=None`` (the default): one split, and the kernels reduce each query row's keys
  as ``flash_attention(q, k, v, causal=True)`` over the whole sequence reduces that position's
  row: the forward's key tiles (its first tile choice for the head dim, dtype and GPU), taken in
  its order, with its softmax arithmetic. So the output for a new token at position t equals row
  t of the training forward bit for bit (single- and multi-token steps, contiguous and paged).
  It holds for calls without ALiBi, softcap, sinks or a left window and with a positive scale
  (those keep one split, batch-invariant only), on the kernels; it needs the forward's first
  tile choice to have launched (``first_fit`` falls back to smaller tiles only where a GPU's
  shared memory refuses it), and per-element dot products that do not depend on the number of
  rows in the tile. Not on the CPU fallbacks (torch's SDPA tiles by the query count).
- ``split_tokens=n``: ``ceil(Lmax / n)`` splits (at most 128): batch-invariant, faster on long
  caches, not equal to the forward.

``num_splits`` given by the caller is outside this mode.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

_state = threading.local()


@contextlib.contextmanager
def batch_invariant(split_tokens: Optional[int] = None):
    """Within the block, decode calls that leave ``num_splits`` None use one split that follows
    the training forward's reduction (``split_tokens`` None), or split each sequence's keys
    ``ceil(Lmax / split_tokens)`` ways (at most 128): counts of the cache's shape only.

    Raises:
        ValueError: split_tokens neither None nor an int >= 1.
    """
    if not (split_tokens is None or (isinstance(split_tokens, int) and split_tokens >= 1)):
        raise ValueError(f"batch_invariant: split_tokens must be None or an int >= 1, got {split_tokens!r}")
    before = getattr(_state, "mode", None)
    _state.mode = (split_tokens,)
    try:
        yield
    finally:
        _state.mode = before


def active() -> bool:
    """Whether a ``batch_invariant`` block is active."""
    return getattr(_state, "mode", None) is not None


def split_tokens() -> Optional[int]:
    """The active mode's split size in tokens: None outside ``batch_invariant`` or with one
    split that follows the forward."""
    mode = getattr(_state, "mode", None)
    return None if mode is None else mode[0]

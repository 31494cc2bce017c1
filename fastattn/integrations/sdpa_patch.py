"""Route torch.nn.functional.scaled_dot_product_attention to fastattn.

Every caller that looks the function up on ``torch.nn.functional`` at call time (timm,
torchvision, Hugging Face's "sdpa" attention, nn.MultiheadAttention, nanoGPT-style code) then
runs ``fastattn.scaled_dot_product_attention``, which runs the kernels where
``fastattn.backend.route`` sends the call there and torch's original function (captured at
import as ``fastattn.backend.TORCH_SDPA``) everywhere else, so patching never changes what
works. Code that imported the function by name before patching
(``from torch.nn.functional import scaled_dot_product_attention``) keeps torch's.
"""
from __future__ import annotations

import torch.nn.functional as F

from fastattn.backend import TORCH_SDPA
from fastattn.functional import scaled_dot_product_attention as _fastattn_sdpa

def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, **kwargs):
    """torch's signature; fastattn's drop-in, or torch's original for arguments it does not know."""
    if kwargs:
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, **kwargs)
    return _fastattn_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)


class _Patch:
    """Returned by patch_sdpa(): already active; as a context manager it restores, on exit,
    what was there before it (so an inner block leaves an outer one active)."""

    def __init__(self, previous):
        self.previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.previous
        return False


def patch_sdpa() -> _Patch:
    """Make ``torch.nn.functional.scaled_dot_product_attention`` run fastattn.

    Use globally (``fastattn.patch_sdpa()`` ... ``fastattn.unpatch_sdpa()``) or as a context
    manager (``with fastattn.patch_sdpa(): model(x)``), which restores torch's on exit. Blocks
    nest: each restores what was there when it began. Inputs the kernels cannot
    take run torch's original function unchanged.
    """
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _patched_sdpa
    return _Patch(previous)


def unpatch_sdpa() -> None:
    """Restore torch's own scaled_dot_product_attention."""
    F.scaled_dot_product_attention = TORCH_SDPA


def is_patched() -> bool:
    return F.scaled_dot_product_attention is _patched_sdpa


__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched"]

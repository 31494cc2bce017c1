"""Route torch.nn.functional.scaled_dot_product_attention to fastattn.

Every caller that looks the function up on ``torch.nn.functional`` at call time (timm,
torchvision, Hugging Face's "sdpa" attention, nn.MultiheadAttention, nanoGPT-style code) then
runs the fastattn kernels. Inputs the kernels cannot take (CPU tensors without the Triton
interpreter, float64, head dims over 256, ...) go to torch's original function, so patching
never changes what works. Code that imported the function by name before patching
(``from torch.nn.functional import scaled_dot_product_attention``) keeps torch's.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastattn import backend
from fastattn.functional import scaled_dot_product_attention as _fastattn_sdpa

_TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, captured before any patching


def _kernels_take(query, key, value, attn_mask) -> bool:
    if not all(isinstance(t, Tensor) for t in (query, key, value)) or query.dim() not in (3, 4):
        return False
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        return False  # torch's own bias objects: leave them to torch
    return not backend.flash_refusals(query, key, value)


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, **kwargs):
    """torch's signature; fastattn where the kernels apply, torch's original elsewhere."""
    if kwargs or not _kernels_take(query, key, value, attn_mask):
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kwargs)
    return _fastattn_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


class _Patch:
    """Returned by patch_sdpa(): already active; as a context manager it restores on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch_sdpa()
        return False


def patch_sdpa() -> _Patch:
    """Make ``torch.nn.functional.scaled_dot_product_attention`` run fastattn.

    Use globally (``fastattn.patch_sdpa()`` ... ``fastattn.unpatch_sdpa()``) or as a context
    manager (``with fastattn.patch_sdpa(): model(x)``), which restores torch's on exit.
    Inputs the kernels cannot take are passed to torch's original function unchanged.
    """
    F.scaled_dot_product_attention = _patched_sdpa
    return _Patch()


def unpatch_sdpa() -> None:
    """Restore torch's own scaled_dot_product_attention."""
    F.scaled_dot_product_attention = _TORCH_SDPA


def is_patched() -> bool:
    return F.scaled_dot_product_attention is _patched_sdpa


__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched"]

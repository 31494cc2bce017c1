"""Plain-PyTorch attention over a KV cache: the spec, the test oracle and the CPU fallback.

A cache holds ``Lmax`` slots per (batch, kv head); sequence ``b`` has ``cache_seqlens[b]``
valid tokens in slots ``0 .. cache_seqlens[b] - 1`` (a ragged batch). New tokens ``k_new`` /
``v_new`` (``Lnew`` of them) go into slots ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1``,
and the queries then attend to the ``cache_seqlens[b] + Lnew`` valid keys of their sequence
only, with FlashAttention's bottom-right alignment: new query ``i`` sits at key position
``i + Lk_b - Lq``. Slots beyond the valid prefix are never read or written.

The spec, per sequence: truncate the cache to its length after appending, then run
``fastattn.ops.flash.reference.attention_reference``. ``decode_reference`` computes exactly that
without touching the cache (it concatenates instead, so it is differentiable with respect to
every input); ``append_reference`` does the in-place write.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn.ops.flash.reference import attention_reference


def _lengths(cache_seqlens: Tensor) -> list[int]:
    return [int(n) for n in cache_seqlens.tolist()]


def append_reference(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     k_new: Tensor, v_new: Tensor) -> None:
    """Write ``k_new[b]`` / ``v_new[b]`` (Hkv, Lnew, D) into slots ``cache_seqlens[b]:`` of the
    caches, in place. ``cache_seqlens`` itself is not changed."""
    lnew = k_new.shape[2]
    with torch.no_grad():
        for b, n in enumerate(_lengths(cache_seqlens)):
            k_cache[b, :, n:n + lnew] = k_new[b]
            v_cache[b, :, n:n + lnew] = v_new[b]


def decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[tuple] = None,
    alibi_slopes: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention of ``q`` over each sequence's valid cache prefix plus its new tokens.

    Args:
        q: (B, Hq, Lq, D). k_cache: (B, Hkv, Lmax, D). v_cache: (B, Hkv, Lmax, Dv).
        cache_seqlens: integer (B,), tokens already in the cache.
        k_new / v_new: (B, Hkv, Lnew, D) / (B, Hkv, Lnew, Dv) or None: keys appended after
            the cached ones (the caches are NOT modified here; see ``append_reference``).
        causal, scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap: as
            ``attention_reference``, with bottom-right alignment per sequence.
        return_lse: also return the row logsumexp (B, Hq, Lq), float32 (float64 for float64).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, and lse if requested. A sequence with no valid key
        (empty cache, no new tokens) gives out 0 and lse -inf.

    Equivalent code, per sequence b with n = cache_seqlens[b]::

        k_b = torch.cat([k_cache[b:b+1, :, :n], k_new[b:b+1]], dim=2)   # likewise v_b
        out[b:b+1] = attention_reference(q[b:b+1], k_b, v_b, causal=causal, ...)
    """
    outs, lses = [], []
    for b, n in enumerate(_lengths(cache_seqlens)):
        k_b, v_b = k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n]
        if k_new is not None:
            k_b = torch.cat([k_b, k_new[b:b + 1]], dim=2)
            v_b = torch.cat([v_b, v_new[b:b + 1]], dim=2)
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out, lse = attention_reference(
            q[b:b + 1], k_b, v_b, causal=causal, scale=scale, window=window,
            alibi_slopes=slopes, softcap=softcap, return_lse=True)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out

"""FlashAttention 2's public functions, with its signatures, defaults and layouts, on fastattn.

Code written for FlashAttention runs by changing one import::

    from fastattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Layouts are FlashAttention's: (batch, seqlen, nheads, headdim) for the padded functions,
(total, nheads, headdim) for the varlen ones; outputs are contiguous in the same layout, and
softmax_lse is (batch, nheads, seqlen) or (nheads, total). The differences from FlashAttention:

- ``return_attn_probs=True`` raises ValueError: fastattn never materialises the attention
  probabilities (FlashAttention's are for testing only). Use
  ``fastattn.nn.attention_weights`` for inspection.
- ``deterministic`` is accepted and changes nothing: fastattn's backward is always
  deterministic.
- The paged-cache arguments (``block_table``, ``cache_batch_idx``, ``cache_leftpad``) raise
  ValueError: fastattn has no paged cache yet.
- ``flash_attn_with_kvcache`` with rotary and ``seqlen_q > 1`` must be causal or local:
  FlashAttention then rotates query i at ``cache_seqlens + i``, as fastattn does; it rotates
  every query at ``cache_seqlens`` otherwise, which fastattn does not implement (ValueError).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from fastattn.functional import attention_with_kvcache, flash_attention, flash_attention_varlen

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _options(op, window_size, softcap, return_attn_probs=False) -> dict:
    """FlashAttention's option conventions -> fastattn's: window -1 is unbounded, softcap 0.0
    is off."""
    if return_attn_probs:
        raise ValueError(f"{op}: return_attn_probs=True is not supported: fastattn never materialises the "
                         "attention probabilities; use fastattn.nn.attention_weights to inspect them")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"{op}: window_size must be (left, right), got {window_size!r}")
    left, right = (None if w is not None and w < 0 else w for w in window_size)
    window = None if (left, right) == (None, None) else (left, right)
    return dict(window=window, softcap=softcap if softcap else None)


def _bhld(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D): a view


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention's ``flash_attn_func``: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> out
    (B, Lq, Hq, D); bottom-right causal; ``alibi_slopes`` (Hq,) or (B, Hq) fp32.
    Equivalent to ``fastattn.flash_attention`` on ``.transpose(1, 2)`` views."""
    kw = _options("flash_attn_func", window_size, softcap, return_attn_probs)
    out = flash_attention(_bhld(q), _bhld(k), _bhld(v), causal=causal, scale=softmax_scale,
                          alibi_slopes=alibi_slopes, dropout_p=dropout_p, **kw)
    return _bhld(out).contiguous()  # (B, H, L, D) -> (B, L, H, D), contiguous as FlashAttention's


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, L, 3, H, D) -> out (B, L, H, D): ``flash_attn_func`` on its three views."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Lq, Hq, D), kv (B, Lk, 2, Hkv, D) -> out (B, Lq, Hq, D)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """FlashAttention's ``flash_attn_varlen_func``: packed q (total_q, Hq, D), k/v
    (total_k, Hkv, D), int32 (B+1,) offsets -> out (total_q, Hq, D). Equivalent to
    ``fastattn.flash_attention_varlen``."""
    op = "flash_attn_varlen_func"
    if block_table is not None:
        raise ValueError(f"{op}: block_table (a paged KV cache) is not supported yet")
    kw = _options(op, window_size, softcap, return_attn_probs)
    return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  scale=softmax_scale, alibi_slopes=alibi_slopes, dropout_p=dropout_p, **kw)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D) -> out (total, H, D)."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D) -> out (total_q, Hq, D)."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, Tensor]] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """FlashAttention's ``flash_attn_with_kvcache``: q (B, Lq, Hq, D), caches (B, Lmax, Hkv, D)
    updated IN PLACE with k/v (B, Lnew, Hkv, D) at ``cache_seqlens`` (None: the caches are
    full), then attention over each sequence's valid keys -> out (B, Lq, Hq, D) (and
    softmax_lse (B, Hq, Lq) if ``return_softmax_lse``). Note FlashAttention's defaults:
    ``causal=False``, ``rotary_interleaved=True``. Forward only (no backward, as in
    FlashAttention). Equivalent to ``fastattn.attention_with_kvcache`` on transposed views."""
    op = "flash_attn_with_kvcache"
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad),
                    ("block_table", block_table)):
        if t is not None:
            raise ValueError(f"{op}: {name} (a paged or indirect KV cache) is not supported yet")
    kw = _options(op, window_size, softcap)
    if rotary_cos is not None and q.shape[1] > 1 and not causal and kw["window"] is None:
        raise ValueError(f"{op}: rotary with seqlen_q > 1 needs causal=True or a window: fastattn rotates query i "
                         "at cache_seqlens + i, FlashAttention's non-causal convention (every query at "
                         "cache_seqlens) is not implemented")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{op}: appending k/v needs cache_seqlens (None means the caches are full)")
        cache_seqlens = k_cache.shape[1]
    out = attention_with_kvcache(
        _bhld(q), _bhld(k_cache), _bhld(v_cache), cache_seqlens,
        k_new=None if k is None else _bhld(k), v_new=None if v is None else _bhld(v), causal=causal,
        scale=softmax_scale, alibi_slopes=alibi_slopes, num_splits=num_splits or None, rotary_cos=rotary_cos,
        rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, return_lse=return_softmax_lse, **kw)
    if return_softmax_lse:
        out, lse = out
        return _bhld(out).contiguous(), lse
    return _bhld(out).contiguous()  # (B, H, L, D) -> (B, L, H, D)

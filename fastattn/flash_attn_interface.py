"""FlashAttention 2's public functions, with its signatures, defaults and layouts, on fastattn.

Code written for FlashAttention runs by changing one import::

    from fastattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Layouts are FlashAttention's: (batch, seqlen, nheads, headdim) for the padded functions,
(total, nheads, headdim) for the varlen ones; outputs are contiguous in the same layout, and
softmax_lse is (batch, nheads, seqlen) or (nheads, total). The differences from FlashAttention:

- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the lse as FlashAttention
  gives it, and no ``S_dmask``, since fastattn never materialises the attention probabilities
  (FlashAttention's are for testing only; ``fastattn.nn.attention_weights`` gives them).
- ``deterministic`` is accepted and changes nothing: fastattn's backward is always
  deterministic.
- ``flash_attn_with_kvcache``'s ``cache_batch_idx`` and ``cache_leftpad`` are served by
  plain torch around one ``fastattn.attention_with_kvcache`` call: the selected cache rows,
  shifted left by their pads, are gathered (a copy of those rows per call; a ``block_table``
  is the zero-copy indirection) and the new tokens written back. ``block_table`` (paged
  caches, any page size >= 1, not only FlashAttention 2's multiples of 256) goes to the
  kernels as it is. As in FlashAttention 2,
  ``cache_leftpad`` cannot be combined with ``block_table``, and neither can
  ``cache_batch_idx`` here.
- ``flash_attn_with_kvcache``'s rotary positions are FlashAttention's: new key t at
  ``cache_seqlens + t``, query i at ``cache_seqlens + i`` when causal or local, every query at
  ``cache_seqlens`` otherwise, all at absolute cache slots (with ``cache_leftpad`` too). Where
  those differ from ``fastattn.attention_with_kvcache``'s own convention (fewer new keys than
  queries, non-causal, left padding) q and k are rotated in torch before the call; otherwise
  inside the kernels.
- A paged cache whose block table is too short for the new tokens raises ValueError (on CPU;
  on CUDA the kernels clamp), where FlashAttention raises a RuntimeError.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastattn.functional import attention_with_kvcache, flash_attention, flash_attention_varlen
from fastattn.ops.decode.reference import apply_rotary

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "varlen_attn"]


def _options(op, window_size, softcap) -> dict:
    """FlashAttention's option conventions -> fastattn's: window_size any two-element sequence
    or tensor, -1 unbounded; softcap 0.0 is off."""
    if isinstance(window_size, Tensor):
        window_size = window_size.tolist()
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"{op}: window_size must be (left, right), got {window_size!r}")
    left, right = (None if w is None or w < 0 else int(w) for w in window_size)
    window = None if (left, right) == (None, None) else (left, right)
    return dict(window=window, softcap=softcap if softcap else None)


def _bhld(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D): a view


def _with_probs(result, return_attn_probs: bool):
    """(out, lse) -> FlashAttention's (out, softmax_lse, S_dmask) with S_dmask None, or out."""
    return (*result, None) if return_attn_probs else result


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None, q_descale=None,
                    k_descale=None, v_descale=None):
    """FlashAttention's ``flash_attn_func``: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> out
    (B, Lq, Hq, D); bottom-right causal; ``alibi_slopes`` (Hq,) or (B, Hq) fp32. ``sinks``
    ((Hq,) attention-sink logits, keyword only) is fastattn's addition, as in
    ``fastattn.flash_attention``. ``q_descale``/``k_descale``/``v_descale`` (keyword only):
    FlashAttention 3's FP8 forward, float32 (B, Hkv) descales of fp8 q, k, v; the output is
    then bf16. Equivalent to ``fastattn.flash_attention`` on ``.transpose(1, 2)`` views."""
    kw = _options("flash_attn_func", window_size, softcap)
    kw.update(sinks=sinks, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    out = flash_attention(_bhld(q), _bhld(k), _bhld(v), causal=causal, scale=softmax_scale,
                          alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_attn_probs, **kw)
    out, lse = out if return_attn_probs else (out, None)
    out = _bhld(out).contiguous()  # (B, H, L, D) -> (B, L, H, D), contiguous as FlashAttention's
    return (out, lse, None) if return_attn_probs else out


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
                           deterministic=False, return_attn_probs=False, block_table=None, *, sinks=None,
                           q_descale=None, k_descale=None, v_descale=None):
    """FlashAttention's ``flash_attn_varlen_func``: packed q (total_q, Hq, D), k/v
    (total_k, Hkv, D), int32 (B+1,) offsets -> out (total_q, Hq, D); ``sinks`` and the FP8
    descales ((B, Hkv), per sequence; not with ``block_table``) keyword only, as
    ``flash_attn_func``'s. Equivalent to ``fastattn.flash_attention_varlen``."""
    op = "flash_attn_varlen_func"
    kw = _options(op, window_size, softcap)
    kw.update(sinks=sinks, return_lse=return_attn_probs)
    if block_table is not None:
        # Paged keys: k/v are pages (num_pages, page_size, Hkv, D), sequence b holds
        # cu_seqlens_k[b+1] - cu_seqlens_k[b] keys in its pages; its queries are packed in q.
        if dropout_p:
            raise ValueError(f"{op}: dropout_p must be 0 with block_table (a paged cache is read forward-only)")
        for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            if d is not None:
                raise ValueError(f"{op}: {name} is not taken with block_table (the paged cache is 16-bit)")
        if not isinstance(cu_seqlens_k, Tensor) or cu_seqlens_k.dim() != 1:
            raise ValueError(f"{op}: cu_seqlens_k must be an int32 Tensor of shape (batch + 1,)")
        out = attention_with_kvcache(q, k, v, cu_seqlens_k.diff().to(torch.int32), causal=causal,
                                     scale=softmax_scale, alibi_slopes=alibi_slopes, block_table=block_table,
                                     cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, **kw)
    else:
        out = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                     scale=softmax_scale, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                     q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, **kw)
    return _with_probs(out, return_attn_probs)


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
                            num_splits=0, return_softmax_lse=False, *, sinks=None, k_scale=None, v_scale=None):
    """FlashAttention's ``flash_attn_with_kvcache``: q (B, Lq, Hq, D), caches (B_cache, Lmax,
    Hkv, D) updated IN PLACE with k/v (B, Lnew, Hkv, D) at ``cache_seqlens`` (None: the caches
    are full), then attention over each sequence's valid keys -> out (B, Lq, Hq, D) (and
    softmax_lse (B, Hq, Lq) if ``return_softmax_lse``). Note FlashAttention's defaults:
    ``causal=False``, ``rotary_interleaved=True``. Forward only (no backward, as in
    FlashAttention). Equivalent to ``fastattn.attention_with_kvcache`` on transposed views.

    - ``block_table`` int32 (B, P): the caches are pages (num_pages, page_size, Hkv, D).
    - ``cache_batch_idx`` int32 (B,): sequence b lives in cache row ``cache_batch_idx[b]``
      (default b). Rows not named are untouched; with duplicates and k/v, which write lands is
      unspecified (as in FlashAttention).
    - ``cache_leftpad`` int32 (B,): sequence b's keys start at slot ``cache_leftpad[b]`` (its
      valid keys are slots leftpad .. cache_seqlens - 1; new ones go at cache_seqlens); rotary
      positions stay absolute cache slots. Combines with ``cache_batch_idx``.
    - rotary_cos / rotary_sin (P, R/2): new key t at position ``cache_seqlens + t``, query i at
      ``cache_seqlens + i`` if causal or local, else every query at ``cache_seqlens``.
    - ``sinks`` (Hq,) attention-sink logits, keyword only: fastattn's addition, as in
      ``fastattn.attention_with_kvcache``.
    - MLA: head dims up to 576 (q/k) and 512 (v); ``v_cache`` may be ``k_cache[..., :512]``
      (the latent, read in place), and then ``v`` must be None: k's first 512 channels are
      the new values (``fastattn.attention_with_kvcache`` documents the rule).
    - ``k_scale`` / ``v_scale`` float32, keyword only (vLLM's names): 8-bit caches
      (``torch.float8_e4m3fn`` / ``torch.int8``), a cache entry standing for ``x.float() * scale``;
      one element each (per tensor) or the cache's shape without its last dim (per token and kv
      head: (B_cache, Lmax, Hkv), paged (num_pages, page_size, Hkv)), written for new tokens by
      the append; see ``fastattn.attention_with_kvcache``. Not with ``cache_batch_idx`` /
      ``cache_leftpad``. FlashAttention 3's ``k_descale`` / ``v_descale`` ((B, Hkv), for FP8
      q/k/v) are not taken.
    """
    op = "flash_attn_with_kvcache"
    if block_table is not None and (cache_batch_idx is not None or cache_leftpad is not None):
        raise ValueError(f"{op}: block_table cannot be combined with cache_batch_idx or cache_leftpad")
    if (k_scale is not None or v_scale is not None) and (cache_batch_idx is not None or cache_leftpad is not None):
        raise ValueError(f"{op}: k_scale / v_scale (8-bit caches) cannot be combined with cache_batch_idx or "
                         "cache_leftpad")
    kw = _options(op, window_size, softcap)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{op}: appending k/v needs cache_seqlens (None means the caches are full)")
        cache_seqlens = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    paged = block_table is not None
    caches = (k_cache, v_cache) if paged else (_bhld(k_cache), _bhld(v_cache))  # pages stay as they are
    if not paged:  # per-token scales (B, Lmax, Hkv) -> (B, Hkv, Lmax), as the caches
        k_scale, v_scale = (x.transpose(1, 2) if isinstance(x, Tensor) and x.dim() == 3 else x
                            for x in (k_scale, v_scale))
    qb, new = _bhld(q), ((None, None) if k is None else (_bhld(k), None if v is None else _bhld(v)))
    if rotary_cos is not None:
        lq, lnew, aligned = q.shape[1], (0 if k is None else k.shape[1]), causal or kw["window"] is not None
        # fastattn's own convention puts query i at cache_seqlens + Lnew - Lq + i and counts from the pad
        if cache_leftpad is not None or not ((aligned and lnew == lq) or lq == lnew == 1):
            qb, k_new = _rotated_as_flash_attention(op, qb, new[0], rotary_cos, rotary_sin, rotary_interleaved,
                                                    cache_seqlens, aligned)
            new, rotary_cos, rotary_sin = (k_new, new[1]), None, None
    kw.update(causal=causal, scale=softmax_scale, num_splits=num_splits or None, rotary_cos=rotary_cos,
              rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, sinks=sinks)
    if cache_batch_idx is not None or cache_leftpad is not None:
        out, lse = _with_rows(op, qb, *caches, cache_seqlens, *new, cache_batch_idx, cache_leftpad,
                              alibi_slopes, kw)
    else:  # without lse the CPU fallback may use torch's fused SDPA
        out = attention_with_kvcache(qb, *caches, cache_seqlens, k_new=new[0], v_new=new[1],
                                     alibi_slopes=alibi_slopes, block_table=block_table,
                                     return_lse=return_softmax_lse, k_scale=k_scale, v_scale=v_scale, **kw)
        out, lse = out if return_softmax_lse else (out, None)
    out = _bhld(out).contiguous()  # (B, H, L, D) -> (B, L, H, D)
    return (out, lse) if return_softmax_lse else out


def _rotated_as_flash_attention(op, q, k_new, cos, sin, interleaved, seqlens, aligned):
    """q (B, Hq, Lq, D) and k_new (B, Hkv, Lnew, D) or None rotated at FlashAttention's
    positions: key t at n + t, query i at n + i (``aligned``: causal or local) or n, with
    n = cache_seqlens[b] (an absolute cache slot). ValueError where a position passes the
    table's P rows (read on the host only off CUDA; clamped there)."""
    b, lq, lnew = q.shape[0], q.shape[2], (0 if k_new is None else k_new.shape[2])
    n = torch.full((b,), seqlens, device=q.device) if isinstance(seqlens, int) else seqlens.long()
    last = n.max() + max(lq if aligned else 1, lnew) - 1 if b else None
    if last is not None and q.device.type != "cuda" and not torch.compiler.is_compiling() \
            and int(last) >= cos.shape[0]:
        raise ValueError(f"{op}: rotary_cos {tuple(cos.shape)} covers {cos.shape[0]} positions; a token sits at "
                         f"position {int(last)}")
    steps = torch.arange(lq, device=q.device) if aligned else torch.zeros(lq, dtype=torch.long, device=q.device)
    q = apply_rotary(q, cos, sin, (n[:, None] + steps).clamp(0, cos.shape[0] - 1), interleaved)
    if k_new is not None:
        positions = (n[:, None] + torch.arange(lnew, device=q.device)).clamp(0, cos.shape[0] - 1)
        k_new = apply_rotary(k_new, cos, sin, positions, interleaved)
    return q, k_new


def _index(op: str, name: str, t, b: int, device) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (b,) \
            or t.device != device:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be an int32 Tensor of shape ({b},) on {device}, got {got}")
    return t.long()


def _with_rows(op, q, k_cache, v_cache, seqlens, k_new, v_new, idx, leftpad, alibi, kw):
    """cache_batch_idx and cache_leftpad, batched: sequence b is cache row ``idx[b]`` (default
    b) from slot ``leftpad[b]`` (default 0) on. Those rows, shifted left by their pads, are
    gathered into (B, Hkv, Lmax, D) copies (slots past a row's end repeat its last slot and lie
    beyond every valid key); one call attends over them with ``cache_seqlens - leftpad``
    tokens; the new tokens are then written back into their slots of the caches."""
    b, lmax = q.shape[0], k_cache.shape[2]
    idx = torch.arange(b, device=q.device) if idx is None else _index(op, "cache_batch_idx", idx, b, q.device)
    pad = torch.zeros(b, dtype=torch.long, device=q.device) if leftpad is None else \
        _index(op, "cache_leftpad", leftpad, b, q.device)
    if isinstance(seqlens, int):
        seqlens = torch.full((b,), seqlens, dtype=torch.int32, device=q.device)
    n, lnew = seqlens.long(), 0 if k_new is None else k_new.shape[2]
    if b and q.device.type != "cuda" and not torch.compiler.is_compiling():  # read on the host where it costs no sync
        if int(idx.min()) < 0 or int(idx.max()) >= k_cache.shape[0]:
            raise ValueError(f"{op}: cache_batch_idx must lie in [0, {k_cache.shape[0]}) (the caches' batch), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        bad = ((pad < 0) | (pad > n)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{op}: cache_leftpad[{i}] = {int(pad[i])} must lie in [0, cache_seqlens[{i}] = "
                             f"{int(n[i])}]")
        if int((n + lnew).max()) > lmax:
            raise ValueError(f"{op}: appending new tokens would overflow the cache: cache_seqlens + seqlen_new "
                             f"reaches {int((n + lnew).max())} > {lmax}")
    slots = (pad[:, None] + torch.arange(lmax, device=q.device)).clamp(max=lmax - 1)  # (B, Lmax)
    flat = (idx[:, None] * lmax + slots).flatten()  # (B * Lmax,) rows of the (B_cache * Lmax, Hkv, D) caches

    def gather(cache):  # (B_cache, Hkv, Lmax, D) -> (B, Hkv, Lmax, D): row idx[b] from slot pad[b] on
        return cache.transpose(1, 2).flatten(0, 1).index_select(0, flat).view(b, lmax, *cache.shape[1::2]) \
            .transpose(1, 2)

    k_rows, v_rows = gather(k_cache), gather(v_cache)
    out, lse = attention_with_kvcache(q, k_rows, v_rows, (n - pad).to(torch.int32), k_new=k_new, v_new=v_new,
                                      alibi_slopes=alibi, return_lse=True, **kw)
    if k_new is not None:  # the appended (rotated) tokens back into their slots n + t of the caches
        t = torch.arange(lnew, device=q.device)
        src = (torch.arange(b, device=q.device)[:, None], ((n - pad)[:, None] + t).clamp(0, lmax - 1))
        dst = (idx[:, None], (n[:, None] + t).clamp(0, lmax - 1))  # clamped: unchecked on CUDA
        k_cache.transpose(1, 2)[dst] = k_rows.transpose(1, 2)[src]
        v_cache.transpose(1, 2)[dst] = v_rows.transpose(1, 2)[src]
    return out, lse


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """``torch.nn.attention.varlen.varlen_attn``'s signature and semantics, on fastattn (any
    device, any page size, no backward through caches).

    query (T_q, Hq, D) packed by ``cu_seq_q`` (int32 (N+1,)); key / value (T_k, Hkv, D) packed
    by ``cu_seq_k``, or with ``block_table`` (int32 (N, P)) pages (num_pages, page_size, Hkv, D)
    (``cu_seq_k`` then unused, may be None). ``seqused_k`` int32 (N,): sequence i attends to the
    first ``seqused_k[i]`` keys of its own (required with ``block_table``): K/V already written,
    as a serving engine's cache holds them; chunked prefills and decodes mix in one call, with
    one launch per kernel and no host sync on CUDA. ``window_size`` (left, right), -1
    unbounded, bottom-right per sequence: (-1, 0) is causal. ``enable_gqa``: Hq a multiple of
    Hkv. ``return_aux`` with ``.lse`` true (``torch.nn.attention.varlen.AuxRequest(lse=True)``):
    also the float32 lse (T_q, Hq). Returns out (T_q, Hq, D).

    Packed keys with ``seqused_k`` are read in place as pages of one token. Raises ValueError
    for Hq != Hkv without ``enable_gqa`` and ``block_table`` without ``seqused_k``, and where
    ``fastattn.attention_with_kvcache`` / ``flash_attention_varlen`` raise."""
    op = "varlen_attn"
    if query.dim() == 3 and query.shape[1] != key.shape[-2] and not enable_gqa:
        raise ValueError(f"{op}: query has {query.shape[1]} heads and key {key.shape[-2]}: pass enable_gqa=True")
    kw = _options(op, window_size, None)
    want_lse = return_aux is not None and bool(getattr(return_aux, "lse", False))
    if block_table is None and seqused_k is None:
        out = flash_attention_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                     return_lse=want_lse, **kw)
        return out if not want_lse else (out[0], out[1].transpose(0, 1))
    if seqused_k is None:
        raise ValueError(f"{op}: block_table needs seqused_k (the keys each sequence holds in its pages)")
    if block_table is None:  # packed keys as pages of one token: key j of sequence i is row cu_seq_k[i] + j
        if not isinstance(cu_seq_k, Tensor) or cu_seq_k.dim() != 1:
            raise ValueError(f"{op}: cu_seq_k must be an int32 Tensor of shape (N + 1,) without block_table")
        block_table = (cu_seq_k[:-1, None] + torch.arange(max(max_k, 1), device=cu_seq_k.device)).to(torch.int32)
        key, value = key[:, None], value[:, None]  # (T_k, Hkv, D) -> (T_k, 1, Hkv, D)
    out = attention_with_kvcache(query, key, value, seqused_k=seqused_k, block_table=block_table, causal=False,
                                 scale=scale, cu_seqlens_q=cu_seq_q, max_seqlen_q=max_q, num_splits=num_splits,
                                 return_lse=want_lse, **kw)
    return out if not want_lse else (out[0], out[1].transpose(0, 1))  # lse (Hq, T_q) -> (T_q, Hq)

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


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool = False) -> Tensor:
    """Rotary embedding (RoPE) of the first ``R = 2 * cos.shape[-1]`` dims of ``x``.

    x: (B, H, L, D). cos, sin: (P, R / 2), row p for position p. positions: int (B, L).
    Non-interleaved (GPT-NeoX): dims ``j`` and ``j + R/2`` form a pair; interleaved (GPT-J):
    dims ``2j`` and ``2j + 1``. Pair j turns by the angle whose cos/sin are ``cos[p, j]``,
    ``sin[p, j]``. Computed in x's dtype; dims from R on pass through.
    """
    r = 2 * cos.shape[-1]
    c = cos[positions].to(x.dtype)[:, None]  # (B, 1, L, R/2)
    s = sin[positions].to(x.dtype)[:, None]
    xr, rest = x[..., :r], x[..., r:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :r // 2], xr[..., r // 2:]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([out, rest], dim=-1)


def rotary_positions(cache_seqlens: Tensor, length: int, seqlen_new: int, seqlen_q: int) -> Tensor:
    """Rotary positions (B, length): ``n + seqlen_new - seqlen_q + t`` with n = cache_seqlens[b].

    For k_new pass ``seqlen_q = seqlen_new``: token t sits at cache slot ``n + t``. For q pass
    the real Lq: query row i sits on the bottom-right diagonal, at key position
    ``n + Lnew - Lq + i`` (``n + i`` when Lq == Lnew)."""
    n = cache_seqlens.long()[:, None]
    return n + (seqlen_new - seqlen_q) + torch.arange(length, device=cache_seqlens.device)


def append_reference(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     k_new: Tensor, v_new: Tensor, rotary_cos: Optional[Tensor] = None,
                     rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False) -> None:
    """Write ``k_new[b]`` / ``v_new[b]`` (Hkv, Lnew, D) into slots ``cache_seqlens[b]:`` of the
    caches, in place (keys rotated first if ``rotary_cos``/``rotary_sin`` are given).
    ``cache_seqlens`` itself is not changed."""
    lnew = k_new.shape[2]
    if rotary_cos is not None:
        k_new = apply_rotary(k_new, rotary_cos, rotary_sin,
                             rotary_positions(cache_seqlens, lnew, lnew, lnew), rotary_interleaved)
    with torch.no_grad():
        for b, n in enumerate(_lengths(cache_seqlens)):
            k_cache[b, :, n:n + lnew] = k_new[b]
            v_cache[b, :, n:n + lnew] = v_new[b]


def decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *, causal: bool = True,
                     scale: Optional[float] = None, window: Optional[tuple] = None,
                     alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                     rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                     rotary_interleaved: bool = False, return_lse: bool = False, upcast: bool = False,
                     sinks: Optional[Tensor] = None):
    """Attention of ``q`` over each sequence's valid cache prefix plus its new tokens.

    Args:
        q: (B, Hq, Lq, D). k_cache: (B, Hkv, Lmax, D). v_cache: (B, Hkv, Lmax, Dv).
        cache_seqlens: integer (B,), tokens already in the cache.
        k_new / v_new: (B, Hkv, Lnew, D) / (B, Hkv, Lnew, Dv) or None: keys appended after
            the cached ones (the caches are NOT modified here; see ``append_reference``).
        causal, scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap: as
            ``attention_reference``, with bottom-right alignment per sequence.
        rotary_cos / rotary_sin: (P, R/2) or None: rotary embedding of the first R dims of q
            and k_new at their positions (``rotary_positions``) before attending; the cached
            keys are taken as already rotated. ``rotary_interleaved``: GPT-J pairs.
        return_lse: also return the row logsumexp (B, Hq, Lq), float32 (float64 for float64).
        upcast: as ``attention_reference`` (float32 scores for fp16/bf16; the CPU fallback's).
        sinks: (Hq,) float logits or None (learnable attention sinks): sink h joins every
            softmax denominator of query head h as ``exp(sinks[h])`` and contributes no value,
            so the weights of the keys sum to less than 1; lse includes it (``apply_sinks``).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, and lse if requested. A sequence with no valid key
        (empty cache, no new tokens) gives out 0 and lse -inf.

    Equivalent code, per sequence b with n = cache_seqlens[b]::

        k_b = torch.cat([k_cache[b:b+1, :, :n], k_new[b:b+1]], dim=2)   # likewise v_b
        out[b:b+1] = attention_reference(q[b:b+1], k_b, v_b, causal=causal, ...)
    """
    if rotary_cos is not None:
        lnew, lq = (0 if k_new is None else k_new.shape[2]), q.shape[2]
        q = apply_rotary(q, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, lq, lnew, lq),
                         rotary_interleaved)
        if k_new is not None:
            k_new = apply_rotary(k_new, rotary_cos, rotary_sin,
                                 rotary_positions(cache_seqlens, lnew, lnew, lnew), rotary_interleaved)
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
            alibi_slopes=slopes, softcap=softcap, return_lse=True, upcast=upcast)
        outs.append(out)
        lses.append(lse)
    if not outs:  # batch 0: nothing to concatenate
        out = q.new_zeros(*q.shape[:3], v_cache.shape[-1])
        lse = q.new_zeros(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
    else:
        out, lse = torch.cat(outs), torch.cat(lses)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention without sinks -> with them: out (B, Hq, Lq, Dv), lse (B, Hq, Lq), sinks (Hq,).

    With a sink logit z added to the denominator, out becomes ``out * exp(lse - lse')`` with
    ``lse' = logaddexp(lse, z)`` (exactly: the numerator is unchanged). A row with no key
    (lse -inf) keeps out 0 and gets lse' = z. Differentiable in all three."""
    z = sinks.to(lse.dtype)[:, None]  # (Hq, 1): broadcasts over (B, Hq, Lq)
    total = torch.logaddexp(lse, z)
    return out * torch.exp(lse - total)[..., None].to(out.dtype), total


# ---------------------------------------------------------------------------------------
# Paged caches (FlashAttention's / vLLM's layout): the keys of every sequence live in pages
# ``(num_pages, page_size, Hkv, D)``; row b of the int32 block table ``(B, P)`` lists the pages
# of sequence b in order, so its logical slot j is row ``j % page_size`` of page
# ``block_table[b, j // page_size]``. Table entries past a sequence's last used page are never
# read (they may hold anything, e.g. -1).

def gather_pages(pages: Tensor, block_table: Tensor) -> Tensor:
    """pages (num_pages, page_size, Hkv, D), block_table int (B, P) -> (B, Hkv, P * page_size, D):
    each sequence's logical cache as a copy (a contiguous cache with Lmax = P * page_size).
    Table entries outside [0, num_pages) (unused slots) read page 0: they lie beyond every
    valid prefix, so what they hold is never attended to."""
    b, p = block_table.shape
    idx = block_table.clamp(0, max(pages.shape[0] - 1, 0)).flatten()  # (B * P,)
    g = pages.index_select(0, idx)  # (B * P, page_size, Hkv, D): one batched copy of the pages
    return g.view(b, p * pages.shape[1], *pages.shape[2:]).transpose(1, 2)  # (B, P * page, Hkv, D) -> (B, Hkv, L, D)


def paged_slots(block_table: Tensor, page_size: int, cache_seqlens: Tensor, lnew: int) -> tuple[Tensor, Tensor]:
    """(page, row) int64 (B, Lnew) of new token t of sequence b, logical slot
    ``cache_seqlens[b] + t``. The caller guarantees the slots lie inside the table."""
    slots = cache_seqlens.long()[:, None] + torch.arange(lnew, device=block_table.device)  # (B, Lnew)
    return block_table.long().gather(1, slots // page_size), slots % page_size


def append_paged_reference(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                           k_new: Tensor, v_new: Tensor, rotary_cos: Optional[Tensor] = None,
                           rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False) -> None:
    """``append_reference`` for paged caches: new token t (of ``k_new`` / ``v_new``,
    (B, Hkv, Lnew, D)) of sequence b goes, in place, into logical slot ``cache_seqlens[b] + t``
    of its pages (keys rotated first if asked). No other page row is written; no host sync."""
    lnew = k_new.shape[2]
    if rotary_cos is not None:
        k_new = apply_rotary(k_new, rotary_cos, rotary_sin,
                             rotary_positions(cache_seqlens, lnew, lnew, lnew), rotary_interleaved)
    page, row = paged_slots(block_table, k_pages.shape[1], cache_seqlens, lnew)
    with torch.no_grad():
        k_pages[page, row] = k_new.transpose(1, 2)  # (B, Lnew, Hkv, D) into (B, Lnew) page rows
        v_pages[page, row] = v_new.transpose(1, 2)


# ---------------------------------------------------------------------------------------
# 8-bit caches (float8_e4m3fn or int8): entry x of the cache stands for ``x.float() * scale``,
# scale float32 either one element (per tensor) or one per token and kv head (the cache's shape
# without its last dim). The append quantizes each new token; the attention reads dequantized
# values, rounded to q's dtype (the kernels' products run in q's dtype).

def quantize_kv(x: Tensor, dtype: torch.dtype, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (..., D) in a 16/32-bit float -> (x8 (..., D) of ``dtype``, scale float32).

    ``scale`` None: per token, computed from each row's absmax (``absmax / QMAX``, QMAX 448 for
    e4m3, 127 for int8; an all-zero row gets scale 0 and zeros), shape (...). Else the given
    per-tensor scale, returned as given. Values are ``x * (1 / scale)`` in float32, rounded to
    nearest (ties to even) and saturated to the dtype's range (+-448; [-128, 127])."""
    from fastattn.validation import KV_QMAX

    qmax = KV_QMAX[dtype]
    x = x.float()
    if scale is None:
        amax = x.abs().amax(-1)
        scale = amax / qmax
        # tensor / tensor: torch computes ``number / tensor`` as a reciprocal times the number
        inv = torch.where(amax > 0, torch.full_like(amax, qmax) / amax, torch.zeros_like(amax))[..., None]
    else:
        inv = torch.ones((), device=x.device) / scale.float().reshape(())
    y = x * inv
    if dtype == torch.int8:
        return y.round().clamp(-128, 127).to(torch.int8), scale
    return y.clamp(-qmax, qmax).to(dtype), scale


def dequantize_kv(cache: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An 8-bit cache (..., D) with its scale (one element or (...)) -> ``cache.float() * scale``
    rounded to ``dtype``, one batched pass."""
    s = scale.reshape(()) if scale.numel() == 1 else scale[..., None]
    if cache.dtype == torch.float8_e4m3fn and cache.device.type == "cpu":
        # torch's e4m3 -> float32 cast runs scalar code on a CPU: a 256-entry table is ~4x faster
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        return (table.take(cache.view(torch.uint8).long()) * s).to(dtype)
    return (cache.float() * s).to(dtype)

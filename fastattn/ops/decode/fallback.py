"""A generation step without kernels, in batched torch calls (no loop over the sequences).

``decode_sdpa``: torch's own fused SDPA over the caches, one call for the whole batch, for
every step it can express (no softcap, no sinks, no lse, no gradient). ``decode_masked``: the
reference's math over all Lmax slots, with each sequence's validity, band and ALiBi as a
mask; it reads nothing on the host, so torch.compile traces it whole. ``decode_ragged``: either
of the two for ragged new tokens (``cu_seqlens_q``), the packed tokens padded into one batch.
``dequantized``: an 8-bit cache's step as a step over caches in q's dtype, for any of them.
All write the new tokens into the caches in place and give the result of ``decode_reference``
followed by ``append_reference``. No Triton here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn.backend import TORCH_SDPA
from fastattn.ops.decode.reference import (
    append_paged_reference, apply_rotary, apply_sinks, dequantize_kv, gather_pages, quantize_kv, rotary_positions)
from fastattn.ops.flash.reference import attention_reference
from fastattn.validation import CacheLayout, DecodeCall


def sdpa_expressible(call: DecodeCall) -> bool:
    """Whether torch's SDPA computes this call exactly (``decode_sdpa``, or ``decode_ragged``
    with ``sdpa=True``): it has no softcap, no sinks and gives no lse."""
    return not (call.needs_grad or call.return_lse or call.sinks is not None or call.softcap)


def _rotated(call: DecodeCall) -> tuple[Tensor, Optional[Tensor]]:
    """(q, k_new) turned by their rotary positions (as they are without rotary)."""
    q, k_new = call.q, call.k_new
    if call.rotary_cos is None:
        return q, k_new
    lq, lnew = q.shape[2], (0 if k_new is None else k_new.shape[2])
    turn = (lambda x, pos: apply_rotary(x, call.rotary_cos, call.rotary_sin, pos, call.rotary_interleaved))  # noqa: E731
    q = turn(q, rotary_positions(call.seqlens, lq, lnew, lq))
    if k_new is not None:
        k_new = turn(k_new, rotary_positions(call.seqlens, lnew, lnew, lnew))
    return q, k_new


def _slots(call: DecodeCall, k_new: Tensor) -> list[Tensor]:
    """Index (B, Hkv, Lnew, D) / (.., Dv) of new token t's cache slot n_b + t, for scatter."""
    slots = call.seqlens.long()[:, None] + torch.arange(k_new.shape[2], device=k_new.device)  # (B, Lnew)
    return [slots[:, None, :, None].expand(*t.shape) for t in (k_new, call.v_new)]


def _append(call: DecodeCall, k_new: Tensor) -> None:
    """Write the (rotated) new tokens into the caches in place: one copy per cache where every
    sequence is known to hold as many tokens, else one scatter per cache."""
    lnew = k_new.shape[2]
    if call.key_range is not None and call.key_range[0] == call.key_range[1] and not call.layout.paged:
        n = call.key_range[0] - lnew  # every sequence's cached tokens
        call.k_cache.narrow(2, n, lnew).copy_(k_new.detach())
        call.v_cache.narrow(2, n, lnew).copy_(call.v_new.detach())
        return
    with torch.no_grad():
        if call.layout.paged:
            append_paged_reference(call.k_cache, call.v_cache, call.block_table, call.seqlens, k_new.detach(),
                                   call.v_new.detach())
        else:
            index = _slots(call, k_new)
            call.k_cache.scatter_(2, index[0], k_new.detach())
            call.v_cache.scatter_(2, index[1], call.v_new.detach())


def _logical(call: DecodeCall, length: int) -> tuple[Tensor, Tensor]:
    """The first ``length`` slots of every sequence's caches, (B, Hkv, length, D): views of
    contiguous caches, a gather of the pages that hold them for paged ones."""
    if not call.layout.paged:
        return call.k_cache.narrow(2, 0, length), call.v_cache.narrow(2, 0, length)
    pages = call.block_table[:, :-(-length // call.layout.page_size)]
    return (gather_pages(call.k_cache, pages)[:, :, :length], gather_pages(call.v_cache, pages)[:, :, :length])


def _bias(call: DecodeCall, total: Tensor, first: Tensor, rows: int, length: int):
    """The attention mask over slots 0 .. length - 1 of ``rows`` query rows: bool (B, 1, rows,
    length), or with ALiBi float (B, Hq, rows, length) with -inf where masked. total: (B,) keys
    per sequence; first: (B,) key position of each sequence's first query row."""
    key_pos = torch.arange(length, device=total.device)
    query_pos = first[:, None] + torch.arange(rows, device=total.device)  # (B, rows): on the bottom-right diagonal
    rel = key_pos[None, None, :] - query_pos[:, :, None]  # (B, rows, length): key relative to the diagonal
    keep = (key_pos[None, None, :] < total[:, None, None]).expand_as(rel)
    left, right = call.band
    if left is not None:
        keep = keep & (rel >= -left)
    if right is not None:
        keep = keep & (rel <= right)
    bias = keep[:, None]
    if call.alibi_slopes is not None:
        slopes = call.alibi_slopes.float().reshape(-1, call.alibi_slopes.shape[-1], 1, 1)  # (1 or B, Hq, 1, 1)
        bias = (-slopes * rel[:, None].abs()).masked_fill(~bias, float("-inf"))
    return bias


def _zero_invalid(keys: Tensor, values: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Slots at or past a sequence's keys may hold anything (NaN): zeroed copies, or the
    masked product 0 * NaN would leak."""
    ok = (torch.arange(keys.shape[2], device=keys.device)[None, :] < total[:, None])[:, None, :, None]
    return keys.where(ok, 0.0), values.where(ok, 0.0)


def decode_sdpa(call: DecodeCall) -> Tensor:
    """One generation step through torch's fused SDPA, for calls ``sdpa_expressible`` takes.
    q (B, Hq, Lq, D) -> out (B, Hq, Lq, Dv). Where the lengths were read on the host
    (``call.key_range``) it attends over the longest sequence's slots only, unmasked when every
    sequence has them all and the band hides none; else over all Lmax slots, masked."""
    q, k_new = _rotated(call)
    lq, lnew = q.shape[2], (0 if k_new is None else k_new.shape[2])
    if k_new is not None:
        _append(call, k_new)
    shortest, length = (0, call.layout.lmax) if call.key_range is None else call.key_range
    if length == 0:  # no sequence has a key: out 0, as everywhere in fastattn
        return q.new_zeros(*q.shape[:3], call.layout.head_dim_v)
    keys, values = _logical(call, length)
    left, right = call.band
    if shortest == length and call.alibi_slopes is None and (right is None or lq - 1 <= right) \
            and (left is None or length - 1 <= left):
        bias = None  # every query sees every slot
    else:
        total = call.seqlens.long() + lnew  # (B,) keys per sequence after the append
        bias = _bias(call, total, total - lq, lq, length)
        if shortest < length:
            keys, values = _zero_invalid(keys, values, total)
    return _sdpa_grouped(q, keys, values, bias, call.scale)


def _sdpa_grouped(q: Tensor, keys: Tensor, values: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """torch's SDPA with the G = Hq / Hkv query heads that share a kv head folded into rows:
    q (B, Hq, Lq, D) as (B, Hkv, G * Lq, D), so K/V are read once per kv head, never repeated
    (torch's ``enable_gqa`` repeats them on CPU). bias: None, bool (B, 1, Lq, L) or float
    (B or 1, Hq, Lq, L). Returns (B, Hq, Lq, Dv)."""
    b, hq, lq, _ = q.shape
    hkv = keys.shape[1]
    groups = hq // hkv if hkv else 1
    if bias is not None and bias.shape[1] == 1:  # one mask for every head: the same rows for each g
        bias = bias[:, :, None].expand(-1, -1, groups, -1, -1).reshape(bias.shape[0], 1, groups * lq, -1)
    elif bias is not None:  # per head: head h = kv head h // G, group member h % G
        bias = bias.reshape(bias.shape[0], hkv, groups * lq, -1)
    out = TORCH_SDPA(q.reshape(b, hkv, groups * lq, q.shape[3]), keys, values, attn_mask=bias, scale=scale)
    return out.reshape(b, hq, lq, values.shape[3])


def decode_masked(call: DecodeCall) -> tuple[Tensor, Tensor]:
    """The step with no host read, for torch.compile, in the reference's math: the new tokens
    are scattered into the caches (in place, and into a differentiable copy), then q attends
    over all Lmax slots of every sequence with its validity, band and ALiBi as a mask. Costs
    Lq x Lmax per sequence. Returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq)), sinks joined in."""
    q, k_new = _rotated(call)
    lq, lnew = q.shape[2], (0 if k_new is None else k_new.shape[2])
    keys, values = _logical(call, call.layout.lmax)
    if k_new is not None:
        index = _slots(call, k_new)
        keys, values = keys.scatter(2, index[0], k_new), values.scatter(2, index[1], call.v_new)
        _append(call, k_new)
    total = call.seqlens.long() + lnew
    keys, values = _zero_invalid(keys, values, total)
    bias = _bias(call, total, total - lq, lq, keys.shape[2])
    out, lse = attention_reference(q, keys, values, scale=call.scale, attn_bias=bias, softcap=call.softcap,
                                   return_lse=True, upcast=True)
    return apply_sinks(out, lse, call.sinks) if call.sinks is not None else (out, lse)


def decode_ragged(call: DecodeCall, sdpa: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Ragged new tokens (``cu_seqlens_q``) in one batched step, no loop over the sequences:
    the packed tokens (T, H, D) are rotated at their own positions, appended in place with one
    indexed write per cache, and padded into rows (B, H, W, D), W the most tokens of any
    sequence; q then attends over the caches with each sequence's own bottom-right diagonal
    as a mask, and the real rows are picked back out. ``sdpa``: through torch's fused SDPA
    (calls ``sdpa_expressible`` takes; lse None), else in the reference's math (the keys a
    differentiable copy, sinks joined in). Returns out (T, Hq, Dv) and lse (Hq, T) or None."""
    if call.q.shape[0] == 0:  # no token this step: nothing to compute or append
        lse = call.q.new_zeros(call.q.shape[1], 0, dtype=torch.float32) if not sdpa else None
        return call.q.new_zeros(0, call.q.shape[1], call.layout.head_dim_v), lse
    cu = call.cu_seqlens_q.long()
    count = cu.diff()  # (B,) tokens of each sequence
    tokens = torch.arange(call.q.shape[0], device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)  # (T,) the sequence of each packed token
    row = tokens - cu[seq]  # (T,) its row within its sequence
    n = call.seqlens.long()
    total = n + (count if call.k_new is not None else 0)  # (B,) keys per sequence after the append
    first = total - count  # (B,) key position of each sequence's first query
    q, k_new = call.q, call.k_new
    if call.rotary_cos is not None:
        q = _turn_packed(call, q, first[seq] + row)
        if k_new is not None:
            k_new = _turn_packed(call, k_new, n[seq] + row)
    width = int(count.max()) if count.numel() and not torch.compiler.is_compiling() else call.max_seqlen_q
    width = q.shape[0] if width is None else width
    padded = q.new_zeros(call.layout.batch, width, *q.shape[1:]).index_put((seq, row), q).transpose(1, 2)
    length = call.layout.lmax if call.key_range is None else call.key_range[1]
    slot = n[seq] + row  # (T,) the cache slot of each new token
    if sdpa:
        if k_new is not None:
            _append_packed(call, k_new, seq, slot)
        keys, values = _logical(call, length)  # with the new keys
    else:
        keys, values = _logical(call, length)
        if k_new is not None:  # differentiable copies with the new keys in their slots, then the write
            keys = keys.transpose(1, 2).index_put((seq, slot), k_new).transpose(1, 2)
            values = values.transpose(1, 2).index_put((seq, slot), call.v_new).transpose(1, 2)
            _append_packed(call, k_new, seq, slot)
    bias = _bias(call, total, first, width, length)
    keys, values = _zero_invalid(keys, values, total)
    if sdpa:
        out, lse = _sdpa_grouped(padded, keys, values, bias, call.scale), None
    else:
        out, lse = attention_reference(padded, keys, values, scale=call.scale, attn_bias=bias, softcap=call.softcap,
                                       return_lse=True, upcast=True)
        if call.sinks is not None:
            out, lse = apply_sinks(out, lse, call.sinks)
        lse = lse.transpose(1, 2)[seq, row].transpose(0, 1)  # (B, Hq, W) -> (T, Hq) -> (Hq, T)
    return out.transpose(1, 2)[seq, row], lse  # (B, Hq, W, Dv) -> (T, Hq, Dv)


def _turn_packed(call: DecodeCall, x: Tensor, positions: Tensor) -> Tensor:
    """Packed x (T, H, D) rotated at positions (T,)."""
    x4 = x.transpose(0, 1)[None]  # (1, H, T, D)
    return apply_rotary(x4, call.rotary_cos, call.rotary_sin, positions[None], call.rotary_interleaved)[0] \
        .transpose(0, 1)


def _append_packed(call: DecodeCall, k_new: Tensor, seq: Tensor, slot: Tensor) -> None:
    """Write packed (rotated) new tokens (T, Hkv, D) into cache slots ``slot`` (T,) of their
    sequences ``seq`` (T,), in place: one indexed write per cache."""
    with torch.no_grad():
        if call.layout.paged:
            page = call.block_table.long()[seq, slot // call.layout.page_size]  # (T,)
            row = slot % call.layout.page_size
            call.k_cache[page, row] = k_new.detach()  # (T, Hkv, D) into T page rows
            call.v_cache[page, row] = call.v_new.detach()
        else:
            call.k_cache.transpose(1, 2)[seq, slot] = k_new.detach()  # (B, Lmax, Hkv, D) view, T rows
            call.v_cache.transpose(1, 2)[seq, slot] = call.v_new.detach()


def dequantized(call: DecodeCall) -> DecodeCall:
    """An 8-bit cache's step (``call.k_scale`` given) as the same step over 16/32-bit caches:
    the (rotated) new tokens are quantized into the 8-bit caches in place, with their scales
    when per token (``quantize_kv``), then both caches are dequantized to q's dtype in one
    batched pass each (``dequantize_kv``). The returned call attends over those copies with no
    new tokens and ``cache_seqlens + Lnew`` cached ones (rotary positions unchanged), so every
    fallback above runs it. Contiguous caches are dequantized only up to the longest sequence
    where the lengths were read on the host (``call.key_range``). No loop over the sequences."""
    q, n = call.q, call.seqlens.long()
    if call.k_new is not None:
        if call.cu_seqlens_q is not None:  # packed (T, H, D): sequence and row of each token
            cu = call.cu_seqlens_q.long()
            tokens = torch.arange(q.shape[0], device=cu.device)
            seq = torch.searchsorted(cu[1:], tokens, right=True)
            row = tokens - cu[seq]
            k_new, v_new, count = call.k_new, call.v_new, cu.diff()
            if call.rotary_cos is not None:
                k_new = _turn_packed(call, k_new, n[seq] + row)
        else:  # (B, Hkv, Lnew, D) -> (B * Lnew, Hkv, D), token-major
            b, _, lnew, _ = call.k_new.shape
            seq = torch.arange(b, device=n.device).repeat_interleave(lnew)
            row = torch.arange(lnew, device=n.device).repeat(b)
            k_new = _rotated(call)[1].transpose(1, 2).flatten(0, 1)
            v_new, count = call.v_new.transpose(1, 2).flatten(0, 1), lnew
        _append_quantized(call, k_new.detach(), v_new.detach(), seq, n[seq] + row)
        n = n + count
    caches = [call.k_cache, call.v_cache, call.k_scale, call.v_scale]
    if call.key_range is not None and not call.layout.paged:  # no slot past the longest sequence is read
        caches = [t.narrow(2, 0, call.key_range[1]) if t.dim() >= 3 else t for t in caches]
    k_cache, v_cache = dequantize_kv(caches[0], caches[2], q.dtype), dequantize_kv(caches[1], caches[3], q.dtype)
    return call._replace(k_cache=k_cache, v_cache=v_cache, layout=CacheLayout.of(k_cache, v_cache, call.block_table),
                         seqlens=n.to(torch.int32), k_new=None, v_new=None, k_scale=None, v_scale=None)


def _append_quantized(call: DecodeCall, k_new: Tensor, v_new: Tensor, seq: Tensor, slot: Tensor) -> None:
    """Quantize tokens (T, Hkv, D) / (T, Hkv, Dv) into cache slots ``slot`` (T,) of sequences
    ``seq`` (T,) of the 8-bit caches, in place, and their per-token scales (T, Hkv) into
    ``k_scale`` / ``v_scale`` when those are per token (a per-tensor scale is only read)."""
    per_token = call.k_scale.dim() == 3  # the cache's shape without its last dim (per tensor: 1 element, dim <= 1)
    for new, cache, scale in ((k_new, call.k_cache, call.k_scale), (v_new, call.v_cache, call.v_scale)):
        x8, s = quantize_kv(new, cache.dtype, None if per_token else scale)
        if call.layout.paged:
            page = call.block_table.long()[seq, slot // call.layout.page_size]  # (T,)
            index = (page, slot % call.layout.page_size)  # page rows: (num_pages, page_size, Hkv, .)
            rows, scales = cache, scale
        else:
            index = (seq, slot)  # (B, Lmax, Hkv, .) views
            rows, scales = cache.transpose(1, 2), (scale.transpose(1, 2) if per_token else scale)
        rows.view(torch.uint8)[index] = x8.view(torch.uint8)  # byte copies: index_put takes no float8
        if per_token:
            scales[index] = s

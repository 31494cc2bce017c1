"""A generation step without kernels, in batched torch calls (no loop over the sequences).

``decode_sdpa``: torch's own fused SDPA over the caches, one call for the whole batch, for
every step it can express (no softcap, no sinks, no lse, no gradient). ``decode_masked``: the
reference's math over all Lmax slots, with each sequence's validity, band and ALiBi as a
mask; it reads nothing on the host, so torch.compile traces it whole. Both write the new
tokens into the caches in place and give the result of ``decode_reference`` followed by
``append_reference``. No Triton here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn.backend import TORCH_SDPA
from fastattn.ops.decode.reference import (
    append_paged_reference, apply_rotary, apply_sinks, gather_pages, rotary_positions)
from fastattn.ops.flash.reference import attention_reference
from fastattn.validation import DecodeCall


def sdpa_expressible(call: DecodeCall) -> bool:
    """Whether ``decode_sdpa`` computes this (non-ragged) call exactly: torch's SDPA has no
    softcap, no sinks and gives no lse."""
    return not (call.needs_grad or call.return_lse or call.sinks is not None or call.softcap
                or call.cu_seqlens_q is not None)


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
        return call.k_cache[:, :, :length], call.v_cache[:, :, :length]
    pages = call.block_table[:, :-(-length // call.layout.page_size)]
    return (gather_pages(call.k_cache, pages)[:, :, :length], gather_pages(call.v_cache, pages)[:, :, :length])


def _bias(call: DecodeCall, total: Tensor, lq: int, length: int):
    """The attention mask over slots 0 .. length - 1: bool (B, 1, Lq, length), or with ALiBi
    float (B, Hq, Lq, length) with -inf where masked. total: (B,) keys per sequence."""
    key_pos = torch.arange(length, device=total.device)
    query_pos = total[:, None] - lq + torch.arange(lq, device=total.device)  # (B, Lq): bottom-right diagonal
    rel = key_pos[None, None, :] - query_pos[:, :, None]  # (B, Lq, length): key relative to the diagonal
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
        bias = _bias(call, total, lq, length)
        if shortest < length:
            keys, values = _zero_invalid(keys, values, total)
    return TORCH_SDPA(q, keys, values, attn_mask=bias, scale=call.scale, enable_gqa=q.shape[1] != keys.shape[1])


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
    out, lse = attention_reference(q, keys, values, scale=call.scale, attn_bias=_bias(call, total, lq, keys.shape[2]),
                                   softcap=call.softcap, return_lse=True, upcast=True)
    return apply_sinks(out, lse, call.sinks) if call.sinks is not None else (out, lse)

"""A generation step without kernels.

``decode_by_prefix`` (no gradients, no lse): append, then each sequence's valid prefix
through torch's fused SDPA where it can express the call (on a CPU many times faster than
the reference, which builds the scores). ``decode_masked``: no host sync, for torch.compile,
and for single-token steps (one batched call instead of a call per sequence).
Both give the result of ``decode_reference`` followed by ``append_reference``. No Triton here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.decode.reference import append_reference, apply_rotary, rotary_positions
from fastattn.ops.flash.fallback import attention
from fastattn.ops.flash.reference import attention_reference


def decode_by_prefix(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, k_new, v_new, *,
                     band: tuple, scale: float, alibi_slopes, softcap, rotary_cos=None, rotary_sin=None,
                     rotary_interleaved: bool = False) -> Tensor:
    """q (B, Hq, Lq, D) over each sequence's ``seqlens[b] + Lnew`` valid keys, after writing
    k_new / v_new (B, Hkv, Lnew, D/Dv) into the caches in place. Returns (B, Hq, Lq, Dv)."""
    lq, lnew = q.shape[2], (0 if k_new is None else k_new.shape[2])
    if rotary_cos is not None:
        q = apply_rotary(q, rotary_cos, rotary_sin, rotary_positions(seqlens, lq, lnew, lq), rotary_interleaved)
    if k_new is not None:  # rotates k_new as it writes
        append_reference(k_cache, v_cache, seqlens, k_new, v_new, rotary_cos, rotary_sin, rotary_interleaved)
    outs = []
    for b, n in enumerate(seqlens.tolist()):
        if n + lnew == 0:  # nothing to attend to: out 0, as everywhere in fastattn
            outs.append(q.new_zeros(1, q.shape[1], lq, v_cache.shape[-1]))
            continue
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, _ = attention(q[b:b + 1], k_cache[b:b + 1, :, :n + lnew], v_cache[b:b + 1, :, :n + lnew], band=band,
                           scale=scale, alibi_slopes=slopes, softcap=softcap)
        outs.append(out)
    return torch.cat(outs)  # (B, Hq, Lq, Dv); B >= 1 here (the router sends batch 0 to the reference)


def decode_masked(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, k_new, v_new, *, band: tuple,
                  scale: float, alibi_slopes, softcap, rotary_cos=None, rotary_sin=None,
                  rotary_interleaved: bool = False):
    """The same step with no host sync, for torch.compile: the new tokens are scattered into
    the caches (in place, and into a differentiable copy), then q attends over all Lmax slots
    with each sequence's validity, causal band and ALiBi as a per-sequence mask. Costs
    Lq x Lmax per sequence. Returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq))."""
    b, _, lq, _ = q.shape
    lmax, lnew = k_cache.shape[2], (0 if k_new is None else k_new.shape[2])
    n = seqlens.long()
    if rotary_cos is not None:
        q = apply_rotary(q, rotary_cos, rotary_sin, rotary_positions(seqlens, lq, lnew, lq), rotary_interleaved)
    keys, values = k_cache, v_cache
    if k_new is not None:
        if rotary_cos is not None:
            k_new = apply_rotary(k_new, rotary_cos, rotary_sin, rotary_positions(seqlens, lnew, lnew, lnew),
                                 rotary_interleaved)
        slots = n[:, None] + torch.arange(lnew, device=q.device)  # (B, Lnew): slot of new token t
        index = [slots[:, None, :, None].expand(*t.shape) for t in (k_new, v_new)]  # (B, Hkv, Lnew, D)
        keys, values = k_cache.scatter(2, index[0], k_new), v_cache.scatter(2, index[1], v_new)
        with torch.no_grad():
            k_cache.scatter_(2, index[0], k_new.detach())
            v_cache.scatter_(2, index[1], v_new.detach())
    total = n + lnew  # (B,) valid keys per sequence
    query_pos = total[:, None] - lq + torch.arange(lq, device=q.device)  # (B, Lq): bottom-right diagonal
    key_pos = torch.arange(lmax, device=q.device)
    # Slots beyond a sequence's keys may hold anything (NaN): zero them, or 0 * NaN would leak.
    slot_ok = (key_pos[None, :] < total[:, None])[:, None, :, None]  # (B, 1, Lmax, 1)
    keys, values = keys.where(slot_ok, 0.0), values.where(slot_ok, 0.0)
    rel = key_pos[None, None, :] - query_pos[:, :, None]  # (B, Lq, Lmax): key relative to the diagonal
    keep = (key_pos[None, None, :] < total[:, None, None]).expand_as(rel)  # (B, Lq, Lmax)
    if band[0] is not None:
        keep = keep & (rel >= -band[0])
    if band[1] is not None:
        keep = keep & (rel <= band[1])
    bias = keep[:, None]  # (B, 1, Lq, Lmax) bool
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().reshape(-1, alibi_slopes.shape[-1], 1, 1)  # (1 or B, Hq, 1, 1)
        bias = (-slopes * rel[:, None].abs()).masked_fill(~bias, float("-inf"))  # (B, Hq, Lq, Lmax)
    return attention_reference(q, keys, values, scale=scale, attn_bias=bias, softcap=softcap, return_lse=True,
                               upcast=True)

"""A generation step without kernels (no gradients, no lse): append, then attend per prefix.

Same result as ``decode_reference`` followed by ``append_reference``, but each sequence's
valid prefix goes through torch's fused SDPA where it can express the call (on a CPU many
times faster than the reference, which builds the scores). No Triton here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.decode.reference import append_reference, apply_rotary, rotary_positions
from fastattn.ops.flash.fallback import attention


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

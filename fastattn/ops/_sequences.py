"""Packed (varlen) sequences in plain PyTorch, for every op's reference and fallback: one call
per sequence of a packed batch. No Triton here."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def per_sequence(attend, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                 alibi_slopes: Optional[Tensor] = None):
    """Packed variable-length sequences, one ``attend`` call per sequence.

    q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv). Sequence b holds rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v.
    ``attend(q_b, k_b, v_b, slopes_b)`` takes (1, H, L, D) views and returns (out, lse or None).
    alibi_slopes: (Hq,) or (B, Hq). Returns out (total_q, Hq, Dv) and lse (Hq, total_q) (None
    if any call gave none). Reads the offsets on the host.
    """
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b, (q0, q1, k0, k1) in enumerate(zip(cq, cq[1:], ck, ck[1:])):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        # (L, H, D) -> (1, H, L, D): views
        out, lse = attend(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                          v[k0:k1].transpose(0, 1)[None], slopes)
        outs.append(out[0].transpose(0, 1))  # (1, H, L, Dv) -> (L, H, Dv)
        lses.append(None if lse is None else lse[0])  # (1, H, L) -> (H, L)
    out = torch.cat(outs) if outs else v.new_zeros(0, q.shape[1], v.shape[-1])
    if any(x is None for x in lses):
        return out, None
    return out, (torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32))

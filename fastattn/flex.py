"""FlexAttention in fastattn's kernels: ``torch.nn.attention.flex_attention``'s interface.

``flex_attention`` takes torch's plain-torch ``score_mod`` / ``mask_mod`` and ``BlockMask`` and
runs them inside Triton kernels (each mod translated once to Triton source, ``ops/flex``); the
BlockMask helpers torch users call are re-exported here, so that swapping the import is enough::

    from fastattn.flex import create_block_mask, flex_attention

``document_block_mask`` builds a packed-documents BlockMask at block level (no (L, L) mask_mod
evaluation); ``flex_attention_varlen`` runs the mods over FlashAttention's packed layout.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, noop_mask, or_masks

from fastattn.ops.flex import dispatch as flex_dispatch
from fastattn.ops.flex.blocks import document_block_mask

__all__ = ["BlockMask", "and_masks", "create_block_mask", "document_block_mask", "flex_attention",
           "flex_attention_varlen", "noop_mask", "or_masks"]


def flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod=None, block_mask=None,
                   scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False):
    """torch's ``flex_attention``, eagerly, with the mods running inside fastattn's kernels.

    Args:
        query: (B, Hq, Lq, D). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv). Any strides.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` written in plain torch
            (arithmetic, comparisons, ``&``/``|``/``~``, ``torch.where``, abs, exp, log, tanh,
            sigmoid, sqrt, minimum/maximum, clamp, integer division, and indexing of captured
            tensors by positions, e.g. ``bias[h, q_idx - kv_idx]``). ``h`` is the query head.
            Captured floating tensors that require grad get their gradient.
        block_mask: torch's ``BlockMask`` (``create_block_mask``) or a fastattn
            ``sparse.BlockSparseLayout``: blocks it does not list are never visited, its
            ``mask_mod`` applies inside partial blocks only, full blocks skip it. None: every
            pair is kept. Its (Q_LEN, KV_LEN) must be (Lq, Lk).
        scale: multiplies q @ k^T before score_mod; default ``1 / sqrt(D)``.
        enable_gqa: allow Hq a multiple of Hkv (query head h uses kv head ``h // (Hq // Hkv)``).
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.

    Returns:
        out (B, Hq, Lq, Dv) in query's dtype, or ``(out, lse)``. A row with no kept key gives
        out 0 and lse -inf.

    Raises:
        ValueError: bad shapes, dtypes or devices (named), a block_mask for other lengths, or,
            under ``use_backend("triton")``, a mod the kernels cannot translate (the message
            names the construct). Under "auto" such a mod runs the chunked reference.

    Equivalent code::

        s = query @ key.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
        s = score_mod(s, b, h, q_idx, kv_idx)    # positions broadcast over (B, Hq, Lq, Lk)
        s = s.masked_fill(~kept_by(block_mask), -inf)
        out = softmax(s, -1) @ value.repeat_interleave(Hq // Hkv, 1)
    """
    return flex_dispatch.run("flex_attention", query, key, value, score_mod, block_mask, scale, enable_gqa,
                             return_lse)


def flex_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                          score_mod=None, mask_mod=None, scale: Optional[float] = None, return_lse: bool = False):
    """``flex_attention``'s mods over packed variable-length sequences (FlashAttention's varlen
    layout): each sequence attends only inside itself, so a document mask needs no (L, L) object.

    Args:
        q: (total_q, Hq, D). k: (total_k, Hkv, D). v: (total_k, Hkv, Dv). Any strides; Hq a
            multiple of Hkv (query head h uses kv head ``h // (Hq // Hkv)``).
        cu_seqlens_q, cu_seqlens_k: int32 (B+1,) offsets, as ``flash_attention_varlen``.
        max_seqlen_q, max_seqlen_k: the longest sequence, or None (checked on CPU, not needed).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` as in ``flex_attention``, with ``b`` the
            sequence and ``q_idx``/``kv_idx`` positions inside it (0 at its first row).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, the same positions; applied to every
            pair inside a sequence (there is no BlockMask: every key tile of the sequence is
            visited). None keeps every pair of the sequence.
        scale: multiplies q @ k^T before score_mod; default ``1 / sqrt(D)``.
        return_lse: also return the row logsumexp, float32 (Hq, total_q), natural log.

    Returns:
        out (total_q, Hq, Dv) in q's dtype, or ``(out, lse)``. A row with no kept key gives out 0
        and lse -inf.

    Raises:
        ValueError: as ``flash_attention_varlen`` for shapes and offsets, a mod that is not
            callable, or, under ``use_backend("triton")``, a mod the kernels cannot translate.

    Equivalent code, per sequence b (q_b = q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], likewise k_b, v_b)::

        out_b = flex_attention(q_b.transpose(0, 1)[None], k_b..., v_b...,
                               score_mod=lambda s, _, h, i, j: score_mod(s, b, h, i, j),
                               block_mask=(mask_mod(b, h, i, j) as a BlockMask))[0].transpose(0, 1)
    """
    return flex_dispatch.run_varlen("flex_attention_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, score_mod, mask_mod, scale, return_lse)

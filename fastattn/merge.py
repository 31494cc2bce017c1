"""Merging attention over disjoint key sets by their log-sum-exps (FlashInfer's merge_state,
FlashAttention 3's flash_attn_combine), and cascade decoding over a prefix shared by a batch of
requests (its K/V stored once) built on it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn.validation import shape_str


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Optional[Tensor] = None,
                           lse_b: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Attention over the union of disjoint key sets from the attention over each.

    Two states: ``out_a`` / ``out_b`` (..., Dv) and ``lse_a`` / ``lse_b`` (...) = out.shape[:-1],
    float, natural log (what ``flash_attention(..., return_lse=True)`` gives: out (B, H, L, Dv),
    lse (B, H, L); FlashInfer's (L, H, Dv) / (L, H) work the same way). Or S states stacked on a
    first dim: ``out_a`` (S, ..., Dv), ``lse_a`` (S, ...), ``out_b`` / ``lse_b`` None.

    With M = max over the states of lse_s: lse = M + log(sum_s exp(lse_s - M)) and
    out = sum_s exp(lse_s - lse) * out_s. A state with no key (lse -inf) has weight 0; rows where
    every state is empty give out 0 and lse -inf (no NaN, in values or gradients). Computed in
    float32 (float64 for float64 inputs); out in out's dtype, lse float32 (or float64).
    Differentiable in every input.

    Returns:
        (out (..., Dv), lse (...)).

    Raises:
        ValueError: only one of out_b / lse_b given, or shapes that do not match as above.
    """
    if (out_b is None) != (lse_b is None):
        raise ValueError("merge_attention_states: give both out_b and lse_b, or neither (states stacked on dim 0)")
    if out_b is not None:
        for name, o, lse in (("a", out_a, lse_a), ("b", out_b, lse_b)):
            if o.dim() < 1 or lse.shape != o.shape[:-1]:
                raise ValueError(f"merge_attention_states: lse_{name} {shape_str(lse)} must be out_{name}'s shape "
                                 f"{shape_str(o)} without its last dim")
        if out_a.shape != out_b.shape:
            raise ValueError(f"merge_attention_states: out_a {shape_str(out_a)} and out_b {shape_str(out_b)} differ")
        out_a, lse_a = torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b])
    elif out_a.dim() < 2 or lse_a.shape != out_a.shape[:-1]:
        raise ValueError(f"merge_attention_states: stacked states need out (S, ..., Dv) and lse (S, ...), got "
                         f"out {shape_str(out_a)} and lse {shape_str(lse_a)}")
    work = torch.float64 if lse_a.dtype == torch.float64 else torch.float32
    lse = lse_a.to(work)
    top = lse.amax(dim=0)  # (...): the largest state's lse, so no exp overflows
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # all states empty: any finite shift
    weights = torch.exp(lse - top)  # (S, ...): exp(lse_s - M), 0 for an empty state
    total = weights.sum(dim=0)  # (...)
    some = total > 0  # rows with a key in some state
    safe = torch.where(some, total, torch.ones_like(total))  # log and division without inf or NaN gradients
    merged_lse = torch.where(some, top + torch.log(safe), torch.full_like(top, float("-inf")))
    share = weights / safe  # (S, ...): each state's weight
    out = (share[..., None] * out_a.to(work)).sum(dim=0)
    return out.to(out_a.dtype), merged_lse


def cascade_attention_with_kvcache(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, k_cache: Tensor, v_cache: Tensor,
                                   cache_seqlens, *, k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
                                   scale: Optional[float] = None, block_table: Optional[Tensor] = None) -> Tensor:
    """A generation step for B requests that share one prefix (a system prompt) whose K/V are
    stored once: each request attends to the whole prefix and then, causally, to its own tokens.

    q (B, Hq, Lq, D). prefix_k / prefix_v (1, Hkv, P, D / Dv): the shared prefix. k_cache,
    v_cache, cache_seqlens, k_new, v_new, block_table: each request's own tokens after the prefix,
    as ``fastattn.attention_with_kvcache`` takes them (the new tokens are appended in place).
    Equals ``attention_with_kvcache`` over caches holding prefix + own tokens, causal bottom-right:
    every query comes after the prefix, so it sees all of it. The B * Lq queries attend to the
    prefix as the rows of one sequence (``flash_attention``), the requests' own keys in one
    ``attention_with_kvcache`` call; the two are merged by lse (``merge_attention_states``).
    Returns out (B, Hq, Lq, Dv). Raises ValueError where those functions do."""
    from fastattn.functional import attention_with_kvcache, flash_attention

    b, hq, lq, d = q.shape
    rows = q.transpose(0, 1).reshape(1, hq, b * lq, d)  # (B, Hq, Lq, D) -> (1, Hq, B * Lq, D)
    out_p, lse_p = flash_attention(rows, prefix_k, prefix_v, scale=scale, return_lse=True)
    dv = out_p.shape[-1]
    out_p = out_p.reshape(hq, b, lq, dv).transpose(0, 1)  # back to (B, Hq, Lq, Dv)
    lse_p = lse_p.reshape(hq, b, lq).transpose(0, 1)
    out_s, lse_s = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, scale=scale,
                                          block_table=block_table, return_lse=True)
    return merge_attention_states(out_p, lse_p, out_s, lse_s)[0]

"""Merging attention over disjoint key sets by their log-sum-exps (FlashInfer's merge_state,
FlashAttention 3's flash_attn_combine): cascade attention over a shared prefix, split-KV, ring
attention. Plain differentiable torch."""
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

"""The flash op without kernels: torch's own fused SDPA where it can express the call.

On a CPU torch's fused SDPA is several times faster than the reference and never
materialises Lq x Lk, so the router sends a call here when ``sdpa_expressible`` says torch
can compute it exactly. It calls ``fastattn.backend.TORCH_SDPA``, torch's function captured
at import, never the attribute that ``fastattn.patch_sdpa`` replaces. No Triton here.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastattn.backend import TORCH_SDPA
from fastattn.ops._sequences import per_sequence
from fastattn.ops.flash.reference import attention_reference


def torch_causal(band: tuple, lq: int, lk: int):
    """How torch's SDPA expresses a band: False (no mask), "upper_left" (its is_causal),
    "lower_right" (its causal_lower_right bias), or None (it cannot)."""
    if band == (None, None):
        return False
    if band == (None, lq - lk):
        return "upper_left"
    if band == (None, 0) and lq <= lk:  # torch warns its lower-right bias gives NaN rows for lq > lk
        return "lower_right"
    return None


def sdpa_expressible(q: Tensor, k: Tensor, *, band: tuple, attn_bias: Optional[Tensor],
                     alibi_slopes: Optional[Tensor], softcap: Optional[float], need_lse: bool) -> bool:
    """Whether ``sdpa_attention`` computes this flash_attention call exactly."""
    if need_lse or alibi_slopes is not None or softcap:
        return False
    causal = torch_causal(band, q.shape[2], k.shape[2])
    return causal is False or (causal is not None and attn_bias is None)  # a mask or a causal flag


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, band: tuple, scale: float,
                   attn_bias: Optional[Tensor], dropout_p: float) -> Tensor:
    """flash_attention's semantics through torch's SDPA, for calls ``sdpa_expressible`` accepts.
    q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D/Dv) -> (B, Hq, Lq, Dv)."""
    causal = torch_causal(band, q.shape[2], k.shape[2])
    if causal == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        attn_bias = causal_lower_right(q.shape[2], k.shape[2])
    elif attn_bias is not None and attn_bias.dtype.is_floating_point and attn_bias.dtype != q.dtype:
        attn_bias = attn_bias.to(q.dtype)  # torch wants a float mask in q's dtype
    return TORCH_SDPA(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, is_causal=causal == "upper_left",
                      scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attention(q: Tensor, k: Tensor, v: Tensor, *, band: tuple, scale: float, attn_bias=None, alibi_slopes=None,
              softcap=None, dropout_p: float = 0.0, sinks=None, need_lse: bool = False):
    """flash_attention's semantics without kernels: torch's SDPA where it expresses the call
    (it has no sinks), else the reference with fp32 scores. Returns (out, lse); lse None from
    torch's SDPA."""
    if sinks is None and sdpa_expressible(q, k, band=band, attn_bias=attn_bias, alibi_slopes=alibi_slopes,
                                          softcap=softcap, need_lse=need_lse):
        return sdpa_attention(q, k, v, band=band, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p), None
    return attention_reference(q, k, v, window=band, scale=scale, attn_bias=attn_bias, alibi_slopes=alibi_slopes,
                               softcap=softcap, dropout_p=dropout_p, sinks=sinks, return_lse=True, upcast=True)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, band: tuple,
                     scale: float, alibi_slopes=None, softcap=None, dropout_p: float = 0.0, sinks=None,
                     need_lse: bool = False):
    """Packed sequences without kernels: ``attention`` per sequence (q (total_q, Hq, D), k/v
    (total_k, Hkv, D/Dv)). Returns out (total_q, Hq, Dv) and lse (Hq, total_q) or None."""
    def attend(qb, kb, vb, slopes):
        return attention(qb, kb, vb, band=band, scale=scale, alibi_slopes=slopes, softcap=softcap,
                         dropout_p=dropout_p, sinks=sinks, need_lse=need_lse)

    return per_sequence(attend, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)

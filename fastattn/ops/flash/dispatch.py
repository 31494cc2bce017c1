"""The flash family's one entry below the public functions: ``run(call)`` asks the router where
a validated ``FlashCall`` goes and runs it there; ``run_sdpa`` does the same for the drop-in
``scaled_dot_product_attention``. Nothing else chooses among the implementations.

    route        flash_attention                      flash_attention_varlen
    kernel       ops/flash/op.py                      the same, packed
    torch_sdpa   fallback.sdpa_attention              fallback.varlen_attention (per sequence)
    reference    reference.attention_reference        reference.varlen_attention_reference

The drop-in runs torch's own function (captured at import) for every call off the kernels.
A low-precision call (fp8 q, k, v, or ``qk_quant="int8"``) runs the kernels' low-precision
forward, or off them the reference in float32 on the dequantized inputs (``_low_precision``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import backend
from fastattn.backend import TORCH_SDPA
from fastattn.ops.flash import fallback
from fastattn.ops.flash.reference import (
    attention_reference, dequantize_fp8, dequantize_int8, smooth_quantize_int8, varlen_attention_reference,
)
from fastattn.ops.flash.sdpa_translate import as_flash
from fastattn.validation import FlashCall

ALIBI_GRAD = "alibi_slopes requires grad; the kernels compute no gradient for the slopes"


def run(op: str, call: FlashCall):
    """out, or (out, lse) with ``call.return_lse``: shapes as flash_attention (or, packed,
    flash_attention_varlen) documents.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels cannot take the call."""
    if call.descale is not None or call.qk_quant is not None:
        out, lse = _low_precision(op, call)
        return (out, lse) if call.return_lse else out
    packed = call.cu_seqlens_q is not None
    # The kernels give no gradient for ALiBi slopes: a call that needs one runs the reference.
    extra = [ALIBI_GRAD] if call.alibi_grad else []
    route = backend.route(op, "flash", *_views(call), torch_sdpa=_sdpa_expressible(call), extra_refusals=extra)
    if route.impl == "kernel":
        out, lse = _kernels(call)
        if packed:
            out, lse = out[0].transpose(0, 1), lse[0]  # (1, Hq, total, Dv) -> (total, Hq, Dv); lse (Hq, total)
    elif packed:
        out, lse = _varlen_fallback(call, route.impl)
    elif route.impl == "torch_sdpa":
        out, lse = fallback.sdpa_attention(call.q, call.k, call.v, band=call.band, scale=call.scale,
                                           attn_bias=call.attn_bias, dropout_p=call.dropout_p), None
    else:
        out, lse = _reference(call)
    return (out, lse) if call.return_lse else out


def _reference(call: FlashCall):
    """(out, lse) of the reference, scores in float32 (at least), dense or packed."""
    if call.cu_seqlens_q is not None:
        return _varlen_fallback(call, "reference")
    return attention_reference(
        call.q, call.k, call.v, window=call.band, scale=call.scale, attn_bias=call.attn_bias,
        alibi_slopes=call.alibi_slopes, softcap=call.softcap, dropout_p=call.dropout_p, sinks=call.sinks,
        return_lse=True, upcast=True)


def _low_precision(op: str, call: FlashCall):
    """(out, lse) of an fp8 call (``call.descale``) or a ``qk_quant="int8"`` one: the kernels'
    low-precision forward, or off them the reference in float32 on the dequantized inputs: fp8
    values times their descales; for int8, q and k quantized as the kernels take them
    (``smooth_quantize_int8``), dequantized (``dequantize_int8``). The output in
    ``call.out_dtype``. fp8 is the router's "flash-fp8" family (compute capability 8.9)."""
    packed, fp8 = call.cu_seqlens_q is not None, call.descale is not None
    route = backend.route(op, "flash-fp8" if fp8 else "flash", *_views(call))
    from_int8 = None
    if not fp8:
        from_int8 = smooth_quantize_int8(call.q, call.k, call.cu_seqlens_q, call.cu_seqlens_k)
    if route.impl == "kernel":
        from fastattn.ops.flash.op import LowPrecision  # imports triton, so only when used

        if fp8:
            lowp = LowPrecision("fp8", call.descale.contiguous(), None, call.out_dtype)
        else:
            q8, q_rows, k8, k_scale = from_int8
            if packed:  # (total, H, ...) -> (1, H, total, ...)
                q_rows, k_scale = q_rows.transpose(0, 1)[None], k_scale.t()[None]
            # Contiguous, as the kernel reads them (q_rows laid out as its lse), whatever q's and k's strides.
            lowp = LowPrecision("int8", q_rows.contiguous(), k_scale.contiguous(), call.out_dtype)
            call = call._replace(q=q8, k=k8)
        out, lse = _kernels(call, lowp)
        if packed:
            out, lse = out[0].transpose(0, 1), lse[0]
        return out, lse
    if fp8:
        q, k, v = (dequantize_fp8(t, call.descale[..., i], call.cu_seqlens_q if i == 0 else call.cu_seqlens_k)
                   for i, t in enumerate((call.q, call.k, call.v)))
    else:
        (q, k), v = dequantize_int8(*from_int8), call.v.float()
    out, lse = _reference(call._replace(q=q, k=k, v=v, descale=None, qk_quant=None))
    return out.to(call.out_dtype), lse


def run_sdpa(op: str, query: Tensor, key: Tensor, value: Tensor, attn_mask, dropout_p: float, is_causal: bool,
             scale, enable_gqa: bool) -> Tensor:
    """The drop-in: the kernels where they take the call, else torch's own function on the
    original arguments (so the result or the error is torch's).

    Raises:
        ValueError: as ``sdpa_translate.as_flash``; under ``use_backend("triton")``, a call the
            kernels cannot take."""
    translated, why_not = as_flash(op, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if translated is not None:
        call, out_shape = translated
        if backend.route(op, "flash", call.q, call.k, call.v, torch_sdpa=True).impl == "kernel":
            out, _ = _kernels(call)
            return out.reshape(*out_shape, out.shape[-1])  # (B, Hq, Lq, Ev) -> (*batch, Hq, Lq, Ev)
    elif why_not is not None and backend.current_backend() == "triton":
        raise backend.triton_refusal(op, [why_not])
    return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa)


def _views(call: FlashCall) -> tuple:
    """(q, k, v) as (B, H, L, D): packed tensors as (1, H, total, D) views."""
    if call.cu_seqlens_q is None:
        return call.q, call.k, call.v
    return tuple(t.transpose(0, 1)[None] for t in (call.q, call.k, call.v))


def _sdpa_expressible(call: FlashCall) -> bool:
    if call.sinks is not None:  # torch's SDPA has no sinks
        return False
    if call.cu_seqlens_q is not None:  # decided per sequence by fallback.attention
        return not call.return_lse
    return fallback.sdpa_expressible(call.q, call.k, band=call.band, attn_bias=call.attn_bias,
                                     alibi_slopes=call.alibi_slopes, softcap=call.softcap,
                                     need_lse=call.return_lse)


def _kernels(call: FlashCall, lowp=None):
    """(out, lse) of the kernels; ``lowp``: ``op.LowPrecision`` of a low-precision call."""
    from fastattn.ops.flash import op as flash_op  # imports triton, so only when used

    bias = call.attn_bias
    # 4-D, unexpanded: the op reads it in place and gives its gradient in its own shape.
    bias = None if bias is None else bias[(None,) * (4 - bias.dim())]
    # The seed is drawn from torch's generator on the device, so torch.manual_seed governs
    # dropout and nothing syncs with the host.
    seed = torch.randint(0, 2**62, (1,), device=call.q.device) if call.dropout_p > 0 else None
    return flash_op.flash_attn(
        *_views(call), bias=bias, alibi=call.alibi_slopes, seed=seed, sinks=call.sinks, scale=call.scale,
        softcap=call.softcap, dropout_p=call.dropout_p, window_left=call.band[0], window_right=call.band[1],
        cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k, lowp=lowp)


def _varlen_fallback(call: FlashCall, impl: str):
    args = (call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k)
    kw = dict(scale=call.scale, alibi_slopes=call.alibi_slopes, softcap=call.softcap, dropout_p=call.dropout_p,
              sinks=call.sinks)
    if impl == "torch_sdpa":
        return fallback.varlen_attention(*args, band=call.band, **kw)
    return varlen_attention_reference(*args, window=call.band, return_lse=True, upcast=True, **kw)

"""torch's SDPA arguments as a flash call: the drop-in ``scaled_dot_product_attention``'s
translation. ``as_flash`` folds torch's leading batch dims, broadcast heads, masks and causal
flags into a validated ``FlashCall`` on 4-D views, or says why only torch's own function can
run the call. No Triton here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn.validation import FlashCall, default_scale, shape_str


def as_flash(op, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's SDPA arguments -> ((call, out_shape), None): a ``FlashCall`` on 4-D (B, H, L, E)
    views of the inputs and the (*batch, Hq, Lq) the output's leading dims fold back into; or (None, why) for a call only torch's own function
    runs (torch then gives its own result or error; why is None for an empty input, which
    every backend hands to torch: nothing to compute). Raises ValueError for what torch refuses
    too, where fastattn has always named the argument (GQA heads without enable_gqa, a mask
    that is neither a Tensor nor a CausalBias)."""
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) for t in tensors):
        return None, "query, key and value must be plain Tensors"
    if min(t.dim() for t in tensors) < 2:
        return None, "query, key and value must have at least 2 dims (L, E)"
    if any(t.is_nested for t in tensors):
        return None, "nested tensors go to torch's SDPA"
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        return None, "query, key and value differ in dtype or device"
    if not query.dtype.is_floating_point:
        return None, f"dtype {query.dtype} is not floating point"
    if any(t.numel() == 0 for t in tensors):
        return None, None
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        return None, f"dropout_p {dropout_p!r} is not in [0, 1)"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return None, f"scale {scale!r} is not a finite float"
    # Pad every input to the same rank (at least 3: heads, L, E); dims before heads are batch.
    rank = max(3, *(t.dim() for t in tensors))
    q, k, v = (t.reshape((1,) * (rank - t.dim()) + t.shape) for t in tensors)  # views
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        return None, f"batch dims of {shape_str(query)}, {shape_str(key)}, {shape_str(value)} do not broadcast"
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv or k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        return None, f"key {shape_str(key)} and value {shape_str(value)} do not fit query {shape_str(query)}"
    if hq == 1 and hk > 1:
        hq = hk  # query heads broadcast over the key/value heads
    elif hq != hk and hk != 1:  # one kv head broadcasts; anything else is grouped-query attention
        if not enable_gqa:
            raise ValueError(f"{op}: query heads ({hq}) differ from key heads ({hk}); "
                             "pass enable_gqa=True for grouped-query attention")
        if hq % hk:
            raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    lq, lk, nb = q.shape[-2], k.shape[-2], math.prod(batch)
    # (*batch, H, L, E) -> (B, H, L, E): a view for ordinary layouts, a copy only when
    # broadcast (stride-0) batch dims cannot merge with the others.
    q = q.expand(*batch, hq, lq, q.shape[-1]).reshape(nb, hq, lq, q.shape[-1])
    k = k.expand(*batch, hk, lk, k.shape[-1]).reshape(nb, hk, lk, k.shape[-1])
    v = v.expand(*batch, hv, lk, v.shape[-1]).reshape(nb, hv, lk, v.shape[-1])
    band, mask = (None, None), attn_mask
    if attn_mask is not None and (_is_causal_bias(attn_mask) or not isinstance(attn_mask, Tensor)):
        band, mask = _causal_bias_band(op, attn_mask, lq, lk), None
    if is_causal:  # with a mask too, both apply, as torch's default path does
        band = (None, lq - lk)  # top-left: j <= i, i.e. rel = j - i - (lk - lq) <= lq - lk
    if mask is not None:
        if mask.dim() < 2 or mask.device != query.device or mask.dtype not in (torch.bool, query.dtype):
            return None, (f"attn_mask ({mask.dtype}, {mask.dim()}-D, on {mask.device}) is not a bool or "
                          f"{query.dtype} mask of 2+ dims on {query.device}")
        full = (*batch, hq, lq, lk)
        try:
            if torch.broadcast_shapes(mask.shape, full) != full:
                raise RuntimeError
        except RuntimeError:
            return None, f"attn_mask {shape_str(mask)} does not broadcast to {full}"
        mask = mask.expand(full).reshape(nb, hq, lq, lk)  # (*batch, Hq, Lq, Lk) -> (B, Hq, Lq, Lk)
    out_shape = (*batch, hq, lq) if query.dim() > 2 or key.dim() > 2 else (lq,)
    call = FlashCall(q, k, v, band, default_scale(q.shape[-1], scale), mask, None,
                     None, float(dropout_p), None, False)
    return (call, out_shape), None


def _is_causal_bias(mask) -> bool:
    try:
        from torch.nn.attention.bias import CausalBias
    except ImportError:  # an older torch
        return False
    return isinstance(mask, CausalBias)  # a Tensor subclass


def _causal_bias_band(op: str, mask, lq: int, lk: int) -> tuple:
    """torch's CausalBias objects -> band. Lower-right is ours; upper-left is torch's is_causal."""
    from torch.nn.attention.bias import CausalVariant

    if not _is_causal_bias(mask):
        raise ValueError(f"{op}: attn_mask must be a Tensor, a CausalBias or None, got {type(mask).__name__}")
    if (mask.seq_len_q, mask.seq_len_kv) != (lq, lk):
        raise ValueError(
            f"{op}: causal bias is for ({mask.seq_len_q}, {mask.seq_len_kv}) but the inputs have "
            f"Lq={lq}, Lk={lk}")
    if mask.variant == CausalVariant.LOWER_RIGHT:
        return (None, 0)
    return (None, lq - lk)



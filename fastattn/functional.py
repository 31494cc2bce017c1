"""Public attention functions: input validation and dispatch, nothing else.

The math lives in ``fastattn/ops/<op>/reference.py`` (pure PyTorch) and the kernels in
``fastattn/ops/<op>/kernels.py``; ``fastattn.backend`` decides which one runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastattn import backend
from fastattn.ops.flash.reference import attention_reference, band_from


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """ValueError naming the argument and shapes for anything the contract forbids."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {_shape(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name}.dtype {t.dtype} differs from q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q must be floating point, got {q.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{op}: batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k {_shape(k)} and v {_shape(v)} must agree in heads and seq")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: head_dim of q {_shape(q)} and k {_shape(k)} differ")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}); "
            f"q {_shape(q)}, k {_shape(k)}")


def _check_bias(op: str, name: str, bias: Optional[Tensor], q: Tensor, k: Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise ValueError(f"{op}: {name} must be a Tensor or None, got {type(bias).__name__}")
    if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be bool (True = attend) or floating point, got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"{op}: {name} is on {bias.device} but q is on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        if bias.dim() > 4 or torch.broadcast_shapes(bias.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{op}: {name} of shape {_shape(bias)} does not broadcast to "
            f"(batch, heads, Lq, Lk) = {target}") from None


def _check_options(op: str, q: Tensor, *, scale, window, alibi_slopes, softcap, dropout_p) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"{op}: softcap must be a positive float or None, got {softcap!r}")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"{op}: window must be (left, right), got {window!r}")
        for side, w in zip(("left", "right"), window):
            if w is not None and not (isinstance(w, int) and w >= 0):
                raise ValueError(f"{op}: window {side} must be an int >= 0 or None, got {w!r}")
    if alibi_slopes is not None:
        b, h = q.shape[0], q.shape[1]
        if not isinstance(alibi_slopes, Tensor) or tuple(alibi_slopes.shape) not in ((h,), (b, h)):
            shape = _shape(alibi_slopes) if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise ValueError(f"{op}: alibi_slopes must have shape ({h},) or ({b}, {h}), got {shape}")
        if alibi_slopes.device != q.device or not alibi_slopes.dtype.is_floating_point:
            raise ValueError(f"{op}: alibi_slopes must be floating point on {q.device}")


def _attend(op, q, k, v, *, band, scale, attn_bias, alibi_slopes, softcap, dropout_p, need_lse):
    """Validated inputs -> (out, lse) from the kernels, torch's own SDPA, or the reference.

    Without kernels ("auto" on a CPU, say), a call that torch's fused SDPA can express and
    that needs no lse goes there: on a CPU it is several times faster than the reference and
    never materialises Lq x Lk. Everything else, and all of use_backend("torch"), runs the
    reference. lse is None when it was not needed and torch's SDPA ran.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    reasons = backend.flash_refusals(q, k, v)
    if min(q.shape[2], k.shape[2], q.shape[0], q.shape[1]) == 0:
        reasons.append("an empty dimension")
    if backend.use_kernels(op, reasons):
        from fastattn.ops.flash import op as flash_op  # imports triton, so only when used

        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        bias = None if attn_bias is None else attn_bias.expand(b, h, lq, lk)
        # The seed is drawn from torch's generator on the device, so torch.manual_seed governs
        # dropout and nothing syncs with the host.
        seed = torch.randint(0, 2**62, (1,), device=q.device) if dropout_p > 0 else None
        return flash_op.flash_attn(
            q, k, v, bias=bias, alibi=alibi_slopes, seed=seed, scale=float(scale),
            softcap=float(softcap or 0.0), dropout_p=float(dropout_p),
            window_left=band[0], window_right=band[1])
    if backend.current_backend() == "auto" and not need_lse and alibi_slopes is None and not softcap:
        causal = _torch_sdpa_causal(band, q.shape[2], k.shape[2])
        if causal is False or (causal and attn_bias is None):  # torch takes a mask or a causal flag
            if causal == "lower_right":
                from torch.nn.attention.bias import causal_lower_right

                attn_bias = causal_lower_right(q.shape[2], k.shape[2])
            elif attn_bias is not None and attn_bias.dtype not in (torch.bool, q.dtype):
                attn_bias = attn_bias.to(q.dtype)  # torch wants a float mask in q's dtype
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, is_causal=causal == "upper_left",
                scale=scale, enable_gqa=q.shape[1] != k.shape[1])
            return out, None
    return attention_reference(
        q, k, v, window=band, scale=scale, attn_bias=attn_bias, alibi_slopes=alibi_slopes,
        softcap=softcap, dropout_p=dropout_p, return_lse=True)


def _torch_sdpa_causal(band, lq: int, lk: int):
    """How torch's SDPA expresses a band: False (no mask), "upper_left" (its is_causal),
    "lower_right" (its causal_lower_right bias), or None (it cannot)."""
    if band == (None, None):
        return False
    if band == (None, lq - lk):
        return "upper_left"
    if band == (None, 0) and lq <= lk:  # torch warns its lower-right bias gives NaN rows for lq > lk
        return "lower_right"
    return None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[tuple] = None,
    attn_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Exact attention with every FlashAttention feature, computed blockwise.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides. Hq must be a
            multiple of Hkv (GQA/MQA): query head h uses kv head ``h // (Hq // Hkv)``.
        causal: bottom-right aligned, as FlashAttention: query i sees key j iff
            ``j <= i + Lk - Lq`` (what a KV cache and chunked prefill need).
        scale: multiplies q @ k^T; default ``1 / sqrt(D)``.
        window: ``(left, right)``, ints >= 0 or None for unbounded: query i sees keys
            ``i + Lk - Lq - left .. i + Lk - Lq + right``. Combines with ``causal``.
        attn_bias: broadcastable to (B, Hq, Lq, Lk): bool (True = attend) or additive float
            (differentiable). Broadcast dims are read with stride 0, never copied.
        alibi_slopes: (Hq,) or (B, Hq): adds ``-slope * |i + Lk - Lq - j|``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (before bias and masks).
        dropout_p: dropout on the attention probabilities, drawn inside the kernel from
            torch's generator (``torch.manual_seed`` makes it repeatable).
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, or ``(out, lse)``. A row whose keys are all masked
        gives out 0 and lse -inf.

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices or options (the message names the
            argument), or, under ``use_backend("triton")``, an input the kernels cannot take.

    Equivalent code::

        s = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
        s = softcap * tanh(s / softcap) + attn_bias + alibi, masked by causal/window
        out = dropout(softmax(s, -1)) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    op = "flash_attention"
    _check_qkv(op, q, k, v)
    _check_bias(op, "attn_bias", attn_bias, q, k)
    _check_options(op, q, scale=scale, window=window, alibi_slopes=alibi_slopes,
                   softcap=softcap, dropout_p=dropout_p)
    out, lse = _attend(op, q, k, v, band=band_from(causal, window), scale=scale,
                       attn_bias=attn_bias, alibi_slopes=alibi_slopes, softcap=softcap,
                       dropout_p=dropout_p, need_lse=return_lse)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (B, Hq, Lq, E) or (Hq, Lq, E). key: (B, Hkv, Lk, E). value: (B, Hkv, Lk, Ev).
        attn_mask: broadcastable to (B, Hq, Lq, Lk): bool (True = attend) or additive float;
            or torch's ``causal_lower_right(...)`` / ``causal_upper_left(...)`` bias objects.
        is_causal: top-left aligned, as torch: query i sees key j iff ``j <= i``.
        enable_gqa: allow Hq to be a multiple of Hkv (otherwise they must be equal).

    Returns:
        (B, Hq, Lq, Ev) (or without B if the inputs had none). Fully masked rows give 0, as
        torch >= 2.5 does.

    Raises:
        ValueError: as ``flash_attention``, plus ``attn_mask`` given with ``is_causal``, and
            Hq != Hkv without ``enable_gqa``.

    Equivalent code: ``torch.nn.functional.scaled_dot_product_attention`` itself.
    """
    op = "scaled_dot_product_attention"
    unbatched = isinstance(query, Tensor) and query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    _check_qkv(op, query, key, value)
    lq, lk = query.shape[2], key.shape[2]
    band = (None, None)
    if attn_mask is not None and (_is_causal_bias(attn_mask) or not isinstance(attn_mask, Tensor)):
        band = _causal_bias_band(op, attn_mask, lq, lk)
        attn_mask = None
    if is_causal:
        if attn_mask is not None:
            raise ValueError(f"{op}: attn_mask must be None when is_causal=True (as in torch)")
        band = (None, lq - lk)  # top-left: j <= i, i.e. rel = j - i - (lk - lq) <= lq - lk
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"{op}: query heads ({query.shape[1]}) differ from key heads ({key.shape[1]}); "
            "pass enable_gqa=True for grouped-query attention")
    _check_bias(op, "attn_mask", attn_mask, query, key)
    _check_options(op, query, scale=scale, window=None, alibi_slopes=None, softcap=None,
                   dropout_p=dropout_p)
    out, _ = _attend(op, query, key, value, band=band, scale=scale, attn_bias=attn_mask,
                     alibi_slopes=None, softcap=None, dropout_p=dropout_p, need_lse=False)
    return out.squeeze(0) if unbatched else out


def _is_causal_bias(mask) -> bool:
    try:
        from torch.nn.attention.bias import CausalBias
    except ImportError:
        return False
    return isinstance(mask, CausalBias)


def _causal_bias_band(op: str, mask, lq: int, lk: int) -> tuple:
    """torch's CausalBias objects -> band. Lower-right is ours; upper-left is torch's is_causal."""
    if not _is_causal_bias(mask):
        raise ValueError(f"{op}: attn_mask must be a Tensor, a CausalBias or None, got {type(mask).__name__}")
    from torch.nn.attention.bias import CausalVariant

    if (mask.seq_len_q, mask.seq_len_kv) != (lq, lk):
        raise ValueError(
            f"{op}: causal bias is for ({mask.seq_len_q}, {mask.seq_len_kv}) but the inputs have "
            f"Lq={lq}, Lk={lk}")
    if mask.variant == CausalVariant.LOWER_RIGHT:
        return (None, 0)
    return (None, lq - lk)


def _check_kvcache(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens,
                   k_new: Optional[Tensor], v_new: Optional[Tensor], num_splits) -> Tensor:
    """ValueErrors for attention_with_kvcache; returns cache_seqlens as a (B,) int32 tensor."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {_shape(t)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q must be floating point, got {q.dtype}")
    b, hq, _, d = q.shape
    hkv, lmax = k_cache.shape[1], k_cache.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name}.dtype {t.dtype} differs from q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        if t.shape[0] != b:
            raise ValueError(f"{op}: batch sizes differ: q {_shape(q)}, {name} {_shape(t)}")
    if v_cache.shape[1] != hkv or v_cache.shape[2] != lmax:
        raise ValueError(f"{op}: k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)} must agree in heads and Lmax")
    if k_cache.shape[-1] != d:
        raise ValueError(f"{op}: head_dim of q {_shape(q)} and k_cache {_shape(k_cache)} differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}); "
                         f"q {_shape(q)}, k_cache {_shape(k_cache)}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: give both k_new and v_new, or neither")
    if k_new is not None:
        for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{op}: {name} must be a 4-D Tensor (batch, kv_heads, Lnew, head_dim)")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{op}: {name} ({t.dtype}, {t.device}) must match q ({q.dtype}, {q.device})")
            if (t.shape[0], t.shape[1], t.shape[3]) != (b, hkv, cache.shape[3]):
                raise ValueError(f"{op}: {name} {_shape(t)} must be ({b}, {hkv}, Lnew, {cache.shape[3]}) "
                                 f"to go into {'k' if cache is k_cache else 'v'}_cache {_shape(cache)}")
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"{op}: k_new {_shape(k_new)} and v_new {_shape(v_new)} differ in Lnew")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cache_seqlens must be an int32/int64 Tensor of shape ({b},) or an int")
    if tuple(cache_seqlens.shape) != (b,) or cache_seqlens.device != q.device:
        raise ValueError(f"{op}: cache_seqlens must have shape ({b},) on {q.device}, got "
                         f"{_shape(cache_seqlens)} on {cache_seqlens.device}")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"{op}: num_splits must be an int >= 1 or None, got {num_splits!r}")
    return cache_seqlens.to(torch.int32).contiguous()


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens,
    *,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[tuple] = None,
    alibi_slopes: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    num_splits: Optional[int] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False,
    return_lse: bool = False,
):
    """Attention of a few new tokens over a preallocated KV cache (incremental decoding).

    Sequence ``b`` holds ``n = cache_seqlens[b]`` tokens in slots ``0 .. n - 1`` of the caches
    (a ragged batch: lengths may differ). If ``k_new``/``v_new`` are given they are first
    written IN PLACE into slots ``n .. n + Lnew - 1`` of ``k_cache``/``v_cache``; then ``q``
    attends to the ``n + Lnew`` valid keys of its own sequence. Slots beyond are never read or
    written. ``cache_seqlens`` is NOT updated (as in FlashAttention's
    ``flash_attn_with_kvcache``): the caller adds ``Lnew`` for the next step
    (``fastattn.nn.KVCache`` does this bookkeeping).

    Args:
        q: (B, Hq, Lq, D), the new tokens' queries (1 for plain decoding, more for speculative
            decoding or chunked prefill). Any strides.
        k_cache: (B, Hkv, Lmax, D). v_cache: (B, Hkv, Lmax, Dv). Hq a multiple of Hkv (GQA:
            query head h reads kv head ``h // (Hq // Hkv)``). Any strides, e.g. a
            (B, Lmax, Hkv, D) buffer viewed with ``.transpose(1, 2)``.
        cache_seqlens: int32 (or int64) (B,) tensor, or an int for every sequence: tokens
            already in the cache, before this call's ``k_new``.
        k_new / v_new: (B, Hkv, Lnew, D) / (B, Hkv, Lnew, Dv), or None.
        causal: bottom-right aligned, per sequence: new query i sees key j iff
            ``j <= i + (n + Lnew) - Lq``. With Lq == 1 it changes nothing.
        scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap: as ``flash_attention``,
            with positions measured per sequence (key j is cache slot j).
        num_splits: how many chunks each sequence's keys are cut into (split-KV "flash
            decoding"); None picks it from batch, heads and length to fill the GPU.
            Results do not depend on it beyond rounding.
        rotary_cos / rotary_sin: (P, R/2) float tables or None: rotary embedding (RoPE) of the
            first R dims of q and k_new, applied inside the kernels (the cache then holds
            rotated keys, as it must). New key t of sequence b is at position ``n + t``; query
            row i at ``n + Lnew - Lq + i`` (its bottom-right diagonal; ``n + i`` when
            Lq == Lnew). P must exceed the last position. ``rotary_interleaved``: rotate the
            pairs (2j, 2j+1) (GPT-J) instead of (j, j + R/2) (GPT-NeoX).
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, or ``(out, lse)``. A sequence with no key at all
        (n = 0 and no k_new) gives out 0 and lse -inf.

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices, options (the message names the
            argument), ``cache_seqlens`` negative or above Lmax, ``n + Lnew > Lmax`` (the write
            would overflow the cache), or, under ``use_backend("triton")``, an input the
            kernels cannot take (e.g. one that requires grad: the kernels are forward-only).
        Checking the lengths reads ``cache_seqlens`` on the host (one device sync); the check
        is skipped while ``torch.compile`` traces, where the kernels clamp to the buffer.

    Equivalent code, per sequence b (n = cache_seqlens[b]; q, k_new rotated first if asked,
    see ``fastattn.ops.decode.reference.apply_rotary``)::

        k_cache[b, :, n:n + Lnew] = k_new[b]; v_cache[b, :, n:n + Lnew] = v_new[b]
        out[b] = flash_attention(q[b:b+1], k_cache[b:b+1, :, :n + Lnew],
                                 v_cache[b:b+1, :, :n + Lnew], causal=causal, ...)[0]
    """
    op = "attention_with_kvcache"
    seqlens = _check_kvcache(op, q, k_cache, v_cache, cache_seqlens, k_new, v_new, num_splits)
    _check_options(op, q, scale=scale, window=window, alibi_slopes=alibi_slopes,
                   softcap=softcap, dropout_p=0.0)
    lnew = 0 if k_new is None else k_new.shape[2]
    lmax = k_cache.shape[2]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{op}: give both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
                raise ValueError(f"{op}: {name} must be a 2-D float Tensor (positions, rotary_dim / 2)")
            if t.device != q.device:
                raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        if rotary_cos.shape != rotary_sin.shape or not 1 <= rotary_cos.shape[1] <= q.shape[-1] // 2:
            raise ValueError(f"{op}: rotary_cos {_shape(rotary_cos)} and rotary_sin {_shape(rotary_sin)} "
                             f"must have the same shape (P, R/2) with 2 <= R <= head_dim {q.shape[-1]}")
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    max_seqlen_k = None
    if not torch.compiler.is_compiling() and seqlens.numel():
        lo, hi = (int(x) for x in torch.stack([seqlens.min(), seqlens.max()]).tolist())
        if lo < 0 or hi > lmax:
            raise ValueError(f"{op}: cache_seqlens must lie in [0, {lmax}] (Lmax of k_cache "
                             f"{_shape(k_cache)}), got values in [{lo}, {hi}]")
        if hi + lnew > lmax:
            raise ValueError(f"{op}: appending {lnew} new tokens to a sequence holding {hi} would "
                             f"overflow the cache: cache_seqlens + Lnew = {hi + lnew} > Lmax = {lmax} "
                             f"(k_cache {_shape(k_cache)})")
        max_seqlen_k = hi + lnew
        if rotary_cos is not None:
            if lo + lnew - q.shape[2] < 0:
                raise ValueError(f"{op}: with rotary, Lq ({q.shape[2]}) may not exceed cache_seqlens + "
                                 f"Lnew (smallest {lo + lnew}): query positions would be negative")
            if hi + lnew > rotary_cos.shape[0]:
                raise ValueError(f"{op}: rotary_cos {_shape(rotary_cos)} covers {rotary_cos.shape[0]} "
                                 f"positions; the longest sequence reaches position {hi + lnew - 1}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    band = band_from(causal, window)
    tensors = [t for t in (q, k_cache, v_cache, k_new, v_new, alibi_slopes, rotary_cos, rotary_sin)
               if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    reasons = backend.decode_refusals(q, k_cache, v_cache, needs_grad)
    if min(q.shape[0], q.shape[1], q.shape[2]) == 0:
        reasons.append("an empty dimension")
    if backend.use_kernels(op, reasons):
        from fastattn.ops.decode import op as decode_op  # imports triton, so only when used

        out, lse = decode_op.decode_attn(
            q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, alibi=alibi_slopes,
            scale=float(scale), softcap=float(softcap or 0.0), window_left=band[0],
            window_right=band[1], num_splits=num_splits, max_seqlen_k=max_seqlen_k,
            rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)
    else:
        from fastattn.ops.decode.reference import append_reference, decode_reference

        # band already holds causal
        rot = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)
        if not (needs_grad or return_lse):
            return _decode_by_prefix(q, k_cache, v_cache, seqlens, k_new, v_new, band=band, scale=scale,
                                     alibi_slopes=alibi_slopes, softcap=softcap, rot=rot)
        out, lse = decode_reference(q, k_cache, v_cache, seqlens, k_new, v_new, causal=False,
                                    window=band, scale=scale, alibi_slopes=alibi_slopes, softcap=softcap,
                                    return_lse=True, **rot)
        if k_new is not None:
            append_reference(k_cache, v_cache, seqlens, k_new, v_new, **rot)
    return (out, lse) if return_lse else out


def _decode_by_prefix(q, k_cache, v_cache, seqlens, k_new, v_new, *, band, scale, alibi_slopes, softcap, rot):
    """The fallback of a generation step (no gradients, no lse): append first, then each
    sequence's valid prefix through ``_attend``, which hands what torch's fused SDPA can
    express to it (on a CPU many times faster than the reference, which builds the scores).
    Same result as ``decode_reference`` followed by ``append_reference``."""
    from fastattn.ops.decode.reference import append_reference, apply_rotary, rotary_positions

    lq, lnew = q.shape[2], (0 if k_new is None else k_new.shape[2])
    if rot["rotary_cos"] is not None:
        q = apply_rotary(q, rot["rotary_cos"], rot["rotary_sin"], rotary_positions(seqlens, lq, lnew, lq),
                         rot["rotary_interleaved"])
    if k_new is not None:
        append_reference(k_cache, v_cache, seqlens, k_new, v_new, **rot)  # rotates k_new as it writes
    outs = []
    for b, n in enumerate(seqlens.tolist()):
        if n + lnew == 0:  # nothing to attend to: out 0, as everywhere in fastattn
            outs.append(q.new_zeros(1, q.shape[1], lq, v_cache.shape[-1]))
            continue
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, _ = _attend("attention_with_kvcache", q[b:b + 1], k_cache[b:b + 1, :, :n + lnew],
                         v_cache[b:b + 1, :, :n + lnew], band=band, scale=scale, attn_bias=None,
                         alibi_slopes=slopes, softcap=softcap, dropout_p=0.0, need_lse=False)
        outs.append(out)
    return torch.cat(outs)  # (B, Hq, Lq, Dv)


# ---------------------------------------------------------------------------------------
# Linear-complexity attention (fastattn/ops/linear)

def _check_eps(op: str, eps) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")


def _linear_dispatch(op, q, k, v, *, feature, causal, normalize, eps):
    """Validated inputs -> out. q/k are the inputs of the elementwise map ``feature``
    ("identity" when the features were computed in torch)."""
    reasons = backend.linear_refusals(q, k, v)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        reasons.append("an empty dimension")
    if backend.use_kernels(op, reasons):
        from fastattn.ops.linear import op as linear_op  # imports triton, so only when used

        return linear_op.linear_attn(q, k, v, feature=feature, causal=causal, normalize=normalize, eps=eps)
    from fastattn.ops.linear import reference as linear_ref

    return linear_ref.linear_attention_chunked(
        linear_ref.feature_map(q, feature), linear_ref.feature_map(k, feature), v,
        causal=causal, normalize=normalize, eps=eps)


def _check_linear(op: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    _check_qkv(op, q, k, v)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{op}: causal linear attention needs Lq == Lk (query i sees keys j <= i), got "
            f"q {_shape(q)}, k {_shape(k)}; decode token by token with "
            "fastattn.ops.linear.reference.linear_attention_step")


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    feature_map="elu",
    normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Linear attention (Katharopoulos et al. 2020): softmax(q k^T) replaced by phi(q).phi(k).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides; GQA/MQA as
            flash_attention (query head h uses kv head ``h // (Hq // Hkv)``).
        causal: query i sees keys j <= i; needs Lq == Lk.
        feature_map: "elu" (elu(x) + 1, the default), "relu", "identity", applied inside the
            kernels; or a callable x (..., L, D) -> (..., L, M), applied in torch first.
        normalize: divide by ``phi(q_i) . sum_j phi(k_j) + eps`` (the normaliser of the kernel
            attention). With "identity" or "relu" the normaliser can vanish; pass False for
            unnormalised (retention-style) linear attention.
        eps: added to the normaliser.

    Returns:
        (B, Hq, Lq, Dv) in q's dtype. The kernels accumulate in fp32 and cost O(L M Dv):
        non-causal via S = phi(K)^T V, causal in chunks with a running state.

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices, feature_map or eps (naming the argument),
            causal with Lq != Lk, or, under ``use_backend("triton")``, an input the kernels
            cannot take (e.g. more than 256 features).

    Equivalent code::

        fq, fk = phi(q), phi(k).repeat_interleave(Hq // Hkv, 1)
        a = fq @ fk.transpose(-1, -2)            # tril() if causal
        out = (a @ v.repeat_interleave(Hq // Hkv, 1)) / (a.sum(-1, keepdim=True) + eps)
    """
    op = "linear_attention"
    _check_qkv(op, q, k, v)
    _check_eps(op, eps)
    feature = feature_map
    if callable(feature_map):
        q, k = feature_map(q), feature_map(k)
        for name, t in (("feature_map(q)", q), ("feature_map(k)", k)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{op}: {name} must return a 4-D Tensor")
        feature = "identity"
    elif feature_map not in ("elu", "relu", "identity"):
        raise ValueError(f"{op}: feature_map must be 'elu', 'relu', 'identity' or a callable, got {feature_map!r}")
    _check_linear(op, q, k, v, causal)
    return _linear_dispatch(op, q, k, v, feature=feature, causal=bool(causal),
                            normalize=bool(normalize), eps=eps)


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    kernel: str = "softmax",
    eps: float = 1e-6,
) -> Tensor:
    """Performer attention (Choromanski et al. 2021): FAVOR+ random features of softmax.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). GQA as flash_attention.
        projection: (M, D) random directions from ``fastattn.performer_projection(M, D)``;
            redraw by calling that again. M <= 256 for the kernels.
        causal: query i sees keys j <= i; needs Lq == Lk.
        scale: softmax temperature approximated, ``softmax(scale * q k^T)``; default 1/sqrt(D).
        kernel: "softmax" (FAVOR+ positive features ``exp(W x - |x|^2/2 - stab)/sqrt(M)`` with
            x scaled by sqrt(scale); the key stabiliser is one constant per (batch, head) over
            the sequence and the query one per row, so both cancel) or "relu" (the generalized
            ReLU kernel ``relu(W x)/sqrt(M)``).
        eps: added to the normaliser of the unstabilised kernel; for "softmax" it is scaled by
            the stabilisers (``favor_eps``), so the result does not depend on them and, causal,
            no output depends on a later key.

    Returns:
        (B, Hq, Lq, Dv): an unbiased-kernel estimate of softmax attention whose error falls as
        M grows. The features are computed in torch (the key stabiliser needs a max over the
        whole sequence), then the linear-attention kernels run on them.

    Raises:
        ValueError: as linear_attention, plus a projection that is not (M, D) on q's device.

    Equivalent code::

        fq, sq = favor_features(q, W, is_query=True, return_stabiliser=True)
        fk, sk = favor_features(k, W, is_query=False, return_stabiliser=True)
        a = fq @ fk.transpose(-1, -2)            # tril() if causal
        out = (a @ v) / (a.sum(-1, keepdim=True) + favor_eps(eps, sq, sk))
    """
    op = "performer_attention"
    _check_qkv(op, q, k, v)
    _check_eps(op, eps)
    if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        shape = _shape(projection) if isinstance(projection, Tensor) else type(projection).__name__
        raise ValueError(f"{op}: projection must be (num_features, head_dim={q.shape[-1]}), got {shape}")
    if projection.device != q.device or not projection.dtype.is_floating_point:
        raise ValueError(f"{op}: projection must be floating point on {q.device}, got {projection.dtype} "
                         f"on {projection.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be a positive float or None, got {scale!r}")
    _check_linear(op, q, k, v, causal)
    from fastattn.ops.linear import reference as linear_ref

    if kernel == "softmax":
        # stabilisers: (B, Hq, Lq, 1) per query row, (B, Hkv, 1, 1) for the keys
        fq, stab_q = linear_ref.favor_features(q, projection, is_query=True, scale=scale, return_stabiliser=True)
        fk, stab_k = linear_ref.favor_features(k, projection, is_query=False, scale=scale, return_stabiliser=True)
        # eps scaled like the features, so the stabilisers cancel exactly and (causal) a large
        # future key cannot reach past outputs through the key stabiliser.
        eps = linear_ref.favor_eps(eps, stab_q, stab_k)
    elif kernel == "relu":
        fq, fk = linear_ref.relu_features(q, projection), linear_ref.relu_features(k, projection)
    else:
        raise ValueError(f"{op}: kernel must be 'softmax' or 'relu', got {kernel!r}")
    return _linear_dispatch(op, fq, fk, v, feature="identity", causal=bool(causal), normalize=True, eps=eps)


def performer_projection(
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random features W (num_features, head_dim) for ``performer_attention``.

    Rows are N(0, I) directions; ``orthogonal=True`` makes them exactly orthogonal in blocks of
    head_dim (each rescaled to a chi-distributed norm), which keeps FAVOR+ unbiased and lowers
    its variance. Call again to redraw; pass ``generator`` for repeatable draws (drawn on the
    generator's device in float64, then moved to ``device``/``dtype``).

    Equivalent code (i.i.d.): ``torch.randn(num_features, head_dim, generator=generator)``.
    """
    for name, n in (("num_features", num_features), ("head_dim", head_dim)):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"performer_projection: {name} must be an int >= 1, got {n!r}")
    from fastattn.ops.linear import reference as linear_ref

    return linear_ref.performer_projection(num_features, head_dim, orthogonal=orthogonal,
                                           generator=generator, device=device, dtype=dtype)


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e_proj: Tensor,
    f_proj: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tensor:
    """Linformer attention (Wang et al. 2020): keys and values projected along the sequence.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). GQA as flash_attention.
        e_proj, f_proj: (P, Lk) shared by all heads, or (Hkv, P, Lk) per kv head, in q's dtype
            and device; ``K' = E K`` and ``V' = F V`` have P rows. Sharing across layers or
            between E and F is the caller's (the module's) choice: pass the same tensor.
        scale: multiplies q K'^T; default 1/sqrt(D).
        causal: must be False. Linformer is non-causal by design: every projected row mixes
            all Lk positions, so no query could be kept from seeing future tokens.

    Returns:
        (B, Hq, Lq, Dv): exact attention of q over the P projected keys, through
        ``fastattn.flash_attention`` (kernels where they apply). Cost O(Lq P + Lk P).

    Raises:
        ValueError: causal=True; projections of the wrong shape, dtype or device; as
            flash_attention for q, k, v.

    Equivalent code::

        kp, vp = e_proj @ k, f_proj @ v          # (B, Hkv, P, D), (B, Hkv, P, Dv)
        out = torch.nn.functional.scaled_dot_product_attention(q, kp, vp, scale=scale, enable_gqa=True)
    """
    op = "linformer_attention"
    if causal:
        raise ValueError(
            f"{op}: causal=True is not supported: Linformer is non-causal by design (each projected "
            "key/value row is a mix of all sequence positions, future ones included). Use "
            "flash_attention(causal=True) or linear_attention(causal=True) instead.")
    _check_qkv(op, q, k, v)
    hkv, lk = k.shape[1], k.shape[2]
    for name, p in (("e_proj", e_proj), ("f_proj", f_proj)):
        if not isinstance(p, Tensor):
            raise ValueError(f"{op}: {name} must be a Tensor, got {type(p).__name__}")
        if not (p.dim() == 2 or (p.dim() == 3 and p.shape[0] == hkv)) or p.shape[-1] != lk or p.shape[-2] < 1:
            raise ValueError(f"{op}: {name} must be (P, Lk={lk}) or (Hkv={hkv}, P, Lk={lk}), got {_shape(p)}")
        if p.dtype != q.dtype or p.device != q.device:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype} and device {q.device}, got "
                             f"{p.dtype} on {p.device}")
    if e_proj.shape[-2] != f_proj.shape[-2]:
        raise ValueError(f"{op}: e_proj {_shape(e_proj)} and f_proj {_shape(f_proj)} must project to the "
                         "same number of rows")
    from fastattn.ops.linear.reference import linformer_project

    return flash_attention(q, linformer_project(k, e_proj), linformer_project(v, f_proj), scale=scale)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, causal: bool = False,
                     scale: Optional[float] = None, return_lse: bool = False):
    """Block-sparse attention: only the (query block, key block) pairs kept by ``layout`` are
    computed; time and memory scale with the kept blocks, on the kernels and on the torch
    fallback alike.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides; Hq a multiple
            of Hkv (GQA/MQA: query head h uses kv head ``h // (Hq // Hkv)``).
        layout: a ``fastattn.sparse.BlockSparseLayout`` for ``seq_len == (Lq, Lk)`` with 1
            (shared) or Hq heads; build it with ``fastattn.sparse.local`` / ``strided`` /
            ``fixed`` / ``longformer`` / ``bigbird`` / ``dilated`` / ``from_dense``.
        causal: bottom-right aligned, as ``flash_attention``: query i sees key j iff
            ``j <= i + Lk - Lq``, applied token by token inside the kept blocks.
        scale: multiplies q @ k^T; default ``1 / sqrt(D)``.
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, or ``(out, lse)``. A query row that sees no key (an
        empty layout row, or causal) gives out 0 and lse -inf.

    Raises:
        ValueError: bad ranks, shapes, dtypes or devices (naming the argument), a layout that
            is not a BlockSparseLayout or does not fit (heads, seq_len), or, under
            ``use_backend("triton")``, an input the kernels cannot take.

    Equivalent code::

        mask = layout.to_element_mask()                      # (1 or Hq, Lq, Lk) bool
        s = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
        s = s.masked_fill(~mask | (causal & (j > i + Lk - Lq)), -inf)
        out = softmax(s, -1).nan_to_num(0) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    from fastattn.sparse import BlockSparseLayout

    op = "sparse_attention"
    _check_qkv(op, q, k, v)
    _check_options(op, q, scale=scale, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0)
    if not isinstance(layout, BlockSparseLayout):
        raise ValueError(f"{op}: layout must be a fastattn.sparse.BlockSparseLayout, got {type(layout).__name__}")
    layout.check_for(op, q, k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    crow, col, ccol, row, dense = layout.device_tensors(q.device)
    reasons = backend.sparse_refusals(q, k, v, layout)
    if min(q.shape[0], q.shape[1], q.shape[-1]) == 0:
        reasons.append("an empty dimension")
    if backend.use_kernels(op, reasons):
        from fastattn.ops.sparse import op as sparse_op  # imports triton, so only when used

        out, lse = sparse_op.sparse_attn(q, k, v, crow, col, ccol, row, block_size=layout.block_size,
                                         scale=float(scale), causal=bool(causal))
    else:
        from fastattn.ops.sparse.reference import sparse_attention_blocked

        out, lse = sparse_attention_blocked(q, k, v, dense, layout.block_size, causal=causal, scale=scale,
                                            return_lse=return_lse)
    return (out, lse) if return_lse else out

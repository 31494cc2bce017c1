"""Plain-PyTorch exact attention: the spec, the test oracle and the CPU fallback.

Everything here is ordinary differentiable torch code that runs in any dtype, float64
included. It materialises the (Lq, Lk) score matrix, so it is meant for checking and for
small inputs; the Triton kernels in ``kernels.py`` compute the same thing blockwise.

Positions follow FlashAttention: query ``i`` sits on the diagonal at key ``i + Lk - Lq``
(bottom-right alignment). A band ``(left, right)`` keeps key ``j`` for query ``i`` iff
``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; ``None`` leaves that side open. Causal is
``right = 0``; torch's top-left causal is ``right = Lq - Lk``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastattn.ops._sequences import per_sequence
from fastattn.validation import band_from, default_scale


def band_mask(lq: int, lk: int, left: Optional[int], right: Optional[int], device=None) -> Optional[Tensor]:
    """Bool (lq, lk), True where query i may see key j under the band; None if unbounded."""
    if left is None and right is None:
        return None
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    rel = j - i - (lk - lq)  # key position relative to the query's diagonal
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left is not None:
        keep &= rel >= -left
    if right is not None:
        keep &= rel <= right
    return keep


def alibi_bias(slopes: Tensor, lq: int, lk: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALiBi as FlashAttention defines it: ``-slope * |i + Lk - Lq - j|``.

    slopes: (H,) or (B, H). Returns (1 or B, H, lq, lk) in ``dtype`` (the scores' dtype, so
    float64 scores get a float64 bias).
    """
    i = torch.arange(lq, device=slopes.device)[:, None]
    j = torch.arange(lk, device=slopes.device)[None, :]
    dist = (i + (lk - lq) - j).abs().to(dtype)
    slopes = slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes[None]
    return -slopes[:, :, None, None] * dist


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                        window: Optional[tuple] = None, attn_bias: Optional[Tensor] = None,
                        alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                        dropout_p: float = 0.0, dropout_mask: Optional[Tensor] = None,
                        sinks: Optional[Tensor] = None, return_lse: bool = False, upcast: bool = False):
    """Exact attention in plain PyTorch, in the dtype of the inputs (or float32, ``upcast``).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv); Hq a multiple of Hkv,
            query head h reads kv head ``h // (Hq // Hkv)``.
        causal: bottom-right causal (see module docstring).
        window: ``(left, right)`` band around the diagonal; entries may be None (unbounded).
            Negative entries are allowed here (torch's top-left causal is ``(None, Lq - Lk)``).
        attn_bias: broadcastable to (B, Hq, Lq, Lk); bool (True = attend) or additive float.
        alibi_slopes: (Hq,) or (B, Hq).
        softcap: logits become ``softcap * tanh(logits / softcap)`` before bias and masks.
        dropout_p / dropout_mask: if ``dropout_mask`` (bool, broadcastable to the scores, True =
            keep) is given it is used as is; otherwise one is drawn with ``torch.rand``.
        sinks: (Hq,) attention-sink logits (gpt-oss): head h's softmax denominator gains
            ``exp(sinks[h])``, a key that carries no value. The lse includes it; a row with
            every key masked then gives out 0 and lse = sinks[h].
        return_lse: also return the natural-log logsumexp of each row, (B, Hq, Lq), in float32
            (float64 for float64 inputs).
        upcast: compute the scores, softmax and P @ V of fp16/bf16 inputs in float32, as the
            kernels do (the CPU fallback's choice: no fp16 overflow of q @ k^T). Off, every
            step runs in the inputs' dtype: the plain-PyTorch yardstick of the error rule.

    Returns:
        out (B, Hq, Lq, Dv) in v's dtype, and lse if requested. Rows with every key masked
        give out 0 and lse -inf, with zero (not NaN) gradients through them.

    Equivalent code::

        s = softcap_fn(q @ k.transpose(-1, -2) * scale) + bias + alibi, masked to -inf
        out = dropout(softmax(cat([s, sinks], -1), -1)[..., :Lk]) @ v   # no sinks: softmax(s, -1)
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = default_scale(d, scale)
    if hq != hkv:
        # The oracle may copy K/V per query head; the kernels index instead.
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    ct = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    masked = None
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            masked = ~attn_bias
        else:
            s = s + attn_bias.to(s.dtype)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, lq, lk, torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    keep = band_mask(lq, lk, *band_from(causal, window), device=q.device)
    if keep is not None:
        masked = ~keep if masked is None else (masked | ~keep)
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    if sinks is not None:
        # The sink is one more column of logits, dropped again after the softmax.
        s = torch.cat([s, sinks.to(s.dtype).view(1, hq, 1, 1).expand(b, hq, lq, 1)], dim=-1)
    # A row whose every score is -inf (masked, or an all -inf bias) is empty. Its softmax is
    # 0/0: compute it on zeros instead, so neither the values nor the gradients (through the
    # bias, too) see a NaN, then give the row p = 0 and lse = -inf, as torch >= 2.5 does.
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = torch.where(empty, torch.zeros((), dtype=s.dtype, device=s.device), s)
    lse = torch.logsumexp(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    lse = lse.masked_fill(empty[..., 0], float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    if sinks is not None:
        p = p[..., :lk]
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(ct)).to(v.dtype) if upcast else torch.matmul(p.to(v.dtype), v)
    return (out, lse) if return_lse else out


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention of q over (k, v) when the softmax normaliser is a given ``lse``.

    With the global out and lse of a query row, this gives that row's share of the gradients
    for just this block of keys, so summing over the blocks gives the full gradients.
    q, do, out: (B, Hq, Lq, D/Dv); k, v: (B, Hkv, Lk, D/Dv), Hq a multiple of Hkv; lse
    (B, Hq, Lq). causal: bottom-right (key j seen by query i iff j <= i + Lk - Lq). Returns
    (dq, dk, dv) in fp32 (float64 for float64 inputs); masked entries contribute 0, a -inf
    lse row contributes 0.

    Equivalent code::

        p = exp(q @ k^T * scale - lse)               # masked entries 0
        dv = p^T @ do;  dp = do @ v^T
        ds = p * (dp - rowsum(do * out))
        dq = ds @ k * scale;  dk = ds^T @ q * scale  # dk, dv summed over each kv head's query heads
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    q, do, out = q.to(ct), do.to(ct), out.to(ct)
    # Query head h reads kv head h // group: view the query heads as (Hkv, group).
    qg = q.view(b, hkv, group, lq, q.shape[-1])
    dog = do.view(b, hkv, group, lq, do.shape[-1])
    kk, vv = k.to(ct)[:, :, None], v.to(ct)[:, :, None]
    s = torch.matmul(qg, kk.transpose(-1, -2)) * scale
    lse = lse.to(ct).view(b, hkv, group, lq)
    # A row with every key masked has lse -inf; +inf makes its p exp(-inf) = 0, not NaN.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    p = torch.exp(s - lse[..., None])
    if causal:
        keep = band_mask(lq, lk, None, 0, device=q.device)
        p = p.masked_fill(~keep, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dog).sum(2)
    dp = torch.matmul(dog, vv.transpose(-1, -2))
    delta = (dog * out.view_as(dog)).sum(-1, keepdim=True)  # rowsum(dO * O), the softmax Jacobian term
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kk).mul_(scale).view(b, hq, lq, k.shape[-1])
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2).mul_(scale)
    return dq, dk, dv


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                               alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                               dropout_masks: Optional[list] = None, **options):
    """``attention_reference`` per packed sequence (see ``per_sequence`` for the layout): each
    sequence attends only inside itself, causal and windows bottom-right per sequence.
    ``dropout_masks``: with dropout_p, sequence b's bool keep-mask (1, Hq, Lq_b, Lk_b) at
    index b (``varlen_dropout_keep_reference``); None draws torch's. ``options``: the other
    arguments of ``attention_reference``. Returns out (total_q, Hq, Dv) and, if asked, lse
    (Hq, total_q) as FlashAttention lays it out."""
    masks = iter(dropout_masks or ())  # per_sequence attends the sequences in order

    def attend(qb, kb, vb, slopes):
        return attention_reference(qb, kb, vb, alibi_slopes=slopes, return_lse=True, dropout_mask=next(masks, None),
                                   **options)

    out, lse = per_sequence(attend, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    return (out, lse) if return_lse else out


def _mul32(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of the 64-bit product of a 32-bit constant and int64 x in
    [0, 2^32), in int64 without overflow: x splits into 16-bit halves."""
    low = a * (x & 0xFFFF)
    mid = a * (x >> 16) + (low >> 16)  # below 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def _philox4x32(seed: int, counters: Tensor) -> list[Tensor]:
    """Philox4x32-10 as Triton's ``tl.randint4x(seed, counters)``: counters int64, state
    (counter low, counter high, 0, 0), key (seed low, seed high); four uint32 values each, as
    int64 in [0, 2^32)."""
    mask = 0xFFFFFFFF
    c = [counters & mask, (counters >> 32) & mask, torch.zeros_like(counters), torch.zeros_like(counters)]
    k0, k1 = seed & mask, (seed >> 32) & mask
    for _ in range(10):
        hi_b, lo_b = _mul32(0xCD9E8D57, c[2])
        hi_a, lo_a = _mul32(0xD2511F53, c[0])
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c


def dropout_keep_reference(seed: int, b: int, h: int, lq: int, lk: int, dropout_p: float,
                           place: Optional[tuple] = None) -> Tensor:
    """The bool keep-mask (B, H, Lq, Lk) that the flash kernels draw for ``seed`` (an int in
    [0, 2^62)), in plain PyTorch on the CPU (``place``: ``op.dropout_seed``'s, unchecked).

    Score (b, h, i, j) sits at (b, h0 + h, r0 + i, c0 + j) of the (B, heads, rows, cols)
    scores; key column c takes number c % 4 of Philox counter ((b * heads + h0 + h) * rows +
    r0 + i) * ceil(cols / 4) + c // 4, which as int32 x (x < 0 -> ~x) times 4.6566127342e-10
    in float32 is the uniform number the score keeps iff it is >= dropout_p."""
    h0, heads, r0, rows, c0, cols = (0, h, 0, lq, 0, lk) if place is None else place
    row = ((torch.arange(b)[:, None, None] * heads + h0 + torch.arange(h)[:, None]) * rows
           + r0 + torch.arange(lq))  # (B, H, Lq)
    col = c0 + torch.arange(lk)
    numbers = _philox4x32(seed, row[..., None] * ((cols + 3) // 4) + col // 4)
    bits = torch.stack(numbers, -1).gather(-1, (col % 4).expand(b, h, lq, lk)[..., None])[..., 0]
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    uniform = torch.where(signed < 0, -signed - 1, signed).to(torch.float32) * torch.tensor(4.6566127342e-10)
    return uniform >= torch.tensor(dropout_p, dtype=torch.float32)


def varlen_dropout_keep_reference(seed: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, h: int, dropout_p: float,
                                  place: Optional[tuple] = None) -> list[Tensor]:
    """The bool keep-masks (1, H, Lq_b, Lk_b), one per sequence b, that the flash kernels draw
    for ``seed`` on a packed call of H query heads with int32 (B+1,) offsets ``cu_seqlens_q/k``
    (``place``: ``op.dropout_seed``'s of (H, total_q, total_k), unchecked; None: the call's
    own). Sequence b's query i is packed row cu_seqlens_q[b] + i, its key j column j (keys
    count from the sequence's first): ``dropout_keep_reference`` with the rows moved down."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    h0, heads, r0, rows, c0, cols = (0, h, 0, cq[-1], 0, ck[-1]) if place is None else place
    return [dropout_keep_reference(seed, 1, h, q1 - q0, k1 - k0, dropout_p, (h0, heads, r0 + q0, rows, c0, cols))
            for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:])]


# ---------------------------------------------------------------------------------------
# Low-precision inputs (forward only): what the kernels' FP8 and INT8 modes compute, in torch.

def sequence_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """int64 (total,): the packed sequence each of ``total`` rows belongs to (no host read)."""
    rows = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)


def dequantize_fp8(x: Tensor, descale: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """float32 ``x.float() * descale`` of an fp8 x: (B, H, L, D), or packed (total, H, D) with
    ``cu_seqlens``; descale float32 (B, Hkv), per batch row (packed: sequence) and kv head,
    H a multiple of Hkv (query head h takes kv head h // (H // Hkv), as FlashAttention 3)."""
    heads = x.shape[1]  # dim 1 in both layouts
    per_head = descale.repeat_interleave(heads // descale.shape[1], dim=1)  # (B, H)
    if cu_seqlens is None:
        return x.float() * per_head[:, :, None, None]
    return x.float() * per_head[sequence_ids(cu_seqlens, x.shape[0])][:, :, None]


def _int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 x (..., D) -> (int8 round(x / s), s): s = max |x| / 127 per row (1 for a row of
    zeros), round to nearest even, so |x / s| <= 127 and nothing saturates."""
    s = x.abs().amax(-1) / 127.0
    s = torch.where(s > 0, s, torch.ones((), device=x.device))
    return torch.round(x / s[..., None]).to(torch.int8), s


def smooth_quantize_int8(q: Tensor, k: Tensor, cu_seqlens_q: Optional[Tensor] = None,
                         cu_seqlens_k: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Smoothed per-token INT8 quantization of q and k (SageAttention's smoothing of K).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D) in fp16/bf16, or packed (total, H, D) with both offsets.
    K's mean over its sequence (per batch row or packed sequence, and kv head) is subtracted
    first: q.(k_j - mean) differs from q.k_j by q.mean, the same for every key a query row can
    see (causal, window and padding masks only drop keys of the same sequence), so the softmax
    is unchanged, while keys whose channels share a large offset (outlier channels) quantize
    with a finer scale. Each query row and each smoothed key is then quantized on its own
    scale, max |x| / 127 (per token: finer than per block, and independent of the kernels'
    tiles). Returns (q8, q_rows, k8, k_scale): q8, k8 int8 in q's and k's shapes; q_rows float32
    (..., 2) in q's shape without D: each row's (scale, shift = q.mean of its kv head, from the
    unquantized q, so the lse, sinks and softcap see the real logits); k_scale float32 in k's
    shape without D. The logits are then ``scale * (q8.k8 * q_scale * k_scale + shift)``.
    """
    group = q.shape[1] // k.shape[1]  # heads are dim 1 in both layouts
    kf, qf = k.float(), q.float()
    if cu_seqlens_k is None:
        mean_k = kf.mean(2, keepdim=True)  # (B, Hkv, 1, D)
        mean_q = mean_k.repeat_interleave(group, dim=1)
    else:
        seq_k = sequence_ids(cu_seqlens_k, k.shape[0])
        counts = cu_seqlens_k.diff().clamp(min=1).to(kf.dtype)
        means = kf.new_zeros(cu_seqlens_k.numel() - 1, *k.shape[1:]).index_add_(0, seq_k, kf)
        means = means / counts[:, None, None]  # (B, Hkv, D)
        mean_k = means[seq_k]
        mean_q = means[sequence_ids(cu_seqlens_q, q.shape[0])].repeat_interleave(group, dim=1)
    k8, k_scale = _int8_rows(kf - mean_k)
    q8, q_scale = _int8_rows(qf)
    return q8, torch.stack([q_scale, (qf * mean_q).sum(-1)], dim=-1), k8, k_scale


def dequantize_int8(q8: Tensor, q_rows: Tensor, k8: Tensor, k_scale: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (q', k') with one more channel, whose dot products are the INT8 mode's logits
    before the scale: q' = [q8 * q_scale, shift], k' = [k8 * k_scale, 1] (``smooth_quantize_int8``)."""
    q_deq = torch.cat([q8.float() * q_rows[..., :1], q_rows[..., 1:]], dim=-1)
    k_deq = torch.cat([k8.float() * k_scale[..., None], torch.ones_like(k_scale[..., None])], dim=-1)
    return q_deq, k_deq

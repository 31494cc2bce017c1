"""Plain-PyTorch block-sparse attention: the spec (dense, masked), and the CPU fallback
(blockwise, skipping dropped blocks).

A layout is given here as its bool block mask ``(Hl, nQB, nKB)`` with ``Hl`` 1 (shared) or
Hq, plus ``block_size``; query block r holds queries ``r*bs .. r*bs + bs - 1`` (the last one
may be partial), likewise for keys. ``causal`` is bottom-right aligned, as flash_attention:
query i sees key j iff ``j <= i + Lk - Lq``.

Nothing here imports Triton; everything runs in any float dtype, float64 included, and is
differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.backend import TORCH_SDPA
from fastattn.ops.flash.reference import attention_reference
from fastattn.validation import default_scale


def element_mask(block_mask: Tensor, block_size: int, lq: int, lk: int) -> Tensor:
    """(Hl, nQB, nKB) bool block mask -> (Hl, lq, lk) bool token mask."""
    bs = block_size
    return block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :lq, :lk]


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, block_size: int, *,
                               causal: bool = False, scale: Optional[float] = None,
                               return_lse: bool = False):
    """The spec: dense attention with the layout expanded to a token mask.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv). Returns out (B, Hq, Lq, Dv) and,
    with ``return_lse``, the float32 (float64 for float64 inputs) row logsumexp. Rows that
    see no key give out 0 and lse -inf.

    Equivalent code::

        mask = block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :Lq, :Lk]
        attention_reference(q, k, v, causal=causal, scale=scale, attn_bias=mask)
    """
    mask = element_mask(block_mask.to(q.device), block_size, q.shape[2], k.shape[2])
    return attention_reference(q, k, v, causal=causal, scale=scale, attn_bias=mask[None],
                               return_lse=return_lse)


# Cap on the elements one chunk of query blocks holds at once (its gathered K and V and its
# score block), so the fallback's peak memory is a constant (16 MB in fp32), whatever the
# sequence length and layout.
_CHUNK_ELEMENTS = 1 << 22


def _row_buckets(counts: Tensor) -> list[tuple[int, Tensor]]:
    """Group query-block rows by how many key blocks they keep: [(width, rows)].

    Rows are padded to the width of their group. Exact counts when there are few distinct
    ones (the usual case: window rows, global rows, edge rows); otherwise counts rounded up to
    a power of two, so there are at most log2(nKB) + 1 groups and padding at most doubles a
    row's work."""
    distinct = torch.unique(counts)
    if distinct.numel() > 8:
        widths = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
        widths = torch.minimum(widths, counts.max())
    else:
        widths = counts
    return [(int(w), (widths == w).nonzero().flatten()) for w in torch.unique(widths)]


def sparse_attention_blocked(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, block_size: int, *,
                             causal: bool = False, scale: Optional[float] = None, return_lse: bool = True):
    """The CPU fallback: the same result as ``sparse_attention_reference`` (out, lse), but
    only kept blocks are ever multiplied or stored.

    For every query block the kept key blocks are gathered into one (width * bs) key
    sequence, and attention of the (bs) queries over those keys is computed per query block,
    in chunks of rows with the same width (see ``_row_buckets``). Time and memory scale with
    the number of kept blocks. Returns (out (B, Hq, Lq, Dv), lse float32/float64 (B, Hq, Lq)),
    or (out, None) with ``return_lse=False``: then each chunk goes to torch's fused
    scaled_dot_product_attention (which returns no lse), several times faster on a CPU than
    the explicit softmax below.

    Under ``torch.compile``, and on the meta device, the grouping by row counts (host reads
    of the layout) cannot run, so it computes the same result as ``sparse_attention_reference``
    (dense, the layout as a token mask: O(Lq Lk) memory); compiled code wanting the
    block-sparse cost uses the kernels. Scores of fp16/bf16 inputs are computed in float32.
    """
    if torch.compiler.is_compiling() or q.is_meta:
        out, lse = sparse_attention_reference(q, k, v, block_mask, block_size, causal=causal, scale=scale,
                                              return_lse=True)
        return out, (lse if return_lse else None)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if min(b, hq, lq) == 0:  # nothing to compute (and no row to group)
        out = _attached(q.new_zeros(b, hq, lq, dv), q, k, v)
        return out, (q.new_zeros(b, hq, lq, dtype=lse_dtype) if return_lse else None)
    bs, group = block_size, hq // hkv
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    scale = default_scale(d, scale)

    # Whole blocks: pad the last partial query / key block (padded keys are masked below).
    qb = F.pad(q, (0, 0, 0, nqb * bs - lq)).reshape(b, hq * nqb, bs, d)
    kb = F.pad(k, (0, 0, 0, nkb * bs - lk)).reshape(b, hkv * nkb, bs, d)
    vb = F.pad(v, (0, 0, 0, nkb * bs - lk)).reshape(b, hkv * nkb, bs, dv)

    if not return_lse and bool(block_mask.all()) and (not causal or lq == lk):
        # Every block kept: plain dense attention, without gathering K/V per query block.
        return TORCH_SDPA(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1), None

    mask = block_mask.to(q.device).expand(hq, nqb, nkb).reshape(hq * nqb, nkb)
    counts = mask.sum(-1)
    # Each row's kept key blocks first, ascending (a stable sort of "dropped" flags).
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    arange_bs = torch.arange(bs, device=q.device)

    outs, lses, rows_done = [], [], []
    for width, rows in _row_buckets(counts):
        if width == 0:  # rows that see no key block: out 0, lse -inf
            outs.append(q.new_zeros(b, rows.numel(), bs, dv))
            lses.append(torch.full((b, rows.numel(), bs), float("-inf"), dtype=lse_dtype, device=q.device))
            rows_done.append(rows)
            continue
        step = max(1, _CHUNK_ELEMENTS // (b * width * bs * (bs + d + dv)))  # rows per chunk
        for chunk in rows.split(step):
            cols = order[chunk, :width]  # (R, W) key blocks, padded past the row's count
            slot_ok = torch.arange(width, device=q.device)[None, :] < counts[chunk, None]
            head = chunk // nqb
            kv_rows = (head // group * nkb)[:, None] + cols  # GQA: kv head h // group
            kg = kb[:, kv_rows].reshape(b, chunk.numel(), width * bs, d)
            vg = vb[:, kv_rows].reshape(b, chunk.numel(), width * bs, dv)
            key_pos = (cols[:, :, None] * bs + arange_bs).reshape(chunk.numel(), width * bs)
            keep = (slot_ok[:, :, None].expand(-1, -1, bs).reshape(chunk.numel(), width * bs)
                    & (key_pos < lk))[:, None, :]  # (R, 1, W*bs)
            if causal:
                query_pos = (chunk % nqb * bs)[:, None] + arange_bs  # (R, bs)
                keep = keep & (key_pos[:, None, :] <= query_pos[:, :, None] + (lk - lq))
            masked = not bool(keep.all())  # padded slots, a partial last key block, or causal
            if not return_lse:
                o = TORCH_SDPA(qb[:, chunk], kg, vg, attn_mask=keep if masked else None,
                               scale=scale)  # (B, R, bs, Dv)
                if masked:  # a query that sees no key here gives 0, as everywhere in fastattn
                    o = o.masked_fill(~keep.any(-1)[None, :, :, None], 0.0)
                outs.append(o)
                rows_done.append(chunk)
                continue
            # (B, R, bs, W*bs) scores, in float32 for fp16/bf16 (no overflow of q.k)
            s = torch.matmul(qb[:, chunk].to(lse_dtype), kg.to(lse_dtype).transpose(-1, -2)) * scale
            if masked:
                s = s.masked_fill(~keep, float("-inf"))
            # A query that sees no key: softmax on zeros instead of 0/0, so no NaN reaches the
            # values or the gradients; then p = 0 and lse = -inf.
            empty = torch.isneginf(s).all(-1, keepdim=True)
            s = torch.where(empty, torch.zeros((), dtype=s.dtype, device=s.device), s)
            lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
            p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
            outs.append(torch.matmul(p, vg.to(lse_dtype)).to(v.dtype))
            lses.append(lse)
            rows_done.append(chunk)

    # Put the rows back in (head, query block) order.
    inverse = torch.argsort(torch.cat(rows_done))
    out = _attached(torch.cat(outs, 1)[:, inverse].reshape(b, hq, nqb * bs, dv)[:, :, :lq], q, k, v)
    if not return_lse:
        return out, None
    lse = torch.cat(lses, 1)[:, inverse].reshape(b, hq, nqb * bs)[:, :, :lq]
    return out, lse


def _attached(out: Tensor, *inputs: Tensor) -> Tensor:
    """``out`` unchanged, but part of the autograd graph of ``inputs`` that require grad even
    when no kept block touched them (a layout that keeps nothing), so backward() works and
    gives zero gradients, as dense attention over no key does. ``where`` takes the values of
    ``out`` alone: nothing of the inputs (not even a NaN) reaches the result."""
    needs = [t for t in inputs if t.requires_grad]
    if out.requires_grad or not needs or not torch.is_grad_enabled():
        return out
    anchor = sum(t.sum() for t in needs)  # () scalar in the graph of every input
    return torch.where(torch.ones((), dtype=torch.bool, device=out.device), out, anchor.to(out.dtype))

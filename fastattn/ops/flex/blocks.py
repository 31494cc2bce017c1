"""BlockMasks as the flex kernels and the reference read them.

torch's ``BlockMask`` (``torch.nn.attention.flex_attention``, from ``create_block_mask`` or
``BlockMask.from_kv_blocks``) lists, per (batch, head, query block), the key blocks to visit:
partial ones (``kv_num_blocks`` / ``kv_indices``: the mask_mod decides per element) and full ones
(``full_kv_num_blocks`` / ``full_kv_indices``: every pair kept), plus the same lists transposed
(``q_num_blocks`` / ``q_indices``, ``full_q_*``) for the backward. A block listed in neither is
skipped. Its batch and head dims may be 1 (shared).

``Blocks`` holds those eight lists expanded to the call's (B, Hq) without copying, on the
inputs' device, with the block sizes and the mask_mod. fastattn's own ``BlockSparseLayout``
converts through ``to_block_mask`` (every kept block partial, no mask_mod). No call builds
an (Lq, Lk) object.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

DEFAULT_BLOCK = 128  # torch's BlockMask default, and the blocks of a call without a block_mask


class Blocks(NamedTuple):
    """The lists of a BlockMask for (B, Hq, Lq, Lk) inputs, int32 on the inputs' device, each
    expanded to B and Hq (stride 0 where the mask shares): ``kv_num`` (B, Hq, nq), ``kv_idx``
    (B, Hq, nq, *), ``full_num``, ``full_idx`` likewise; ``q_num`` (B, Hq, nk), ``q_idx``
    (B, Hq, nk, *), ``full_q_num``, ``full_q_idx``. ``q_block`` x ``kv_block`` tokens per
    block; ``mask_mod`` applies in partial blocks (None: keep every pair)."""

    kv_num: Tensor
    kv_idx: Tensor
    full_num: Tensor
    full_idx: Tensor
    q_num: Tensor
    q_idx: Tensor
    full_q_num: Tensor
    full_q_idx: Tensor
    q_block: int
    kv_block: int
    mask_mod: Optional[Callable]


def _noop_mask():
    from torch.nn.attention.flex_attention import noop_mask
    return noop_mask


def all_blocks(b: int, h: int, lq: int, lk: int, device, mask_mod: Optional[Callable] = None) -> Blocks:
    """Every key block listed for every query block: full (a call without a block_mask), or,
    with ``mask_mod``, partial (it applies to every pair: packed sequences)."""
    nq, nk = -(-lq // DEFAULT_BLOCK), -(-lk // DEFAULT_BLOCK)

    def shared(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=torch.int32)[None, None].expand(b, h, *t.shape)

    no_num_q, no_idx_q = shared(torch.zeros(nq)), shared(torch.zeros(nq, 1))
    no_num_k, no_idx_k = shared(torch.zeros(nk)), shared(torch.zeros(nk, 1))
    full_num, full_idx = shared(torch.full((nq,), nk)), shared(torch.arange(nk).expand(nq, nk))
    full_q_num, full_q_idx = shared(torch.full((nk,), nq)), shared(torch.arange(nq).expand(nk, nq))
    if mask_mod is not None:
        return Blocks(full_num, full_idx, no_num_q, no_idx_q, full_q_num, full_q_idx, no_num_k, no_idx_k,
                      DEFAULT_BLOCK, DEFAULT_BLOCK, mask_mod)
    return Blocks(no_num_q, no_idx_q, full_num, full_idx, no_num_k, no_idx_k, full_q_num, full_q_idx,
                  DEFAULT_BLOCK, DEFAULT_BLOCK, None)


def from_block_mask(op: str, block_mask, b: int, h: int, lq: int, lk: int, device) -> Blocks:
    """``Blocks`` of a torch BlockMask (or a fastattn ``BlockSparseLayout``) for (B, Hq, Lq, Lk).

    Raises:
        ValueError: it is neither, or was made for other sequence lengths, batch or heads."""
    from torch.nn.attention.flex_attention import BlockMask

    from fastattn.sparse import BlockSparseLayout

    if isinstance(block_mask, BlockSparseLayout):
        block_mask = block_mask.to_block_mask()
    if not isinstance(block_mask, BlockMask):
        raise ValueError(f"{op}: block_mask must be a torch BlockMask (create_block_mask) or a fastattn "
                         f"BlockSparseLayout, got {type(block_mask).__name__}")
    if tuple(block_mask.seq_lengths) != (lq, lk):
        raise ValueError(f"{op}: block_mask was made for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} but the "
                         f"inputs have Lq={lq}, Lk={lk}")
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, b) or mh not in (1, h):
        raise ValueError(f"{op}: block_mask has batch {mb} and heads {mh}; the inputs have batch {b} and {h} query "
                         f"heads (the mask's must equal them or be 1)")
    if block_mask.q_indices is None:  # made without the transposed lists: make them
        block_mask = BlockMask.from_kv_blocks(
            block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=block_mask.mask_mod,
            seq_lengths=block_mask.seq_lengths)
    q_block, kv_block = block_mask.BLOCK_SIZE
    nq, nk = -(-lq // q_block), -(-lk // kv_block)

    def lists(num, idx, rows):
        if num is None:  # no full blocks
            return (torch.zeros(1, 1, rows, dtype=torch.int32, device=device).expand(b, h, rows),
                    torch.zeros(1, 1, rows, 1, dtype=torch.int32, device=device).expand(b, h, rows, 1))
        num, idx = num[:, :, :rows], idx[:, :, :rows]
        return (num.to(device=device, dtype=torch.int32).expand(b, h, rows),
                idx.to(device=device, dtype=torch.int32).expand(b, h, rows, idx.shape[-1]))

    mask_mod = block_mask.mask_mod
    if mask_mod is _noop_mask():
        mask_mod = None
    return Blocks(*lists(block_mask.kv_num_blocks, block_mask.kv_indices, nq),
                  *lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nq),
                  *lists(block_mask.q_num_blocks, block_mask.q_indices, nk),
                  *lists(block_mask.full_q_num_blocks, block_mask.full_q_indices, nk),
                  q_block, kv_block, mask_mod)


def dense_block_kinds(blocks: Blocks, rows: slice) -> tuple[Tensor, Tensor]:
    """(partial, full): bool (B, Hq, rows, nk) block-level tables of query-block ``rows`` (for
    the reference, which works on materialised scores)."""
    def table(num, idx):
        b, h, _, width = idx.shape
        num, idx = num[:, :, rows], idx[:, :, rows].long()
        nk = blocks.q_num.shape[2]
        listed = torch.arange(width, device=idx.device) < num[..., None]  # the first num entries count
        out = torch.zeros(b, h, idx.shape[2], nk + 1, dtype=torch.bool, device=idx.device)
        # Unused entries go to a spare column nk, dropped below.
        out.scatter_(3, torch.where(listed, idx, nk), True)
        return out[..., :nk]
    return table(blocks.kv_num, blocks.kv_idx), table(blocks.full_num, blocks.full_idx)


def document_block_mask(document_id: Tensor, *, causal: bool = False, block_size: int = DEFAULT_BLOCK):
    """torch's ``BlockMask`` for packed documents: query i sees key j iff ``document_id[i] ==
    document_id[j]`` (and ``j <= i`` with ``causal``), built at block level from each block's
    first and last document, so it costs O((L / block_size)^2), never (L, L) as
    ``create_block_mask`` does eagerly. ``document_id``: int (L,), non-decreasing (documents
    contiguous). Blocks inside one document (and below the diagonal when causal) are full.

    Raises:
        ValueError: document_id is not a non-decreasing 1-D integer tensor."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(document_id, Tensor) or document_id.dim() != 1 or document_id.is_floating_point():
        raise ValueError(f"document_block_mask: document_id must be a 1-D integer tensor, got "
                         f"{getattr(document_id, 'shape', type(document_id).__name__)}")
    if document_id.numel() > 1 and bool((document_id[1:] < document_id[:-1]).any()):
        raise ValueError("document_block_mask: document_id must be non-decreasing (documents contiguous)")
    n = document_id.numel()
    nb = -(-n // block_size)
    ends = torch.clamp(torch.arange(nb, device=document_id.device) * block_size + block_size - 1, max=n - 1)
    first, last = document_id[::block_size], document_id[ends]  # each block's first and last document
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    full = (first == last)[:, None] & (first == last)[None, :] & (first[:, None] == first[None, :])
    if causal:
        r = torch.arange(nb, device=document_id.device)
        overlap &= r[None, :] <= r[:, None]
        full &= r[None, :] < r[:, None]
    partial = overlap & ~full

    def lists(table):
        counts = table.sum(-1).to(torch.int32)[None, None]
        order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return counts, order

    def mask_mod(b, h, q_idx, kv_idx):
        keep = document_id[q_idx] == document_id[kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    return BlockMask.from_kv_blocks(*lists(partial), *lists(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))

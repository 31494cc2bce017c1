"""Ulysses (all-to-all, head-parallel) context parallelism.

Each rank holds a sequence shard of every head. One all-to-all turns that into every
position of H / W heads, attention runs locally over the full sequence
(``fastattn.flash_attention``), and a second all-to-all turns the output back into sequence
shards. Communication per rank is 4 all-to-alls of (W-1)/W of its shard (q, k, v, out), and
it needs the head counts divisible by the world size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn.distributed.ring import check_inputs


def _zigzag_order(world: int, device) -> Tensor:
    """Chunk order that turns the gathered (rank, half) chunks into sequence order: chunk
    c < W is (rank c, half 0), chunk c >= W is (rank 2W-1-c, half 1); index = 2*rank + half."""
    idx = [2 * c for c in range(world)] + [2 * (2 * world - 1 - c) + 1 for c in range(world, 2 * world)]
    return torch.tensor(idx, device=device)


def _seq_to_head(x: Tensor, group, zigzag: bool) -> Tensor:
    """(B, H, L/W, D) sequence shard -> (B, H/W, L, D) full sequence of this rank's heads."""
    world = dist.get_world_size(group)
    b, h, ll, d = x.shape
    # Head group j goes to rank j: put it first, as all_to_all_single splits dim 0.
    send = x.reshape(b, world, h // world, ll, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is rank i's sequence shard of our heads.
    full = recv.permute(1, 2, 0, 3, 4)  # (B, H/W, W, L/W, D)
    if zigzag:
        halves = full.reshape(b, h // world, 2 * world, ll // 2, d)
        full = halves.index_select(2, _zigzag_order(world, x.device))
    return full.reshape(b, h // world, world * ll, d)


def _head_to_seq(x: Tensor, group, zigzag: bool) -> Tensor:
    """Inverse of ``_seq_to_head``: (B, H/W, L, D) -> (B, H, L/W, D)."""
    world = dist.get_world_size(group)
    b, hl, length, d = x.shape
    ll = length // world
    if zigzag:
        chunks = x.reshape(b, hl, 2 * world, ll // 2, d)
        inverse = torch.argsort(_zigzag_order(world, x.device))
        x = chunks.index_select(2, inverse)
    send = x.reshape(b, hl, world, ll, d).permute(2, 0, 1, 3, 4).contiguous()  # sequence shard i -> rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is head group j of our sequence shard.
    return recv.transpose(0, 1).reshape(b, hl * world, ll, d)


class _SeqToHead(torch.autograd.Function):
    # Both maps are permutations of the elements across ranks, so each one's adjoint is the other.
    @staticmethod
    def forward(ctx, x, group, zigzag):
        ctx.args = (group, zigzag)
        return _seq_to_head(x, group, zigzag)

    @staticmethod
    def backward(ctx, g):
        return _head_to_seq(g, *ctx.args), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, zigzag):
        ctx.args = (group, zigzag)
        return _head_to_seq(x, group, zigzag)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_head(g, *ctx.args), None, None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                      scale: Optional[float] = None, zigzag: bool = False) -> Tensor:
    """Exact attention over a sequence sharded across ``group``, head-parallel (Ulysses).

    Collective: every rank calls it with its shard. All-to-all turns the sequence shards of
    all heads into the full sequence of Hq / W query heads (Hkv / W kv heads), runs
    ``fastattn.flash_attention`` on it (differentiable as usual), and all-to-all turns the
    output back.

    Args:
        q: (B, Hq, L_local, D), k: (B, Hkv, L_local, D), v: (B, Hkv, L_local, Dv): this rank's
            shard; Hq and Hkv must both be multiples of the world size W (GQA keeps its
            grouping: query heads of rank j read kv heads of rank j).
        causal: causal over the global sequence.
        scale: default ``1 / sqrt(D)``.
        zigzag: the shards are in the zig-zag layout (``shard_sequence(..., zigzag=True)``)
            rather than contiguous; the gathered sequence is put back in order before the
            attention.

    Returns:
        (B, Hq, L_local, Dv) in q's dtype: this rank's shard of the output, in its layout.

    Raises:
        ValueError: as ``ring_attention``, plus Hq or Hkv not divisible by W, or q and k
            shards of different lengths.

    Equivalent code (on the gathered sequences)::

        fastattn.flash_attention(q_full, k_full, v_full, causal=causal, scale=scale)
    """
    import fastattn

    op = "ulysses_attention"
    check_inputs(op, q, k, v, group, causal=causal, zigzag=zigzag, scale=scale)
    world = dist.get_world_size(group)
    if q.shape[1] % world or k.shape[1] % world:
        raise ValueError(
            f"{op}: query heads ({q.shape[1]}) and key/value heads ({k.shape[1]}) must both be "
            f"divisible by the world size ({world}) to split heads across ranks; use ring_attention")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k shards must have one length, got {q.shape[2]} and {k.shape[2]}")
    qh, kh, vh = (_SeqToHead.apply(t, group, zigzag) for t in (q, k, v))
    out = fastattn.flash_attention(qh, kh, vh, causal=causal, scale=scale)
    return _HeadToSeq.apply(out, group, zigzag)

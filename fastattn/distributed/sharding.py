"""Sequence layouts for context parallelism: contiguous and zig-zag shards.

Contiguous: the sequence of length L is cut into W equal pieces; rank r holds piece r.
Zig-zag: the sequence is cut into 2W equal chunks; rank r holds chunks r and 2W-1-r, in that
order. Under causal attention every rank then does the same amount of work (an early chunk
with little to attend to paired with a late chunk with much), while the contiguous layout
leaves rank W-1 with about 2W-1 times the work of rank 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _check_world(op: str, rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"{op}: world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"{op}: rank must be an int in [0, {world_size}), got {rank!r}")


def _pieces(op: str, length: int, world_size: int, zigzag: bool) -> int:
    """Number of equal pieces the sequence is cut into; ValueError when it does not divide."""
    pieces = 2 * world_size if zigzag else world_size
    if length % pieces != 0:
        layout = f"zig-zag needs a multiple of 2 * world_size = {pieces}" if zigzag else \
            f"contiguous needs a multiple of world_size = {pieces}"
        raise ValueError(
            f"{op}: sequence length {length} cannot be split evenly over {world_size} ranks "
            f"({layout}); pad the sequence (and mask the padding) to a multiple of {pieces}")
    return pieces


def chunk_ids(rank: int, world_size: int, *, zigzag: bool = False) -> tuple[int, ...]:
    """Which of the ``2W`` (zig-zag) or ``W`` (contiguous) chunks rank ``rank`` holds."""
    _check_world("chunk_ids", rank, world_size)
    return (rank, 2 * world_size - 1 - rank) if zigzag else (rank,)


def shard_sequence(x: Tensor, rank: int, world_size: int, *, zigzag: bool = False, dim: int = 2) -> Tensor:
    """This rank's shard of a full sequence.

    Args:
        x: any tensor whose ``dim`` (default 2, the seq dim of (B, H, L, D)) has length L.
        zigzag: False -> contiguous piece ``rank`` of W; True -> chunks ``rank`` and
            ``2W-1-rank`` of 2W, concatenated (the layout causal ring attention wants).

    Returns:
        (..., L / W, ...), a view for the contiguous layout, a new tensor for zig-zag.

    Raises:
        ValueError: L not a multiple of W (contiguous) or 2W (zig-zag), or a bad rank.

    Equivalent code::

        torch.cat([x.chunk(2 * W, dim)[c] for c in (rank, 2 * W - 1 - rank)], dim)  # zig-zag
        x.chunk(W, dim)[rank]                                                        # contiguous
    """
    _check_world("shard_sequence", rank, world_size)
    pieces = _pieces("shard_sequence", x.shape[dim], world_size, zigzag)
    chunks = x.chunk(pieces, dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, world_size, zigzag=zigzag)], dim) if zigzag else chunks[rank]


def unshard_sequence(shards: Sequence[Tensor], *, zigzag: bool = False, dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard, given in rank order (inverse of
    ``shard_sequence``). Raises ValueError if the shards differ in length (or are odd for
    zig-zag)."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_sequence: shards is empty")
    lengths = [s.shape[dim] for s in shards]
    if len(set(lengths)) != 1 or (zigzag and lengths[0] % 2):
        raise ValueError(f"unshard_sequence: shards must have one (even, for zig-zag) length along dim {dim}, "
                         f"got {lengths}")
    if not zigzag:
        return torch.cat(list(shards), dim)
    halves = [s.chunk(2, dim) for s in shards]
    # Chunk c < W is the first half of rank c; chunk c >= W the second half of rank 2W-1-c.
    order = [halves[c][0] for c in range(world_size)] + [halves[2 * world_size - 1 - c][1]
                                                       for c in range(world_size, 2 * world_size)]
    return torch.cat(order, dim)


def shard_positions(seq_len: int, rank: int, world_size: int, *, zigzag: bool = False,
                    device=None) -> Tensor:
    """Global positions (int64, length L / W) of the tokens this rank holds, for RoPE or
    learned position embeddings of a sharded sequence."""
    return shard_sequence(torch.arange(seq_len, device=device), rank, world_size, zigzag=zigzag, dim=0)


def gather_sequence(x: Tensor, group=None, *, zigzag: bool = False, dim: int = 2) -> Tensor:
    """All-gather every rank's shard and return the full sequence on every rank (not
    differentiable; for evaluation and tests). Collective: every rank of ``group`` calls it."""
    world_size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, zigzag=zigzag, dim=dim)


def packed_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous share of a packed stream of ``total`` tokens:
    ``total // world_size`` tokens each, the first ``total % world_size`` ranks one more.

    Raises:
        ValueError: bad rank/world_size, or fewer tokens than ranks (every rank needs one)."""
    _check_world("packed_bounds", rank, world_size)
    if not (isinstance(total, int) and total >= world_size):
        raise ValueError(f"packed_bounds: total must be an int >= world_size = {world_size}, got {total!r}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)

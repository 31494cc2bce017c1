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

from fastattn import backend

from fastattn.distributed.ring import Schedule, _Alone, _RingAttention, check_inputs, features, process_group
from fastattn.validation import band_from


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


def _check_full_bias(op: str, bias, q: Tensor, world: int, alibi_slopes) -> None:
    """attn_bias of Ulysses: None, or bool / float (B|1, Hq|1, L, L), L = W * L_local, on q's device."""
    if bias is None:
        return
    b, hq, lq, _ = q.shape
    length = world * lq
    if not isinstance(bias, Tensor) or bias.dim() != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, hq) \
            or tuple(bias.shape[2:]) != (length, length):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: attn_bias must cover the whole sequence, ({b} or 1, {hq} or 1, {length}, {length}), "
                         f"got {got}")
    if bias.device != q.device or not (bias.dtype == torch.bool or bias.dtype.is_floating_point):
        raise ValueError(f"{op}: attn_bias must be bool or floating point on {q.device}, got {bias.dtype} on "
                         f"{bias.device}")
    if alibi_slopes is not None:
        raise ValueError(f"{op}: attn_bias and alibi_slopes together: fold the ALiBi into the bias")


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                      scale: Optional[float] = None, window: Optional[tuple] = None,
                      alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                      attn_bias: Optional[Tensor] = None, dropout_p: float = 0.0, sinks: Optional[Tensor] = None,
                      zigzag: bool = False, return_lse: bool = False):
    """Exact attention over a sequence sharded across ``group``, head-parallel (Ulysses).

    Collective: every rank calls it with its shard. All-to-all turns the sequence shards of
    all heads into the full sequence of Hq / W query heads (Hkv / W kv heads), attention runs
    on it with every feature (the flash kernels or the reference, as ``use_backend``
    decides), and all-to-all turns the output (and lse) back.

    Args:
        q: (B, Hq, L_local, D), k: (B, Hkv, L_local, D), v: (B, Hkv, L_local, Dv): this rank's
            shard; Hq and Hkv must both be multiples of the world size W (GQA keeps its
            grouping: query heads of rank j read kv heads of rank j).
        group: the ranks: None (the default group), a ProcessGroup, or a 1-D DeviceMesh.
        causal, scale, window, alibi_slopes, softcap: as ``flash_attention`` over the global
            sequence (ALiBi slopes get no gradient).
        attn_bias: a bias over the WHOLE sequence, the same on every rank, (B or 1, Hq or 1,
            L, L) with L = W * L_local, rows and keys in global order (whatever the shards'
            layout): bool (True = attend) or additive float. Each rank reads its heads' slice.
            The float bias's gradient is this rank's heads' share (zero on the other heads;
            summed over this rank's heads where it broadcasts): sum it over the ranks, as for
            every replicated parameter. Not with ALiBi (fold the slopes into the bias).
        dropout_p: dropout on the probabilities, with one seed taken from torch's generator
            per call: each rank draws its heads' block of the mask that one process's
            ``flash_attention`` on the kernels draws under the same ``torch.manual_seed``.
            The backward redraws it.
        sinks: (Hq,) attention-sink logits; the gradient holds this rank's heads (sum it
            over the ranks, as for every replicated parameter).
        zigzag: the shards are in the zig-zag layout (``shard_sequence(..., zigzag=True)``)
            rather than contiguous; the gathered sequence is put back in order before the
            attention.
        return_lse: also return the row logsumexp (B, Hq, L_local), float32 (not differentiated).

    Returns:
        out (B, Hq, L_local, Dv) in q's dtype, this rank's shard in its layout; or (out, lse).

    Raises:
        ValueError: as ``ring_attention``, plus Hq or Hkv not divisible by W, q and k
            shards of different lengths, or attn_bias of another shape or dtype, or with
            alibi_slopes.

    Equivalent code (on the gathered sequences)::

        fastattn.flash_attention(q_full, k_full, v_full, causal=causal, window=window, ...)
    """
    op = "ulysses_attention"
    group = process_group(op, group)
    check_inputs(op, q, k, v, group, causal=causal, zigzag=zigzag, scale=scale, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, sinks=sinks)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if q.shape[1] % world or k.shape[1] % world:
        raise ValueError(
            f"{op}: query heads ({q.shape[1]}) and key/value heads ({k.shape[1]}) must both be "
            f"divisible by the world size ({world}) to split heads across ranks; use ring_attention")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k shards must have one length, got {q.shape[2]} and {k.shape[2]}")
    _check_full_bias(op, attn_bias, q, world, alibi_slopes)
    heads = slice(rank * q.shape[1] // world, (rank + 1) * q.shape[1] // world)  # this rank's query heads
    alibi = None if alibi_slopes is None else alibi_slopes[..., heads]
    bias = attn_bias if attn_bias is None or attn_bias.shape[1] == 1 else attn_bias[:, heads]  # a view
    f = features(op, q, scale=scale, softcap=softcap, alibi_slopes=alibi, dropout_p=dropout_p,
                 scores=(heads.start, q.shape[1], world * q.shape[2], world * k.shape[2]))
    qh, kh, vh = (_SeqToHead.apply(t, group, zigzag) for t in (q, k, v))
    band = band_from(causal, window)
    sched = Schedule(1, qh.shape[2], kh.shape[2], zigzag=False, band=band,
                     positional=band != (None, None) or alibi is not None or bias is not None)
    kernels = backend.route(op, "flash", qh, kh, vh).impl == "kernel"
    out, lse = _RingAttention.apply(qh, kh, vh, None if sinks is None else sinks[heads], bias, _Alone(), f, sched,
                                    kernels)
    out = _HeadToSeq.apply(out, group, zigzag)
    if not return_lse:
        return out
    return out, _head_to_seq(lse[..., None], group, zigzag)[..., 0]

"""Ring attention: K/V shards travel around a ring of ranks while each rank attends its
own queries to every shard in turn, merging the partial results exactly by their LSE.

Forward, rank r of W, step s = 0 .. W-1: the rank holds the K/V of rank ``src = r - s`` (mod
W). It posts the send of that block to rank r+1 and the receive of the next block from rank
r-1 (``torch.distributed.batch_isend_irecv``: NCCL on GPUs, gloo on CPUs), runs
``fastattn.flash_attention(..., return_lse=True)`` on the block it holds while the transfer
is in flight, and merges the result into an fp32 accumulator.

Backward: the same rotation of K/V, and beside it a travelling fp32 dK/dV accumulator per
block. Each rank recomputes its share of the block's gradients from the GLOBAL output and
LSE (so the per-step softmax is the global one and the pieces simply add), adds them to the
accumulator it received for that block, and passes it on; after W steps each accumulator
arrives back at the rank that owns the block.

Causal patterns per step (``src`` the block's owner, c = half a zig-zag shard):

    contiguous   src == r: causal diagonal   src < r: full        src > r: skipped
    zig-zag      src == r: causal diagonal   src < r: all queries x first half of the keys
                                             src > r: second half of the queries x all keys

so under zig-zag every off-diagonal step costs every rank the same half block.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn import backend
from fastattn.functional import flash_attention
from fastattn.ops.flash.reference import attention_backward
from fastattn.validation import check_options, check_qkv, default_scale

_KV_TAG, _DKV_TAG = 0, 1  # gloo matches messages by (peer, tag); NCCL ignores tags


# ---------------------------------------------------------------------------------------
# The LSE merge (pure torch).

def merge_partials(out: Tensor, lse: Tensor, out_i: Tensor, lse_i: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets, exactly.

    out, out_i: (..., Lq, Dv); lse, lse_i: (..., Lq), natural log. Returns (out, lse) in the
    dtype of ``out``/``lse`` (use fp32 accumulators). A row that is -inf in both stays out 0,
    lse -inf; a -inf partial contributes nothing.

    Equivalent code::

        lse_new = logaddexp(lse, lse_i)
        out_new = out * exp(lse - lse_new) + out_i * exp(lse_i - lse_new)
    """
    new = torch.logaddexp(lse, lse_i.to(lse.dtype))
    # Both -inf: logaddexp is -inf and -inf - -inf is NaN; shifting by 0 gives weights exp(-inf) = 0.
    shift = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w, w_i = torch.exp(lse - shift), torch.exp(lse_i.to(lse.dtype) - shift)
    return out * w[..., None] + out_i.to(out.dtype) * w_i[..., None], new


# ---------------------------------------------------------------------------------------
# Communication.

class _Ring:
    """Ranks of ``group`` in a ring: sends go to rank+1, receives come from rank-1."""

    def __init__(self, group):
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        # P2POp wants global ranks.
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def start(self, tensors, tag):
        """Post sends of ``tensors`` to the next rank and receives of same-shaped buffers from
        the previous one. Returns (buffers, pending); the buffers are valid after ``wait``."""
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in bufs]
        # The sent tensors (maybe fresh contiguous copies) stay referenced until the wait.
        return bufs, (dist.batch_isend_irecv(ops), tensors)

    @staticmethod
    def wait(pending):
        requests, _sent = pending
        for r in requests:
            r.wait()


def _shape_check(op: str, group, device, **sizes) -> None:
    """ValueError on every rank when the ranks' shapes differ (a mismatched receive would
    hang or corrupt memory). One small all_gather per call, on the inputs' device (the one
    the group must serve anyway)."""
    world = dist.get_world_size(group)
    mine = torch.tensor(list(sizes.values()), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if len(set(rows)) != 1:
        names = ", ".join(sizes)
        per_rank = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
        raise ValueError(
            f"{op}: every rank must hold a shard of the same shape ({names}), got {per_rank}. "
            "Uneven shards are not supported: pad the sequence to a multiple of world_size "
            "(2 * world_size for zig-zag) and mask the padding")


def check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, group, *, causal: bool, zigzag: bool,
                 scale) -> None:
    """Local and cross-rank validation shared by ring and Ulysses attention."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: torch.distributed is not initialised (call init_process_group first)")
    check_qkv(op, q, k, v)
    check_options(op, q, scale=scale)
    lq, lk = q.shape[2], k.shape[2]
    if causal and lq != lk:
        raise ValueError(f"{op}: causal context-parallel attention needs q and k shards of one length, "
                         f"got {lq} and {lk}")
    if zigzag and (lq % 2 or lk % 2):
        raise ValueError(f"{op}: a zig-zag shard holds two equal chunks, so its length must be even, "
                         f"got q {lq}, k {lk}; the full sequence must be a multiple of 2 * world_size")
    b, hq, _, d = q.shape
    _shape_check(op, group, q.device, batch=b, q_heads=hq, kv_heads=k.shape[1], q_len=lq, k_len=lk,
                 head_dim=d, v_dim=v.shape[-1])


# ---------------------------------------------------------------------------------------
# The ring.

def _blocks(rank: int, src: int, lq: int, lk: int, causal: bool, zigzag: bool):
    """(query slice, key slice, diagonal?) pieces rank ``rank`` computes against the K/V of
    rank ``src``; empty when the block is entirely in the future."""
    whole = slice(None)
    if not causal:
        return [(whole, whole, False)]
    if src == rank:
        return [(whole, whole, True)]  # equal lengths: bottom-right causal is the plain diagonal
    if not zigzag:
        return [(whole, whole, False)] if src < rank else []
    # Zig-zag: ours are chunks (r, 2W-1-r), theirs (src, 2W-1-src).
    if src < rank:
        return [(whole, slice(0, lk // 2), False)]  # chunk src precedes both of ours; 2W-1-src follows both
    return [(slice(lq // 2, None), whole, False)]    # both of theirs lie between our chunks r and 2W-1-r


def _local_attention(q, k, v, scale, diag):
    return flash_attention(q, k, v, causal=diag, scale=scale, return_lse=True)


def _block_grads(do, q, k, v, out, lse, scale, diag, kernels):
    if not kernels:
        return attention_backward(do, q, k, v, out, lse, scale=scale, causal=diag)
    from fastattn.ops.flash.op import flash_backward  # imports triton, so only when used

    dq, dk, dv, _ = flash_backward(do, q, k, v, out, lse, scale=scale, window_right=0 if diag else None)
    return dq, dk, dv


def _ring_forward(ring: _Ring, q, k, v, scale, causal, zigzag):
    b, hq, lq, _ = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(b, hq, lq, v.shape[-1], device=q.device, dtype=acc_dtype)
    lse = torch.full((b, hq, lq), -math.inf, device=q.device, dtype=acc_dtype)
    kv = (k, v)
    for step in range(ring.world):
        if step + 1 < ring.world:
            incoming, requests = ring.start(kv, _KV_TAG)  # overlaps with this step's compute
        src = (ring.rank - step) % ring.world
        for qs, ks, diag in _blocks(ring.rank, src, lq, k.shape[2], causal, zigzag):
            o_i, l_i = _local_attention(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], scale, diag)
            out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], o_i, l_i)
        if step + 1 < ring.world:
            ring.wait(requests)
            kv = tuple(incoming)
    return out, lse


def _ring_backward(ring: _Ring, do, q, k, v, out, lse, scale, causal, zigzag, kernels):
    lq, lk = q.shape[2], k.shape[2]
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, device=q.device, dtype=acc_dtype)
    kv, travelling, dkv_requests = (k, v), None, None
    for step in range(ring.world):
        if step + 1 < ring.world:
            incoming, kv_requests = ring.start(kv, _KV_TAG)
        src = (ring.rank - step) % ring.world
        dk = torch.zeros(kv[0].shape, device=q.device, dtype=acc_dtype)
        dv = torch.zeros(kv[1].shape, device=q.device, dtype=acc_dtype)
        for qs, ks, diag in _blocks(ring.rank, src, lq, lk, causal, zigzag):
            dq_i, dk_i, dv_i = _block_grads(do[:, :, qs], q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                            out[:, :, qs], lse[:, :, qs], scale, diag, kernels)
            dq[:, :, qs] += dq_i
            dk[:, :, ks] += dk_i
            dv[:, :, ks] += dv_i
        if ring.world == 1:
            return dq, dk, dv  # nothing to pass on (and P2P to oneself is not allowed)
        if dkv_requests is not None:
            # The accumulator for block src, filled by the ranks that held it before us.
            ring.wait(dkv_requests)
            dk += travelling[0]
            dv += travelling[1]
        # Pass block src's gradients on; after the last step this lands on its owner.
        travelling, dkv_requests = ring.start((dk, dv), _DKV_TAG)
        if step + 1 < ring.world:
            ring.wait(kv_requests)
            kv = tuple(incoming)
    ring.wait(dkv_requests)
    return dq, travelling[0], travelling[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, scale, causal, zigzag, kernels):
        out, lse = _ring_forward(ring, q, k, v, scale, causal, zigzag)
        out = out.to(q.dtype)
        lse = lse.to(torch.float32) if q.dtype != torch.float64 else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, scale, causal, zigzag, kernels)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # dlse is not propagated (as fastattn.flash_attention): lse is returned for merging.
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, causal, zigzag, kernels = ctx.args
        dq, dk, dv = _ring_backward(ring, dout, q, k, v, out, lse, scale, causal, zigzag, kernels)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                   scale: Optional[float] = None, zigzag: Optional[bool] = None,
                   return_lse: bool = False):
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring attention).

    Collective: every rank of ``group`` calls it with its own shard (and, when training,
    every rank runs the backward). K/V shards rotate around the ring with
    ``torch.distributed`` P2P (NCCL or gloo), overlapped with the local attention
    (``fastattn.flash_attention``: the kernels on CUDA or under TRITON_INTERPRET=1, the
    reference otherwise, as ``fastattn.use_backend`` decides); partial results merge exactly
    by their LSE in fp32.

    Args:
        q: (B, Hq, Lq_local, D), k: (B, Hkv, Lk_local, D), v: (B, Hkv, Lk_local, Dv): this
            rank's shard (see ``shard_sequence``); Hq a multiple of Hkv (GQA/MQA, K/V are
            sent with Hkv heads). Every rank's shapes must agree.
        causal: causal over the GLOBAL sequence (query at global position i sees keys at
            j <= i). Needs Lq_local == Lk_local.
        scale: multiplies q @ k^T; default ``1 / sqrt(D)``.
        zigzag: the layout of the shards; default ``causal``. True: rank r holds chunks r and
            2W-1-r of 2W (balanced causal work); False: contiguous piece r of W. Irrelevant
            to the result when not causal.
        return_lse: also return the global row logsumexp (B, Hq, Lq_local), float32 (not
            differentiated).

    Returns:
        out (B, Hq, Lq_local, Dv) in q's dtype (rows of this rank's queries, in its layout),
        or (out, lse).

    Raises:
        ValueError: torch.distributed not initialised; bad local shapes (as flash_attention);
            ranks holding shards of different shapes (uneven sharding); causal with
            Lq_local != Lk_local; an odd shard length under zig-zag; under
            ``use_backend("triton")``, inputs the kernels cannot take.

    Equivalent code (on the gathered sequences, zig-zag order undone)::

        fastattn.flash_attention(q_full, k_full, v_full, causal=causal, scale=scale)
    """
    op = "ring_attention"
    zigzag = causal if zigzag is None else bool(zigzag)
    check_inputs(op, q, k, v, group, causal=causal, zigzag=zigzag, scale=scale)
    scale = default_scale(q.shape[-1], scale)
    kernels = backend.route(op, "flash", q, k, v).impl == "kernel"
    out, lse = _RingAttention.apply(q, k, v, _Ring(group), scale, causal, zigzag, kernels)
    return (out, lse) if return_lse else out

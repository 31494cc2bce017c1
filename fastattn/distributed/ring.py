"""Ring attention: K/V shards travel around a ring of ranks while each rank attends its
own queries to every shard in turn, merging the partial results exactly by their LSE.

Forward, rank r of W, step s = 0 .. S-1 (S <= W, ``Schedule.steps``): the rank holds the K/V
of rank ``src = r - s`` (mod W). It posts the send of that block to rank r+1 and the receive of
the next block from rank r-1 (``torch.distributed.batch_isend_irecv``: NCCL on GPUs, gloo on
CPUs) before computing, runs the flash op with its lse (the kernels, or the reference) on the
pieces of the block it holds while the transfer is in flight, and merges the results into an
fp32 accumulator.

Backward: the same rotation of K/V, and beside it a travelling fp32 dK/dV accumulator per
block. Each rank recomputes its share of the block's gradients from the GLOBAL output and
LSE (so the per-step softmax is the global one and the pieces simply add), adds them to the
accumulator it received for that block, and passes it on; after the last step each
accumulator goes to the rank that owns the block (the next one when S = W).

Which keys a rank attends at each step is ``Schedule``'s: every shard is one (contiguous) or
two (zig-zag: chunks r and 2W-1-r of 2W) chunks with known global positions, and each pair of
a query chunk and a key chunk becomes one piece, trimmed to the rows and keys that the global
band (causal, window) keeps, or skipped. Under zig-zag causal every off-diagonal step then
costs every rank the same half block. A piece's ALiBi, off the global diagonal, is a per-key
bias plus a per-row lse shift (``_alibi_terms``); sinks join once, after the ring; dropout
draws, in every piece, that piece's block of the mask one process draws from the same seed
(``_dropout_place``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn import backend
from fastattn.ops.flash.reference import alibi_bias, attention_reference, band_mask, dropout_keep_reference
from fastattn.validation import band_from, check_options, check_qkv, check_sinks, default_scale

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

    def start(self, tensors, tag, ahead: int = 1):
        """Post sends of ``tensors`` to rank + ``ahead`` and receives of same-shaped buffers
        from rank - ``ahead``. Returns (buffers, pending); the buffers are valid after ``wait``."""
        # P2POp wants global ranks.
        to = dist.get_global_rank(self.group, (self.rank + ahead) % self.world)
        frm = dist.get_global_rank(self.group, (self.rank - ahead) % self.world)
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, to, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, frm, self.group, tag) for t in bufs]
        # The sent tensors (maybe fresh contiguous copies) stay referenced until the wait.
        return bufs, (dist.batch_isend_irecv(ops), tensors)

    @staticmethod
    def wait(pending):
        requests, _sent = pending
        for r in requests:
            r.wait()


class _Alone:
    """A ring of one rank, which never sends: the local attention of Ulysses."""

    rank, world = 0, 1


def process_group(op: str, group):
    """``group`` as the ranks to run over: None (the default group) or a ProcessGroup as given;
    a 1-D ``DeviceMesh`` (e.g. ``mesh["cp"]`` of a data x context mesh) as its process group.

    Raises:
        ValueError: a DeviceMesh of more than one dimension."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(group, DeviceMesh):
        return group
    if group.ndim != 1:
        raise ValueError(f"{op}: group is a DeviceMesh of {group.ndim} dims {group.mesh_dim_names}; pass the "
                         "context-parallel dimension, e.g. mesh['cp']")
    return group.get_group()


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
            "Ring and Ulysses attention need even shards: pad the sequence to a multiple of world_size "
            "(2 * world_size for zig-zag) and mask the padding; packed documents take uneven shards "
            "(varlen_attention)")


def check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, group, *, causal: bool, zigzag: bool,
                 scale, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, sinks=None) -> None:
    """Local and cross-rank validation shared by ring and Ulysses attention."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: torch.distributed is not initialised (call init_process_group first)")
    check_qkv(op, q, k, v)
    check_options(op, q, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                  dropout_p=dropout_p)
    check_sinks(op, sinks, q.shape[1], q.device)
    lq, lk = q.shape[2], k.shape[2]
    if (causal or window is not None or alibi_slopes is not None) and lq != lk:
        raise ValueError(f"{op}: causal, window and ALiBi need global positions, so q and k shards of one "
                         f"length, got {lq} and {lk}")
    if zigzag and (lq % 2 or lk % 2):
        raise ValueError(f"{op}: a zig-zag shard holds two equal chunks, so its length must be even, "
                         f"got q {lq}, k {lk}; the full sequence must be a multiple of 2 * world_size")
    b, hq, _, d = q.shape
    _shape_check(op, group, q.device, batch=b, q_heads=hq, kv_heads=k.shape[1], q_len=lq, k_len=lk,
                 head_dim=d, v_dim=v.shape[-1])


# ---------------------------------------------------------------------------------------
# The schedule: which pieces of the held K/V block each rank attends at each step.

class Piece(NamedTuple):
    """One local attention call of a ring step.

    ``q``/``k``: slices of this rank's query rows and of the held block's key rows; ``q0``/``k0``:
    the global positions of their first rows; ``left``/``right``: the band in
    ``flash_attention``'s bottom-right convention for the sliced call (None: open)."""

    q: slice
    k: slice
    q0: int
    k0: int
    left: Optional[int]
    right: Optional[int]


def shard_chunks(rank: int, world: int, local: int, zigzag: bool) -> list[tuple[int, int, int, int]]:
    """(chunk index, global start, local start, length) of the chunks rank ``rank`` holds."""
    if not zigzag:
        return [(rank, rank * local, 0, local)]
    c = local // 2
    return [(rank, rank * c, 0, c), (2 * world - 1 - rank, (2 * world - 1 - rank) * c, c, c)]


def _chunk_piece(qc, kc, band) -> Optional[Piece]:
    """The part of query chunk ``qc`` x key chunk ``kc`` that the global band (left, right)
    keeps (None if nothing), trimmed to the rows and keys that see anything, so that its band
    is expressible as a bottom-right window with both edges >= 0."""
    (_, qa, ql, n), (_, ka, kl, m) = qc, kc
    left, right = band
    # Query qa + i sees keys qa + i - left .. qa + i + right (global); local key j is ka + j.
    i0 = 0 if right is None else max(0, ka - qa - right)
    i1 = n if left is None else min(n, m + ka - qa + left)
    if i0 >= i1:
        return None
    j0 = 0 if left is None else max(0, qa + i0 - left - ka)
    j1 = m if right is None else min(m, qa + i1 + right - ka)
    if j0 >= j1:
        return None
    # Keys from a global multiple of 4 (dropout draws keys in fours); the extra ones are outside the band.
    j0 = max(0, j0 - (ka + j0) % 4)
    lq, lk, d = i1 - i0, j1 - j0, (qa + i0) - (ka + j0)
    # The op's query i sits at key i + lk - lq; ours at key i + d.
    w_left = None if left is None else lk - lq - d + left
    w_right = None if right is None else d + right - (lk - lq)
    # A window edge that cuts nothing in this piece is dropped (no masking cost).
    w_left = None if w_left is not None and w_left >= lk - 1 else w_left
    w_right = None if w_right is not None and w_right >= lq - 1 else w_right
    return Piece(slice(ql + i0, ql + i1), slice(kl + j0, kl + j1), qa + i0, ka + j0, w_left, w_right)


class Schedule:
    """The pieces of every (rank, source block) pair of a ring over ``world`` ranks holding
    ``lq``/``lk`` rows each, and ``steps``: how many ring steps any rank has work in (K/V
    travels no further; a window keeps it short on the contiguous layout).

    ``positional``: the band or ALiBi needs global positions (then lq == lk); otherwise every
    block is one whole piece."""

    def __init__(self, world: int, lq: int, lk: int, *, zigzag: bool, band: tuple, positional: bool):
        self.world, self.lq, self.lk, self.zigzag, self.band = world, lq, lk, zigzag, band
        self.positional = positional
        busy = [s for s in range(world) if any(self.pieces(r, (r - s) % world) for r in range(world))]
        self.steps = 1 + max(busy, default=0)

    def pieces(self, rank: int, src: int) -> list[Piece]:
        if not self.positional:
            whole = slice(None)
            return [Piece(whole, whole, 0, 0, None, None)]
        out = []
        for qc in shard_chunks(rank, self.world, self.lq, self.zigzag):
            for kc in shard_chunks(src, self.world, self.lk, self.zigzag):
                piece = _chunk_piece(qc, kc, self.band)
                if piece is not None:
                    out.append(piece)
        return out


# ---------------------------------------------------------------------------------------
# One piece, forward and backward (the kernels, or the plain-PyTorch reference).

class Features(NamedTuple):
    """The flash_attention options a ring call applies to every piece. ``alibi``: the slopes
    as given ((Hq,) or (B, Hq)), None if off; ``seed``: int64 (1,) on the device, drawn once
    per call, None without dropout; ``scores``: with dropout, (h0, heads, rows, cols): this
    rank's heads are h0 .. of the ``heads`` of one process's (B, heads, rows, cols) scores,
    whose mask the pieces draw blocks of (``_dropout_place``)."""

    scale: float
    softcap: Optional[float]
    alibi: Optional[Tensor]
    dropout_p: float
    seed: Optional[Tensor]
    scores: Optional[tuple] = None


def _alibi_terms(alibi: Optional[Tensor], piece: Piece, lq: int, lk: int):
    """ALiBi of a piece as (slopes for the op, key bias (1|B, Hq, 1, lk), row shift (1|B, Hq, lq)).

    The op adds ``-slope * |i + lk - lq - j|``: right for a piece on the global diagonal. Any
    other piece lies on one side of it (its chunks are disjoint), where the distance is linear:
    ``-slope * (qpos - kpos)`` splits into a per-key bias (a broadcast row the op reads with
    stride 0) and a per-query constant, which leaves the softmax alone and shifts the lse."""
    if alibi is None:
        return None, None, None
    d = piece.q0 - piece.k0
    if d == lk - lq:
        return alibi, None, None
    slopes = (alibi if alibi.dim() == 2 else alibi[None]).float()[:, :, None]
    i = torch.arange(lq, device=alibi.device, dtype=torch.float32)
    j = torch.arange(lk, device=alibi.device, dtype=torch.float32)
    if d >= lk - 1:  # every query after every key: -slope * ((d + i - (lk - 1)) + (lk - 1 - j))
        key, row = -slopes * (lk - 1 - j), -slopes * (d + i - (lk - 1))
    elif d + lq - 1 <= 0:  # every query before every key: -slope * ((j) - (i + d))
        key, row = -slopes * j, slopes * (i + d)
    else:
        raise RuntimeError(f"ring schedule: piece {piece} straddles the diagonal off its alignment")
    return None, key[:, :, None, :], row


def _dropout_place(f: Features, piece: Piece) -> Optional[tuple]:
    """Where a piece's scores sit in one process's (``f.scores``; ``op.dropout_seed``'s
    place): its first query row and key are global positions piece.q0, piece.k0. None
    without dropout."""
    if f.dropout_p == 0.0:
        return None
    h0, heads, rows, cols = f.scores
    return h0, heads, piece.q0, rows, piece.k0, cols


def _reference_keep(f: Features, piece: Piece, shape, device) -> Optional[Tensor]:
    """The reference path's dropout keep-mask of a piece: the kernels' (one host read of the
    seed per piece)."""
    if f.dropout_p == 0.0:
        return None
    return dropout_keep_reference(int(f.seed.item()), *shape, f.dropout_p, _dropout_place(f, piece)).to(device)


def _piece_bias(bias: Optional[Tensor], piece: Piece, lk: int) -> Optional[Tensor]:
    """The piece's block of a (B|1, Hq|1, Lq_local, L) bias of this rank's rows over every
    global key: a view (a piece's keys are consecutive global positions)."""
    return None if bias is None else bias[:, :, piece.q, piece.k0:piece.k0 + lk]


def piece_forward(q, k, v, f: Features, piece: Piece, kernels: bool, bias: Optional[Tensor] = None):
    """(out, lse) of this rank's queries ``q[:, :, piece.q]`` over ``k/v[:, :, piece.k]``,
    lse float32 with the piece's ALiBi shift included; ``bias``: this rank's rows of an
    attention bias over every global key (see ``_piece_bias``; never with ALiBi)."""
    qp, kp, vp = q[:, :, piece.q], k[:, :, piece.k], v[:, :, piece.k]
    alibi, key_bias, row = _alibi_terms(f.alibi, piece, qp.shape[2], kp.shape[2])
    if bias is not None:
        key_bias = _piece_bias(bias, piece, kp.shape[2])
    if kernels:
        from fastattn.ops.flash import op as flash_op  # imports triton, so only when used

        out, lse = flash_op.flash_attn(
            qp, kp, vp, bias=key_bias, alibi=alibi, seed=f.seed, scale=f.scale, softcap=f.softcap,
            dropout_p=f.dropout_p, window_left=piece.left, window_right=piece.right,
            dropout_place=_dropout_place(f, piece))
    else:
        keep = _reference_keep(f, piece, (qp.shape[0], qp.shape[1], qp.shape[2], kp.shape[2]), q.device)
        out, lse = attention_reference(qp, kp, vp, scale=f.scale, window=(piece.left, piece.right),
                                       attn_bias=key_bias, alibi_slopes=alibi, softcap=f.softcap,
                                       dropout_p=f.dropout_p, dropout_mask=keep, return_lse=True, upcast=True)
    return out, lse if row is None else lse + row


def _reference_grads(do, q, k, v, out, lse, f: Features, piece: Piece, alibi, key_bias):
    """Gradients (dq, dk, dv, dS) of a piece given the GLOBAL out and lse rows (plain torch, no
    autograd, so it also runs inside a dispatcher kernel): ``P = exp(s - lse)``, ``dS = P *
    (dP - rowsum(do * out))``, the softmax backward restricted to this block of keys, through
    softcap's tanh; dS (B, Hq, Lq, Lk) is the gradient of an additive bias. ``key_bias``: a
    float bias or a bool mask (True = attend) broadcasting to the scores."""
    ct = torch.promote_types(q.dtype, torch.float32)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qf, do, out = q.to(ct), do.to(ct), out.to(ct)
    kf, vf = k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * f.scale
    if f.softcap:
        capped = torch.tanh(s / f.softcap)
        s = f.softcap * capped
    if key_bias is not None and key_bias.dtype == torch.bool:
        s = s.masked_fill(~key_bias, -math.inf)
    elif key_bias is not None:
        s = s + key_bias.to(ct)
    if alibi is not None:
        s = s + alibi_bias(alibi, lq, lk, ct)
    band = band_mask(lq, lk, piece.left, piece.right, device=q.device)
    if band is not None:
        s = s.masked_fill(~band, -math.inf)
    # A row that sees no key at all has lse -inf; +inf gives it p = 0, not NaN.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse).to(ct)
    p = torch.exp(s - lse[..., None])
    keep = _reference_keep(f, piece, (b, hq, lq, lk), q.device)
    dropped = p if keep is None else p.masked_fill(~keep, 0.0) / (1.0 - f.dropout_p)
    dv = torch.matmul(dropped.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    if keep is not None:
        dp = dp.masked_fill(~keep, 0.0) / (1.0 - f.dropout_p)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))  # rowsum(do * out): the softmax Jacobian's term
    if f.softcap:
        ds = ds * (1.0 - capped * capped)  # d(softcap * tanh(x / softcap)) / dx
    dq = torch.matmul(ds, kf) * f.scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * f.scale
    # Each kv head's gradient sums over its group of query heads.
    return dq, dk.view(b, hkv, group, lk, -1).sum(2), dv.view(b, hkv, group, lk, -1).sum(2), ds


def piece_backward(do, q, k, v, out, lse, f: Features, piece: Piece, kernels: bool, bias: Optional[Tensor] = None,
                   bias_grad: bool = False):
    """(dq, dk, dv, dbias) of one piece given the global out and lse of this rank's queries
    (fp32 or the inputs' dtype; the caller accumulates in fp32). dbias: with ``bias_grad``, the
    gradient of the piece's block of a float ``bias``, summed over the dims it broadcasts; else
    None."""
    qs, ks = piece.q, piece.k
    qp, kp, vp, dop, outp = q[:, :, qs], k[:, :, ks], v[:, :, ks], do[:, :, qs], out[:, :, qs]
    alibi, key_bias, row = _alibi_terms(f.alibi, piece, qp.shape[2], kp.shape[2])
    if bias is not None:
        key_bias = _piece_bias(bias, piece, kp.shape[2])
    lsep = lse[:, :, qs] if row is None else lse[:, :, qs] - row  # the op's logits lack the row shift
    if not kernels:
        dq, dk, dv, ds = _reference_grads(dop, qp, kp, vp, outp, lsep, f, piece, alibi, key_bias)
        if not bias_grad:
            return dq, dk, dv, None
        summed = [d for d in range(2) if key_bias.shape[d] == 1]  # the dims the bias broadcasts over
        return dq, dk, dv, ds.sum(summed, keepdim=True) if summed else ds
    from fastattn.ops.flash.op import flash_backward  # imports triton, so only when used

    dq, dk, dv, ds = flash_backward(
        dop, qp, kp, vp, outp, lsep, bias=key_bias, alibi=alibi,
        seed=f.seed, scale=f.scale, softcap=f.softcap, dropout_p=f.dropout_p, window_left=piece.left,
        window_right=piece.right, bias_grad=bias_grad, dropout_place=_dropout_place(f, piece))
    return dq, dk, dv, ds if bias_grad else None


# ---------------------------------------------------------------------------------------
# The ring.

def _ring_forward(ring, q, k, v, f: Features, sched: Schedule, kernels: bool, bias=None):
    b, hq, lq, _ = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(b, hq, lq, v.shape[-1], device=q.device, dtype=acc_dtype)
    lse = torch.full((b, hq, lq), -math.inf, device=q.device, dtype=acc_dtype)
    kv = (k, v)
    for step in range(sched.steps):
        if step + 1 < sched.steps:
            incoming, requests = ring.start(kv, _KV_TAG)  # overlaps with this step's compute
        src = (ring.rank - step) % ring.world
        for piece in sched.pieces(ring.rank, src):
            o_i, l_i = piece_forward(q, kv[0], kv[1], f, piece, kernels, bias)
            qs = piece.q
            out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], o_i, l_i)
        if step + 1 < sched.steps:
            ring.wait(requests)
            kv = tuple(incoming)
    return out, lse


def _ring_backward(ring, do, q, k, v, out, lse, f: Features, sched: Schedule, kernels: bool, bias=None,
                   bias_grad=False):
    """(dq, dk, dv, dbias): dbias fp32 in the bias's shape with ``bias_grad``, else None."""
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, device=q.device, dtype=acc_dtype)
    dbias = torch.zeros(bias.shape, device=q.device, dtype=acc_dtype) if bias_grad else None
    kv, travelling, dkv_requests = (k, v), None, None
    last = sched.steps - 1
    for step in range(sched.steps):
        if step < last:
            incoming, kv_requests = ring.start(kv, _KV_TAG)
        src = (ring.rank - step) % ring.world
        dk = torch.zeros(kv[0].shape, device=q.device, dtype=acc_dtype)
        dv = torch.zeros(kv[1].shape, device=q.device, dtype=acc_dtype)
        for piece in sched.pieces(ring.rank, src):
            dq_i, dk_i, dv_i, db_i = piece_backward(do, q, kv[0], kv[1], out, lse, f, piece, kernels, bias,
                                                    bias_grad)
            dq[:, :, piece.q] += dq_i
            dk[:, :, piece.k] += dk_i
            dv[:, :, piece.k] += dv_i
            if db_i is not None:
                _piece_bias(dbias, piece, dk_i.shape[2])[...] += db_i
        if last == 0:
            return dq, dk, dv, dbias  # only our own block was needed: nothing travels
        if dkv_requests is not None:
            # The accumulator for block src, filled by the ranks that held it before us.
            ring.wait(dkv_requests)
            dk += travelling[0]
            dv += travelling[1]
        # Pass block src's gradients on with its K/V; after the last step, straight to its owner
        # (rank - last; the next rank when the ring goes all the way round).
        travelling, dkv_requests = ring.start((dk, dv), _DKV_TAG, ahead=1 if step < last else -last)
        if step < last:
            ring.wait(kv_requests)
            kv = tuple(incoming)
    ring.wait(dkv_requests)
    return dq, travelling[0], travelling[1], dbias


def _add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Count each head's sink once in the merged result: ``exp(sinks[h])`` joins the softmax
    denominator, so the output rows scale by ``exp(lse - lse_new)``."""
    new = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
    return out * torch.exp(lse - new)[..., None], new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, bias, ring, f, sched, kernels):
        out, lse = _ring_forward(ring, q, k, v, f, sched, kernels, bias)
        if sinks is not None:
            out, lse = _add_sinks(out, lse, sinks)
        out = out.to(q.dtype)
        lse = lse.to(torch.float32) if q.dtype != torch.float64 else lse
        ctx.save_for_backward(q, k, v, out, lse, sinks, bias)
        ctx.args = (ring, f, sched, kernels)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # dlse is not propagated (as fastattn.flash_attention): lse is returned for merging.
        q, k, v, out, lse, sinks, bias = ctx.saved_tensors
        ring, f, sched, kernels = ctx.args
        bias_grad = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias = _ring_backward(ring, dout, q, k, v, out, lse, f, sched, kernels, bias, bias_grad)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d out / d sink = -P_sink * out: this rank's rows' share (sum it over the ranks).
            delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
            dsinks = -(torch.exp(sinks.to(lse.dtype)[None, :, None] - lse) * delta).sum((0, 2)).to(sinks.dtype)
        dbias = None if dbias is None else dbias.to(bias.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, dbias, None, None, None, None


def _check_sharded_bias(op: str, bias, q: Tensor, k: Tensor, world: int, alibi_slopes) -> None:
    """attn_bias of ring attention: None, or bool / float (B|1, Hq|1, Lq_local, W * Lk_local) on q's device."""
    if bias is None:
        return
    b, hq, lq, _ = q.shape
    want = f"({b} or 1, {hq} or 1, {lq}, {world * k.shape[2]})"
    if not isinstance(bias, Tensor) or bias.dim() != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, hq) \
            or tuple(bias.shape[2:]) != (lq, world * k.shape[2]):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: attn_bias must be this rank's query rows over every key, {want}, got {got}")
    if bias.device != q.device or not (bias.dtype == torch.bool or bias.dtype.is_floating_point):
        raise ValueError(f"{op}: attn_bias must be bool or floating point on {q.device}, got {bias.dtype} on "
                         f"{bias.device}")
    if alibi_slopes is not None:
        raise ValueError(f"{op}: attn_bias and alibi_slopes together: fold the ALiBi into the bias")


def features(op: str, q: Tensor, *, scale, softcap, alibi_slopes, dropout_p, scores=None) -> Features:
    """The validated per-piece options of a context-parallel call; draws the dropout seed
    from torch's generator on q's device (as flash_attention does); ``scores``: as
    ``Features``'s."""
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        raise ValueError(f"{op}: alibi_slopes of shape {tuple(alibi_slopes.shape)} requires grad, but "
                         "context-parallel attention gives no gradient for ALiBi slopes; pass them detached")
    seed = torch.randint(0, 2**62, (1,), device=q.device) if dropout_p > 0 else None
    return Features(default_scale(q.shape[-1], scale), softcap, alibi_slopes, float(dropout_p), seed,
                    scores if dropout_p > 0 else None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                   scale: Optional[float] = None, window: Optional[tuple] = None,
                   attn_bias: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                   softcap: Optional[float] = None, dropout_p: float = 0.0, sinks: Optional[Tensor] = None,
                   zigzag: Optional[bool] = None, return_lse: bool = False):
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring attention).

    Collective: every rank of ``group`` calls it with its own shard (and, when training,
    every rank runs the backward). K/V shards rotate around the ring with
    ``torch.distributed`` P2P (NCCL or gloo), overlapped with the local attention (the flash
    kernels on CUDA or under TRITON_INTERPRET=1, the reference otherwise, as
    ``fastattn.use_backend`` decides); partial results merge exactly by their LSE in fp32.

    Args:
        q: (B, Hq, Lq_local, D), k: (B, Hkv, Lk_local, D), v: (B, Hkv, Lk_local, Dv): this
            rank's shard (see ``shard_sequence``); Hq a multiple of Hkv (GQA/MQA, K/V are
            sent with Hkv heads). Every rank's shapes must agree.
        group: the ranks: None (the default group), a ProcessGroup, or a 1-D DeviceMesh.
        causal, window, alibi_slopes, softcap, scale: as ``flash_attention``, over the GLOBAL
            sequence (query at global position i sees keys i - left .. i + right, causal
            ``right = 0``; ALiBi ``-slope * |i - j|``). Positions need Lq_local == Lk_local.
            A window shortens the ring on the contiguous layout: K/V travels only as far as
            some rank's band reaches, and pieces outside every band are skipped. ALiBi slopes
            get no gradient.
        attn_bias: this rank's query rows of a bias over the WHOLE key sequence,
            (B or 1, Hq or 1, Lq_local, W * Lk_local): rows in the shard's order
            (``shard_sequence(bias, rank, W, zigzag=..., dim=2)``), keys in global order. bool
            (True = attend) or additive float (differentiable; its gradient comes back in its
            shape). Not with ALiBi (fold the slopes into the bias).
        dropout_p: dropout on the attention probabilities, with one seed taken from torch's
            generator per call: the same mask as one process's ``flash_attention`` on the
            kernels under the same ``torch.manual_seed`` (each piece draws its block of it;
            the reference path draws it too, ``dropout_keep_reference``). The backward
            redraws it. Needs Lk_local a multiple of 4 (8 under zig-zag).
        sinks: (Hq,) attention-sink logits, counted once per row (after the ring). The
            gradient is this rank's rows' share: sum it over the ranks, as for every
            replicated parameter.
        zigzag: the layout of the shards; default ``causal``. True: rank r holds chunks r and
            2W-1-r of 2W (balanced causal work); False: contiguous piece r of W.
        return_lse: also return the global row logsumexp (B, Hq, Lq_local), float32 (not
            differentiated; sinks included).

    Returns:
        out (B, Hq, Lq_local, Dv) in q's dtype (rows of this rank's queries, in its layout),
        or (out, lse).

    Raises:
        ValueError: torch.distributed not initialised; bad local shapes or options (as
            flash_attention); ranks holding shards of different shapes (uneven sharding);
            positions (causal, window, ALiBi) with Lq_local != Lk_local; an odd shard length
            under zig-zag; dropout with Lk_local not a multiple of 4 (8 under zig-zag);
            alibi_slopes requiring grad; attn_bias of another shape, or with
            alibi_slopes; a DeviceMesh of more than one dimension;
            under ``use_backend("triton")``,
            inputs the kernels cannot take.

    Equivalent code (on the gathered sequences, zig-zag order undone)::

        fastattn.flash_attention(q_full, k_full, v_full, causal=causal, window=window, ...)
    """
    op = "ring_attention"
    zigzag = causal if zigzag is None else bool(zigzag)
    group = process_group(op, group)
    check_inputs(op, q, k, v, group, causal=causal, zigzag=zigzag, scale=scale, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, sinks=sinks)
    world = dist.get_world_size(group)
    if dropout_p > 0 and k.shape[2] % (8 if zigzag else 4):
        raise ValueError(f"{op}: dropout draws keys in groups of four from global multiples of 4, so the key "
                         f"shards' chunks must be multiples of 4 long; got Lk_local = {k.shape[2]} "
                         f"({'zig-zag: two chunks of half of it' if zigzag else 'one chunk'})")
    f = features(op, q, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                 scores=(0, q.shape[1], world * q.shape[2], world * k.shape[2]))
    band = band_from(causal, window)
    ring = _Ring(group)
    _check_sharded_bias(op, attn_bias, q, k, ring.world, alibi_slopes)
    sched = Schedule(ring.world, q.shape[2], k.shape[2], zigzag=zigzag, band=band,
                     positional=band != (None, None) or alibi_slopes is not None or attn_bias is not None
                     or dropout_p > 0)
    kernels = backend.route(op, "flash", q, k, v).impl == "kernel"
    out, lse = _RingAttention.apply(q, k, v, sinks, attn_bias, ring, f, sched, kernels)
    return (out, lse) if return_lse else out

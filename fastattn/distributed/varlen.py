"""Packed documents across ranks: context parallelism for ``flash_attention_varlen``'s layout.

The whole batch is one packed stream of tokens (documents back to back, offsets
``cu_seqlens``), cut into contiguous shards of any lengths, one per rank in rank order. Each
rank all-gathers K/V (every rank's shard, padded to the longest for the collective), slices
the keys its own documents need (a document cut by the shard's start brings its earlier keys;
under causal attention keys end at the shard's last token), and runs one
``flash_attention_varlen`` call over its pieces of documents. Queries never leave their rank;
documents never attend across each other. The backward all-reduces the gathered K/V's
gradient and keeps each rank's own rows (the Llama 3 paper's all-gather context parallelism).
Dropout: the local call is placed at the rank's first row of the whole batch's packed
scores (every document's keys start at its first key, as one process counts them), so it
draws its rows of the mask one process draws from the same seed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastattn import backend, validation
from fastattn.distributed.ring import _shape_check, process_group
from fastattn.functional import flash_attention_varlen
from fastattn.ops.flash.reference import varlen_attention_reference, varlen_dropout_keep_reference


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (dim 0) of ``x``, concatenated in rank order; rank r holds
    ``lengths[r]`` rows. The backward sums the gathered gradient over the ranks and returns
    this rank's rows of it."""

    @staticmethod
    def forward(ctx, x, group, lengths, rank):
        longest = max(lengths)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded, group=group)
        ctx.args = (group, lengths, rank)
        return torch.cat([p[:n] for p, n in zip(parts, lengths)])

    @staticmethod
    def backward(ctx, g):
        group, lengths, rank = ctx.args
        g = g.contiguous()
        dist.all_reduce(g, group=group)
        start = sum(lengths[:rank])
        return g[start:start + lengths[rank]], None, None, None


def _local_documents(cu: list[int], start: int, end: int, causal: bool, right: Optional[int]):
    """For this rank's tokens [start, end) of the packed stream with offsets ``cu``: the
    indices of the documents it holds, their query offsets (relative to start), their key
    offsets (relative to the first key used), the global range [lo, hi) of the keys used, and
    ``pad``, the zero query rows appended to the last document so that its queries end where
    its keys do (flash_attention_varlen aligns each document's queries bottom-right)."""
    docs = [b for b in range(len(cu) - 1) if cu[b] < end and cu[b + 1] > start]
    cu_q, cu_k = [0], [0]
    lo = cu[docs[0]]
    for b in docs:
        cu_q.append(min(cu[b + 1], end) - start)
        # Causal: a document's keys end at its last query here; otherwise at its end, or, with
        # a window's right edge, that many keys past its last query here.
        last = cu[b + 1] if right is None else min(cu[b + 1], end + right)
        cu_k.append((min(cu[b + 1], end) if causal else max(last, min(cu[b + 1], end))) - lo)
    pad = lo + cu_k[-1] - end if not causal and cu[docs[-1] + 1] > end else 0  # a document cut by the end
    cu_q[-1] += pad
    return docs, cu_q, cu_k, lo, lo + cu_k[-1], pad


def _dropout_attention(q, k, v, cu_q: Tensor, cu_k: Tensor, seed: Tensor, place: tuple, **options):
    """``flash_attention_varlen(q, k, v, cu_q, cu_k, **options)`` with dropout drawn from
    ``seed`` (int64 (1,)) at ``place`` (``op.dropout_seed``'s, of (Hq, total_q, total_k)):
    the kernels placed there, or the reference with their masks. Raises as the public call."""
    op = "varlen_attention"
    call = validation.check_flash_varlen(op, q, k, v, cu_q, cu_k, None, None, **options)
    views = tuple(t.transpose(0, 1)[None] for t in (q, k, v))  # (total, H, D) -> (1, H, total, D)
    if backend.route(op, "flash", *views).impl == "kernel":
        from fastattn.ops.flash import op as flash_op  # imports triton, so only when used

        out, lse = flash_op.flash_attn(*views, alibi=call.alibi_slopes, seed=seed, sinks=call.sinks,
                                       scale=call.scale, softcap=call.softcap, dropout_p=call.dropout_p,
                                       window_left=call.band[0], window_right=call.band[1], cu_seqlens_q=cu_q,
                                       cu_seqlens_k=cu_k, dropout_place=place)
        out, lse = out[0].transpose(0, 1), lse[0]  # (1, Hq, total, Dv) -> (total, Hq, Dv); lse (Hq, total)
    else:
        keep = [m.to(q.device) for m in
                varlen_dropout_keep_reference(int(seed.item()), cu_q, cu_k, q.shape[1], call.dropout_p, place)]
        out, lse = varlen_attention_reference(
            q, k, v, cu_q, cu_k, window=call.band, scale=call.scale, alibi_slopes=call.alibi_slopes,
            softcap=call.softcap, dropout_p=call.dropout_p, dropout_masks=keep, sinks=call.sinks, return_lse=True,
            upcast=True)
    return (out, lse) if call.return_lse else out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, group=None, *, causal: bool = False,
                     scale: Optional[float] = None, window: Optional[tuple] = None,
                     alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                     dropout_p: float = 0.0, sinks: Optional[Tensor] = None, return_lse: bool = False):
    """Exact attention over packed documents whose token stream is sharded across ``group``.

    Collective: every rank calls it with its contiguous shard of the packed tokens (rank 0
    the first, shards of any lengths >= 1) and the same ``cu_seqlens``.

    Args:
        q: (T_local, Hq, D), k: (T_local, Hkv, D), v: (T_local, Hkv, Dv): this rank's tokens,
            FlashAttention's packed layout; Hq a multiple of Hkv. Heads and dims agree across ranks.
        cu_seqlens: int32 (B+1,) offsets of the WHOLE batch's documents in the packed stream
            (0 first, the total of every rank's T_local last), the same on every rank. It is
            read on the host (one copy per call).
        group: the ranks: None (the default group), a ProcessGroup, or a 1-D DeviceMesh.
        causal, scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap, dropout_p, sinks: as
            ``flash_attention_varlen``, per document over its global positions. Without
            causal, a document cut by the shard's end gets zero query rows up to its last key
            used (its end, or the window's right edge past the shard), so its queries keep
            their positions; they cost compute, not results. Dropout takes one seed from
            torch's generator on the device and draws this rank's rows of the mask that
            ``flash_attention_varlen`` on the kernels draws on the whole batch under the same
            ``torch.manual_seed`` (the kernels, or the reference with their mask).
        return_lse: also return the lse (Hq, T_local), float32.

    Returns:
        out (T_local, Hq, Dv) in q's dtype, or (out, lse). Differentiable in q, k, v and sinks
        (the sinks' gradient is this rank's share: sum it over the ranks).

    Raises:
        ValueError: torch.distributed not initialised; cu_seqlens not int32 (B+1,), not
            starting at 0, decreasing, or not ending at the ranks' total; a rank with no
            tokens; heads or dims that differ across ranks; what ``flash_attention_varlen``
            raises for the local call.

    Equivalent code (on the gathered packed tensors)::

        fastattn.flash_attention_varlen(q_all, k_all, v_all, cu_seqlens, cu_seqlens, causal=causal, ...)
    """
    op = "varlen_attention"
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: torch.distributed is not initialised (call init_process_group first)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a 3-D (tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (k.shape[0] == v.shape[0] == q.shape[0]):
        raise ValueError(f"{op}: q, k and v must hold the same tokens, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    group = process_group(op, group)
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be an int32 (B+1,) tensor")
    _shape_check(op, group, q.device, q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[2],
                 v_dim=v.shape[2])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([q.shape[0]], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    lengths = [int(t) for t in every]
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(a > b for a, b in zip(cu, cu[1:])) or cu[-1] != sum(lengths):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to the ranks' total of {sum(lengths)} tokens "
                         f"(shards {lengths}), got {cu}")
    if min(lengths) == 0:
        raise ValueError(f"{op}: every rank must hold at least one token, got shards of {lengths}")
    start = sum(lengths[:rank])
    tokens = q.shape[0]
    right = window[1] if isinstance(window, tuple) and len(window) == 2 else None  # the op validates it
    docs, cu_q, cu_k, lo, hi, pad = _local_documents(cu, start, start + tokens, causal, right)
    k_all, v_all = (_GatherRows.apply(t, group, lengths, rank) for t in (k, v))
    offsets = [torch.tensor(c, dtype=torch.int32, device=q.device) for c in (cu_q, cu_k)]
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        alibi_slopes = alibi_slopes[docs[0]:docs[-1] + 1]  # this rank's documents' rows
    if pad:  # zero rows, dropped below: their zero gradient adds nothing to dK/dV
        q = torch.cat([q, q.new_zeros(pad, *q.shape[1:])])
    options = dict(causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                   dropout_p=dropout_p, sinks=sinks, return_lse=return_lse)
    if dropout_p:  # validated by the call below
        # One process's seed (the same draw on every rank), and this rank's place in the whole
        # batch's packed (Hq, total, total) scores: local row t is packed row start + t (the
        # padded rows too: they end at hi <= total), and every document's keys here start at
        # its first key, as one process counts them.
        seed = torch.randint(0, 2**62, (1,), device=q.device)
        place = (0, q.shape[1], start, cu[-1], 0, cu[-1])
        out = _dropout_attention(q, k_all[lo:hi], v_all[lo:hi], *offsets, seed, place, **options)
    else:
        out = flash_attention_varlen(q, k_all[lo:hi], v_all[lo:hi], *offsets, **options)
    if not pad:
        return out
    return (out[0][:tokens], out[1][:, :tokens]) if return_lse else out[:tokens]

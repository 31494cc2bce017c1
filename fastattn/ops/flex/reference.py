"""Plain-PyTorch FlexAttention: the spec, the float64 test oracle and the CPU fallback.

The user's mods run on materialised scores, with position tensors shaped to broadcast:
``b`` (B, 1, 1, 1), ``h`` (1, Hq, 1, 1), ``q_idx`` (1, 1, rows, 1), ``kv_idx`` (1, 1, 1, Lk)
(int64), so ``bias[h, q_idx - kv_idx]`` or ``document_id[q_idx] == document_id[kv_idx]`` index as
they do in torch's own flex_attention. A pair (i, j) is kept iff its block is full in the
BlockMask, or partial and ``mask_mod`` keeps it. The work goes in chunks of query rows, so
memory is O(chunk * Lk), never (Lq, Lk) when a chunk is given.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from fastattn.ops.flex.blocks import Blocks, all_blocks, dense_block_kinds


def _positions(b: int, h: int, rows: range, lk: int, device):
    return (torch.arange(b, device=device).view(-1, 1, 1, 1), torch.arange(h, device=device).view(1, -1, 1, 1),
            torch.arange(rows.start, rows.stop, device=device).view(1, 1, -1, 1),
            torch.arange(lk, device=device).view(1, 1, 1, -1))


def chunk_logits(q: Tensor, k: Tensor, score_mod: Optional[Callable], blocks: Blocks, scale: float,
                 rows: range) -> tuple[Tensor, Tensor]:
    """(logits, keep) of query rows ``rows``: logits (B, Hq, len(rows), Lk) = score_mod(q.k *
    scale) in q's dtype promoted with whatever the mod reads, -inf where not kept; keep bool.
    q (B, Hq, Lq, D) and k (B, Hq, Lk, D) (GQA already expanded)."""
    bsz, h, _, _ = q.shape
    lk = k.shape[2]
    s = q[:, :, rows.start:rows.stop] @ k.transpose(-1, -2) * scale
    b_idx, h_idx, q_idx, kv_idx = _positions(bsz, h, rows, lk, q.device)
    if score_mod is not None:
        s = score_mod(s, b_idx, h_idx, q_idx, kv_idx).expand_as(s)
    first, last = rows.start // blocks.q_block, -(-rows.stop // blocks.q_block)
    partial, full = dense_block_kinds(blocks, slice(first, last))

    def spread(t: Tensor) -> Tensor:  # block level -> the chunk's (rows, Lk) elements
        t = t.repeat_interleave(blocks.q_block, 2).repeat_interleave(blocks.kv_block, 3)
        offset = rows.start - first * blocks.q_block
        return t[:, :, offset:offset + len(rows), :lk]

    keep = spread(full)
    if blocks.mask_mod is None:
        keep = keep | spread(partial)
    else:
        kept = blocks.mask_mod(b_idx, h_idx, q_idx, kv_idx).to(torch.bool)
        keep = keep | (spread(partial) & kept)
    return s.masked_fill(~keep, float("-inf")), keep


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], blocks: Blocks, scale: float,
                     rows: range) -> tuple[Tensor, Tensor]:
    s, _ = chunk_logits(q, k, score_mod, blocks, scale, rows)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    # A row with every key masked: lse -inf, probabilities 0 (not NaN).
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")))
    return p.to(v.dtype) @ v, lse[..., 0]


def flex_reference(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], blocks: Blocks, scale: float,
                   *, chunk: Optional[int] = None, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv) in q's dtype, lse float32 (B, Hq, Lq), natural log) of
    FlexAttention; a row with no kept key gives out 0 and lse -inf. Differentiable through
    q, k, v and the tensors the mods capture. ``chunk``: query rows per step (default all), each
    step checkpointed when differentiating (its scores are recomputed in the backward), so
    the backward's memory is O(chunk * Lk) too; ``upcast``: compute in float32 for 16-bit
    inputs. q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Hq a multiple of Hkv."""
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    k, v = _expand_kv(q, k, v)
    lq = q.shape[2]
    step = lq if chunk is None else max(chunk, 1)
    outs, lses = [], []
    for start in range(0, lq, step):
        rows = range(start, min(start + step, lq))
        if chunk is not None and torch.is_grad_enabled():
            out, lse = torch.utils.checkpoint.checkpoint(_chunk_attention, q, k, v, score_mod, blocks, scale, rows,
                                                         use_reentrant=False)
        else:
            out, lse = _chunk_attention(q, k, v, score_mod, blocks, scale, rows)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2).to(dtype), torch.cat(lses, 2).float()


def capture_grads(q: Tensor, k: Tensor, v: Tensor, do: Tensor, score_mod: Callable, blocks: Blocks,
                  scale: float, captures: list[Tensor], chunk: int) -> list[Tensor]:
    """Gradients of the loss with respect to ``captures`` (floating tensors score_mod reads):
    per chunk of query rows, the logits t = score_mod(q.k * scale) are recomputed in fp32 over
    whole rows, with p = softmax(t), dP = dO V^T and dt = p * (dP - rowsum(p * dP)), and autograd
    takes dt back through score_mod alone. rowsum(p * dP) equals the usual delta = rowsum(dO *
    O) in exact arithmetic but not when O was rounded to 16 bits: a bias shared by a whole row
    (per head, per sequence) has a gradient near 0 that the rounded delta would swamp. Chunks
    are summed in order, under torch's deterministic algorithms: bitwise repeatable. Memory is
    O(B * Hq * chunk * Lk)."""
    q, k, v, do = (t.detach().float() for t in (q, k, v, do))
    k, v = _expand_kv(q, k, v)
    total = [torch.zeros_like(c, dtype=torch.float32) for c in captures]
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: cuBLAS matmuls only warn; what matters here, index backward's scatter-add, then
    # takes torch's sorted (deterministic) path instead of atomics.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for start in range(0, q.shape[2], chunk):
            rows = range(start, min(start + chunk, q.shape[2]))
            with torch.enable_grad():
                t, keep = chunk_logits(q, k, score_mod, blocks, scale, rows)
                lse = torch.logsumexp(t.detach(), dim=-1, keepdim=True)
                p = torch.exp(t.detach() - lse.masked_fill(lse == float("-inf"), float("inf")))
                dp = do[:, :, start:rows.stop] @ v.transpose(-1, -2)
                dt = torch.where(keep, p * (dp - (p * dp).sum(-1, keepdim=True)), 0.0)
                grads = torch.autograd.grad(t, captures, dt.to(t.dtype), allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.float()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    return [g.to(c.dtype) for g, c in zip(total, captures)]


def sequence_mods(score_mod: Optional[Callable], mask_mod: Optional[Callable], seq: int):
    """The mods of packed sequence ``seq`` run on that sequence alone: ``b`` becomes ``b + seq``
    (the kernels pass the sequence as b), positions are already local."""
    score = None if score_mod is None else (lambda s, b, h, q_idx, kv_idx: score_mod(s, b + seq, h, q_idx, kv_idx))
    mask = None if mask_mod is None else (lambda b, h, q_idx, kv_idx: mask_mod(b + seq, h, q_idx, kv_idx))
    return score, mask


def _bounds(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def varlen_flex_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          score_mod: Optional[Callable], mask_mod: Optional[Callable], scale: float, *,
                          chunk: Optional[int] = None, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """FlexAttention over packed sequences, one sequence at a time (``flex_reference``): q
    (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_seqlens int (B + 1,). The
    mods see b = the sequence and positions local to it; mask_mod applies to every pair.
    Returns out (total_q, Hq, Dv) in q's dtype and lse float32 (Hq, total_q)."""
    outs, lses = [], []
    for seq, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_seqlens_q), _bounds(cu_seqlens_k))):
        qs, ks, vs = (t[a:e].transpose(0, 1)[None] for t, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        if q1 == q0:
            outs.append(q.new_zeros(0, q.shape[1], v.shape[-1]))
            lses.append(q.new_zeros(q.shape[1], 0, dtype=torch.float32))
            continue
        score, mask = sequence_mods(score_mod, mask_mod, seq)
        blocks = all_blocks(1, q.shape[1], q1 - q0, k1 - k0, q.device, mask)
        out, lse = flex_reference(qs, ks, vs, score, blocks, scale, chunk=chunk, upcast=upcast)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def varlen_capture_grads(q: Tensor, k: Tensor, v: Tensor, do: Tensor, score_mod: Callable, blocks: Blocks,
                         scale: float, captures: list[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         chunk_elements: int) -> list[Tensor]:
    """``capture_grads`` over packed sequences: q, k, v, do (1, H, total, D) views;
    ``blocks.mask_mod`` applies to every pair. Sequences are summed in order."""
    total = [torch.zeros_like(c, dtype=torch.float32) for c in captures]
    h = q.shape[1]
    for seq, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_seqlens_q), _bounds(cu_seqlens_k))):
        if q1 == q0 or k1 == k0:
            continue
        score, mask = sequence_mods(score_mod, blocks.mask_mod, seq)
        seq_blocks = all_blocks(1, h, q1 - q0, k1 - k0, q.device, mask)
        chunk = max(1, chunk_elements // (h * (k1 - k0)))
        chunk = -(-chunk // seq_blocks.q_block) * seq_blocks.q_block
        grads = capture_grads(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], do[:, :, q0:q1], score, seq_blocks,
                              scale, captures, chunk)
        for acc, g in zip(total, grads):
            acc += g.float()
    return [g.to(c.dtype) for g, c in zip(total, captures)]

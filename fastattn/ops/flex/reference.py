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
from torch import Tensor

from fastattn.ops.flex.blocks import Blocks, dense_block_kinds


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


def flex_reference(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], blocks: Blocks, scale: float,
                   *, chunk: Optional[int] = None, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv) in q's dtype, lse float32 (B, Hq, Lq), natural log) of
    FlexAttention; a row with no kept key gives out 0 and lse -inf. Differentiable through
    q, k, v and the tensors the mods capture. ``chunk``: query rows per step (default all);
    ``upcast``: compute in float32 for 16-bit inputs. q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v
    (B, Hkv, Lk, Dv), Hq a multiple of Hkv."""
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    k, v = _expand_kv(q, k, v)
    lq = q.shape[2]
    step = lq if chunk is None else max(chunk, 1)
    outs, lses = [], []
    for start in range(0, lq, step):
        rows = range(start, min(start + step, lq))
        s, _ = chunk_logits(q, k, score_mod, blocks, scale, rows)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        # A row with every key masked: lse -inf, probabilities 0 (not NaN).
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")))
        outs.append((p.to(v.dtype) @ v))
        lses.append(lse[..., 0])
    return torch.cat(outs, 2).to(dtype), torch.cat(lses, 2).float()


def capture_grads(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor,
                  score_mod: Callable, blocks: Blocks, scale: float, captures: list[Tensor],
                  chunk: int) -> list[Tensor]:
    """Gradients of the loss with respect to ``captures`` (floating tensors score_mod reads),
    from the forward's lse and delta = rowsum(dO * O) (B, Hq, Lq) float32: per chunk of query
    rows, the logits t = score_mod(q.k * scale) are recomputed in fp32, dt = p * (dP - delta)
    with p = exp(t - lse), and autograd takes dt back through score_mod alone. Chunks are
    summed in order, under torch's deterministic algorithms: bitwise repeatable. Memory is
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
                lse_c = lse[:, :, start:rows.stop, None]
                p = torch.exp(t.detach() - lse_c.masked_fill(lse_c == float("-inf"), float("inf")))
                dp = do[:, :, start:rows.stop] @ v.transpose(-1, -2)
                dt = torch.where(keep, p * (dp - delta[:, :, start:rows.stop, None]), 0.0)
                grads = torch.autograd.grad(t, captures, dt.to(t.dtype), allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.float()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    return [g.to(c.dtype) for g, c in zip(total, captures)]

"""The flex family's one entry below ``fastattn.flex_attention``: checks the call, asks the router
where it goes and runs it there.

    route        flex_attention                         flex_attention_varlen
    kernel       ops/flex/op.py                         the same, packed
    reference    reference.flex_reference (chunked)     reference.varlen_flex_reference (per sequence)

The kernels take the flash family's inputs (``backend.route(..., "flash", ...)``). A mod the
translator cannot take raises ValueError under ``use_backend("triton")``; under "auto" the call
runs the chunked reference instead (O(chunk * Lk) memory, never (Lq, Lk)).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from torch.nn.attention.flex_attention import BlockMask

from fastattn import backend
from fastattn.ops.flex import blocks as flex_blocks
from fastattn.ops.flex import compiled
from fastattn.ops.flex.reference import flex_reference, varlen_flex_reference
from fastattn.validation import check_qkv, check_varlen, default_scale, shape_str

FALLBACK_CHUNK_ELEMENTS = 1 << 24  # scores per query chunk of the reference fallback


def _check(op: str, q: Tensor, k: Tensor, v: Tensor, score_mod, scale, enable_gqa) -> float:
    check_qkv(op, q, k, v)
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"{op}: q {shape_str(q)} has {q.shape[1]} heads and k {shape_str(k)} {k.shape[1]}; pass "
                         f"enable_gqa=True for grouped-query attention")
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"{op}: score_mod must be callable (score, b, h, q_idx, kv_idx) or None, got "
                         f"{type(score_mod).__name__}")
    return default_scale(q.shape[-1], scale)


def run(op: str, q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], block_mask, scale,
        enable_gqa: bool, return_lse: bool):
    """out (B, Hq, Lq, Dv), or (out, lse float32 (B, Hq, Lq)) with ``return_lse``. Under
    torch.compile, mods that are plain functions (no closure cells) that translate and capture
    no tensor, with a torch BlockMask or none, run as ``compiled.py``'s custom ops (fullgraph=True
    works); any other call is a graph break that runs ``run_eager``."""
    mask_mod = block_mask.mask_mod if isinstance(block_mask, BlockMask) else None
    if torch.compiler.is_compiling() and (block_mask is None or isinstance(block_mask, BlockMask)) \
            and compiled.plain_mod(score_mod) and compiled.plain_mod(mask_mod):
        key = compiled.mods_key(score_mod, mask_mod)
        if key >= 0:
            scale = _check(op, q, k, v, score_mod, scale, enable_gqa)
            out, lse = compiled.flex_attention(q, k, v, block_mask, key, scale, enable_gqa)
            return (out, lse) if return_lse else out
    return run_eager(op, q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse)


# torch.compile runs these eagerly (a graph break): the mods are traced by the translator, not by
# dynamo, and the kernels launch as they do without it. fullgraph=True refuses such a call.
@torch.compiler.disable
def run_eager(op: str, q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], block_mask, scale,
              enable_gqa: bool, return_lse: bool):
    """``run`` outside torch.compile.

    Raises:
        ValueError: bad inputs (named), a block_mask for other shapes, or, under
            ``use_backend("triton")``, a call the kernels cannot take (a mod they cannot
            translate, a BLOCK_SIZE that is not a multiple of 16)."""
    scale = _check(op, q, k, v, score_mod, scale, enable_gqa)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if block_mask is None:
        blocks = flex_blocks.all_blocks(b, h, lq, lk, q.device)
    else:
        blocks = flex_blocks.from_block_mask(op, block_mask, b, h, lq, lk, q.device)
    route = backend.route(op, "flash", q, k, v)
    out = None
    if route.impl == "kernel":
        from fastattn.ops.flex import op as flex_op  # imports triton, so only when used

        try:
            tr = flex_op.prepare(q, v, score_mod, blocks)
        except ValueError:
            if backend.current_backend() == "triton":
                raise
        else:
            out, lse = flex_op.flex_attn(q, k, v, score_mod, blocks, scale, tr)
    if out is None:
        chunk = max(blocks.q_block, FALLBACK_CHUNK_ELEMENTS // max(1, b * h * lk)) // blocks.q_block * blocks.q_block
        out, lse = flex_reference(q, k, v, score_mod, blocks, scale, chunk=chunk, upcast=True)
    return (out, lse) if return_lse else out


def _check_mod(op: str, name: str, mod) -> None:
    if mod is not None and not callable(mod):
        raise ValueError(f"{op}: {name} must be callable or None, got {type(mod).__name__}")


@torch.compiler.disable
def run_varlen(op: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               max_seqlen_q, max_seqlen_k, score_mod: Optional[Callable], mask_mod: Optional[Callable], scale,
               return_lse: bool):
    """out (total_q, Hq, Dv), or (out, lse float32 (Hq, total_q)) with ``return_lse``.

    Raises:
        ValueError: as ``check_varlen`` (named arguments), a mod that is not callable, or, under
            ``use_backend("triton")``, a mod the kernels cannot translate."""
    check_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_mod(op, "score_mod", score_mod)
    _check_mod(op, "mask_mod", mask_mod)
    scale = default_scale(q.shape[-1], scale)
    views = tuple(t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, total, D)
    h = q.shape[1]
    blocks = flex_blocks.all_blocks(1, h, q.shape[0], k.shape[0], q.device, mask_mod)
    route = backend.route(op, "flash", *views)
    if route.impl == "kernel":
        from fastattn.ops.flex import op as flex_op  # imports triton, so only when used

        try:
            tr = flex_op.prepare(views[0], views[2], score_mod, blocks)
        except ValueError:
            if backend.current_backend() == "triton":
                raise
        else:
            out, lse = flex_op.flex_attn(*views, score_mod, blocks, scale, tr, cu_seqlens_q, cu_seqlens_k)
            out, lse = out[0].transpose(0, 1), lse[0]  # (1, Hq, total, Dv) -> (total, Hq, Dv); lse (Hq, total)
            return (out, lse) if return_lse else out
    chunk = max(1, FALLBACK_CHUNK_ELEMENTS // max(1, h * k.shape[0]))
    out, lse = varlen_flex_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, score_mod, mask_mod, scale,
                                     chunk=-(-chunk // flex_blocks.DEFAULT_BLOCK) * flex_blocks.DEFAULT_BLOCK,
                                     upcast=True)
    return (out, lse) if return_lse else out

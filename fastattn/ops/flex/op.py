"""Launchers and autograd for the flex kernels.

``prepare`` translates the mods (``translate.py``) and checks the tiles against the BlockMask;
``flex_attn`` launches the forward and records an autograd node whose backward runs the dQ and
dK/dV kernels. The gradients of floating tensors that score_mod captures come from
``reference.capture_grads`` (chunked, deterministic), not from the kernels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
from torch import Tensor

from fastattn.ops import _launch
from fastattn.ops.flex import kernels
from fastattn.ops.flex.blocks import Blocks
from fastattn.ops.flex.reference import capture_grads, varlen_capture_grads
from fastattn.ops.flex.translate import Translation, translate

CAPTURE_CHUNK_ELEMENTS = 1 << 24  # scores per chunk of the capture-gradient pass (64 MB fp32)


def _tile(preferred: int, block: int, side: str) -> int:
    """The largest power of two <= ``preferred`` that divides the mask's ``block`` (>= 16).

    Raises:
        ValueError: no such tile (the BlockMask's BLOCK_SIZE has no power-of-two factor >= 16)."""
    tile = preferred
    while tile >= 16 and block % tile:
        tile //= 2
    if tile < 16:
        raise ValueError(f"flex_attention: the block_mask's {side} BLOCK_SIZE {block} must be a multiple of 16 "
                         f"for the kernels' tiles")
    return tile


# sm_90's forward at d128 with a mod: the flash feature tiles (64 x 64, 4 warps) spill 80 bytes
# with a document mask and a relative bias (tests/sm90.py flex-bfloat16-d128-document-relbias);
# 128 x 32 with 8 warps and 2 stages spills none (202 registers, 82,176 B shared).
_FWD_TILES = {("sm90", 128): _launch.Tiles(128, 32, 8, 2), ("sm100", 128): _launch.Tiles(128, 32, 8, 2)}


def _tiles(q: Tensor, v: Tensor, blocks: Blocks, kernel: str) -> list:
    """The launch candidates (``_launch.candidates`` with the feature tiles, most preferred
    first), each shrunk to divide the BlockMask's blocks."""
    head_dim = max(q.shape[-1], v.shape[-1])
    first = _FWD_TILES.get((_launch.tier(q.device), _launch.pad(head_dim))) if kernel == "fwd" else None
    if q.dtype == torch.float32:
        first = None  # fp32 takes candidates' own halved tiles
    out = []
    for t in ([first] if first else []) + _launch.candidates(head_dim, q.dtype, kernel, q.device, False, True):
        t = t._replace(block_m=_tile(t.block_m, blocks.q_block, "query"),
                       block_n=_tile(t.block_n, blocks.kv_block, "key"))
        if t not in out:
            out.append(t)
    return out


def _mask_args(blocks: Blocks, transposed: bool) -> tuple:
    """(LISTS, list_strides) kernel arguments of one direction of the block lists: the four
    tensors (NUM, IDX, FULL_NUM, FULL_IDX) and a tuple of their stride tuples."""
    lists = tuple(blocks[4:8] if transposed else blocks[0:4])
    return lists, tuple(t.stride() for t in lists)


def _meta(q: Tensor, v: Tensor, tr: Translation, blocks: Blocks, tiles, varlen: bool) -> dict:
    return dict(SCORE_MOD=tr.score_mod, MASK_MOD=tr.mask_mod, HAS_MASK=blocks.mask_mod is not None,
                HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], Q_BLOCK=blocks.q_block, KV_BLOCK=blocks.kv_block,
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=_launch.pad(q.shape[-1]),
                BLOCK_DV=_launch.pad(v.shape[-1]), VARLEN=varlen, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages, **_launch.dtype_flags(q.dtype))


def _grid(rows: Tensor, heads: int, batch: int, block: int, cu_seqlens: Optional[Tensor]):
    """(grid, BLOCKS) of a kernel over blocks of ``block`` rows of (B, H, L, D) ``rows``: grid
    (L blocks, heads, B); packed (VARLEN), (blocks of every sequence, heads, 1) and BLOCKS, int32
    (programs, 2): each program's (sequence, first row in it), -1 past the last block, computed
    on the device (no length read on the host). A sequence of n rows has at most n / block + 1
    blocks, so cdiv(total, block) + B programs cover every packing."""
    if cu_seqlens is None:
        return (triton.cdiv(rows.shape[2], block), heads, batch), rows  # rows: an unused stand-in
    programs = triton.cdiv(rows.shape[2], block) + batch
    ends = torch.cumsum((cu_seqlens.diff() + block - 1) // block, 0)  # one past each sequence's last block
    pid = torch.arange(programs, device=rows.device)
    seq = torch.searchsorted(ends, pid, right=True)
    starts = torch.cat([ends.new_zeros(1), ends])
    first = ((pid - starts[seq]) * block).clamp_(min=0)
    return (programs, heads, 1), torch.stack([torch.where(seq < batch, seq, -1), first], 1).to(torch.int32)


def _strides(t: Tensor, varlen: bool) -> tuple:
    """t's strides for the kernels: a packed (1, H, total, D) view's batch stride is 0."""
    return (0, *t.stride()[1:]) if varlen else t.stride()


def _captures(tr: Translation, q: Tensor) -> tuple:
    """(CAP, DIMS) kernel arguments: bool captures read as bytes; q stands in when there are none
    (Triton takes no empty tuple)."""
    caps = tuple(t.view(torch.uint8) if t.dtype == torch.bool else t.detach() for t in tr.captures)
    return caps or (q,), tr.dims or (0,)


@_launch.on_device
def forward(q, k, v, tr: Translation, blocks: Blocks, scale: float, cu_seqlens=(None, None),
            visits: Optional[Tensor] = None):
    """(out (B, Hq, Lq, Dv), lse float32 (B, Hq, Lq)). Packed sequences: q, k, v (1, H, total, D)
    views and ``cu_seqlens`` (cu_seqlens_q, cu_seqlens_k) int32 (B + 1,); out is stored as
    (total, Hq, Dv) contiguous and viewed as (1, Hq, total, Dv). ``visits``: int32 (B * Hq *
    query tiles,) that gets the number of key tiles each program visited (for tests)."""
    _, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    varlen = cu_seqlens[0] is not None
    batch = cu_seqlens[0].numel() - 1 if varlen else q.shape[0]
    if varlen:
        out = _launch.empty(lq, h, v.shape[-1], like=q).transpose(0, 1)[None]
    else:
        out = _launch.empty(*q.shape[:3], v.shape[-1], like=q)
    lse = _launch.empty(*q.shape[:3], like=q, dtype=torch.float32)
    lists, list_strides = _mask_args(blocks, False)
    cap, dims = _captures(tr, q)
    cu_q, cu_k = cu_seqlens if varlen else (q, q)  # q stands in for the unused pointers

    def launch(tiles):
        grid, blocks_ptr = _grid(q, h, batch, tiles.block_m, cu_seqlens[0])
        kernels.flex_fwd_kernel[grid](
            q, k, v, out, lse, q if visits is None else visits, lists, cu_q, cu_k, blocks_ptr, cap, dims,
            *(_strides(t, varlen) for t in (q, k, v, out, lse)), list_strides,
            h, h // hkv, lq, lk, scale, COUNT_VISITS=visits is not None, **_meta(q, v, tr, blocks, tiles, varlen))

    _launch.first_fit(kernels.flex_fwd_kernel, q.device, _tiles(q, v, blocks, "fwd"), launch,
                      key=(q.dtype, q.shape[-1], v.shape[-1], tr.source, blocks.q_block, blocks.kv_block, varlen))
    return out, lse


@_launch.on_device
def backward(do, q, k, v, out, lse, tr: Translation, blocks: Blocks, scale: float, cu_seqlens=(None, None)):
    """(dq, dk, dv) in q's, k's, v's shapes and dtypes (dk, dv summed over each GQA group).
    Packed as ``forward``."""
    _, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    varlen = cu_seqlens[0] is not None
    batch = cu_seqlens[0].numel() - 1 if varlen else q.shape[0]
    delta = _launch.softmax_delta(do, out)
    dq, dk, dv = (_launch.empty(*t.shape, like=t) for t in (q, k, v))
    cap, dims = _captures(tr, q)
    fwd_lists, fwd_strides = _mask_args(blocks, False)
    bwd_lists, bwd_strides = _mask_args(blocks, True)
    cu_q, cu_k = cu_seqlens if varlen else (q, q)
    q_k_v_do_lse = tuple(_strides(t, varlen) for t in (q, k, v, do, lse))
    key = (q.dtype, q.shape[-1], v.shape[-1], tr.source, blocks.q_block, blocks.kv_block, varlen)

    def launch_dq(tiles):
        grid, blocks_ptr = _grid(q, h, batch, tiles.block_m, cu_seqlens[0])
        kernels.flex_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, fwd_lists, cu_q, cu_k, blocks_ptr, cap, dims,
            *q_k_v_do_lse, _strides(dq, varlen), fwd_strides,
            h, h // hkv, lq, lk, scale, SCORE_GRAD=tr.score_grad, **_meta(q, v, tr, blocks, tiles, varlen))

    _launch.first_fit(kernels.flex_bwd_dq_kernel, q.device, _tiles(q, v, blocks, "dq"), launch_dq, key=key)
    for grads in _launch.key_grads(max(q.shape[-1], v.shape[-1])):
        def launch_dkdv(tiles, grads=grads):
            grid, blocks_ptr = _grid(k, hkv, batch, tiles.block_n, cu_seqlens[1])
            kernels.flex_bwd_dkdv_kernel[grid](
                q, k, v, do, lse, delta, dk, dv, bwd_lists, cu_q, cu_k, blocks_ptr, cap, dims,
                *q_k_v_do_lse, _strides(dk, varlen), _strides(dv, varlen), bwd_strides,
                hkv, h // hkv, lq, lk, scale, SCORE_GRAD=tr.score_grad, **grads,
                **_meta(q, v, tr, blocks, tiles, varlen))

        _launch.first_fit(kernels.flex_bwd_dkdv_kernel, q.device, _tiles(q, v, blocks, "dkdv"), launch_dkdv,
                          key=(*key, tuple(grads.items())))
    return dq, dk, dv


class _Flex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, score_mod, tr, blocks, scale, cu_seqlens_q, cu_seqlens_k, *captures):
        out, lse = forward(q, k, v, tr, blocks, scale, (cu_seqlens_q, cu_seqlens_k))
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.score_mod, ctx.tr, ctx.blocks, ctx.scale = score_mod, tr, blocks, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # dlse is not propagated: lse is returned for merging partial results, not for training.
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = backward(dout, q, k, v, out, lse, ctx.tr, ctx.blocks, ctx.scale, (cu_q, cu_k))
        caps = ctx.tr.captures
        want = [i for i, need in enumerate(ctx.needs_input_grad[9:]) if need]
        grads = [None] * len(caps)
        if want:
            args = (q, k, v, dout, ctx.score_mod, ctx.blocks, ctx.scale, [caps[i] for i in want])
            if cu_q is None:
                chunk = max(1, CAPTURE_CHUNK_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[2]))
                got = capture_grads(*args, chunk=-(-chunk // ctx.blocks.q_block) * ctx.blocks.q_block)
            else:
                got = varlen_capture_grads(*args, cu_q, cu_k, CAPTURE_CHUNK_ELEMENTS)
            for i, g in zip(want, got):
                grads[i] = g
        return (dq, dk, dv, None, None, None, None, None, None, *grads)


def prepare(q: Tensor, v: Tensor, score_mod: Optional[Callable], blocks: Blocks) -> Translation:
    """The translation of the mods, once the kernels' tiles are known to suit the BlockMask.

    Raises:
        ValueError: a mod cannot be translated (the message names the construct), captures a
            tensor on another device than q, or the BlockMask's block sizes have no power-of-two
            factor >= 16 for the tiles."""
    for kernel in ("fwd", "dq", "dkdv"):
        _tiles(q, v, blocks, kernel)
    tr = translate(score_mod, blocks.mask_mod)
    for t in tr.captures:
        if t.device != q.device:
            raise ValueError(f"flex_attention: a mod captures a tensor of shape {tuple(t.shape)} on {t.device}, "
                             f"but the inputs are on {q.device}; the kernels read captured tensors in place")
    return tr


def flex_attn(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[Callable], blocks: Blocks, scale: float,
              tr: Translation, cu_seqlens_q: Optional[Tensor] = None,
              cu_seqlens_k: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Validated inputs and ``prepare``'s translation -> (out, lse), differentiable through q,
    k, v and the floating tensors score_mod captures. Packed sequences: q, k, v (1, H, total, D)
    views and int32 ``cu_seqlens_q/k`` (B + 1,); the mods then see b = the sequence and
    positions local to it, and ``blocks.mask_mod`` applies to every pair."""
    return _Flex.apply(q, k, v, score_mod, tr, blocks, scale, cu_seqlens_q, cu_seqlens_k, *tr.captures)

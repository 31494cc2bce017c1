"""Launchers, torch.library registration and autograd for the block-sparse kernels.

``sparse_attn(...)`` is what ``fastattn.functional.sparse_attention`` calls once it has
validated the inputs. Forward and backward are custom ops (``fastattn::sparse_fwd`` and
``fastattn::sparse_bwd``) with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` sees one opaque node per call. The layout travels as its
int32 index tensors (compressed rows and their transpose).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastattn.ops import _launch
from fastattn.ops.sparse import kernels


def _candidates(q: Tensor, v: Tensor, block_size: int, kernel: str) -> list[_launch.Tiles]:
    """The softmax-attention tiles (``_launch.candidates``), clipped to the layout block so a
    tile never straddles two layout blocks; both are powers of two, so they divide it."""
    tiles = _launch.candidates(max(q.shape[-1], v.shape[-1]), q.dtype, kernel, q.device)
    return list(dict.fromkeys(t._replace(block_m=min(t.block_m, block_size), block_n=min(t.block_n, block_size))
                              for t in tiles))


def _meta(q: Tensor, v: Tensor, block_size: int, causal: bool, scale: float, tiles: _launch.Tiles) -> dict:
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    return dict(
        scalars=_launch.logit_scalars(scale),
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=_launch.pad(head_dim), BLOCK_DV=_launch.pad(head_dim_v),
        LAYOUT_BLOCK=block_size, TERMS=_launch.Terms(RIGHT=causal), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **_launch.dtype_flags(q.dtype),
    )


def _layout_stride(index_ptr: Tensor, heads: int, blocks: int) -> int:
    """0 for a layout shared by all heads, else the rows per head."""
    return blocks if index_ptr.numel() - 1 == heads * blocks and heads > 1 else 0


@_launch.on_device
def _forward(q, k, v, crow, col, block_size, scale, causal):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = _launch.empty(b, h, lq, v.shape[-1], like=q)
    lse = _launch.empty(b, h, lq, like=q, dtype=torch.float32)
    stride_h = _layout_stride(crow, h, triton.cdiv(lq, block_size))

    def launch(tiles):
        kernels.sparse_fwd_kernel[(triton.cdiv(lq, tiles.block_m), h, b)](
            q, k, v, out, lse, crow, col,
            q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(),
            h, h // hkv, lq, lk, stride_h, **_meta(q, v, block_size, causal, scale, tiles),
        )

    _launch.first_fit(kernels.sparse_fwd_kernel, q.device, _candidates(q, v, block_size, "fwd"), launch,
                      key=(q.dtype, q.shape[-1], v.shape[-1], causal))
    return out, lse


@_launch.on_device
def _backward(do, q, k, v, out, lse, crow, col, ccol, row, block_size, scale, causal):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    delta = _launch.softmax_delta(do, out)
    dq, dk, dv = (_launch.empty(*t.shape, like=t) for t in (q, k, v))
    args = (q.stride(), k.stride(), v.stride(), do.stride(), lse.stride())
    stride_q = _layout_stride(crow, h, triton.cdiv(lq, block_size))
    stride_k = _layout_stride(ccol, h, triton.cdiv(lk, block_size))
    key = (q.dtype, q.shape[-1], v.shape[-1], causal)
    for grads in _launch.key_grads(max(q.shape[-1], v.shape[-1])):
        def launch_dkdv(tiles, grads=grads):
            kernels.sparse_bwd_dkdv_kernel[(triton.cdiv(lk, tiles.block_n), hkv, b)](
                q, k, v, do, lse, delta, dk, dv, ccol, row, *args, dk.stride(), dv.stride(),
                hkv, h // hkv, lq, lk, stride_k, **grads, **_meta(q, v, block_size, causal, scale, tiles),
            )

        _launch.first_fit(kernels.sparse_bwd_dkdv_kernel, q.device, _candidates(q, v, block_size, "dkdv"),
                          launch_dkdv, key=(*key, tuple(grads.items())))

    def launch_dq(tiles):
        kernels.sparse_bwd_dq_kernel[(triton.cdiv(lq, tiles.block_m), h, b)](
            q, k, v, do, lse, delta, dq, crow, col, *args, dq.stride(),
            h, h // hkv, lq, lk, stride_q, **_meta(q, v, block_size, causal, scale, tiles),
        )

    _launch.first_fit(kernels.sparse_bwd_dq_kernel, q.device, _candidates(q, v, block_size, "dq"), launch_dq, key=key)
    return dq, dk, dv


# Under the interpreter the kernels are plain Python calls on CPU tensors, so these are
# custom_op (opaque to the compiler) rather than triton_op, whose wrap_triton refuses them.

@torch.library.custom_op("fastattn::sparse_fwd", mutates_args=())
def sparse_fwd(q: Tensor, k: Tensor, v: Tensor, crow: Tensor, col: Tensor, ccol: Tensor, row: Tensor,
               block_size: int, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, crow, col, block_size, scale, causal)


@sparse_fwd.register_fake
def _(q, k, v, crow, col, ccol, row, block_size, scale, causal):
    b, h, lq, _ = q.shape
    return q.new_empty(b, h, lq, v.shape[-1]), q.new_empty(b, h, lq, dtype=torch.float32)


@torch.library.custom_op("fastattn::sparse_bwd", mutates_args=())
def sparse_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               crow: Tensor, col: Tensor, ccol: Tensor, row: Tensor,
               block_size: int, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, out, lse, crow, col, ccol, row, block_size, scale, causal)


@sparse_bwd.register_fake
def _(do, q, k, v, out, lse, crow, col, ccol, row, block_size, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, crow, col, ccol, row, block_size, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, crow, col, ccol, row)
    ctx.args = (block_size, scale, causal)


def _sparse_fwd_backward(ctx, dout, dlse):
    # dlse is not propagated: lse is returned for merging partial results, not for training.
    q, k, v, out, lse, crow, col, ccol, row = ctx.saved_tensors
    dq, dk, dv = sparse_bwd(dout, q, k, v, out, lse, crow, col, ccol, row, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


sparse_fwd.register_autograd(_sparse_fwd_backward, setup_context=_setup_context)


def sparse_attn(q, k, v, crow, col, ccol, row, *, block_size: int, scale: float, causal: bool):
    """Validated inputs and the layout's index tensors on q's device -> (out, lse)."""
    return sparse_fwd(q, k, v, crow, col, ccol, row, block_size, scale, causal)

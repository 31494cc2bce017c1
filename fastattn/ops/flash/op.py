"""Launchers, torch.library registration and autograd for the flash kernels.

``flash_attn(...)`` is what ``fastattn.functional`` calls once it has validated the inputs.
The forward and backward are registered as custom ops (``fastattn::flash_fwd`` and
``fastattn::flash_bwd``) with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` sees one opaque node per call instead of breaking the graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from fastattn.backend import gpu_tiles, interpreting
from fastattn.ops.flash import kernels

# (BLOCK_M, BLOCK_N, num_warps) by padded head dim when compiled for a GPU, hand-picked so
# every kernel fits the H100's 227 KB of shared memory (tests/test_flash_compile.py checks
# this without a GPU); per-device autotuning is the H100 issue's work. fp32 tiles take twice
# the bytes, so they get half the query rows. The interpreter runs one program at a time in
# NumPy, where fewer, larger blocks are faster.
_FWD_BLOCKS = {16: (128, 64, 4), 32: (128, 64, 4), 64: (128, 64, 4), 128: (128, 64, 8), 256: (64, 32, 8)}
_BWD_BLOCKS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8), 256: (64, 32, 8)}
_INTERPRETER_BLOCKS = (32, 32, 4)


def block_config(head_dim: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim (the larger of q's and v's)."""
    if not gpu_tiles():
        return _INTERPRETER_BLOCKS
    table = _BWD_BLOCKS if backward else _FWD_BLOCKS
    block_m, block_n, warps = table[max(16, triton.next_power_of_2(head_dim))]
    if dtype == torch.float32:
        block_m = max(32, block_m // 2)
    return block_m, block_n, warps


def _empty(*shape, like: Tensor, dtype=None) -> Tensor:
    """Every output buffer comes from here, so tests can poison them with NaN."""
    return torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so results match torch's on the same GPU.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _band_args(window_left: Optional[int], window_right: Optional[int]) -> dict:
    return dict(
        window_left=0 if window_left is None else window_left,
        window_right=0 if window_right is None else window_right,
        HAS_LEFT=window_left is not None,
        HAS_RIGHT=window_right is not None,
    )


def _bias_args(q: Tensor, bias: Optional[Tensor]):
    """Bias as (tensor, 4 strides, flags). bool masks are read as bytes (same itemsize)."""
    if bias is None:
        return q, (0, 0, 0, 0), dict(HAS_BIAS=False, BIAS_IS_BOOL=False)
    is_bool = bias.dtype == torch.bool
    t = bias.view(torch.uint8) if is_bool else bias
    return t, bias.stride(), dict(HAS_BIAS=True, BIAS_IS_BOOL=is_bool)


def _alibi_args(q: Tensor, alibi: Optional[Tensor]):
    """ALiBi slopes as (B, H) with stride 0 over the batch when given per head only."""
    if alibi is None:
        return q, (0, 0)
    if alibi.dim() == 1:
        alibi = alibi[None]
    alibi = alibi.expand(q.shape[0], q.shape[1])
    return alibi, alibi.stride()


def _common(q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right, backward):
    bias_t, bias_strides, bias_flags = _bias_args(q, bias)
    alibi_t, alibi_strides = _alibi_args(q, alibi)
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    block_m, block_n, warps = block_config(max(head_dim, head_dim_v), q.dtype, backward)
    meta = dict(
        scale=scale, softcap=softcap or 1.0, dropout_p=dropout_p,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        HAS_ALIBI=alibi is not None, HAS_SOFTCAP=bool(softcap), HAS_DROPOUT=dropout_p > 0.0,
        # bf16 dots are wrong under the interpreter; fp32 dots hold the same values exactly.
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        # ... and its fp32 -> bf16 casts truncate; round to nearest as a GPU does.
        BF16_RTNE=interpreting() and q.dtype == torch.bfloat16,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        **bias_flags, **_band_args(window_left, window_right),
    )
    tensors = (bias_t, alibi_t, q if seed is None else seed)
    strides = (*bias_strides, *alibi_strides)
    return tensors, strides, meta


def _forward(q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = _empty(b, h, lq, v.shape[-1], like=q)
    lse = _empty(b, h, lq, like=q, dtype=torch.float32)
    (bias_t, alibi_t, seed_t), strides, meta = _common(
        q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right, False)
    grid = (triton.cdiv(lq, meta["BLOCK_M"]), h, b)
    kernels.attn_fwd_kernel[grid](
        q, k, v, out, lse, bias_t, alibi_t, seed_t,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *strides,
        h, h // hkv, lq, lk, **meta,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, bias, alibi, seed, scale, softcap, dropout_p,
              window_left, window_right, bias_grad):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    # Softmax backward needs rowsum(dO * O) per query row.
    delta = torch.linalg.vecdot(do.float(), out.float()).contiguous()
    dq = _empty(b, h, lq, q.shape[-1], like=q)
    dk = _empty(b, hkv, lk, k.shape[-1], like=k)
    dv = _empty(b, hkv, lk, v.shape[-1], like=v)
    # Zeros, not empty: blocks outside the causal/window band are skipped, and their bias
    # gradient is 0.
    ds = torch.zeros(b, h, lq, lk if bias_grad else 0, device=q.device, dtype=torch.float32)
    (bias_t, alibi_t, seed_t), strides, meta = _common(
        q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right, True)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *strides)
    kernels.attn_bwd_dkdv_kernel[(triton.cdiv(lk, meta["BLOCK_N"]), hkv, b)](
        q, k, v, do, lse, delta, dk, dv, bias_t, alibi_t, seed_t, *args,
        hkv, h // hkv, lq, lk, **meta,
    )
    kernels.attn_bwd_dq_kernel[(triton.cdiv(lq, meta["BLOCK_M"]), h, b)](
        q, k, v, do, lse, delta, dq, ds, bias_t, alibi_t, seed_t, *args,
        h, h // hkv, lq, lk, STORE_DS=bias_grad, **meta,
    )
    return dq, dk, dv, ds


# ---------------------------------------------------------------------------------------
# torch.library registration. Under the interpreter the kernels are plain Python calls on
# CPU tensors, so the ops are custom_op (opaque to the compiler) rather than triton_op,
# whose wrap_triton refuses interpreted kernels.

@torch.library.custom_op("fastattn::flash_fwd", mutates_args=())
def flash_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], alibi: Optional[Tensor],
    seed: Optional[Tensor], scale: float, softcap: float, dropout_p: float,
    window_left: Optional[int], window_right: Optional[int],
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right)


@flash_fwd.register_fake
def _(q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right):
    b, h, lq, _ = q.shape
    return q.new_empty(b, h, lq, v.shape[-1]), q.new_empty(b, h, lq, dtype=torch.float32)


@torch.library.custom_op("fastattn::flash_bwd", mutates_args=())
def flash_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Optional[Tensor], alibi: Optional[Tensor], seed: Optional[Tensor],
    scale: float, softcap: float, dropout_p: float,
    window_left: Optional[int], window_right: Optional[int], bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, out, lse, bias, alibi, seed, scale, softcap, dropout_p,
                     window_left, window_right, bias_grad)


@flash_bwd.register_fake
def _(do, q, k, v, out, lse, bias, alibi, seed, scale, softcap, dropout_p,
      window_left, window_right, bias_grad):
    b, h, lq, _ = q.shape
    ds = q.new_empty(b, h, lq, k.shape[2] if bias_grad else 0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi, seed)
    ctx.args = (scale, softcap, dropout_p, window_left, window_right)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _flash_fwd_backward(ctx, dout, dlse):
    # dlse is not propagated: lse is returned for merging partial results, not for training.
    q, k, v, out, lse, bias, alibi, seed = ctx.saved_tensors
    dq, dk, dv, ds = flash_bwd(dout, q, k, v, out, lse, bias, alibi, seed, *ctx.args, ctx.bias_grad)
    dbias = ds.to(bias.dtype) if ctx.bias_grad else None
    return dq, dk, dv, dbias, None, None, None, None, None, None, None


flash_fwd.register_autograd(_flash_fwd_backward, setup_context=_setup_context)


def flash_attn(q, k, v, *, bias=None, alibi=None, seed=None, scale, softcap=0.0, dropout_p=0.0,
               window_left=None, window_right=None):
    """Validated inputs -> (out, lse). ``bias`` is already expanded to (B, Hq, Lq, Lk)."""
    return flash_fwd(q, k, v, bias, alibi, seed, scale, softcap, dropout_p, window_left, window_right)


def dropout_keep_mask(seed: Tensor, b: int, h: int, lq: int, lk: int, dropout_p: float) -> Tensor:
    """The bool keep-mask (B, H, Lq, Lk) that the kernels draw for ``seed``."""
    keep = _empty(b * h, lq, lk, like=seed, dtype=torch.uint8)
    grid = (triton.cdiv(lq, 32) * triton.cdiv(lk, 32), h, b)
    kernels.dropout_mask_kernel[grid](keep, seed, h, lq, lk, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.view(b, h, lq, lk).bool()

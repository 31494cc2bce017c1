"""Launchers, torch.library registration and autograd for the linear-attention kernels.

``linear_attn(q, k, v, ...)`` is what ``fastattn.functional`` calls once it has validated the
inputs. q/k are the raw inputs of an elementwise feature map (``feature`` = "identity",
"elu", "relu"), which the kernels apply to their tiles; FAVOR+ features are computed in torch
and passed with ``feature="identity"``. Forward and backward are custom ops
(``fastattn::linear_fwd`` / ``fastattn::linear_bwd``) with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` sees one opaque node per call.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
from torch import Tensor

from fastattn._env import gpu_tiles, interpreting
from fastattn.ops import _launch
from fastattn.ops.linear import kernels

FEATURE_CODES = {"identity": 0, "elu": 1, "relu": 2}
MAX_DIM = 256  # features (M) and value dim: one program holds a (M, block) fp32 state

# The state split (BLOCK_F of dQ/dK, BLOCK_DV of out/dV) on a GPU. The interpreter runs one
# program at a time in NumPy, where fewer, larger blocks are faster.
_SPLIT = 64
_INTERPRETER_SPLIT = 64
_INTERPRETER_CHUNK = 32


def block_config(feat_dim: int, head_dim_v: int, dtype: torch.dtype, causal: bool = False,
                 device: Optional[torch.device] = None) -> dict:
    """Chunk length, full and split widths for M features and value dim Dv, num_warps and
    num_stages on ``device``'s GPU (``_launch.arch``; default the current one).
    tests/sm90.py --arch N checks that every kernel fits each GPU's shared memory with these."""
    full_f, full_dv = _launch.pad(feat_dim), _launch.pad(head_dim_v)
    widest = max(full_f, full_dv)
    warps, stages = 4, 3
    if not gpu_tiles():
        chunk, split = _INTERPRETER_CHUNK, _INTERPRETER_SPLIT
    elif dtype == torch.float32 and widest >= 256:
        chunk, split = 16, 32  # fp32 tiles take twice the bytes: fewer rows, narrower state split
    elif dtype == torch.float32 and widest >= 128:
        chunk, split = 32, _SPLIT
    else:
        # 64-row chunks: the (chunk, .) products get wgmma only with M >= 64 (sm_90). A program
        # then holds (64, M) fp32 features (two when causal) and an (M, 64) fp32 state, past
        # 4 warps' 255 registers a thread at M = 256 or causal M >= 64 (tests/sm90.py): 8 warps.
        chunk, split = 64, _SPLIT
        if widest >= 256 or (causal and widest >= 64):
            warps = 8
        if causal and widest >= 256:
            stages = 2  # 3 copies of the causal M = 256 tiles take 272 KB of shared memory, 2 take 200
    tier = _launch.tier(device)
    if tier not in (None, "sm90"):
        # Off sm_90 there is no wgmma to feed, and the causal 64-row chunks ask for 113-205 KB
        # below it (tests/sm90.py --arch 89), 282 KB on sm_100 (tcgen05) at M = 256: 32-row
        # chunks (16 on sm_75's 64 KB, and fp32 at M = 256), 2 stages, and at M = 256 a
        # 32-wide state split (64 wide: 103 KB with 8 warps on sm_89).
        chunk, stages = min(chunk, 16 if tier == "sm75" else 32), 2
        if widest >= 256:
            split = 32
    return dict(chunk=chunk, full_f=full_f, full_dv=full_dv,
                split_f=min(split, full_f), split_dv=min(split, full_dv), num_warps=warps, num_stages=stages)


def _meta(q: Tensor, v: Tensor, feature: str, causal: bool, normalize: bool, varlen: bool) -> tuple[dict, dict]:
    cfg = block_config(q.shape[-1], v.shape[-1], q.dtype, causal, q.device)
    meta = dict(
        FEAT_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_C=cfg["chunk"],
        FEATURE=FEATURE_CODES[feature], CAUSAL=causal, NORMALIZE=normalize, VARLEN=varlen,
        # The fp32 state dots of fp16/bf16 inputs: tf32 (10 mantissa bits, as fp16; torch rounds
        # the state to the input dtype), also under the interpreter, where the operands are
        # rounded as the GPU's tf32 does, so the CPU tests check the GPU's precision ("tf32x3"
        # doubled the loops' instructions and spilled: tests/sm90.py). fp32 inputs: torch's
        # fp32 matmul setting.
        STATE_PRECISION=_launch.precision(torch.float32) if q.dtype == torch.float32
        else "tf32-interpreted" if interpreting() else "tf32",
        # The causal intra-chunk product of fp16 features can overflow fp16: it stays fp32
        # (forward and dV; dQ and dK never round it).
        INTRA_FP32=q.dtype == torch.float16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_launch.dtype_flags(q.dtype),
    )
    return cfg, meta


def _sequences(q: Tensor, cu_seqlens: Optional[Tensor]) -> tuple[int, Tensor]:
    """The grid's sequence count and the offsets the kernels read (a placeholder, never read,
    when the inputs are not packed)."""
    if cu_seqlens is None:
        return q.shape[0], q
    return cu_seqlens.numel() - 1, cu_seqlens


def _out_buffer(b: int, h: int, lq: int, dv: int, like: Tensor, packed: bool) -> Tensor:
    """out (B, Hq, Lq, Dv); packed: a (1, Hq, total, Dv) view of a contiguous (total, Hq, Dv)
    buffer, FlashAttention's layout."""
    if packed:
        return _launch.empty(lq, h, dv, like=like).transpose(0, 1)[None]  # (total, H, Dv) -> (1, H, total, Dv)
    return _launch.empty(b, h, lq, dv, like=like)


@_launch.on_device
def _forward(q, k, v, feature, causal, normalize, eps, cu_seqlens):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = _out_buffer(b, h, lq, v.shape[-1], q, cu_seqlens is not None)
    den = _launch.empty(b, h, lq if normalize else 0, like=q, dtype=torch.float32)
    cfg, meta = _meta(q, v, feature, causal, normalize, cu_seqlens is not None)
    n_seq, cu = _sequences(q, cu_seqlens)
    grid = (triton.cdiv(v.shape[-1], cfg["split_dv"]), h, n_seq)
    kernels.linear_fwd_kernel[grid](
        q, k, v, out, den, eps, cu, q.stride(), k.stride(), v.stride(), out.stride(), den.stride(), eps.stride(),
        h // hkv, lq, lk, BLOCK_F=cfg["full_f"], BLOCK_DV=cfg["split_dv"], **meta)
    return out, den


@_launch.on_device
def _backward(do, q, k, v, out, den, feature, causal, normalize, cu_seqlens):
    b, h, lq, m = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dv_dim = v.shape[-1]
    if normalize:
        # The normaliser's gradient: g_i = -(dout_i . out_i) / d_i.
        g = (-torch.linalg.vecdot(do.float(), out.float()) / den).contiguous()
    else:
        g = den
    cfg, meta = _meta(q, v, feature, causal, normalize, cu_seqlens is not None)
    n_seq, cu = _sequences(q, cu_seqlens)
    dq = _launch.empty(b, h, lq, m, like=q)
    # Key/value gradients per query head in fp32, summed over the GQA group below.
    dk = _launch.empty(b, h, lk, m, like=q, dtype=torch.float32)
    dv = _launch.empty(b, h, lk, dv_dim, like=q, dtype=torch.float32)
    split_f = dict(BLOCK_F=cfg["split_f"], BLOCK_DV=cfg["full_dv"])  # dQ, dK: a block of features each
    split_dv = dict(BLOCK_F=cfg["full_f"], BLOCK_DV=cfg["split_dv"])  # dV: a block of value columns each
    for grad, dx, blocks, n_blocks in ((kernels.GRAD_Q, dq, split_f, triton.cdiv(m, cfg["split_f"])),
                                       (kernels.GRAD_K, dk, split_f, triton.cdiv(m, cfg["split_f"])),
                                       (kernels.GRAD_V, dv, split_dv, triton.cdiv(dv_dim, cfg["split_dv"]))):
        kernels.linear_bwd_kernel[(n_blocks, h, n_seq)](
            q, k, v, do, den, g, dx, cu, q.stride(), k.stride(), v.stride(), do.stride(), den.stride(), dx.stride(),
            h // hkv, lq, lk, GRAD=grad, **blocks, **meta)
    if h != hkv:
        dk = dk.view(b, hkv, h // hkv, lk, m).sum(2)  # (B, Hq, Lk, M) -> (B, Hkv, Lk, M)
        dv = dv.view(b, hkv, h // hkv, lk, dv_dim).sum(2)  # (B, Hq, Lk, Dv) -> (B, Hkv, Lk, Dv)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------
# torch.library registration (custom_op, not triton_op: wrap_triton refuses interpreted
# kernels, and the CI runs them interpreted).

@torch.library.custom_op("fastattn::linear_fwd", mutates_args=())
def linear_fwd(q: Tensor, k: Tensor, v: Tensor, feature: str, causal: bool, normalize: bool,
               eps: Tensor, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, feature, causal, normalize, eps, cu_seqlens)


@linear_fwd.register_fake
def _(q, k, v, feature, causal, normalize, eps, cu_seqlens=None):
    b, h, lq, _ = q.shape
    out = q.new_empty(lq, h, v.shape[-1]).transpose(0, 1)[None] if cu_seqlens is not None \
        else q.new_empty(b, h, lq, v.shape[-1])  # the real buffer's layout (see _out_buffer)
    return out, q.new_empty(b, h, lq if normalize else 0, dtype=torch.float32)


@torch.library.custom_op("fastattn::linear_bwd", mutates_args=())
def linear_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, den: Tensor, feature: str,
               causal: bool, normalize: bool, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, out, den, feature, causal, normalize, cu_seqlens)


@linear_bwd.register_fake
def _(do, q, k, v, out, den, feature, causal, normalize, cu_seqlens=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, feature, causal, normalize, eps, cu_seqlens = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, out, den, cu_seqlens)
    ctx.args = (feature, causal, normalize)


def _linear_fwd_backward(ctx, dout, dden):
    # dden is not propagated: the normaliser is returned for the backward only.
    q, k, v, out, den, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = linear_bwd(dout.contiguous(), q, k, v, out, den, *ctx.args, cu_seqlens)
    return dq, dk, dv, None, None, None, None, None


linear_fwd.register_autograd(_linear_fwd_backward, setup_context=_setup_context)


def linear_attn(q: Tensor, k: Tensor, v: Tensor, *, feature: str = "identity", causal: bool = False,
                normalize: bool = True, eps: Union[float, Tensor] = 1e-6,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Validated inputs -> out (B, Hq, Lq, Dv). q: (B, Hq, Lq, M), k: (B, Hkv, Lk, M);
    eps a number or a tensor broadcastable to (B, Hq, Lq, 1) (one value per query row).

    cu_seqlens: int32 (S+1,) offsets of packed sequences; then q, k, v are (1, H, total, .)
    views of FlashAttention's (total, H, .) layout (Lq == Lk == total), sequence s is rows
    cu_seqlens[s]:cu_seqlens[s+1] of all three, each attends only inside itself, and out is a
    (1, Hq, total, Dv) view of a contiguous (total, Hq, Dv) tensor. The kernels read the
    offsets on the device: nothing syncs with the host."""
    b, h, lq, _ = q.shape
    eps = torch.as_tensor(eps, dtype=torch.float32, device=q.device)
    eps = eps.reshape(eps.shape[:3] if eps.dim() == 4 else (1,) * 3).expand(b, h, lq)  # (B, Hq, Lq), stride 0 where broadcast
    out, _ = linear_fwd(q, k, v, feature, causal, normalize, eps, cu_seqlens)
    return out

"""Launchers and torch.library registration for the KV-cache kernels.

Two custom ops, so ``torch.compile(fullgraph=True)`` sees one opaque node each:
``fastattn::kvcache_append`` (writes the new tokens into the caches in place; declared as
mutating them) and ``fastattn::decode_fwd`` (split-KV attention + merge; pure). The decode
kernels are forward-only: ``fastattn.backend.route`` (the decode family declares no gradients) sends calls that need gradients
to the (differentiable) reference. Rotary embeddings, when asked for, are applied to k_new by
the append kernel and to q by the split kernel, so neither is rotated in a separate pass.
Block sizes and the split heuristic are first choices, not yet measured on an H100.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from fastattn.backend import gpu_tiles
from fastattn.ops import _launch
from fastattn.ops._launch import pad
from fastattn.ops.decode import kernels

H100_SMS = 132
MAX_SPLITS = 128
# Key block by padded head dim when compiled for a GPU: decoding streams K/V, so the tile is
# sized for loads in flight, not for tensor-core work (tests/sm90.py checks shared memory).
_BLOCK_N = {16: 64, 32: 64, 64: 64, 128: 64, 256: 32}
_MAX_BLOCK_M = 64
# The interpreter runs one program at a time: small key blocks so that tests on short caches
# still get several blocks, hence several splits, per sequence.
_INTERPRETER_BLOCK_N = 16


def block_config(head_dim: int, rows: int, dtype: torch.dtype,
                 page_size: Optional[int] = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for ``rows`` = group * new tokens query rows per kv head.
    With pages, BLOCK_N divides ``page_size`` (both powers of two), so a tile lies in one page."""
    block_m = min(_MAX_BLOCK_M, pad(rows))
    if not gpu_tiles():
        return block_m, _INTERPRETER_BLOCK_N, 4
    block_n = _BLOCK_N[pad(head_dim)]
    if dtype == torch.float32 and head_dim > 64:
        block_n = max(16, block_n // 2)  # fp32 tiles take twice the bytes
    if page_size is not None:
        block_n = min(block_n, page_size)
    return block_m, block_n, 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return H100_SMS  # the interpreter makes the same choice an H100 would


def choose_num_splits(programs: int, seqlen_k: int, block_n: int, num_sms: int) -> int:
    """Splits per (batch, kv head, row block) so that ``programs * splits`` fills the GPU.

    programs: batch * kv_heads * row blocks, the programs there are without splitting.
    seqlen_k: the longest visible key range. Rules: no split when the programs already fill
    80% of the SMs; otherwise aim for two programs per SM (decoding is bandwidth-bound and
    wants many loads in flight), but give every split at least two key blocks, so its fixed
    cost (loading q, writing a partial row) stays small next to its streaming; at most 128.
    """
    if programs >= 0.8 * num_sms:
        return 1
    key_blocks = triton.cdiv(max(seqlen_k, 1), block_n)
    most = max(1, min(MAX_SPLITS, key_blocks // 2))
    return max(1, min(triton.cdiv(2 * num_sms, programs), most))


def _rotary_args(like: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], interleaved: bool):
    """(COS, SIN, row stride) and the constexprs. cos/sin are contiguous (P, R/2) tables."""
    if cos is None:
        return (like, like, 0), dict(HAS_ROTARY=False, ROT_DIM=0, ROT_INTERLEAVED=False)
    return (cos, sin, cos.stride(0)), dict(HAS_ROTARY=True, ROT_DIM=2 * cos.shape[1],
                                           ROT_INTERLEAVED=interleaved)


def _cache_args(k_cache, v_cache, block_table):
    """(k strides, v strides, Lmax, table args, constexprs) in the kernels' (b, h, n, d) order.
    Pages (num_pages, page_size, Hkv, D): the "b" stride is the page stride and Lmax is
    P * page_size; contiguous caches (B, Hkv, Lmax, D) take their strides as they are."""
    if block_table is None:
        return (k_cache.stride(), v_cache.stride(), k_cache.shape[2], (k_cache, 0, 1),
                dict(PAGED=False, PAGE_SIZE=16))
    ks, vs = k_cache.stride(), v_cache.stride()
    page = k_cache.shape[1]
    return ((ks[0], ks[2], ks[1], ks[3]), (vs[0], vs[2], vs[1], vs[3]), block_table.shape[1] * page,
            (block_table, block_table.stride(0), k_cache.shape[0]), dict(PAGED=True, PAGE_SIZE=page))


def _append(k_cache, v_cache, seqlens, k_new, v_new, cos=None, sin=None, interleaved=False, block_table=None,
            cu_seqlens_q=None, max_seqlen_q=0):
    varlen = cu_seqlens_q is not None
    if varlen:  # packed (total, Hkv, D): the batch comes from the offsets, Lnew is an upper bound
        b, (_, hkv, d), lnew = seqlens.shape[0], k_new.shape, max_seqlen_q
        kn_strides = (0, k_new.stride(1), k_new.stride(0), k_new.stride(2))
        vn_strides = (0, v_new.stride(1), v_new.stride(0), v_new.stride(2))
    else:
        b, hkv, lnew, d = k_new.shape
        kn_strides, vn_strides = k_new.stride(), v_new.stride()
    dv = v_new.shape[-1]
    block_l = 32 if gpu_tiles() else 16
    (cos_t, sin_t, stride_cs), rot = _rotary_args(k_new, cos, sin, interleaved)
    k_strides, v_strides, lmax, (bt, stride_btb, n_pages), paged = _cache_args(k_cache, v_cache, block_table)
    kernels.kv_append_kernel[(b * hkv, triton.cdiv(lnew, block_l))](
        k_new, v_new, k_cache, v_cache, seqlens, cos_t, sin_t, bt, seqlens if cu_seqlens_q is None else cu_seqlens_q,
        *kn_strides, *vn_strides, *k_strides, *v_strides,
        hkv, lnew, lmax, stride_cs, stride_btb, n_pages,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_L=block_l, BLOCK_D=pad(d), BLOCK_DV=pad(dv),
        num_warps=4, BF16_RTNE=_launch.dtype_flags(k_new.dtype)["BF16_RTNE"], VARLEN=varlen, **rot, **paged,
    )


def _forward(q, k_cache, v_cache, seqlens, alibi, scale, softcap, window_left, window_right,
             seqlen_new, num_splits, cos=None, sin=None, interleaved=False, block_table=None,
             cu_seqlens_q=None, max_seqlen_q=0, sinks=None):
    varlen = cu_seqlens_q is not None
    hq, d = q.shape[1], q.shape[-1]  # q (B, Hq, Lq, D) or packed (total, Hq, D)
    hkv = k_cache.shape[1] if block_table is None else k_cache.shape[2]
    dv = v_cache.shape[-1]
    group = hq // hkv
    if varlen:  # q (total, Hq, D) -> out (total, Hq, Dv), lse (Hq, total); lq bounds every sequence's count
        b, lq, total = seqlens.shape[0], max_seqlen_q, q.shape[0]
        out = _launch.empty(total, hq, dv, like=q)
        lse = _launch.empty(hq, total, like=q, dtype=torch.float32)
        q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
        out_strides = (0, out.stride(1), out.stride(0), out.stride(2))
        lse_strides = (0, lse.stride(0), lse.stride(1))
    else:
        b, _, lq, _ = q.shape
        out = _launch.empty(b, hq, lq, dv, like=q)
        lse = _launch.empty(b, hq, lq, like=q, dtype=torch.float32)
        q_strides, out_strides, lse_strides = q.stride(), out.stride(), lse.stride()
    rows = group * lq
    k_strides, v_strides, lmax, (bt, stride_btb, n_pages), paged = _cache_args(k_cache, v_cache, block_table)
    block_m, block_n, warps = block_config(max(d, dv), rows, q.dtype, paged["PAGE_SIZE"] if paged["PAGED"] else None)
    if alibi is None:
        alibi_t, alibi_strides = q, (0, 0)
    else:  # (Hq,) or (B, Hq) -> (B, Hq), stride 0 over the batch for per-head slopes
        alibi_t = (alibi[None] if alibi.dim() == 1 else alibi).expand(b, hq)
        alibi_strides = alibi_t.stride()
    (cos_t, sin_t, stride_cs), rot = _rotary_args(q, cos, sin, interleaved)
    cu = seqlens if cu_seqlens_q is None else cu_seqlens_q
    single = num_splits == 1
    if single:
        o_t, lse_t, o_strides, l_strides = out, lse, out_strides, lse_strides
    else:
        o_t = _launch.empty(b, hq, lq, num_splits, dv, like=q, dtype=torch.float32)
        lse_t = _launch.empty(b, hq, lq, num_splits, like=q, dtype=torch.float32)
        o_strides, l_strides = (0, 0, 0, 0), (0, 0, 0)
    flags = _launch.dtype_flags(q.dtype)
    grid = (b * hkv, triton.cdiv(rows, block_m), num_splits)
    kernels.decode_split_kernel[grid](
        q, k_cache, v_cache, seqlens, alibi_t, cos_t, sin_t, bt, cu, q if sinks is None else sinks, o_t, lse_t,
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, *alibi_strides,
        hq, group, lq, seqlen_new, lmax, num_splits, scale=scale, stride_cs=stride_cs,
        stride_btb=stride_btb, n_pages=n_pages, VARLEN=varlen, HAS_SINKS=sinks is not None, **paged,
        **_launch.softcap_args(softcap), **_launch.band_args(window_left, window_right), **rot,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pad(d), BLOCK_DV=pad(dv),
        HAS_ALIBI=alibi is not None, SINGLE_SPLIT=single, num_warps=warps, **flags,
    )
    if not single:
        kernels.decode_merge_kernel[(b * hq * lq,)](
            o_t, lse_t, out, lse, cu, *out_strides, *lse_strides, hq, lq, num_splits,
            HEAD_DIM_V=dv, BLOCK_S=pad(num_splits), CHUNK_S=8,
            BLOCK_DV=pad(dv), VARLEN=varlen, BF16_RTNE=flags["BF16_RTNE"], num_warps=4,
        )
    return out, lse


# ---------------------------------------------------------------------------------------
# torch.library registration (custom_op, not triton_op: wrap_triton refuses interpreted kernels).

@torch.library.custom_op("fastattn::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, k_new: Tensor, v_new: Tensor,
                   cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
                   interleaved: bool = False, block_table: Optional[Tensor] = None,
                   cu_seqlens_q: Optional[Tensor] = None, max_seqlen_q: int = 0) -> None:
    _append(k_cache, v_cache, seqlens, k_new, v_new, cos, sin, interleaved, block_table, cu_seqlens_q, max_seqlen_q)


@kvcache_append.register_fake
def _(k_cache, v_cache, seqlens, k_new, v_new, cos=None, sin=None, interleaved=False, block_table=None,
      cu_seqlens_q=None, max_seqlen_q=0):
    return None


@torch.library.custom_op("fastattn::decode_fwd", mutates_args=())
def decode_fwd(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, alibi: Optional[Tensor],
    scale: float, softcap: Optional[float], window_left: Optional[int], window_right: Optional[int],
    seqlen_new: int, num_splits: int, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
    interleaved: bool = False, block_table: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None, max_seqlen_q: int = 0, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    return _forward(q, k_cache, v_cache, seqlens, alibi, scale, softcap, window_left, window_right,
                    seqlen_new, num_splits, cos, sin, interleaved, block_table, cu_seqlens_q, max_seqlen_q, sinks)


@decode_fwd.register_fake
def _(q, k_cache, v_cache, seqlens, alibi, scale, softcap, window_left, window_right,
      seqlen_new, num_splits, cos=None, sin=None, interleaved=False, block_table=None,
      cu_seqlens_q=None, max_seqlen_q=0, sinks=None):
    if cu_seqlens_q is not None:  # packed (total, Hq, D) -> (total, Hq, Dv), lse (Hq, total)
        total, hq, _ = q.shape
        return q.new_empty(total, hq, v_cache.shape[-1]), q.new_empty(hq, total, dtype=torch.float32)
    b, hq, lq, _ = q.shape
    return q.new_empty(b, hq, lq, v_cache.shape[-1]), q.new_empty(b, hq, lq, dtype=torch.float32)


def decode_attn(q, k_cache, v_cache, seqlens, *, k_new=None, v_new=None, alibi=None, scale,
                softcap=None, window_left=None, window_right=None, num_splits=None,
                max_seqlen_k=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                block_table=None, cu_seqlens_q=None, max_seqlen_q=None, sinks=None):
    """Validated inputs -> (out, lse), after writing k_new/v_new into the caches.

    seqlens: int32 contiguous (B,). max_seqlen_k: the longest valid length after the append,
    if the caller knows it (it only steers the choice of num_splits); else Lmax.
    rotary_cos/sin: contiguous (P, R/2) tables: q and k_new are rotated inside the kernels.
    softcap None (or 0.0) is no cap. block_table: int32 contiguous (B, P) or None; with it
    the caches are pages (num_pages, page_size, Hkv, D). cu_seqlens_q: int32 contiguous
    (B+1,) or None; with it q is packed (total, Hq, D), k_new/v_new (total, Hkv, D) with the
    same offsets, out (total, Hq, Dv), lse (Hq, total); max_seqlen_q an upper bound on any
    sequence's tokens (default total). sinks: contiguous fp32 (Hq,) logits or None. No host
    sync: the split count comes from shapes (and max_seqlen_k when given).
    """
    rot = (rotary_cos, rotary_sin, rotary_interleaved)
    varlen = cu_seqlens_q is not None
    if varlen:
        lq = q.shape[0] if max_seqlen_q is None else max_seqlen_q
        hq, d = q.shape[1], q.shape[2]
        seqlen_new = 0 if k_new is None else 1  # a flag: each sequence appends its own tokens' keys
    else:
        _, hq, lq, d = q.shape
        seqlen_new = 0 if k_new is None else k_new.shape[2]
    if k_new is not None and k_new.shape[0] and (varlen or seqlen_new):
        kvcache_append(k_cache, v_cache, seqlens, k_new, v_new, *rot, block_table, cu_seqlens_q, lq if varlen else 0)
    if num_splits is None:
        b = seqlens.shape[0]
        paged = block_table is not None
        hkv = k_cache.shape[2] if paged else k_cache.shape[1]
        lmax = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
        block_m, block_n, _ = block_config(max(d, v_cache.shape[-1]), (hq // hkv) * lq, q.dtype,
                                           k_cache.shape[1] if paged else None)
        programs = b * hkv * triton.cdiv((hq // hkv) * lq, block_m)
        length = lmax if max_seqlen_k is None else max_seqlen_k
        if window_left is not None:
            length = min(length, window_left + lq + (window_right or 0))  # a window bounds the keys read
        num_splits = choose_num_splits(programs, length, block_n, _num_sms(str(q.device)))
    return decode_fwd(q, k_cache, v_cache, seqlens, alibi, scale, softcap or None, window_left,
                      window_right, seqlen_new, num_splits, *rot, block_table, cu_seqlens_q, lq if varlen else 0,
                      sinks)

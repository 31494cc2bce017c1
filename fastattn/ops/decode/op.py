"""Launchers and torch.library registration for the KV-cache kernels.

Two custom ops, so ``torch.compile(fullgraph=True)`` sees one opaque node each:
``fastattn::kvcache_append`` (writes the new tokens into the caches in place; declared as
mutating them) and ``fastattn::decode_fwd`` (split-KV attention + merge; pure). Tensors are
their positional arguments, every option a keyword. The decode kernels are forward-only:
``fastattn.backend.route`` (the decode family declares no gradients) sends calls that need
gradients to the (differentiable) reference. Rotary embeddings, when asked for, are applied to
k_new by the append kernel and to q by the split kernel, so neither is rotated in a separate
pass. Block sizes and the split heuristic are first choices, not yet measured on an H100.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from fastattn import invariance
from fastattn._env import gpu_tiles
from fastattn.ops import _launch
from fastattn.ops._launch import pad
from fastattn.ops.decode import kernels
from fastattn.validation import CacheLayout, value_channels

H100_SMS = 132
MAX_SPLITS = 128
# Key block by padded head dim when compiled for a GPU: decoding streams K/V, so the tile is
# sized for loads in flight, not for tensor-core work (tests/sm90.py checks shared memory).
_BLOCK_N = {16: 64, 32: 64, 64: 64, 128: 64, 256: 32}
_MAX_BLOCK_M = 64
# The interpreter runs one program at a time: small key blocks so that tests on short caches
# still get several blocks, hence several splits, per sequence.
_INTERPRETER_BLOCK_N = 16


class Tiles(NamedTuple):
    """The decode kernels' tiles: query rows and keys per split program, its warps, new
    tokens per append program, and the split kernel's pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    block_l: int
    num_stages: int = 3


class Widths(NamedTuple):
    """How the split kernel reads q/k's head dim (its constexpr ``WIDTHS``): a power-of-two
    main part of D channels and, with TAIL > 0, a power-of-two tail of the channels after it
    (MLA's 576 = 512 + 64: two products summed, no 1024-wide tile); V_IN_K: V is K's first
    Dv = D channels (the same memory), so K's main tile serves as V's, the latent read once."""

    D: int
    TAIL: int = 0
    V_IN_K: bool = False


def head_widths(d: int, dv: int, values_at: Optional[int]) -> Widths:
    """The ``Widths`` of q/k head dim ``d`` with v head dim ``dv``, ``values_at`` the channel
    offset where V lies in K (``validation.value_channels``; None: its own memory). Above 256 a
    head dim that is no power of two splits into the power of two below it and the tail's
    width padded (at least 16, a tensor-core product's depth) where that is narrower than
    padding the whole (576: 512 + 64, not 1024; 320: 256 + 64); others are one part."""
    main, tail = pad(d), 0
    if d > 256 and main != d:
        half = main // 2
        if half + max(16, pad(d - half)) < main:
            main, tail = half, max(16, pad(d - half))
    return Widths(main, tail, values_at == 0 and dv == main)


def wide_tiles(head_dim: int, dtype: torch.dtype, device: Optional[torch.device] = None):
    """The decode kernels' (query rows, keys, warps, stages, append tokens) at a head dim past
    256 (the larger of q's and v's) on the GPU of ``device``: MLA's table where q/k's channels
    split into more than 512 (``head_widths``: 576 = 512 + 64), else that of the padded head
    dim; None where no tile fits the GPU's shared memory."""
    widths = head_widths(head_dim, 0, None)
    if widths.D + widths.TAIL > 512:
        return _launch.decode_mla_tiles(dtype, device)
    return _launch.decode_wide_tiles(pad(head_dim), dtype, device)


def block_config(head_dim: int, rows: int, dtype: torch.dtype, page_size: Optional[int] = None) -> Tiles:
    """The tiles for ``rows`` = group * new tokens query rows per kv head, at ``head_dim`` (the
    larger of q's and v's). With pages of a power-of-two size >= 16, BLOCK_N divides it, so a
    tile lies in one page; other page sizes keep BLOCK_N (the kernel reads the table per key)."""
    block_m = min(_MAX_BLOCK_M, pad(rows))
    if not gpu_tiles():
        return Tiles(block_m, _INTERPRETER_BLOCK_N, 4, 16)
    if pad(head_dim) > 256:  # 512 and MLA's 512 + 64: tiles per GPU and dtype (few rows: 2 KB per fp32 row)
        most_m, block_n, warps, stages, block_l = wide_tiles(head_dim, dtype)
        tiles = Tiles(min(block_m, most_m), block_n, warps, block_l, stages)
    else:
        block_m, block_n = _launch.decode_tiles(block_m, _BLOCK_N[pad(head_dim)], head_dim)  # capped per GPU
        if dtype == torch.float32 and head_dim > 64:
            block_n = max(16, block_n // 2)  # fp32 tiles take twice the bytes
        tiles = Tiles(block_m, block_n, 4, 32)
    if page_size is not None and page_size >= 16 and page_size & (page_size - 1) == 0:
        tiles = tiles._replace(block_n=min(tiles.block_n, page_size))
    return tiles


def forward_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> _launch.Tiles:
    """The flash forward's first tiles for a training batch of contiguous, 16-byte aligned
    (B, H, L, D) tensors at ``head_dim`` (the larger of q's and v's): TMA where the GPU and
    dtype take it, no logit terms."""
    tier = _launch.tier(device)
    tma = tier in _launch._TMA_TIERS and dtype != torch.float32
    return _launch.candidates(head_dim, dtype, "fwd", device, tma, False)[0]


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
    """(COS, SIN, (row stride, positions)) and the constexprs; cos/sin contiguous (P, R/2)
    tables. ROT_DIM 0: none."""
    if cos is None:
        return (like, like, (0, 1)), dict(ROT_DIM=0, ROT_INTERLEAVED=False)
    return (cos, sin, (cos.stride(0), cos.shape[0])), dict(ROT_DIM=2 * cos.shape[1], ROT_INTERLEAVED=interleaved)


def _cache_args(k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor], layout: CacheLayout):
    """(k strides, v strides, table pointer, (table row stride, num_pages), constexprs), strides
    in the kernels' (b, h, slot, d) order: a page's "b" stride is the page stride."""
    if not layout.paged:
        return k_cache.stride(), v_cache.stride(), _bytes(k_cache), (0, 1), dict(PAGED=False, PAGE_SIZE=16)
    ks, vs = k_cache.stride(), v_cache.stride()
    return ((ks[0], ks[2], ks[1], ks[3]), (vs[0], vs[2], vs[1], vs[3]), block_table,
            (block_table.stride(0), layout.num_pages), dict(PAGED=True, PAGE_SIZE=layout.page_size))


def _fp8_native(device: torch.device) -> bool:
    """Whether the kernels take float8_e4m3fn caches as such on ``device``: compiled Triton has
    e4m3 from sm_89 on (the interpreter too); before, the kernels get the bytes."""
    gpu = _launch.arch(device)
    return gpu is None or gpu.capability >= 89


def _bytes(cache: Tensor) -> Tensor:
    """A cache as the kernels take it: a float8_e4m3fn one as its bytes (uint8, same strides)
    where ``_fp8_native`` says no (the kernels decode and encode e4m3 themselves, exactly);
    others as they are."""
    if cache.dtype == torch.float8_e4m3fn and not _fp8_native(cache.device):
        return cache.view(torch.uint8)
    return cache


def _scale_args(k_scale: Optional[Tensor], v_scale: Optional[Tensor], layout: CacheLayout, append: bool) -> dict:
    """The kernels' 8-bit cache arguments: none for a 16/32-bit cache; else the scales and
    their strides in the kernels' (b, h, slot) order (a page's "b" stride is the page stride;
    per-tensor scales: strides 0). The split kernel reads a per-tensor scale as every key's (a
    broadcast load, which compiles to fewer registers than one scalar did: no spills on sm_80
    to sm_120); the append (SCALE_PER_TOKEN) writes per-token scales, else reads the one."""
    if k_scale is None:
        return {}
    per_token = k_scale.dim() == 3  # the cache's shape without its last dim (per tensor: 1 element)

    def strides(s):
        if not per_token:
            return (0, 0, 0)
        return (s.stride(0), s.stride(2), s.stride(1)) if layout.paged else s.stride()
    args = dict(KS=k_scale, VS=v_scale, ks_strides=strides(k_scale), vs_strides=strides(v_scale), KV_QUANT=True)
    return dict(args, SCALE_PER_TOKEN=per_token) if append else args


def _packed_strides(t: Tensor) -> tuple:
    """A packed (total, H, D) tensor's strides in (b, h, row, d) order, batch stride 0."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


@_launch.on_device
def _append(k_cache, v_cache, seqlens, k_new, v_new, cos, sin, interleaved, block_table, cu_seqlens_q,
            max_seqlen_q, k_scale=None, v_scale=None):
    layout = CacheLayout.of(k_cache, v_cache, block_table)
    # V a view of K's channels (MLA's latent): K's store writes the values; HEAD_DIM_V 0 masks V's store off.
    values_in_keys = value_channels(k_cache, v_cache) is not None
    if values_in_keys:
        v_new, v_cache = k_new, k_cache
    varlen = cu_seqlens_q is not None
    if varlen:  # packed (total, Hkv, D): the batch comes from the offsets, Lnew is an upper bound
        lnew, new_strides = max_seqlen_q, (_packed_strides(k_new), _packed_strides(v_new))
    else:
        lnew, new_strides = k_new.shape[2], (k_new.stride(), v_new.stride())
    d, dv = k_new.shape[-1], 0 if values_in_keys else v_new.shape[-1]
    block_l = block_config(max(d, dv), 1, k_new.dtype).block_l
    (cos_t, sin_t, rotary), rot = _rotary_args(k_new, cos, sin, interleaved)
    k_strides, v_strides, bt, table, paged = _cache_args(k_cache, v_cache, block_table, layout)
    kernels.kv_append_kernel[(layout.batch * layout.kv_heads * triton.cdiv(lnew, block_l),)](
        k_new, v_new, _bytes(k_cache), _bytes(v_cache), seqlens, cos_t, sin_t, bt,
        seqlens if not varlen else cu_seqlens_q,
        *new_strides, k_strides, v_strides, layout.kv_heads, lnew, layout.lmax, rotary, table,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_L=block_l, BLOCK_D=pad(d), BLOCK_DV=pad(dv), VARLEN=varlen,
        BF16_RTNE=_launch.dtype_flags(k_new.dtype)["BF16_RTNE"], num_warps=4, **rot, **paged,
        **_scale_args(k_scale, v_scale, layout, append=True),
    )


def _outputs(q: Tensor, dv: int, varlen: bool):
    """(out, lse, their strides in (b, h, row, d) / (b, h, row) order): (B, Hq, Lq, Dv) and
    (B, Hq, Lq), or packed (total, Hq, Dv) and (Hq, total)."""
    hq = q.shape[1]
    if not varlen:
        out = _launch.empty(*q.shape[:3], dv, like=q)
        lse = _launch.empty(*q.shape[:3], like=q, dtype=torch.float32)
        return out, lse, out.stride(), lse.stride()
    out = _launch.empty(q.shape[0], hq, dv, like=q)
    lse = _launch.empty(hq, q.shape[0], like=q, dtype=torch.float32)
    return out, lse, _packed_strides(out), (0, lse.stride(0), lse.stride(1))


def _partials(q: Tensor, dv: int, lq: int, num_splits: int, varlen: bool):
    """The fp32 partial outputs and lse of every query row and split: (B, Hq, Lq, splits, Dv)
    and (B, Hq, Lq, splits), or by packed row (total, Hq, splits, Dv) and (total, Hq, splits)
    (not by the sequences' upper bound times their number)."""
    rows = (q.shape[0], q.shape[1]) if varlen else (q.shape[0], q.shape[1], lq)
    return (_launch.empty(*rows, num_splits, dv, like=q, dtype=torch.float32),
            _launch.empty(*rows, num_splits, like=q, dtype=torch.float32))


@_launch.on_device
def _forward(q, k_cache, v_cache, seqlens, alibi, cos, sin, block_table, cu_seqlens_q, sinks, *, scale,
             softcap, window_left, window_right, seqlen_new, num_splits, interleaved, max_seqlen_q, fwd_order,
             k_scale=None, v_scale=None):
    layout = CacheLayout.of(k_cache, v_cache, block_table)
    varlen = cu_seqlens_q is not None
    hq, d, dv = q.shape[1], q.shape[-1], layout.head_dim_v
    group = hq // layout.kv_heads
    lq = max_seqlen_q if varlen else q.shape[2]  # varlen: an upper bound on every sequence's count
    out, lse, out_strides, lse_strides = _outputs(q, dv, varlen)
    tiles = block_config(max(d, dv), group * lq, q.dtype, layout.page_size)
    fwd = forward_tiles(max(d, dv), q.dtype, q.device)
    if fwd_order:  # the forward's key block, warps and stages, at most its query rows (so what fits it fits this;
        # a page then may not hold whole tiles: read per key)
        tiles = tiles._replace(block_m=min(tiles.block_m, fwd.block_m), block_n=fwd.block_n, num_warps=fwd.num_warps)
    alibi_t, alibi_strides = _launch.alibi_args(q, alibi, layout.batch)
    (cos_t, sin_t, rotary), rot = _rotary_args(q, cos, sin, interleaved)
    k_strides, v_strides, bt, table, paged = _cache_args(k_cache, v_cache, block_table, layout)
    widths = head_widths(d, dv, None if k_scale is not None else value_channels(k_cache, v_cache))
    terms = _launch.Terms(ALIBI=alibi is not None, SOFTCAP=softcap is not None, LEFT=window_left is not None,
                          RIGHT=window_right is not None, SINKS=sinks is not None)
    single = num_splits == 1
    o_t, lse_t, o_strides, l_strides = out, lse, out_strides, lse_strides
    if not single:
        (o_t, lse_t), o_strides, l_strides = _partials(q, dv, lq, num_splits, varlen), (0, 0, 0, 0), (0, 0, 0)
    cu = seqlens if cu_seqlens_q is None else cu_seqlens_q
    flags = _launch.dtype_flags(q.dtype)
    # Axis 0: the row blocks of every (batch, kv head); axis 1: the splits (at most MAX_SPLITS).
    grid = (layout.batch * layout.kv_heads * triton.cdiv(group * lq, tiles.block_m), num_splits)
    kernels.decode_split_kernel[grid](
        q, _bytes(k_cache), _bytes(v_cache), seqlens, alibi_t, cos_t, sin_t, bt, cu, q if sinks is None else sinks,
        o_t, lse_t,
        strides=(_packed_strides(q) if varlen else q.stride(), k_strides, v_strides, o_strides, l_strides,
                 alibi_strides), n_heads=hq, group=group,
        seqlen_q=lq, seqlen_new=seqlen_new, seqlen_max=layout.lmax, num_splits=num_splits,
        scalars=_launch.logit_scalars(scale, softcap, 0.0, window_left, window_right), rotary=rotary,
        table=table, fwd_block_m=fwd.block_m, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, WIDTHS=widths, BLOCK_DV=pad(dv), TERMS=terms, VARLEN=varlen,
        SINGLE_SPLIT=single, FWD_ORDER=fwd_order and single,
        num_warps=tiles.num_warps, num_stages=fwd.num_stages if fwd_order else tiles.num_stages, **rot, **paged,
        **flags,
        **_scale_args(k_scale, v_scale, layout, append=False),
    )
    if not single:
        kernels.decode_merge_kernel[(lse_t.numel() // num_splits,)](
            o_t, lse_t, out, lse, out_strides, lse_strides, hq, lq, num_splits,
            HEAD_DIM_V=dv, BLOCK_S=pad(num_splits), CHUNK_S=8, BLOCK_DV=pad(dv), VARLEN=varlen,
            BF16_RTNE=flags["BF16_RTNE"], num_warps=4,
        )
    return out, lse


# ---------------------------------------------------------------------------------------
# torch.library registration (custom_op, not triton_op: wrap_triton refuses interpreted kernels).

@torch.library.custom_op("fastattn::kvcache_append", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def kvcache_append(k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, k_new: Tensor, v_new: Tensor,
                   cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
                   block_table: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                   k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None, *,
                   interleaved: bool = False, max_seqlen_q: int = 0) -> None:
    _append(k_cache, v_cache, seqlens, k_new, v_new, cos, sin, interleaved, block_table, cu_seqlens_q, max_seqlen_q,
            k_scale, v_scale)


@kvcache_append.register_fake
def _(k_cache, v_cache, seqlens, k_new, v_new, cos=None, sin=None, block_table=None, cu_seqlens_q=None,
      k_scale=None, v_scale=None, *, interleaved=False, max_seqlen_q=0):
    return None


@torch.library.custom_op("fastattn::decode_fwd", mutates_args=())
def decode_fwd(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, alibi: Optional[Tensor] = None,
    cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None, sinks: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None, *, scale: float,
    softcap: Optional[float] = None, window_left: Optional[int] = None, window_right: Optional[int] = None,
    seqlen_new: int = 0, num_splits: int = 1, interleaved: bool = False, max_seqlen_q: int = 0,
    fwd_order: bool = False,
) -> tuple[Tensor, Tensor]:
    return _forward(q, k_cache, v_cache, seqlens, alibi, cos, sin, block_table, cu_seqlens_q, sinks, scale=scale,
                    softcap=softcap, window_left=window_left, window_right=window_right, seqlen_new=seqlen_new,
                    num_splits=num_splits, interleaved=interleaved, max_seqlen_q=max_seqlen_q, fwd_order=fwd_order,
                    k_scale=k_scale, v_scale=v_scale)


@decode_fwd.register_fake
def _(q, k_cache, v_cache, seqlens, alibi=None, cos=None, sin=None, block_table=None, cu_seqlens_q=None,
      sinks=None, k_scale=None, v_scale=None, **options):
    dv = v_cache.shape[-1]
    if cu_seqlens_q is not None:  # packed (total, Hq, D) -> (total, Hq, Dv), lse (Hq, total)
        total, hq, _ = q.shape
        return q.new_empty(total, hq, dv), q.new_empty(hq, total, dtype=torch.float32)
    b, hq, lq, _ = q.shape
    return q.new_empty(b, hq, lq, dv), q.new_empty(b, hq, lq, dtype=torch.float32)


def decode_attn(q, k_cache, v_cache, seqlens, *, k_new=None, v_new=None, alibi=None, scale,
                softcap=None, window_left=None, window_right=None, num_splits=None,
                max_seqlen_k=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                block_table=None, cu_seqlens_q=None, max_seqlen_q=None, sinks=None, k_scale=None, v_scale=None):
    """Validated inputs -> (out, lse), after writing k_new/v_new into the caches.

    seqlens: int32 contiguous (B,). max_seqlen_k: the longest valid length after the append,
    if the caller knows it (it only steers the choice of num_splits); else Lmax.
    rotary_cos/sin: contiguous (P, R/2) tables: q and k_new are rotated inside the kernels.
    softcap None is no cap. block_table: int32 contiguous (B, P) or None; with it the caches
    are pages (num_pages, page_size, Hkv, D). cu_seqlens_q: int32 contiguous (B+1,) or None;
    with it q is packed (total, Hq, D), k_new/v_new (total, Hkv, D) with the same offsets, out
    (total, Hq, Dv), lse (Hq, total); max_seqlen_q an upper bound on any sequence's tokens
    (default total). sinks: contiguous fp32 (Hq,) logits or None. k_scale / v_scale: float32
    scales of 8-bit (float8_e4m3fn / int8) caches, one element or per token and kv head
    ((B, Hkv, Lmax), paged (num_pages, page_size, Hkv)), or None. No host sync: the split
    count comes from shapes (and max_seqlen_k when given). Values it does not check (cache
    lengths, table entries, rotary positions) the kernels clamp to the buffers.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        lq = q.shape[0] if max_seqlen_q is None else max_seqlen_q
        seqlen_new = 0 if k_new is None else 1  # a flag: each sequence appends its own tokens' keys
    else:
        lq = q.shape[2]
        seqlen_new = 0 if k_new is None else k_new.shape[2]
    tensors = dict(cos=rotary_cos, sin=rotary_sin, block_table=block_table, cu_seqlens_q=cu_seqlens_q)
    if k_new is not None and k_new.shape[0] and (varlen or seqlen_new):
        kvcache_append(k_cache, v_cache, seqlens, k_new, v_new, **tensors, k_scale=k_scale, v_scale=v_scale,
                       interleaved=rotary_interleaved, max_seqlen_q=lq if varlen else 0)
    # fastattn.batch_invariant() with one split: the training forward's tiles, order and arithmetic
    fwd_order = (num_splits is None and invariance.active() and invariance.split_tokens() is None
                 and alibi is None and softcap is None and sinks is None and window_left is None and scale > 0)
    if num_splits is None:
        num_splits = _auto_splits(q, k_cache, v_cache, block_table, lq, window_left, window_right, max_seqlen_k)
    return decode_fwd(q, k_cache, v_cache, seqlens, alibi, **tensors, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                      scale=scale, softcap=softcap, window_left=window_left, window_right=window_right,
                      seqlen_new=seqlen_new,
                      num_splits=num_splits, interleaved=rotary_interleaved, max_seqlen_q=lq if varlen else 0,
                      fwd_order=fwd_order)


def _auto_splits(q, k_cache, v_cache, block_table, lq, window_left, window_right, max_seqlen_k) -> int:
    """num_splits from the shapes (and max_seqlen_k, the longest sequence, when known); under
    ``fastattn.batch_invariant`` from the cache capacity Lmax alone."""
    layout = CacheLayout.of(k_cache, v_cache, block_table)
    if invariance.active():  # independent of the batch: its size and its longest sequence
        split = invariance.split_tokens()
        return 1 if split is None else max(1, min(MAX_SPLITS, triton.cdiv(layout.lmax, split)))
    hq = q.shape[1]
    rows = (hq // layout.kv_heads) * lq
    tiles = block_config(max(q.shape[-1], layout.head_dim_v), rows, q.dtype, layout.page_size)
    programs = layout.batch * layout.kv_heads * triton.cdiv(rows, tiles.block_m)
    length = layout.lmax if max_seqlen_k is None else max_seqlen_k
    if window_left is not None:
        length = min(length, window_left + lq + (window_right or 0))  # a window bounds the keys read
    return choose_num_splits(programs, length, tiles.block_n, _num_sms(str(q.device)))

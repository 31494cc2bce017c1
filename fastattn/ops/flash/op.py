"""Launchers, torch.library registration and autograd for the flash kernels.

``flash_attn(...)`` is what ``fastattn.functional`` calls once it has validated the inputs;
``flash_backward(...)`` is the backward for callers that differentiate on their own (context
parallelism). The forward and backward are registered as custom ops (``fastattn::flash_fwd``
and ``fastattn::flash_bwd``) with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` sees one opaque node per call instead of breaking the graph.
Their non-tensor arguments are ``FlashOptions``, in its field order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from fastattn.ops import _launch
from fastattn.ops._launch import block_config  # noqa: F401 (tests read the tiles here)
from fastattn.ops.flash import kernels


class FlashOptions(NamedTuple):
    """The flash ops' non-tensor options, in their custom ops' argument order, so
    ``flash_fwd(q, k, v, bias, alibi, seed, *options)`` is a call."""

    scale: float
    softcap: Optional[float] = None  # None: no cap; else positive (the public API checks it)
    dropout_p: float = 0.0
    window_left: Optional[int] = None  # band edges around the diagonal; None: unbounded
    window_right: Optional[int] = None


class LowPrecision(NamedTuple):
    """What a low-precision forward reads besides q, k, v (``kernels._low_precision``).

    mode "fp8": q, k, v in one fp8 dtype; ``rows`` the descales, float32 (B, Hkv, 3): q's,
    k's and v's per (sequence, kv head). mode "int8": q and k int8 (smoothed, per token,
    ``reference.smooth_quantize_int8``); ``rows`` float32 (B, Hq, Lq, 2), each query row's scale
    and shift, ``cols`` float32 (B, Hkv, Lk), each key's scale (packed: (1, H, total, ...)).
    ``out_dtype``: the output's."""

    mode: str
    rows: Tensor
    cols: Optional[Tensor]
    out_dtype: torch.dtype


def _bias_args(q: Tensor, bias: Optional[Tensor]):
    """Bias as (tensor, strides). bool masks are read as bytes (same itemsize)."""
    if bias is None:
        return q, (0, 0, 0, 0)
    return (bias.view(torch.uint8) if bias.dtype == torch.bool else bias), bias.stride()


def _terms(bias, alibi, sinks, options: FlashOptions) -> _launch.Terms:
    """The logit terms the kernels compile in."""
    return _launch.Terms(
        BIAS=bias is not None, BIAS_IS_BOOL=bias is not None and bias.dtype == torch.bool,
        ALIBI=alibi is not None, SOFTCAP=options.softcap is not None, DROPOUT=options.dropout_p > 0.0,
        LEFT=options.window_left is not None, RIGHT=options.window_right is not None, SINKS=sinks is not None,
        SCALE_FIRST=not options.scale > 0.0)


def _candidates(q, v, terms: _launch.Terms, kernel: str, tma: bool) -> list[_launch.Tiles]:
    """``_launch.candidates`` for kernel "fwd", "dkdv" or "dq" of these inputs."""
    return _launch.candidates(max(q.shape[-1], v.shape[-1]), q.dtype, kernel, q.device, tma, terms.costly())


def _launch_args(q, v, bias, alibi, seed, sinks, cu_seqlens, options: FlashOptions, terms, tiles: _launch.Tiles):
    """The pointer arguments of a kernel after q, k, v and their outputs, the strides of bias
    and alibi, the grid's batch axis, and the keyword arguments for ``tiles``."""
    varlen = cu_seqlens[0] is not None
    batch = cu_seqlens[0].numel() - 1 if varlen else q.shape[0]
    bias_t, bias_strides = _bias_args(q, bias)
    alibi_t, alibi_strides = _launch.alibi_args(q, alibi, batch)
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    meta = dict(
        scalars=_launch.logit_scalars(*options[:5]),
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=_launch.pad(head_dim), BLOCK_DV=_launch.pad(head_dim_v), TERMS=terms,
        VARLEN=varlen, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **_launch.dtype_flags(q.dtype),
    )
    cu_q, cu_k = cu_seqlens if varlen else (q, q)  # q stands in for the unused pointers
    pointers = (bias_t, alibi_t, q if seed is None else seed, q if sinks is None else sinks, cu_q, cu_k)
    return pointers, (bias_strides, alibi_strides), batch, meta


def _strides(t: Tensor, varlen: bool) -> tuple:
    """t's strides for the kernels: a packed (1, H, total, D) view's batch stride is 0, so the
    grid's batch axis (the sequence) moves nothing and CU_SEQLENS give the row offsets."""
    return (0, *t.stride()[1:]) if varlen else t.stride()


def _grid(rows: Tensor, heads: int, batch: int, block: int, cu_seqlens: Optional[Tensor]):
    """(grid, BLOCKS) of a kernel over blocks of ``block`` rows of (B, H, L, D) ``rows``: grid
    (L blocks, heads, B); packed, (blocks of every sequence, heads, 1) and BLOCKS, int32
    (programs, 2), each program's (sequence, first row in it) (``_triton.packed_block``),
    computed on the device: no length is read on the host (no sync, CUDA-graph capturable).
    A sequence of n rows has ceil(n / block) <= n / block + 1 blocks, so cdiv(total, block)
    + B programs cover every packing; the ones past the last block get sequence -1."""
    if cu_seqlens is None:
        return (triton.cdiv(rows.shape[2], block), heads, batch), rows  # rows: an unused stand-in
    programs = triton.cdiv(rows.shape[2], block) + batch
    counts = (cu_seqlens.diff() + block - 1) // block  # blocks per sequence
    ends = torch.cumsum(counts, 0)  # one past each sequence's last block
    pid = torch.arange(programs, device=rows.device)
    seq = torch.searchsorted(ends, pid, right=True)  # the sequence whose blocks hold pid
    first = ends.new_zeros(batch + 1)
    first[1:] = ends
    start = ((pid - first[seq]) * block).clamp_(min=0)  # >= 0 even for offsets nobody checked
    blocks = torch.stack([torch.where(seq < batch, seq, -1), start], dim=1).to(torch.int32)
    return (programs, heads, 1), blocks


def _output(q: Tensor, head_dim_v: int, varlen: bool, empty) -> Tensor:
    """The output buffer (B, H, L, Dv); a packed one is stored as FlashAttention returns it,
    (total, H, Dv) contiguous, and viewed as (1, H, total, Dv)."""
    _, h, lq, _ = q.shape
    if varlen:
        return empty(lq, h, head_dim_v).transpose(0, 1)[None]  # (total, H, Dv) -> (1, H, total, Dv)
    return empty(*q.shape[:3], head_dim_v)


def _tiles_in(tma: bool, block_rows: int, *tensors: Tensor) -> tuple:
    """The (B, H, L, D) tensors a kernel loop walks, as the kernel reads them: with TMA as
    tensor descriptors of (1, 1, block_rows, padded D) blocks (kernels._row_tile), else as
    they are."""
    if not tma:
        return tensors
    return tuple(_launch.descriptor(t, [1, 1, block_rows, _launch.pad(t.shape[-1])]) for t in tensors)


def _expanded(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """A 4-D bias broadcastable to (B, Hq, Lq, Lk) as an expanded view of that shape (stride 0
    on the broadcast dims: the kernels read it in place)."""
    return None if bias is None else bias.expand(*q.shape[:3], k.shape[2])


def dropout_seed(seed: Tensor, heads: int, lq: int, lk: int, place: Optional[tuple] = None) -> Tensor:
    """The kernels' dropout seed: int64 (7,) ``(seed, h0, heads, r0, rows, c0, cols)``.

    ``seed``: int64 (1,), or already (7,) (kept as is when ``place`` is None). ``place``:
    ``(h0, heads, r0, rows, c0, cols)``, where a call's (B, H, Lq, Lk) scores sit in a larger
    (B, heads, rows, cols) score matrix (its head h is h0 + h, query i row r0 + i, key j
    column c0 + j), so that the call draws exactly that block of the larger call's mask
    (``kernels.dropout_frame``); None: the call's own, (0, H, 0, Lq, 0, Lk). Packed
    sequences pass (H, total_q, total_k): sequence b's query i is packed row
    ``cu_seqlens_q[b] + i``, and its key j (counted from its first key) column j.

    Raises:
        ValueError: a ``place`` that does not hold the (H, Lq, Lk) block, or whose key offset
            c0 is not a multiple of 4 (the kernels draw keys in groups of four)."""
    if place is None:
        if seed.numel() == 7:
            return seed
        place = (0, heads, 0, lq, 0, lk)
    h0, n_heads, r0, rows, c0, cols = (int(x) for x in place)
    if c0 % 4 or min(h0, r0, c0) < 0 or h0 + heads > n_heads or r0 + lq > rows or c0 + lk > cols:
        raise ValueError(
            f"dropout_place {tuple(place)} (h0, heads, r0, rows, c0, cols) must hold scores of (H, Lq, Lk) = "
            f"({heads}, {lq}, {lk}) inside (heads, rows, cols) at offsets >= 0, with c0 a multiple of 4")
    offsets = torch.tensor([h0, n_heads, r0, rows, c0, cols], dtype=torch.int64, device=seed.device)
    return torch.cat([seed.reshape(-1)[:1].to(torch.int64), offsets])


def _placed(seed: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The seed as the kernels read it: (7,) (``dropout_seed``), None without dropout."""
    return seed if seed is None else dropout_seed(seed, q.shape[1], q.shape[2], k.shape[2])


@_launch.on_device
def _forward(q, k, v, bias, alibi, seed, sinks, cu_seqlens, options: FlashOptions, lowp: Optional[LowPrecision] = None):
    _, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bias = _expanded(bias, q, k)
    varlen = cu_seqlens[0] is not None
    seed = _placed(seed, q, k)
    out_dtype = q.dtype if lowp is None else lowp.out_dtype
    out = _output(q, v.shape[-1], varlen, lambda *shape: _launch.empty(*shape, like=q, dtype=out_dtype))
    lse = _launch.empty(*q.shape[:3], like=q, dtype=torch.float32)
    tma = _launch.tma(k, v)
    terms = _terms(bias, alibi, sinks, options)
    scales = (q, q) if lowp is None else (lowp.rows, q if lowp.cols is None else lowp.cols)  # q: unused stand-ins
    lowp_meta = {} if lowp is None else dict(LOWP=lowp.mode, **_launch.lowp_flags(v.dtype))

    def launch(tiles):
        pointers, strides, batch, meta = _launch_args(q, v, bias, alibi, seed, sinks, cu_seqlens, options, terms, tiles)
        grid, blocks = _grid(q, h, batch, tiles.block_m, cu_seqlens[0])
        k_in, v_in = _tiles_in(tma, tiles.block_n, k, v)
        kernels.attn_fwd_kernel[grid](
            q, k_in, v_in, out, lse, *pointers, blocks, *scales,
            *(_strides(t, varlen) for t in (q, k, v, out, lse)), *strides,
            h, h // hkv, lq, lk, TMA=tma, **{**meta, **lowp_meta},
        )

    tiles = (_candidates(q, v, terms, "fwd", tma) if lowp is None else
             _launch.lowp_candidates(max(q.shape[-1], v.shape[-1]), lowp.mode, q.device, tma, terms.costly()))
    _launch.first_fit(kernels.attn_fwd_kernel, q.device, tiles, launch,
                      key=(q.dtype, q.shape[-1], v.shape[-1], terms, varlen, tma, lowp_meta.get("LOWP")))
    return out, lse


@_launch.on_device
def _backward(do, q, k, v, out, lse, bias, alibi, seed, sinks, cu_seqlens, options: FlashOptions, bias_grad: bool):
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    varlen = cu_seqlens[0] is not None
    seed = _placed(seed, q, k)
    delta = _launch.softmax_delta(do, out)
    dq, dk, dv = (_launch.empty(*t.shape, like=t) for t in (q, k, v))
    small_bias, bias = bias, _expanded(bias, q, k)
    # The dQ kernel writes the bias gradient only for a bias with every dim its own; zeros, not
    # empty: blocks outside the causal/window band are skipped, and their gradient is 0.
    store_ds = bias_grad and tuple(small_bias.shape) == (b, h, lq, lk)
    ds = torch.zeros(b, h, lq, lk, device=q.device, dtype=small_bias.dtype) if store_ds else lse
    q_k_v_do_lse = tuple(_strides(t, varlen) for t in (q, k, v, do, lse))

    terms = _terms(bias, alibi, sinks, options)
    key = (q.dtype, q.shape[-1], v.shape[-1], terms, varlen)

    tma = _launch.tma(q, do)  # the dK/dV loop walks query rows
    for grads in _launch.key_grads(max(q.shape[-1], v.shape[-1])):
        def launch_dkdv(tiles, grads=grads):
            pointers, strides, batch, meta = _launch_args(q, v, bias, alibi, seed, sinks, cu_seqlens, options, terms,
                                                          tiles)
            q_in, do_in = _tiles_in(tma, tiles.block_m, q, do)
            grid, blocks = _grid(k, hkv, batch, tiles.block_n, cu_seqlens[1])
            kernels.attn_bwd_dkdv_kernel[grid](
                q_in, k, v, do_in, lse, delta, dk, dv, *pointers, blocks,
                *q_k_v_do_lse, _strides(dk, varlen), _strides(dv, varlen), *strides,
                hkv, h // hkv, lq, lk, TMA=tma, **grads, **meta,
            )

        _launch.first_fit(kernels.attn_bwd_dkdv_kernel, q.device, _candidates(q, v, terms, "dkdv", tma), launch_dkdv,
                          key=(*key, tma, tuple(grads.items())))

    ds_rows = lse if sinks is None else _launch.empty(*lse.shape, like=lse)  # lse: an unused stand-in
    tma = _launch.tma(k, v)  # the dQ loop walks key rows

    def launch_dq(tiles):
        pointers, strides, batch, meta = _launch_args(q, v, bias, alibi, seed, sinks, cu_seqlens, options, terms, tiles)
        k_in, v_in = _tiles_in(tma, tiles.block_n, k, v)
        grid, blocks = _grid(q, h, batch, tiles.block_m, cu_seqlens[0])
        kernels.attn_bwd_dq_kernel[grid](
            q, k_in, v_in, do, lse, delta, dq, ds, ds_rows, *pointers, blocks,
            *q_k_v_do_lse, _strides(dq, varlen), *strides,
            h, h // hkv, lq, lk, STORE_DS=store_ds, TMA=tma, **meta,
        )

    _launch.first_fit(kernels.attn_bwd_dq_kernel, q.device, _candidates(q, v, terms, "dq", tma), launch_dq,
                      key=(*key, tma, store_ds))
    if bias_grad and not store_ds:
        ds = _broadcast_bias_grad(do, q, k, v, lse, delta, small_bias, alibi, seed, options)
    elif not bias_grad:
        ds = lse.new_zeros(0)
    return dq, dk, dv, ds, _sinks_grad(sinks, lse, delta, ds_rows)


def _broadcast_bias_grad(do, q, k, v, lse, delta, bias, alibi, seed, options: FlashOptions) -> Tensor:
    """The gradient of a 4-D bias that broadcasts over some of (B, Hq, Lq, Lk), in its own
    shape and dtype, never (B, Hq, Lq, Lk): a learned (1, H, L, L) bias at 16k tokens would ask
    for B * H * L^2 fp32 there. The dbias kernel sums dS over the batch rows and heads the bias
    is broadcast to, in a fixed order in registers (deterministic, no atomics), recomputing each
    tile's P and dP (two of the backward's five products, again); a size-1 query or key dim is
    then summed here."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    bb, hb = bias.shape[0], bias.shape[1]
    full = _expanded(bias, q, k)
    terms = _terms(full, alibi, None, options)
    dbias = _launch.empty(bb, hb, lq, lk, like=bias)

    def launch(tiles):
        pointers, strides, _, meta = _launch_args(q, v, full, alibi, seed, None, (None, None), options, terms, tiles)
        del meta["VARLEN"]  # never packed: a bias takes no packed sequences
        # One stage: the loop walks the few (batch row, head) pairs a tile is broadcast to, and
        # pipelining its q/k/v/dO loads took more than the H100's shared memory.
        meta["num_stages"] = 1
        grid = (triton.cdiv(lq, tiles.block_m) * triton.cdiv(lk, tiles.block_n), hb, bb)
        kernels.attn_bwd_dbias_kernel[grid](
            q, k, v, do, lse, delta, dbias, *pointers[:3],
            q.stride(), k.stride(), v.stride(), do.stride(), lse.stride(), dbias.stride(), *strides,
            h, h // k.shape[1], b, lq, lk, BROADCAST_B=bb != b, BROADCAST_H=hb != h, **meta,
        )

    # dQ's tiles (the same q, k, v, dO tiles and one (queries, keys) accumulator).
    _launch.first_fit(kernels.attn_bwd_dbias_kernel, q.device, _candidates(q, v, terms, "dq", False), launch,
                      key=(q.dtype, q.shape[-1], v.shape[-1], terms, bb != b, hb != h))
    rows_or_keys = [d for d in (2, 3) if bias.shape[d] == 1]
    return dbias.sum(dim=rows_or_keys, keepdim=True) if rows_or_keys else dbias  # sum(dim=[]) sums all


def _sinks_grad(sinks: Optional[Tensor], lse: Tensor, delta: Tensor, ds_rows: Tensor) -> Tensor:
    """d loss / d sinks[h] = -sum over rows i of p_sink_i * t_i, with p_sink_i = exp(sink - lse_i)
    and t_i = sum_j p_ij dP_ij: the sink is a key whose value is 0, so its dP is 0.

    t_i equals delta_i = rowsum(dO * O) in exact arithmetic, but delta comes from the rounded
    output (bf16: ~3 digits), and the sum over every row would carry that error. The dQ kernel
    gives rowsum(dS) = t - delta * sum_j p_ij with the same delta, and sum_j p_ij = 1 - p_sink,
    so t = rowsum(dS) + delta * (1 - p_sink) cancels delta's rounding. lse, delta, ds_rows
    (B, H, L) float32; returns float32 (H,), or an empty (0,) without sinks."""
    if sinks is None:
        return lse.new_zeros(0)
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)  # (B, H, L)
    return -(p_sink * (ds_rows + delta * (1.0 - p_sink))).sum(dim=(0, 2))


# ---------------------------------------------------------------------------------------
# torch.library registration. Under the interpreter the kernels are plain Python calls on
# CPU tensors, so the ops are custom_op (opaque to the compiler) rather than triton_op,
# whose wrap_triton refuses interpreted kernels.

@torch.library.custom_op("fastattn::flash_fwd", mutates_args=())
def flash_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], alibi: Optional[Tensor],
    seed: Optional[Tensor], sinks: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    scale: float, softcap: Optional[float], dropout_p: float,
    window_left: Optional[int], window_right: Optional[int],
) -> tuple[Tensor, Tensor]:
    options = FlashOptions(scale, softcap, dropout_p, window_left, window_right)
    return _forward(q, k, v, bias, alibi, seed, sinks, (cu_seqlens_q, cu_seqlens_k), options)


@flash_fwd.register_fake
def _(q, k, v, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k, *options):
    out = _output(q, v.shape[-1], cu_seqlens_q is not None, q.new_empty)
    return out, q.new_empty(*q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastattn::flash_bwd", mutates_args=())
def flash_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Optional[Tensor], alibi: Optional[Tensor], seed: Optional[Tensor], sinks: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    scale: float, softcap: Optional[float], dropout_p: float,
    window_left: Optional[int], window_right: Optional[int], bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = FlashOptions(scale, softcap, dropout_p, window_left, window_right)
    return _backward(do, q, k, v, out, lse, bias, alibi, seed, sinks, (cu_seqlens_q, cu_seqlens_k), options,
                     bias_grad)


@flash_bwd.register_fake
def _(do, q, k, v, out, lse, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k, *options_and_bias_grad):
    ds = bias.new_empty(bias.shape) if options_and_bias_grad[-1] else q.new_empty(0, dtype=torch.float32)
    dsinks = q.new_empty(q.shape[1] if sinks is not None else 0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds, dsinks)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k = inputs[:9]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k)
    ctx.options = FlashOptions(*inputs[9:])
    ctx.bias_grad = bias is not None and bias.requires_grad


def _flash_fwd_backward(ctx, dout, dlse):
    # dlse is not propagated: lse is returned for merging partial results, not for training.
    q, k, v, out, lse, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv, ds, dsinks = flash_bwd(dout, q, k, v, out, lse, bias, alibi, seed, sinks, cu_seqlens_q,
                                       cu_seqlens_k, *ctx.options, ctx.bias_grad)
    dbias = ds if ctx.bias_grad else None
    dsinks = dsinks.to(sinks.dtype) if sinks is not None else None
    return (dq, dk, dv, dbias, None, None, dsinks) + (None,) * (2 + len(FlashOptions._fields))


flash_fwd.register_autograd(_flash_fwd_backward, setup_context=_setup_context)


def flash_attn(q, k, v, *, bias=None, alibi=None, seed=None, sinks=None, scale, softcap=None, dropout_p=0.0,
               window_left=None, window_right=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_place=None,
               lowp: Optional[LowPrecision] = None):
    """Validated inputs -> (out, lse). ``bias``: 4-D, broadcastable to (B, Hq, Lq, Lk) (read in
    place; its gradient comes back in its own shape and dtype, never (B, Hq, Lq, Lk)); softcap
    None is no cap; ``sinks`` (Hq,) or None. Packed sequences: q, k, v are (1, H, total, D)
    views, ``cu_seqlens_q/k`` int32 (B + 1,) contiguous, never read on the host (the grid comes
    from shapes); out and lse come back (1, H, total, ...). ``seed``: int64 (1,) with dropout;
    ``dropout_place``: (h0, heads, r0, rows, c0, cols), the call's block of a larger call
    whose mask it draws (``dropout_seed``; packed: of (H, total_q, total_k)). ``lowp``: a
    low-precision forward (``LowPrecision``; q, k, v as it says), forward only: it is not a
    custom op and has no gradient."""
    options = FlashOptions(scale, softcap, dropout_p, window_left, window_right)
    if dropout_place is not None:
        seed = dropout_seed(seed, q.shape[1], q.shape[2], k.shape[2], dropout_place)
    sinks = None if sinks is None else sinks.contiguous()
    if lowp is not None:
        return _forward(q, k, v, bias, alibi, seed, sinks, (cu_seqlens_q, cu_seqlens_k), options, lowp)
    return flash_fwd(q, k, v, bias, alibi, seed, sinks, cu_seqlens_q, cu_seqlens_k, *options)


def flash_backward(do, q, k, v, out, lse, *, bias=None, alibi=None, seed=None, scale, softcap=None,
                   dropout_p=0.0, window_left=None, window_right=None, bias_grad=False, dropout_place=None):
    """Gradients of ``flash_attn``'s output, for callers that run the backward themselves
    (context parallelism merges the blocks' forwards by their lse, then differentiates each).

    Shapes: q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); out and do (B, Hq, Lq, Dv),
    any strides; lse float32 (B, Hq, Lq), the forward's (natural log; -inf for a row that sees
    no key). The options are flash_attn's, and must be the forward's (the same seed redraws
    the same dropout, ``dropout_place`` included). Returns ``(dq, dk, dv, ds)``: dq, dk, dv contiguous in q's, k's, v's
    shapes and dtypes (dk, dv summed over each kv head's GQA group), and ds, the gradient
    of the 4-D ``bias`` (the logits' gradient summed over the dims it broadcasts over), in its
    shape and dtype, when ``bias_grad``; else an empty float32 (0,). Runs as the
    ``fastattn::flash_bwd`` custom op.
    """
    options = FlashOptions(scale, softcap, dropout_p, window_left, window_right)
    if dropout_place is not None:
        seed = dropout_seed(seed, q.shape[1], q.shape[2], k.shape[2], dropout_place)
    return flash_bwd(do, q, k, v, out, lse.contiguous(), bias, alibi, seed, None, None, None, *options,
                     bias_grad)[:4]


@_launch.on_device
def dropout_keep_mask(seed: Tensor, b: int, h: int, lq: int, lk: int, dropout_p: float,
                      place: Optional[tuple] = None) -> Tensor:
    """The bool keep-mask (B, H, Lq, Lk) that the kernels draw for ``seed`` (int64 (1,)) on a
    dense call, or with ``place`` on a call placed there (``dropout_seed``; ValueError as it)."""
    seed = dropout_seed(seed, h, lq, lk, place)
    keep = _launch.empty(b * h, lq, lk, like=seed, dtype=torch.uint8)
    grid = (triton.cdiv(lq, 32) * triton.cdiv(lk, 32), h, b)
    kernels.dropout_mask_kernel[grid](keep, seed, h, lq, lk, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.view(b, h, lq, lk).bool()

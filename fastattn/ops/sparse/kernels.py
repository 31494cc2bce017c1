"""Triton kernels for block-sparse attention: forward, dK/dV and dQ.

The layout arrives in compressed-row form (see ``fastattn/sparse.py``): ``CROW``/``COL`` list,
for every query block of every layout head, its kept key blocks; ``CCOL``/``ROW`` are the
transpose (for every key block, its query blocks), which the dK/dV kernel walks. A layout
shared by all heads has ``layout_stride_h`` 0. Programs loop only over the kept blocks, so
work is proportional to them; a dropped block is never loaded.

Kernel tiles (BLOCK_M x BLOCK_N) divide the layout's block (LAYOUT_BLOCK, a power of two
>= 16): one program owns BLOCK_M rows inside one layout block, and each kept layout block is
walked in BLOCK_N (or BLOCK_M) sub-tiles. The per-tile math (online softmax, masking of the
partial last block and of causal positions, the backward tile) is the softmax-attention
helpers' of ``fastattn/ops/_triton.py``, with ``TERMS`` holding causal (a band whose right
edge is the diagonal) as the only logit term and ``scalars`` = (scale, 1.0, 0.0, 0, 0).
Positions follow flash: ``diag = Lk - Lq``; causal keeps key j for query i iff ``j <= i + diag``.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import (
    bwd_tile, dot, cast, load_query_rows, load_rows, load_tile, program_heads, rows_base, softmax_finish,
    softmax_init, softmax_update, span, store_rows, term_logits,
)


@triton.jit
def _key_tiles_end(start_m, kb_start, seqlen_k, diag,
                   BLOCK_M: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, TERMS: tl.constexpr):
    """End (exclusive, relative to kb_start) of the key sub-tiles of a kept block that rows
    start_m .. start_m + BLOCK_M - 1 need. min is written as arithmetic (interpreter)."""
    hi = seqlen_k - kb_start  # the partial last key block stops at seqlen_k
    hi = LAYOUT_BLOCK + (hi - LAYOUT_BLOCK) * (hi < LAYOUT_BLOCK)
    if TERMS.RIGHT:  # causal
        c = start_m + BLOCK_M + diag - kb_start  # keys from here on are after every row's diagonal
        hi = hi + (c - hi) * (c < hi)
    return hi


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, O, LSE, CROW, COL,
    q_strides, k_strides, v_strides, o_strides, lse_strides,
    n_heads, group, seqlen_q, seqlen_k, layout_stride_h, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, TERMS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h, _bh, hk = program_heads(n_heads, group)
    diag = seqlen_k - seqlen_q

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    q = load_rows(Q, q_strides, b, h, 0, offs_m, offs_d, row_ok, d_ok)
    k_base = rows_base(K, k_strides, b, hk, 0)
    v_base = rows_base(V, v_strides, b, hk, 0)

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)

    # This tile lies inside one layout row: (layout head, query block).
    row = h * layout_stride_h + start_m // LAYOUT_BLOCK
    first = tl.load(CROW + row)
    last = tl.load(CROW + row + 1)
    for i in range(first, last):
        kb_start = tl.load(COL + i) * LAYOUT_BLOCK  # first key of this kept block
        hi = _key_tiles_end(start_m, kb_start, seqlen_k, diag, BLOCK_M, LAYOUT_BLOCK, TERMS)
        for sub in range(0, hi, BLOCK_N):
            offs_n, col_ok = span(kb_start + sub, BLOCK_N, seqlen_k)
            k = load_tile(k_base, offs_n, offs_d, k_strides[2], k_strides[3], col_ok, d_ok)
            qk = dot(q, tl.trans(k), DOT_FP32, PRECISION) * scalars[0]
            s = term_logits(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag, scalars, Q, q_strides, 0.0, TERMS)
            p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
            v = load_tile(v_base, offs_n, offs_dv, v_strides[2], v_strides[3], col_ok, dv_ok)
            acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)

    out, lse = softmax_finish(acc, m_i, l_i)  # no kept key (empty layout row, or causal): 0, -inf
    store_rows(O, o_strides, b, h, 0, out, offs_m, offs_dv, row_ok, dv_ok, BF16_RTNE)
    tl.store(LSE + b * lse_strides[0] + h * lse_strides[1] + offs_m * lse_strides[2], lse, mask=row_ok)


@triton.jit
def sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CCOL, ROW,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides, dv_strides,
    n_kv_heads, group, seqlen_q, seqlen_k, layout_stride_h, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, TERMS: tl.constexpr, GRAD_K: tl.constexpr, GRAD_V: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dK (GRAD_K) and dV (GRAD_V) for one tile of keys of one kv head, summed over the group
    query heads that share it (each with its own layout row). Walks the transposed layout.
    DK/DV contiguous. One gradient per launch at d256, as flash (``_launch.key_grads``)."""
    start_n = tl.program_id(0) * BLOCK_N
    b, hk, _, _ = program_heads(n_kv_heads, 1)  # grid (blocks, kv heads, batch)
    diag = seqlen_k - seqlen_q

    offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    k = load_rows(K, k_strides, b, hk, 0, offs_n, offs_d, col_ok, d_ok)
    v = load_rows(V, v_strides, b, hk, 0, offs_n, offs_dv, col_ok, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    kblock = start_n // LAYOUT_BLOCK

    for g in range(0, group):
        h = hk * group + g
        row = h * layout_stride_h + kblock  # (layout head, key block) of the transposed layout
        first = tl.load(CCOL + row)
        last = tl.load(CCOL + row + 1)
        for i in range(first, last):
            qb_start = tl.load(ROW + i) * LAYOUT_BLOCK  # first query of this kept block
            hi = seqlen_q - qb_start  # the partial last query block stops at seqlen_q
            hi = LAYOUT_BLOCK + (hi - LAYOUT_BLOCK) * (hi < LAYOUT_BLOCK)
            lo = qb_start * 0
            if TERMS.RIGHT:  # causal
                # Query i sees key j iff i >= j - diag: rows before start_n - diag see none
                # of this tile; start at the sub-tile holding that row.
                lo = start_n - diag - qb_start
                lo = lo * (lo > 0)
                lo = (lo // BLOCK_M) * BLOCK_M
            for sub in range(lo, hi, BLOCK_M):
                offs_m, row_ok = span(qb_start + sub, BLOCK_M, seqlen_q)
                q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h,
                                                    qb_start + sub, offs_m - qb_start - sub, row_ok,
                                                    offs_d, d_ok, offs_dv, dv_ok)
                # (keys, queries) tiles: the key block is the tall side of all four products.
                p, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, 0, seqlen_q, seqlen_k, diag,
                                        (0, 0), 0, 0.0, Q, q_strides, scalars, TERMS, True, DOT_FP32, PRECISION)
                if GRAD_V:
                    dv += dot(cast(p, do.dtype, BF16_RTNE), do, DOT_FP32, PRECISION)
                if GRAD_K:
                    dk += dot(cast(ds, q.dtype, BF16_RTNE), q, DOT_FP32, PRECISION)

    if GRAD_K:  # the scores were q.k * scale
        store_rows(DK, dk_strides, b, hk, 0, dk * scalars[0], offs_n, offs_d, col_ok, d_ok, BF16_RTNE)
    if GRAD_V:
        store_rows(DV, dv_strides, b, hk, 0, dv, offs_n, offs_dv, col_ok, dv_ok, BF16_RTNE)


@triton.jit
def sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CROW, COL,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides,
    n_heads, group, seqlen_q, seqlen_k, layout_stride_h, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, TERMS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ for one tile of queries over its row's kept key blocks (no atomics). DQ contiguous."""
    start_m = tl.program_id(0) * BLOCK_M
    b, h, _bh, hk = program_heads(n_heads, group)
    diag = seqlen_k - seqlen_q

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, start_m,
                                        offs_m - start_m, row_ok, offs_d, d_ok, offs_dv, dv_ok)
    k_base = rows_base(K, k_strides, b, hk, 0)
    v_base = rows_base(V, v_strides, b, hk, 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row = h * layout_stride_h + start_m // LAYOUT_BLOCK
    first = tl.load(CROW + row)
    last = tl.load(CROW + row + 1)
    for i in range(first, last):
        kb_start = tl.load(COL + i) * LAYOUT_BLOCK
        hi = _key_tiles_end(start_m, kb_start, seqlen_k, diag, BLOCK_M, LAYOUT_BLOCK, TERMS)
        for sub in range(0, hi, BLOCK_N):
            offs_n, col_ok = span(kb_start + sub, BLOCK_N, seqlen_k)
            k = load_tile(k_base, offs_n, offs_d, k_strides[2], k_strides[3], col_ok, d_ok)
            v = load_tile(v_base, offs_n, offs_dv, v_strides[2], v_strides[3], col_ok, dv_ok)
            _, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, 0, seqlen_q, seqlen_k, diag,
                                (0, 0), 0, 0.0, Q, q_strides, scalars, TERMS, False, DOT_FP32, PRECISION)
            dq += dot(cast(ds, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)

    # The scores were q.k * scale.
    store_rows(DQ, dq_strides, b, h, 0, dq * scalars[0], offs_m, offs_d, row_ok, d_ok, BF16_RTNE)

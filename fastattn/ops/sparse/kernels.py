"""Triton kernels for block-sparse attention: forward, dK/dV and dQ.

The layout arrives in compressed-row form (see ``fastattn/sparse.py``): ``CROW``/``COL`` list,
for every query block of every layout head, its kept key blocks; ``CCOL``/``ROW`` are the
transpose (for every key block, its query blocks), which the dK/dV kernel walks. A layout
shared by all heads has ``layout_stride_h`` 0. Programs loop only over the kept blocks, so
work is proportional to them; a dropped block is never loaded.

Kernel tiles (BLOCK_M x BLOCK_N) divide the layout's block (LAYOUT_BLOCK, a power of two
>= 16): one program owns BLOCK_M rows inside one layout block, and each kept layout block is
walked in BLOCK_N (or BLOCK_M) sub-tiles. The per-tile math (online softmax, masking of the
partial last block and of causal positions) is the flash kernels', reused from there.
Positions follow flash: ``diag = Lk - Lq``; causal keeps key j for query i iff ``j <= i + diag``.
"""
import triton
import triton.language as tl

from fastattn.ops.flash.kernels import LOG2E, _cast, _dot, _logits


@triton.jit
def _tile_logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, Q, CAUSAL: tl.constexpr):
    # Only bounds and causal masking apply here; the flash helper's other features are off
    # (Q stands in for the unused bias pointer).
    return _logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, 1.0, 0, 0,
                   Q, 0, 0, 0.0,
                   False, False, False, False, False, CAUSAL)


@triton.jit
def _key_tiles_end(start_m, kb_start, seqlen_k, diag,
                   BLOCK_M: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """End (exclusive, relative to kb_start) of the key sub-tiles of a kept block that rows
    start_m .. start_m + BLOCK_M - 1 need. min is written as arithmetic (interpreter)."""
    hi = seqlen_k - kb_start  # the partial last key block stops at seqlen_k
    hi = LAYOUT_BLOCK + (hi - LAYOUT_BLOCK) * (hi < LAYOUT_BLOCK)
    if CAUSAL:
        c = start_m + BLOCK_M + diag - kb_start  # keys from here on are after every row's diagonal
        hi = hi + (c - hi) * (c < hi)
    return hi


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, O, LSE, CROW, COL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, group, seqlen_q, seqlen_k, layout_stride_h,
    scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): CUDA caps axes 1 and 2 at 65535
    b = tl.program_id(2).to(tl.int64)
    bh = b * n_heads + h
    hk = h // group  # GQA: query head h reads kv head h // group, no copy of K/V
    diag = seqlen_k - seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # This tile lies inside one layout row: (layout head, query block).
    row = h * layout_stride_h + start_m // LAYOUT_BLOCK
    first = tl.load(CROW + row)
    last = tl.load(CROW + row + 1)
    for i in range(first, last):
        kb_start = tl.load(COL + i) * LAYOUT_BLOCK  # first key of this kept block
        hi = _key_tiles_end(start_m, kb_start, seqlen_k, diag, BLOCK_M, LAYOUT_BLOCK, CAUSAL)
        for sub in range(0, hi, BLOCK_N):
            offs_n = kb_start + sub + offs_n0
            col_ok = offs_n < seqlen_k
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
            s = _tile_logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, Q, CAUSAL)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys has max -inf; subtract 0 instead so that
            # exp(-inf - m) is 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
            alpha = tl.math.exp2((m_i - m_safe) * LOG2E)  # rescales what was summed under the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)
            m_i = m_new

    empty = l_i == 0.0  # no kept key (empty layout row, or causal): output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


@triton.jit
def sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CCOL, ROW,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_kv_heads, group, seqlen_q, seqlen_k, layout_stride_h,
    scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dK, dV for one tile of keys of one kv head, summed over the group query heads that
    share it (each with its own layout row). Walks the transposed layout. DK/DV contiguous."""
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)  # grid (blocks, kv heads, batch)
    b = tl.program_id(2).to(tl.int64)
    bhk = b * n_kv_heads + hk
    n_heads = n_kv_heads * group
    diag = seqlen_k - seqlen_q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    kblock = start_n // LAYOUT_BLOCK

    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row = h * layout_stride_h + kblock  # (layout head, key block) of the transposed layout
        first = tl.load(CCOL + row)
        last = tl.load(CCOL + row + 1)
        for i in range(first, last):
            qb_start = tl.load(ROW + i) * LAYOUT_BLOCK  # first query of this kept block
            hi = seqlen_q - qb_start  # the partial last query block stops at seqlen_q
            hi = LAYOUT_BLOCK + (hi - LAYOUT_BLOCK) * (hi < LAYOUT_BLOCK)
            lo = qb_start * 0
            if CAUSAL:
                # Query i sees key j iff i >= j - diag: rows before start_n - diag see none
                # of this tile; start at the sub-tile holding that row.
                lo = start_n - diag - qb_start
                lo = lo * (lo > 0)
                lo = (lo // BLOCK_M) * BLOCK_M
            for sub in range(lo, hi, BLOCK_M):
                offs_m = qb_start + sub + offs_m0
                row_ok = offs_m < seqlen_q
                q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                             mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
                lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=row_ok, other=0.0)
                qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
                s = _tile_logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, Q, CAUSAL)
                # A row with no kept key has lse -inf; use +inf so p = exp(-inf) = 0, not NaN.
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
                p = tl.math.exp2((s - lse[:, None]) * LOG2E)  # the forward's softmax, recomputed
                dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
                dv += _dot(tl.trans(_cast(p, do.dtype, BF16_RTNE)), do, DOT_FP32, PRECISION)
                # Softmax backward: dS = P * (dP - rowsum(dO * O)).
                ds = p * (dp - delta[:, None])
                dk += _dot(tl.trans(_cast(ds, q.dtype, BF16_RTNE)), q, DOT_FP32, PRECISION)

    dk = dk * scale  # the scores were q.k * scale
    out_rows = bhk.to(tl.int64) * seqlen_k + offs_n
    tl.store(DK + out_rows[:, None] * HEAD_DIM + offs_d[None, :], _cast(dk, DK.dtype.element_ty, BF16_RTNE),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + out_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], _cast(dv, DV.dtype.element_ty, BF16_RTNE),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CROW, COL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, group, seqlen_q, seqlen_k, layout_stride_h,
    scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ for one tile of queries over its row's kept key blocks (no atomics). DQ contiguous."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): CUDA caps axes 1 and 2 at 65535
    b = tl.program_id(2).to(tl.int64)
    bh = b * n_heads + h
    hk = h // group
    diag = seqlen_k - seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # row with no kept key -> p = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row = h * layout_stride_h + start_m // LAYOUT_BLOCK
    first = tl.load(CROW + row)
    last = tl.load(CROW + row + 1)
    for i in range(first, last):
        kb_start = tl.load(COL + i) * LAYOUT_BLOCK
        hi = _key_tiles_end(start_m, kb_start, seqlen_k, diag, BLOCK_M, LAYOUT_BLOCK, CAUSAL)
        for sub in range(0, hi, BLOCK_N):
            offs_n = kb_start + sub + offs_n0
            col_ok = offs_n < seqlen_k
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
            qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
            s = _tile_logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, Q, CAUSAL)
            p = tl.math.exp2((s - lse[:, None]) * LOG2E)
            dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(_cast(ds, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)

    dq = dq * scale
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, BF16_RTNE),
             mask=row_ok[:, None] & d_ok[None, :])

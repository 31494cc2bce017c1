"""Triton kernels for exact (flash) attention: forward, dK/dV and dQ.

Layout: every tensor is (batch, heads, seq, dim) with arbitrary strides; the launchers in
``op.py`` pass all strides. One program owns one block of rows (queries in the forward and
dQ kernels, keys in the dK/dV kernel) of one (batch, head). Scores are never stored: they
are recomputed blockwise, and the softmax is carried online (running max ``m`` and sum ``l``).

Positions (see ``reference.py``): ``rel = j - i - diag`` is key j's distance from query i's
diagonal, with diag = Lk - Lq. The band keeps ``-window_left <= rel <= window_right``.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E); exp2 is the fast hardware path


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1; exact at the limits, and tl has no portable tanh.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _round_bf16(x):
    """fp32 -> fp32 holding x rounded to the nearest bf16 (ties to even). Triton's interpreter
    converts fp32 to bf16 by truncation, doubling the rounding error of every bf16 result, so
    under the interpreter (BF16_RTNE) values are rounded here first and the cast is then exact.
    On a GPU the cast itself rounds to nearest and BF16_RTNE is off."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carry into bit 16 iff the dropped half rounds up
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, dtype, BF16_RTNE: tl.constexpr):
    """x.to(dtype), rounding to nearest under the interpreter too (see _round_bf16)."""
    if BF16_RTNE:
        x = _round_bf16(x)
    return x.to(dtype)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:
        # The interpreter's bf16 dot is wrong; fp32 operands hold bf16 values exactly.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _logits(
    qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, softcap, window_left, window_right,
    bias_base, stride_bm, stride_bn, slope,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Scaled scores ``qk`` (BLOCK_M, BLOCK_N) -> final logits, -inf where masked."""
    s = qk
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    valid = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    rel = offs_n[None, :] - offs_m[:, None] - diag
    if HAS_LEFT:
        valid = valid & (rel >= -window_left)
    if HAS_RIGHT:
        valid = valid & (rel <= window_right)
    if HAS_BIAS:
        in_bounds = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        b_ptrs = bias_base + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :].to(tl.int64) * stride_bn
        if BIAS_IS_BOOL:
            valid = valid & (tl.load(b_ptrs, mask=in_bounds, other=0) != 0)
        else:
            s = s + tl.load(b_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        s = s - slope * tl.abs(rel).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p):
    # One Philox counter per (batch*head, query, key): the backward regenerates the same mask.
    offs = (bh.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _bwd_tile(
    q, k, v, do, lse, delta, offs_m, offs_n, bh, seed, slope, bias_base, stride_bm, stride_bn,
    seqlen_q, seqlen_k, diag, scale, softcap, dropout_p, window_left, window_right,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one (BLOCK_M, BLOCK_N) tile of the forward and differentiate it.

    Returns (p_drop, ds, ds_qk): the probabilities after dropout (for dV), the gradient of
    the final logits (= of an additive bias), and the gradient of the scaled q.k (for dQ, dK).
    """
    qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
    s = _logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, softcap, window_left, window_right,
                bias_base, stride_bm, stride_bn, slope,
                HAS_BIAS, BIAS_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT)
    # A fully masked row has lse -inf; use +inf so that p = exp(-inf) = 0, not NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.math.exp2((s - lse[:, None]) * LOG2E)  # the forward's softmax, recomputed
    dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    # Softmax backward: dS = P * (dP - rowsum(dO * O)).
    ds = p * (dp - delta[:, None])
    ds_qk = ds
    if HAS_SOFTCAP:
        t = _tanh(qk / softcap)
        ds_qk = ds * (1.0 - t * t)  # d/dx [c * tanh(x / c)] = 1 - tanh^2
    return p_drop, ds, ds_qk


@triton.jit
def _key_range(start_m, seqlen_k, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of key positions that query rows start_m .. start_m + BLOCK_M - 1 can see.

    Blocks outside it are skipped entirely. max/min are written as arithmetic because the
    interpreter turns tl.minimum of two scalars into an array.
    """
    lo = start_m * 0
    hi = lo + seqlen_k
    if HAS_LEFT:
        lo = start_m + diag - window_left
        lo = lo * (lo > 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = start_m + BLOCK_M + diag + window_right  # one past the last visible key
        hi = seqlen_k + (hi - seqlen_k) * (hi < seqlen_k)
    return lo, hi


@triton.jit
def _query_range(start_n, seqlen_q, diag, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of query positions that can see key columns start_n .. start_n + BLOCK_N - 1."""
    lo = start_n * 0
    hi = lo + seqlen_q
    if HAS_RIGHT:
        lo = start_n - diag - window_right  # rel <= right  <=>  i >= j - diag - right
        lo = lo * (lo > 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = start_n + BLOCK_N - diag + window_left  # rel >= -left  <=>  i <= j - diag + left
        hi = seqlen_q + (hi - seqlen_q) * (hi < seqlen_q)
    return lo, hi


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, BIAS, ALIBI, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    n_heads, group, seqlen_q, seqlen_k,
    scale, softcap, dropout_p, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
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

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, hi = _key_range(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seqlen_k
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
        s = _logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, softcap, window_left, window_right,
                    bias_base, stride_bm, stride_bn, slope,
                    HAS_BIAS, BIAS_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys its max is -inf; subtract 0 instead so that
        # exp(-inf - m) is 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser counts dropped entries too
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, lse -inf, as torch >= 2.5
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, ALIBI, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    n_kv_heads, group, seqlen_q, seqlen_k,
    scale, softcap, dropout_p, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dK, dV for one block of keys of one kv head, summed over the group query heads that
    share it, so GQA never allocates Hq-sized key gradients. DK/DV are contiguous."""
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
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo, hi = _query_range(start_n, seqlen_q, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        bias_base = BIAS + b * stride_bb + h * stride_bh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seqlen_q
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=row_ok, other=0.0)
            p_drop, ds, ds_qk = _bwd_tile(
                q, k, v, do, lse, delta, offs_m, offs_n, bh, seed, slope, bias_base, stride_bm, stride_bn,
                seqlen_q, seqlen_k, diag, scale, softcap, dropout_p, window_left, window_right,
                HAS_BIAS, BIAS_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT,
                DOT_FP32, PRECISION)
            dv += _dot(tl.trans(_cast(p_drop, do.dtype, BF16_RTNE)), do, DOT_FP32, PRECISION)
            dk += _dot(tl.trans(_cast(ds_qk, q.dtype, BF16_RTNE)), q, DOT_FP32, PRECISION)

    dk = dk * scale  # the scores were q.k * scale
    out_rows = bhk.to(tl.int64) * seqlen_k + offs_n
    tl.store(DK + out_rows[:, None] * HEAD_DIM + offs_d[None, :], _cast(dk, DK.dtype.element_ty, BF16_RTNE),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + out_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], _cast(dv, DV.dtype.element_ty, BF16_RTNE),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, BIAS, ALIBI, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    n_heads, group, seqlen_q, seqlen_k,
    scale, softcap, dropout_p, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ for one block of queries (no atomics: deterministic). With STORE_DS it also writes
    dS, the gradient of the logits, which is the gradient of an additive bias. DQ, DS are
    contiguous."""
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
    delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_range(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seqlen_k
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        _, ds, ds_qk = _bwd_tile(
            q, k, v, do, lse, delta, offs_m, offs_n, bh, seed, slope, bias_base, stride_bm, stride_bn,
            seqlen_q, seqlen_k, diag, scale, softcap, dropout_p, window_left, window_right,
            HAS_BIAS, BIAS_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT,
            DOT_FP32, PRECISION)
        if STORE_DS:
            ds_ptrs = DS + (bh.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
            tl.store(ds_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
        dq += _dot(_cast(ds_qk, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)

    dq = dq * scale
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, BF16_RTNE),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def dropout_mask_kernel(KEEP, SEED, n_heads, seqlen_q, seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask the attention kernels draw, (B*H, Lq, Lk) uint8: for tests and
    for anyone who needs to reproduce a dropout pattern with the reference."""
    n_blocks = tl.cdiv(seqlen_k, BLOCK_N)  # grid (Lq blocks x Lk blocks, heads, batch)
    offs_m = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64) * n_heads + tl.program_id(1)
    keep = _dropout_keep(tl.load(SEED), bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
    ptrs = KEEP + (bh.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))

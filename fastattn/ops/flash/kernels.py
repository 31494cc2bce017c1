"""Triton kernels for exact (flash) attention: forward, dK/dV and dQ.

Layout: every tensor is (batch, heads, seq, dim) with arbitrary strides; the launchers in
``op.py`` pass each tensor's strides as one tuple (``q_strides``...). With VARLEN the batch
holds packed sequences (FlashAttention's varlen layout): the tensors are (1, heads, total,
dim) views with batch stride 0, the grid's batch axis walks the sequences, and
``CU_SEQLENS_Q/K`` give each sequence's first row and length; every position below is then
local to its sequence, so no tile reads across a boundary. The logit terms compiled
in are one constexpr, ``TERMS`` (``fastattn/ops/_launch.py: Terms``); their runtime values are
the ``scalars`` tuple (scale, softcap, dropout_p, window_left, window_right). One program owns one block of rows (queries in the forward and
dQ kernels, keys in the dK/dV kernel) of one (batch, head). Scores are never stored: they
are recomputed blockwise, and the softmax is carried online (running max ``m`` and sum ``l``).

Positions (see ``reference.py``): ``rel = j - i - diag`` is key j's distance from query i's
diagonal, with diag = Lk - Lq. The band keeps ``-window_left <= rel <= window_right``. The
per-tile math (logits, online softmax, the backward tile) is ``fastattn/ops/_triton.py``'s;
what is flash's own is the band's block ranges and the three kernels' loops.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import (
    bwd_tile, cast, dot, dropout_keep, load_query_rows, load_rows, load_tile, program_heads, rows_base,
    sequence, softmax_finish, softmax_init, softmax_update, span, store_key_grads, store_rows, store_tile,
    term_logits,
)


@triton.jit
def _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS: tl.constexpr):
    """(ALiBi slope of head h, dropout seed); 0 for a term that is off."""
    slope = 0.0
    if TERMS.ALIBI:
        slope = tl.load(ALIBI + b * alibi_strides[0] + h * alibi_strides[1]).to(tl.float32)
    seed = 0
    if TERMS.DROPOUT:
        seed = tl.load(SEED)
    return slope, seed


@triton.jit
def _key_range(start_m, seqlen_k, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TERMS: tl.constexpr):
    """[lo, hi) of key positions that query rows start_m .. start_m + BLOCK_M - 1 can see.

    Blocks outside it are skipped entirely. max/min are written as arithmetic because the
    interpreter turns tl.minimum of two scalars into an array.
    """
    lo = start_m * 0
    hi = lo + seqlen_k
    if TERMS.LEFT:
        lo = start_m + diag - window_left
        lo = lo * (lo > 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if TERMS.RIGHT:
        hi = start_m + BLOCK_M + diag + window_right  # one past the last visible key
        hi = seqlen_k + (hi - seqlen_k) * (hi < seqlen_k)
    return lo, hi


@triton.jit
def _query_range(start_n, seqlen_q, diag, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TERMS: tl.constexpr):
    """[lo, hi) of query positions that can see key columns start_n .. start_n + BLOCK_N - 1."""
    lo = start_n * 0
    hi = lo + seqlen_q
    if TERMS.RIGHT:
        lo = start_n - diag - window_right  # rel <= right  <=>  i >= j - diag - right
        lo = lo * (lo > 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if TERMS.LEFT:
        hi = start_n + BLOCK_N - diag + window_left  # rel >= -left  <=>  i <= j - diag + left
        hi = seqlen_q + (hi - seqlen_q) * (hi < seqlen_q)
    return lo, hi


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, BIAS, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
    q_strides, k_strides, v_strides, o_strides, lse_strides, bias_strides, alibi_strides,
    n_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """Output and lse of one block of queries of one (sequence, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    b, h, bh, hk = program_heads(n_heads, group)
    q0, seqlen_q = sequence(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    k0, seqlen_k = sequence(CU_SEQLENS_K, b, seqlen_k, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:  # the grid covers the longest sequence
            return
    diag = seqlen_k - seqlen_q
    scale, dropout_p, window_left, window_right = scalars[0], scalars[2], scalars[3], scalars[4]

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    q = load_rows(Q, q_strides, b, h, q0, offs_m, offs_d, row_ok, d_ok)
    k_base = rows_base(K, k_strides, b, hk, k0)
    v_base = rows_base(V, v_strides, b, hk, k0)
    bias_base = rows_base(BIAS, bias_strides, b, h, 0)
    slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)

    lo, hi = _key_range(start_m, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N, TERMS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
        k = load_tile(k_base, offs_n, offs_d, k_strides[2], k_strides[3], col_ok, d_ok)
        qk = dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
        s = term_logits(qk, offs_m, offs_n, seqlen_q, seqlen_k, diag, scalars, bias_base, bias_strides, slope,
                        TERMS)
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
        v = load_tile(v_base, offs_n, offs_dv, v_strides[2], v_strides[3], col_ok, dv_ok)
        if TERMS.DROPOUT:
            # The softmax normalises by the undropped sum l; dropout scales what reaches V.
            keep = dropout_keep(seed, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)

    out, lse = softmax_finish(acc, m_i, l_i)  # every key masked: output 0, lse -inf, as torch >= 2.5
    store_rows(O, o_strides, b, h, q0, out, offs_m, offs_dv, row_ok, dv_ok, BF16_RTNE)
    lse_row = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
    tl.store(LSE + lse_row, lse, mask=row_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides, dv_strides, bias_strides,
    alibi_strides,
    n_kv_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """dK, dV for one block of keys of one kv head, summed over the group query heads that
    share it, so GQA never allocates Hq-sized key gradients."""
    start_n = tl.program_id(0) * BLOCK_N
    b, hk, _, _ = program_heads(n_kv_heads, 1)  # grid (blocks, kv heads, sequences)
    q0, seqlen_q = sequence(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    k0, seqlen_k = sequence(CU_SEQLENS_K, b, seqlen_k, VARLEN)
    if VARLEN:
        if start_n >= seqlen_k:
            return
    n_heads = n_kv_heads * group
    diag = seqlen_k - seqlen_q

    offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    k = load_rows(K, k_strides, b, hk, k0, offs_n, offs_d, col_ok, d_ok)
    v = load_rows(V, v_strides, b, hk, k0, offs_n, offs_dv, col_ok, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo, hi = _query_range(start_n, seqlen_q, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        bias_base = rows_base(BIAS, bias_strides, b, h, 0)
        slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
            q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, q0,
                                                offs_m, row_ok, offs_d, d_ok, offs_dv, dv_ok)
            p_drop, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, seqlen_q, seqlen_k, diag,
                                         bh, seed, slope, bias_base, bias_strides, scalars,
                                         TERMS, DOT_FP32, PRECISION)
            dv += dot(tl.trans(cast(p_drop, do.dtype, BF16_RTNE)), do, DOT_FP32, PRECISION)
            dk += dot(tl.trans(cast(ds_qk, q.dtype, BF16_RTNE)), q, DOT_FP32, PRECISION)

    store_key_grads(DK, DV, dk_strides, dv_strides, dk, dv, b, hk, k0, scalars[0], offs_n, offs_d, offs_dv,
                    col_ok, d_ok, dv_ok, BF16_RTNE)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, BIAS, ALIBI, SEED, CU_SEQLENS_Q, CU_SEQLENS_K,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides, bias_strides, alibi_strides,
    n_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, STORE_DS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ for one block of queries (no atomics: deterministic). With STORE_DS it also writes
    dS, the gradient of the logits, which is the gradient of an additive bias; DS is
    contiguous (B * H, Lq, Lk) (no packed sequences)."""
    start_m = tl.program_id(0) * BLOCK_M
    b, h, bh, hk = program_heads(n_heads, group)
    q0, seqlen_q = sequence(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    k0, seqlen_k = sequence(CU_SEQLENS_K, b, seqlen_k, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:
            return
    diag = seqlen_k - seqlen_q

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, q0,
                                        offs_m, row_ok, offs_d, d_ok, offs_dv, dv_ok)
    k_base = rows_base(K, k_strides, b, hk, k0)
    v_base = rows_base(V, v_strides, b, hk, k0)
    bias_base = rows_base(BIAS, bias_strides, b, h, 0)
    slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_range(start_m, seqlen_k, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
        k = load_tile(k_base, offs_n, offs_d, k_strides[2], k_strides[3], col_ok, d_ok)
        v = load_tile(v_base, offs_n, offs_dv, v_strides[2], v_strides[3], col_ok, dv_ok)
        _, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, seqlen_q, seqlen_k, diag,
                                bh, seed, slope, bias_base, bias_strides, scalars, TERMS, DOT_FP32, PRECISION)
        if STORE_DS:
            store_tile(DS + bh * seqlen_q * seqlen_k, ds, offs_m, offs_n, seqlen_k, 1, row_ok, col_ok)
        dq += dot(cast(ds_qk, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)

    # The scores were q.k * scale.
    store_rows(DQ, dq_strides, b, h, q0, dq * scalars[0], offs_m, offs_d, row_ok, d_ok, BF16_RTNE)


@triton.jit
def dropout_mask_kernel(KEEP, SEED, n_heads, seqlen_q, seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask the attention kernels draw, (B*H, Lq, Lk) uint8: for tests and
    for anyone who needs to reproduce a dropout pattern with the reference."""
    n_blocks = tl.cdiv(seqlen_k, BLOCK_N)  # grid (Lq blocks x Lk blocks, heads, batch)
    offs_m = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64) * n_heads + tl.program_id(1)
    keep = dropout_keep(tl.load(SEED), bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
    store_tile(KEEP + bh * seqlen_q * seqlen_k, keep.to(tl.uint8), offs_m, offs_n, seqlen_k, 1,
               offs_m < seqlen_q, offs_n < seqlen_k)

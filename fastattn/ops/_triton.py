"""@triton.jit helpers that every op's kernels are built from.

Dots and casts that are also right under Triton's interpreter, tile loads and stores, the
program's (batch, head), the terms that turn scores into logits (band, bias, ALiBi, softcap),
dropout, and the online softmax with its empty-row rule. Kernel files import triton and this
module only; no op imports another op's kernels.

The launchers set these compile-time flags (``fastattn/ops/_launch.py``):

- ``DOT_FP32``: interpreting bf16. The interpreter's bf16 ``tl.dot`` is wrong, so the operands
  go up to fp32, which holds every bf16 value exactly.
- ``BF16_RTNE``: interpreting bf16. The interpreter's fp32 -> bf16 cast truncates; ``cast``
  rounds the bits to nearest even first, as a GPU's cast does.
- ``PRECISION``: ``tl.dot``'s input_precision, "ieee" or (fp32 on a GPU, as torch allows) "tf32";
  "tf32-interpreted" runs a GPU's tf32 dot under the interpreter (``dot``).

Positions: ``rel = j - i - diag`` is key j's distance from query i's diagonal, with
``diag = Lk - Lq`` (bottom-right aligned); a band keeps ``-window_left <= rel <= window_right``.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E); exp2 is the fast hardware path
LN2 = tl.constexpr(0.6931471805599453)  # 1 / LOG2E: log2 units back to natural ones


@triton.jit
def round_tf32(x):
    """fp32 -> fp32 rounded to tf32's 10 mantissa bits, ties to even (what a GPU's tf32 dot
    does to its operands)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0xFFF + ((bits >> 13) & 1)  # carry into bit 13 iff the dropped bits round up
    return ((bits >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with an fp32 accumulator. PRECISION "tf32-interpreted": a tf32 dot as a GPU runs
    it, under the interpreter (whose dots are exact): operands rounded to tf32 first."""
    if PRECISION == "tf32-interpreted":
        return tl.dot(round_tf32(a.to(tl.float32)), round_tf32(b.to(tl.float32)), input_precision="ieee")
    if DOT_FP32:
        # The interpreter's bf16 dot is wrong; fp32 operands hold bf16 values exactly.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def round_bf16(x):
    """fp32 -> fp32 holding x rounded to the nearest bf16, ties to even (the cast to bf16 that
    follows is then exact, even a truncating one)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carry into bit 16 iff the dropped half rounds up
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, BF16_RTNE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest under the interpreter too."""
    if BF16_RTNE:
        if DTYPE == tl.bfloat16:
            x = round_bf16(x)
    return x.to(DTYPE)


@triton.jit
def tanh(x):
    # tl has no portable tanh. For |x| >= 1/4: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|),
    # exact at the limits (1 - e >= 0.39: no cancellation). Below, the Taylor series to x^9:
    # 1 - e would cancel there (softcap * tanh(s / softcap) with a large cap lives at tiny x),
    # and the first term left out, 1382/155925 x^11, is under 1e-8 relative.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def program_heads(n_heads, group):
    """(b, h, bh, hk) of a program on a (blocks, heads, batch) grid: batch, head, their flat
    index b * n_heads + h, and the kv head h // group that GQA head h reads (no copy of K/V).
    Heads and batch get grid axes of their own because CUDA caps axes 1 and 2 at 65535.
    int64: they multiply strides."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return b, h, b * n_heads + h, h // group


@triton.jit
def span(start, BLOCK: tl.constexpr, n):
    """Offsets start .. start + BLOCK - 1 and which of them are < n."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, row_ok, col_ok):
    """The (rows, cols) tile at base + rows * stride_r + cols * stride_c, 0 where masked.
    int64 offsets: one (batch, head) slice may hold more than 2^31 elements."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_tile(base, x, rows, cols, stride_r, stride_c, row_ok, col_ok):
    """Stores x where load_tile would have loaded it."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def band_mask(qi, kj, seqlen_q, seqlen_k, diag, window_left, window_right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """True where query qi may see key kj: both in bounds, and inside the band where it has an
    edge (causal is HAS_RIGHT with window_right 0). qi and kj are positions shaped to broadcast
    to the tile: ``offs_m[:, None], offs_n[None, :]`` for a (queries, keys) tile, or
    ``offs_m[None, :], offs_n[:, None]`` for a (keys, queries) one (the same for ``logits``
    and ``dropout_keep``)."""
    valid = (qi < seqlen_q) & (kj < seqlen_k)
    rel = kj - qi - diag
    if HAS_LEFT:
        valid = valid & (rel >= -window_left)
    if HAS_RIGHT:
        valid = valid & (rel <= window_right)
    return valid


@triton.jit
def logits(
    qk, qi, kj, seqlen_q, seqlen_k, diag, softcap, window_left, window_right,
    bias_base, stride_bm, stride_bn, slope,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Scaled scores ``qk`` -> final logits, -inf where masked: softcap * tanh(qk / softcap),
    then + bias (or a bool mask), - slope * |rel| (ALiBi). qi, kj as ``band_mask``'s; the bias
    is (queries, keys) with strides stride_bm, stride_bn."""
    s = qk
    if HAS_SOFTCAP:
        s = softcap * tanh(s / softcap)
    valid = band_mask(qi, kj, seqlen_q, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    if HAS_BIAS:
        # int64 offsets: one (batch, head) bias slice may hold more than 2^31 elements.
        ptrs = bias_base + qi.to(tl.int64) * stride_bm + kj.to(tl.int64) * stride_bn
        bias = tl.load(ptrs, mask=(qi < seqlen_q) & (kj < seqlen_k), other=0.0)
        if BIAS_IS_BOOL:
            valid = valid & (bias != 0)
        else:
            s = s + bias.to(tl.float32)
    if HAS_ALIBI:
        s = s - slope * tl.abs(kj - qi - diag).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def term_logits(qk, qi, kj, seqlen_q, seqlen_k, diag, scalars, bias_base, bias_strides, slope,
                TERMS: tl.constexpr):
    """``logits`` with the flags of a ``TERMS`` constexpr (``fastattn/ops/_launch.py: Terms``)
    and the runtime ``scalars = (scale, softcap, dropout_p, window_left, window_right)``."""
    return logits(qk, qi, kj, seqlen_q, seqlen_k, diag, scalars[1], scalars[3], scalars[4],
                  bias_base, bias_strides[2], bias_strides[3], slope,
                  TERMS.BIAS, TERMS.BIAS_IS_BOOL, TERMS.ALIBI, TERMS.SOFTCAP, TERMS.LEFT, TERMS.RIGHT)


@triton.jit
def dropout_frame(b, h, n_heads, q0, rows_q, rows_k, SEED, VARLEN: tl.constexpr, PLACED: tl.constexpr):
    """(first row, groups per row, first group): head (b, h)'s dropout counters, for
    ``dropout_keep``. A counter draws four keys' numbers (one Philox call gives four); query
    i's keys 4g .. 4g + 3 take counter (first row + i) * groups per row + first group + g.
    The rows are those of the (B * H, Lq) scores, or with VARLEN of the packed (H, total_q)
    ones (q0: the sequence's first row; its keys count from its first key, and no sequence
    has more than ceil(total_k / 4) groups), so no two sequences, heads or batch rows share a
    counter and the backward redraws the forward's mask.

    PLACED (calls with dropout): SEED is int64 (7,), and SEED[1:7] = (h0, heads, r0, rows,
    c0, cols) place the call's (B, H, Lq, Lk) scores, or with VARLEN its packed (1, H,
    total_q, total_k) ones, in a larger (B, heads, rows, cols) score matrix: head h is head
    h0 + h, query i row r0 + i, key j column c0 + j (c0 a multiple of 4; packed: j counted
    from the sequence's first key). A call on a slice then draws that slice of the larger
    call's mask; the place (0, H, 0, Lq, 0, Lk) is the call's own. int64: B * H * Lq * Lk / 4
    may pass 2^31."""
    if VARLEN and PLACED:
        # The packed sequences share batch row 0; sequence rows start q0 below the call's r0.
        first = (tl.load(SEED + 1) + h) * tl.load(SEED + 4) + tl.load(SEED + 3) + q0
        groups = (tl.load(SEED + 6) + 3) // 4
        group0 = tl.load(SEED + 5) // 4
    elif PLACED:
        heads, rows, cols = tl.load(SEED + 2), tl.load(SEED + 4), tl.load(SEED + 6)
        first = (b.to(tl.int64) * heads + tl.load(SEED + 1) + h) * rows + tl.load(SEED + 3)
        groups = (cols + 3) // 4
        group0 = tl.load(SEED + 5) // 4
    else:
        first = (b.to(tl.int64) * n_heads + h) * rows_q
        groups = (rows_k + 3) // 4
        group0 = 0
    return first, groups, group0


@triton.jit
def dropout_keep(seed, frame, offs_m, offs_n, start_n, dropout_p, KEY_MAJOR: tl.constexpr):
    """Where dropout keeps (query offs_m, key offs_n = start_n + arange, start_n a multiple of 4)
    of a (queries, keys) tile, or with KEY_MAJOR of its (keys, queries) transpose; ``frame``:
    ``dropout_frame``'s. One Philox call per four keys: the (queries, keys / 4) counters give
    four numbers each, interleaved into keys 4g .. 4g + 3."""
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    groups = frame[2] + start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counters = (frame[0] + offs_m.to(tl.int64))[:, None] * frame[1] + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # join(join(r0, r2), join(r1, r3))[.., j, k] is r[2j + k]: row-major, keys 4g + 0..3.
    bits = tl.join(tl.join(r0, r2), tl.join(r1, r3)).reshape(BLOCK_M, BLOCK_N)
    uniform = tl.random.uint_to_uniform_float(bits)
    if KEY_MAJOR:
        uniform = tl.trans(uniform)
    return uniform >= dropout_p


@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(m, l, acc) of BLOCK_M rows that have seen no key yet: max -inf, sum 0, output 0."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    return m_i, tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)


@triton.jit
def softmax_update(s, m_i, l_i):
    """Takes the logits s (rows, keys) of one key block into a running softmax with row max
    m_i and row sum l_i = sum exp(s - m_i). Returns (p, alpha, m, l): the block's
    exp(s - m), the factor exp(m_i - m) that rescales whatever was summed under the old max,
    and the new max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen only masked keys its max is -inf; subtract 0 instead so that
    # exp(-inf - m) is 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
    alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def row_lse(m, l):
    """Natural-log logsumexp m + log(l) of rows with max m and sum l; -inf where l is 0."""
    empty = l == 0.0
    return tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """(out, lse) of a running softmax: acc / l and the logsumexp. A row that saw no key
    (l = 0) gets out 0 and lse -inf, as torch >= 2.5."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    return out, row_lse(m_i, l_i)


@triton.jit
def bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, start_n, seqlen_q, seqlen_k, diag, frame, seed, slope,
             bias_base, bias_strides, scalars, TERMS: tl.constexpr, KEY_MAJOR: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputes one tile of a softmax-attention forward from its lse and differentiates it;
    delta is rowsum(dO * O); offs_n = start_n + arange. ``scalars`` and ``TERMS`` as
    ``term_logits``; ``frame``: the head's dropout counters (``dropout_frame``).

    Returns (p_drop, ds, ds_qk): the probabilities after dropout (for dV), the gradient of
    the final logits (= of an additive bias), and the gradient of the scaled q.k (for dQ, dK).
    They are (queries, keys) tiles, or with KEY_MAJOR (keys, queries): the transposes, which
    a key block multiplies as they are (dV += P^T dO, dK += dS^T Q), so that its key rows are
    the MMA's tall side (Hopper's wgmma needs 64 rows per warpgroup).
    """
    scale, softcap, dropout_p = scalars[0], scalars[1], scalars[2]
    if KEY_MAJOR:
        qk = dot(k, tl.trans(q), DOT_FP32, PRECISION) * scale
        dp = dot(v, tl.trans(do), DOT_FP32, PRECISION)
        qi, kj = offs_m[None, :], offs_n[:, None]
        lse, delta = lse[None, :], delta[None, :]
    else:
        qk = dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
        dp = dot(do, tl.trans(v), DOT_FP32, PRECISION)
        qi, kj = offs_m[:, None], offs_n[None, :]
        lse, delta = lse[:, None], delta[:, None]
    s = term_logits(qk, qi, kj, seqlen_q, seqlen_k, diag, scalars, bias_base, bias_strides, slope, TERMS)
    # A row that saw no key has lse -inf; use +inf so that p = exp(-inf) = 0, not NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.math.exp2((s - lse) * LOG2E)  # the forward's softmax, recomputed
    if TERMS.DROPOUT:
        keep = dropout_keep(seed, frame, offs_m, offs_n, start_n, dropout_p, KEY_MAJOR)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    # Softmax backward: dS = P * (dP - rowsum(dO * O)).
    ds = p * (dp - delta)
    ds_qk = ds
    if TERMS.SOFTCAP:
        t = tanh(qk / softcap)
        ds_qk = ds * (1.0 - t * t)  # d/dx [c * tanh(x / c)] = 1 - tanh^2
    return p_drop, ds, ds_qk


@triton.jit
def sequence(CU_SEQLENS, seq, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``seq``: its slice of a packed tensor of ``seqlen`` rows,
    from the int32 offsets CU_SEQLENS (B + 1,), when VARLEN; else (0, seqlen), a row of a
    padded batch. Offsets are clamped into [0, seqlen] and made non-decreasing, so offsets the
    host never checked (on a GPU) read nothing outside the tensor. max/min are written as
    arithmetic because the interpreter turns tl.minimum of two scalars into an array."""
    # Plain int32 (a padded batch's offset is the constant 0): position math stays 32-bit.
    start = 0
    length = seqlen
    if VARLEN:
        start = tl.load(CU_SEQLENS + seq)
        end = tl.load(CU_SEQLENS + seq + 1)
        start = start * (start > 0)
        start = seqlen + (start - seqlen) * (start < seqlen)
        end = end + (start - end) * (end < start)
        end = seqlen + (end - seqlen) * (end < seqlen)
        length = end - start
    return start, length


@triton.jit
def packed_block(BLOCKS, b, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, first row) of the program's block of rows. On a padded batch's grid (blocks,
    heads, batch): (b, program_id(0) * BLOCK). With VARLEN the grid's axis 0 walks the blocks
    of every packed sequence, and BLOCKS, int32 (grid, 2) built by the launcher without reading
    the lengths on the host, holds each program's (sequence, first row); sequence -1 marks a
    program with no block (the grid is sized from shapes alone, an upper bound)."""
    pid = tl.program_id(0)
    if VARLEN:
        b = tl.load(BLOCKS + 2 * pid).to(tl.int64)
        start = tl.load(BLOCKS + 2 * pid + 1)
    else:
        start = pid * BLOCK
    return b, start


@triton.jit
def rows_base(PTR, strides, b, h, row0):
    """Pointer to row row0 of head (b, h) of a (B, H, L, D) tensor with strides ``strides``.
    int64: a packed tensor's row offset times its stride can pass 2^31."""
    return PTR + b * strides[0] + h * strides[1] + tl.cast(row0, tl.int64) * strides[2]


@triton.jit
def load_rows(PTR, strides, b, h, row0, rows, cols, row_ok, col_ok):
    """The (rows, cols) tile of head (b, h) of a (B, H, L, D) tensor, rows counted from row0."""
    return load_tile(rows_base(PTR, strides, b, h, row0), rows, cols, strides[2], strides[3], row_ok, col_ok)


@triton.jit
def store_rows(PTR, strides, b, h, row0, x, rows, cols, row_ok, col_ok, BF16_RTNE: tl.constexpr):
    """Stores x, cast to PTR's dtype, where load_rows would have loaded it."""
    store_tile(rows_base(PTR, strides, b, h, row0), cast(x, PTR.dtype.element_ty, BF16_RTNE),
               rows, cols, strides[2], strides[3], row_ok, col_ok)


@triton.jit
def load_block(base, rows, cols, stride_r, stride_c, row_ok, col_ok):
    """load_tile of a block whose first row is at ``base``: rows and cols count from it, in
    int32 (a block spans far less than 2^31 elements; the int64 part is in base), so a loop
    that moves base keeps the offsets loop-invariant."""
    return tl.load(base + (rows[:, None] * stride_r + cols[None, :] * stride_c),
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, row0, offs, row_ok,
                    offs_d, d_ok, offs_dv, dv_ok):
    """What the backward needs of a block of query rows row0 + offs (offs from 0) of head
    (b, h): q, dO, the forward's lse and delta = rowsum(dO * O). LSE and DELTA are (B, H, L)
    with ``lse_strides``."""
    q = load_block(rows_base(Q, q_strides, b, h, row0), offs, offs_d, q_strides[2], q_strides[3], row_ok, d_ok)
    do = load_block(rows_base(DO, do_strides, b, h, row0), offs, offs_dv, do_strides[2], do_strides[3],
                    row_ok, dv_ok)
    row = b * lse_strides[0] + h * lse_strides[1] + tl.cast(row0, tl.int64) * lse_strides[2] + offs * lse_strides[2]
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def row_dot_kernel(A, B, OUT, a_strides, b_strides, out_strides, seqlen,
                   DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, h, i] = sum_d A[b, h, i, d] * B[b, h, i, d] in fp32 for (B, H, L, D) A and B of any
    strides and dtype, reading each once (the softmax backward's rowsum(dO * O), without fp32
    copies of dO and O). Grid (row blocks, heads, batch)."""
    rows, row_ok = span(tl.program_id(0) * BLOCK_R, BLOCK_R, seqlen)
    cols, col_ok = span(0, BLOCK_D, DIM)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    a = load_rows(A, a_strides, b, h, 0, rows, cols, row_ok, col_ok).to(tl.float32)
    x = load_rows(B, b_strides, b, h, 0, rows, cols, row_ok, col_ok).to(tl.float32)
    out = OUT + b * out_strides[0] + h * out_strides[1] + rows.to(tl.int64) * out_strides[2]
    tl.store(out, tl.sum(a * x, 1), mask=row_ok)


@triton.jit
def round_fp8(x, DTYPE: tl.constexpr):
    """fp32 -> fp32 holding x rounded to the nearest value of the fp8 ``DTYPE``, ties to even,
    saturating at its largest finite value (a GPU's cvt.rn.satfinite); the cast to DTYPE that
    follows is then exact, even the interpreter's (which truncates, and rounds 0.49 to 0.25
    when the carry reaches the exponent). tl.float8e4nv (e4m3): 3 mantissa bits, normals
    from 2^-6, largest 448; tl.float8e5 (e5m2): 2 bits, from 2^-14, largest 57344."""
    if DTYPE == tl.float8e4nv:
        DROP: tl.constexpr = 20  # fp32's 23 mantissa bits less e4m3's 3
        MIN_NORMAL: tl.constexpr = 0.015625
        MAGIC: tl.constexpr = 16384.0  # 2^23 x the smallest subnormal, 2^-9
        LARGEST: tl.constexpr = 448.0
    else:
        DROP: tl.constexpr = 21
        MIN_NORMAL: tl.constexpr = 6.103515625e-05
        MAGIC: tl.constexpr = 128.0  # 2^23 x 2^-16
        LARGEST: tl.constexpr = 57344.0
    ax = tl.abs(x)
    bits = ax.to(tl.uint32, bitcast=True)
    bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)  # carry iff the dropped bits round up
    normal = tl.minimum(((bits >> DROP) << DROP).to(tl.float32, bitcast=True), LARGEST)
    # Subnormals are multiples of the smallest one: fp32 addition of MAGIC (whose ulp that is)
    # rounds to the nearest multiple, ties to even, and the subtraction is exact.
    subnormal = (ax + MAGIC) - MAGIC
    r = tl.where(ax < MIN_NORMAL, subnormal, normal)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def cast_lowp(x, DTYPE: tl.constexpr, ROUND: tl.constexpr):
    """``cast`` to any float dtype, fp8 included: with ROUND (under the interpreter, whose casts
    truncate) x is rounded to nearest first, as a GPU's cast does."""
    if ROUND:
        if DTYPE == tl.float8e4nv or DTYPE == tl.float8e5:
            x = round_fp8(x, DTYPE)
    return cast(x, DTYPE, ROUND)

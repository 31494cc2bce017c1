"""Triton kernels for exact (flash) attention: forward, dK/dV and dQ.

Layout: every tensor is (batch, heads, seq, dim) with arbitrary strides; the launchers in
``op.py`` pass each tensor's strides as one tuple (``q_strides``...). With VARLEN the batch
holds packed sequences (FlashAttention's varlen layout): the tensors are (1, heads, total,
dim) views with batch stride 0, the grid's first axis walks the row blocks of every
sequence (``packed_block``), and ``CU_SEQLENS_Q/K`` give each sequence's first row and length; every position below is then
local to its sequence, so no tile reads across a boundary. The logit terms compiled
in are one constexpr, ``TERMS`` (``fastattn/ops/_launch.py: Terms``); their runtime values are
the ``scalars`` tuple (scale, softcap, dropout_p, window_left, window_right). One program owns one block of rows (queries in the forward and
dQ kernels, keys in the dK/dV kernel) of one (batch, head). Scores are never stored: they
are recomputed blockwise, and the softmax is carried online (running max ``m`` and sum ``l``).

Positions (see ``reference.py``): ``rel = j - i - diag`` is key j's distance from query i's
diagonal, with diag = Lk - Lq. The band keeps ``-window_left <= rel <= window_right``. The
per-tile math (logit terms, the backward tile) is ``fastattn/ops/_triton.py``'s; what is
flash's own is the band's block ranges, the three kernels' loops, and the forward's lean
inner loop: tiles every row sees whole run without masks or the empty-row guard, and the
softmax runs in log2 units so the scale folds into the multiply-add before exp2 (the static
sm_90 read is in ``benchmarks/results/static-per-arch.md``).
"""
import triton
import triton.language as tl

from fastattn.ops._triton import (
    LN2, LOG2E, bwd_tile, cast, cast_lowp, dot, dropout_frame, dropout_keep, load_query_rows, load_rows, program_heads,
    packed_block, rows_base, sequence, softmax_init, span, store_rows, store_tile, term_logits,
)


# FP8 forward: P (<= 1) carries a factor 2^P_LOG2 = 256 into its cast to fp8, so that
# probabilities down to 2^-17 of the row max survive (e4m3's smallest subnormal is 2^-9;
# 256 x 1 stays below 448). It is added to the exponent (free), and the row sum l carries it too,
# so acc / l is unchanged; the lse takes it out, a sink's 1 puts it in.
P_LOG2 = tl.constexpr(8.0)


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
def _sequence_pair(CU_SEQLENS_Q, CU_SEQLENS_K, SEED, b, h, n_heads, seqlen_q, seqlen_k, VARLEN: tl.constexpr,
                   DROPOUT: tl.constexpr):
    """(q0, Lq, k0, Lk, diag, frame) of sequence b for head h: its first query and key rows and
    lengths (``sequence``), the diagonal Lk - Lq, and the head's dropout counters
    (``dropout_frame``: with VARLEN, seqlen_q/k are the packed totals it counts rows in)."""
    q0, lq = sequence(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    k0, lk = sequence(CU_SEQLENS_K, b, seqlen_k, VARLEN)
    return q0, lq, k0, lk, lk - lq, dropout_frame(b, h, n_heads, q0, seqlen_q, seqlen_k, SEED, VARLEN, DROPOUT)


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
def _interior(start_m, lo, hi, seqlen_k, diag, window_left, window_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TERMS: tl.constexpr):
    """[ilo, ihi), inside [lo, hi): the key tiles that every row of query block start_m sees
    whole (no band edge crosses them and none passes seqlen_k), so they need no mask. Tile
    starts are multiples of BLOCK_N; an empty interior is (lo, lo). Values are clamped at 0
    before dividing: the interpreter's // floors, compiled code truncates."""
    ihi = (seqlen_k // BLOCK_N) * BLOCK_N  # tiles before a partial last one
    ilo = lo
    if TERMS.RIGHT:
        # Tile [n, n + BLOCK_N) is inside every row's right edge iff its last key is inside the
        # first row's: n + BLOCK_N - 1 - start_m - diag <= window_right.
        r = start_m + diag + window_right + 1
        r = (r * (r > 0)) // BLOCK_N * BLOCK_N
        ihi = ihi + (r - ihi) * (r < ihi)
    if TERMS.LEFT:
        # ... and inside every row's left edge iff its first key is inside the last row's:
        # n - (start_m + BLOCK_M - 1) - diag >= -window_left.
        left = start_m + BLOCK_M - 1 + diag - window_left
        left = (left * (left > 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        ilo = ilo + (left - ilo) * (left > ilo)
    empty = ihi <= ilo
    return ilo + (lo - ilo) * empty, ihi + (lo - ihi) * empty


@triton.jit
def _fwd_tiles(acc, m_i, l_i, kv, lo, hi, rows, quant,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, TERMS: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
               VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
               LOWP: tl.constexpr):
    """Takes key tiles lo, lo + BLOCK_N, .. < hi into the running softmax (m_i, l_i, acc).
    m_i is the row max in score units (``_score_units``), and one multiply-add per score
    takes a score to log2 units relative to it, which feeds exp2. MASKED tiles may hold keys some row must not see (a band edge, the partial last
    tile): they are masked, and a row that has seen no key yet is guarded. Unmasked tiles
    are seen whole by every row and skip both. ``quant`` and LOWP: ``_low_precision``'s."""
    q, k_src, v_src = kv
    offs_m, offs_n0, d_ok, dv_ok, seqlen_q, seqlen_k, diag, scalars, bias_base, bias_strides, slope, seed, frame = rows
    # The lean path: q.k unscaled, the scale folded into the multiply-add before exp2. Not
    # with logit terms (they work on scaled logits), nor when the scale is not positive
    # (SCALE_FIRST: the max of the unscaled scores would not be that of the logits).
    PLAIN: tl.constexpr = not (TERMS.BIAS or TERMS.ALIBI or TERMS.SOFTCAP or TERMS.SCALE_FIRST)
    # With bias terms a row can be empty in any tile (a bool mask, or -inf in a float bias).
    GUARD: tl.constexpr = MASKED or TERMS.BIAS
    c, c_tile, _, _ = _score_units(scalars[0], quant, PLAIN, LOWP)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seqlen_k
        k = _row_tile(k_src, start_n, col_ok, d_ok, BLOCK_N, BLOCK_D, MASKED, HEAD_DIM == BLOCK_D, TMA, VARLEN)
        qk = _scores(q, k, quant, offs_n, col_ok, PLAIN, LOWP, DOT_FP32, PRECISION)
        if PLAIN:
            if MASKED:
                qk = tl.where(_visible(offs_m, offs_n, seqlen_k, diag, scalars[3], scalars[4], TERMS),
                              qk, float("-inf"))
        else:
            qk = term_logits(qk * scalars[0], offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag, scalars,
                             bias_base, bias_strides, slope, TERMS)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new * c  # log2 units; c > 0, so the max of the scores is that of the logits
        if GUARD:
            # A row that has seen only masked keys keeps max -inf; subtract 0 instead so that
            # exp2(-inf - m) is 0, not NaN. Only for the subtraction: the row keeps max -inf,
            # or a later tile's logits far below 0 would be taken relative to 0 and underflow.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_sub)
        offset = -m_sub
        if LOWP == "fp8":
            offset = offset + P_LOG2  # P times 2^P_LOG2, for its cast to fp8
        # One rounding, as the GPU's fused multiply-add: qk * c alone may be ~1e4, whose
        # rounding would be a relative error of P.
        p = tl.math.exp2(tl.fma(qk, c_tile, offset[:, None]))
        alpha = tl.math.exp2(m_i * c - m_sub)  # m_i * c is the previous tile's m_sub, bit for bit
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v = _row_tile(v_src, start_n, col_ok, dv_ok, BLOCK_N, BLOCK_DV, MASKED, HEAD_DIM_V == BLOCK_DV, TMA, VARLEN)
        if TERMS.DROPOUT:
            # The softmax normalises by the undropped sum l; dropout scales what reaches V.
            keep = dropout_keep(seed, frame, offs_m, offs_n, start_n, scalars[2], False)
            p = tl.where(keep, p / (1.0 - scalars[2]), 0.0)
        if LOWP == "fp8":  # P in e4m3 (3 mantissa bits) with e5m2 v too
            acc = acc * alpha[:, None] + dot(cast_lowp(p, tl.float8e4nv, BF16_RTNE), v, DOT_FP32, PRECISION)
        else:
            acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _scores(q, k, quant, offs_n, col_ok, PLAIN: tl.constexpr, LOWP: tl.constexpr, DOT_FP32: tl.constexpr,
            PRECISION: tl.constexpr):
    """The scores of a (queries, keys) tile, fp32 (``_score_units``). With LOWP "int8" q and k
    are int8 and their dot an int32 one, q.k ~= q8.k8 * k_scale * q_scale + shift
    (``_low_precision``): the lean (PLAIN) path's scores are q8.k8 * k_scale, each row in units
    of its q_scale, with its shift in the lse (a row's constant does not change its softmax);
    the logit terms' are the whole q.k. fp8 dots are plain: their descales are in the scale."""
    if LOWP == "int8":
        q_scale, shift, k_scales = quant
        k_scale = tl.load(k_scales + offs_n, mask=col_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * k_scale[None, :]
        if not PLAIN:
            qk = tl.fma(qk, q_scale[:, None], shift[:, None])
    else:
        qk = dot(q, tl.trans(k), DOT_FP32, PRECISION)
    return qk


@triton.jit
def _low_precision(ROW_SCALES, COL_SCALES, b, h, hk, n_kv_heads, q0, rows_k, k0, offs_m, row_ok, lse_strides, scalars,
                   VARLEN: tl.constexpr, LOWP: tl.constexpr):
    """(quant, scalars, out_scale) of a low-precision forward (LOWP "fp8" or "int8"; "" for none).

    fp8: ROW_SCALES is float32 (B, Hkv, 3), sequence b's descales of q, k and v at kv head hk
    (real value = fp8 value * descale): q's and k's multiply the scale (so the scores, the
    sinks and the lse are real ones), v's the output (``out_scale``).
    int8: ROW_SCALES is float32 (B, Hq, Lq, 2), laid out as the lse (``lse_strides``): each query
    row's (scale, shift), shift being q.mean_k, the row's dot with the mean key subtracted
    before quantizing K; COL_SCALES float32 (B, Hkv, Lk), or packed (1, Hkv, total_k), each
    key's scale. quant = (q scales, shifts, pointer to the sequence's first key scale)."""
    quant = (0.0, 0.0, COL_SCALES)
    out_scale = 1.0
    if LOWP == "fp8":
        descales = ROW_SCALES + (b * n_kv_heads + hk) * 3
        scalars = (scalars[0] * tl.load(descales) * tl.load(descales + 1), scalars[1], scalars[2], scalars[3],
                   scalars[4])
        out_scale = tl.load(descales + 2)
    if LOWP == "int8":
        lse_row = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
        q_scale = tl.load(ROW_SCALES + 2 * lse_row, mask=row_ok, other=1.0)
        shift = tl.load(ROW_SCALES + 2 * lse_row + 1, mask=row_ok, other=0.0)
        batch_row = b * rows_k * n_kv_heads
        if VARLEN:
            batch_row = b * 0  # one packed row; k0 is the sequence's first key
        quant = (q_scale, shift, COL_SCALES + batch_row + hk * rows_k + k0)
    return quant, scalars, out_scale


@triton.jit
def _score_units(scale, quant, PLAIN: tl.constexpr, LOWP: tl.constexpr):
    """(c, c_tile, unit, base) of the forward's scores: a score times c is a logit in log2
    units, times unit one in natural units, less base (natural units, per row); c_tile is c
    as it multiplies a (queries, keys) tile. The lean (PLAIN) path's scores are q.k unscaled
    (int8: per-row units and shifts, ``_scores``: c, unit and base are rows); the logit terms'
    are natural. The running max is kept in score units, so the lse is max * unit + log(l)
    (+ base) with one rounding (a log2-unit max scaled back by ln 2 rounded twice more: several
    ulps of an lse of order 1e3)."""
    if PLAIN:
        unit = scale
    else:
        unit = scale * 0.0 + 1.0
    c = unit * LOG2E
    c_tile = c
    base = 0.0
    if LOWP == "int8":
        if PLAIN:
            q_scale, shift, _ = quant
            unit = unit * q_scale
            c = unit * LOG2E
            c_tile = c[:, None]
            base = shift * scale
    return c, c_tile, unit, base


@triton.jit
def _visible(offs_m, offs_n, seqlen_k, diag, window_left, window_right, TERMS: tl.constexpr):
    """(queries, keys) True where a query may see a key: in bounds and inside the band. Rows
    past seqlen_q are not checked: they are never stored."""
    visible = (offs_n < seqlen_k)[None, :]
    rel = offs_n[None, :] - offs_m[:, None] - diag
    if TERMS.LEFT:
        visible = visible & (rel >= -window_left)
    if TERMS.RIGHT:
        visible = visible & (rel <= window_right)
    return visible


@triton.jit
def _rows_source(PTR, strides, b, h, row0, offs_r0, offs_c, TMA: tl.constexpr, VARLEN: tl.constexpr):
    """Where ``_row_tile`` reads the row tiles of head (b, h) of a (B, H, L, D) tensor, rows
    counted from row0. With TMA, PTR is a tensor descriptor and this is (descriptor, batch row,
    head, row0) as int32 coordinates; else (int64 pointer to row row0, int32 offsets of the
    tile's elements from its first row, the row stride): the loops move the pointer by whole
    rows (int32 offsets: a tile spans far less than 2^31 elements)."""
    if TMA:
        tb = b.to(tl.int32)
        if VARLEN:
            tb = tb * 0  # a packed tensor is one batch row; row0 is the sequence's first row
        src = (PTR, tb, h.to(tl.int32), row0)
    else:
        src = (rows_base(PTR, strides, b, h, row0), offs_r0[:, None] * strides[2] + offs_c[None, :] * strides[3],
               strides[2])
    return src


@triton.jit
def _row_tile(src, start, row_ok, col_ok, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              MASKED: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, VARLEN: tl.constexpr):
    """Rows start .. start + BLOCK_R - 1 of a ``_rows_source``, 0 past the sequence's end.

    With TMA the copy engine reads the tile and fills rows and columns past the tensor's
    bounds with 0, so no tile needs a mask, except a packed sequence's last one, whose next
    rows are the next sequence's (zeroed: 0 * NaN there would leak). Else masked rows only in
    MASKED tiles, masked columns only when the head dim is not a power of two."""
    if TMA:
        desc, b, h, row0 = src
        x = desc.load([b, h, (row0 + start).to(tl.int32), 0]).reshape(BLOCK_R, BLOCK_C)
        if VARLEN:
            if MASKED:
                x = tl.where(row_ok[:, None], x, tl.zeros_like(x))  # zeros of x's dtype (int8 too)
    else:
        base, offs, step = src
        ptrs = base + tl.cast(start, tl.int64) * step + offs
        if MASKED:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        elif EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    return x


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, BIAS, ALIBI, SEED, SINKS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS, ROW_SCALES, COL_SCALES,
    q_strides, k_strides, v_strides, o_strides, lse_strides, bias_strides, alibi_strides,
    n_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, LOWP: tl.constexpr = "",
):
    """Output and lse of one block of queries of one (sequence, head). The key tiles run in
    three loops: first the right-edge/diagonal and partial tiles, then the band's left-edge
    tiles (both masked), then those every row sees whole (no masks). With TMA, K and V are
    tensor descriptors of their (B, H, L, D) tensors with blocks (1, 1, BLOCK_N, BLOCK_D).
    LOWP "fp8": q, k, v in one fp8 dtype, P times 2^P_LOG2 cast to e4m3 for the PV product; "int8":
    q and k int8 (smoothed, ``_low_precision``), v 16-bit. Forward only."""
    b, h, _, hk = program_heads(n_heads, group)
    rows_k = seqlen_k  # before _sequence_pair: with VARLEN, the packed total
    b, start_m = packed_block(BLOCKS, b, BLOCK_M, VARLEN)
    if VARLEN:
        if b < 0:  # past the packed sequences' blocks
            return
    q0, seqlen_q, k0, seqlen_k, diag, frame = _sequence_pair(CU_SEQLENS_Q, CU_SEQLENS_K, SEED, b, h, n_heads,
                                                             seqlen_q, seqlen_k, VARLEN, TERMS.DROPOUT)

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    q = load_rows(Q, q_strides, b, h, q0, offs_m, offs_d, row_ok, d_ok)
    k_src = _rows_source(K, k_strides, b, hk, k0, offs_n0, offs_d, TMA, VARLEN)
    v_src = _rows_source(V, v_strides, b, hk, k0, offs_n0, offs_dv, TMA, VARLEN)
    bias_base = rows_base(BIAS, bias_strides, b, h, 0)
    slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
    quant, scalars, out_scale = _low_precision(ROW_SCALES, COL_SCALES, b, h, hk, n_heads // group, q0, rows_k, k0,
                                               offs_m, row_ok, lse_strides, scalars, VARLEN, LOWP)

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)
    PLAIN: tl.constexpr = not (TERMS.BIAS or TERMS.ALIBI or TERMS.SOFTCAP or TERMS.SCALE_FIRST)  # _fwd_tiles'
    c, _, unit, base = _score_units(scalars[0], quant, PLAIN, LOWP)
    if TERMS.SINKS:
        # The sink is a key every row sees, with no value: start the running softmax from it
        # (max = the sink in score units, sum exp2(0) = 1), so no row is ever empty.
        sink = tl.load(SINKS + h).to(tl.float32)
        if LOWP == "int8":
            sink = sink - base
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink / unit
        l_i = l_i + 1.0
        if LOWP == "fp8":
            l_i = l_i * tl.math.exp2(P_LOG2)  # the sink's term in l, which carries P's factor
    lo, hi = _key_range(start_m, seqlen_k, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    ilo, ihi = _interior(start_m, lo, hi, seqlen_k, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    kv = (q, k_src, v_src)
    rows = (offs_m, offs_n0, d_ok, dv_ok, seqlen_q, seqlen_k, diag, scalars, bias_base, bias_strides, slope, seed, frame)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, kv, ihi, hi, rows, quant, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                               BLOCK_N, TERMS, True, TMA, VARLEN, DOT_FP32, PRECISION, BF16_RTNE, LOWP)
    if TERMS.LEFT:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, kv, lo, ilo, rows, quant, HEAD_DIM, BLOCK_D, HEAD_DIM_V,
                                   BLOCK_DV, BLOCK_N, TERMS, True, TMA, VARLEN, DOT_FP32, PRECISION, BF16_RTNE, LOWP)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, kv, ilo, ihi, rows, quant, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                               BLOCK_N, TERMS, False, TMA, VARLEN, DOT_FP32, PRECISION, BF16_RTNE, LOWP)
    if LOWP == "fp8":
        acc = acc * out_scale  # v's descale

    # Every key masked: output 0, lse -inf, as torch >= 2.5 (with a sink: output 0, lse the
    # sink). l is relative to the last tile's m_sub = m_i * c, rounded: it holds a factor
    # exp2(r) with r = m_i * c - m_sub, which the fma gives exactly. Without taking r out, the
    # lse of a row of logits ~1e3 was an ulp off whenever the max dominated (l ~ 1).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    r = tl.fma(m_i, c, -(m_i * c))
    log_l = tl.log(tl.where(empty, 1.0, l_i)) - r * LN2
    if LOWP == "fp8":
        log_l = log_l - P_LOG2 * LN2  # l carried P's factor 2^P_LOG2
    if LOWP == "int8":
        log_l = log_l + base  # the rows' shifts (PLAIN; else 0)
    lse = tl.where(empty, float("-inf"), tl.fma(m_i, unit, log_l))
    store_rows(O, o_strides, b, h, q0, out, offs_m, offs_dv, row_ok, dv_ok, BF16_RTNE)
    lse_row = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
    tl.store(LSE + lse_row, lse, mask=row_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, ALIBI, SEED, SINKS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides, dv_strides, bias_strides,
    alibi_strides,
    n_kv_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr, GRAD_K: tl.constexpr, GRAD_V: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dK (GRAD_K) and dV (GRAD_V) for one block of keys of one kv head, summed over the group
    query heads that share it, so GQA never allocates Hq-sized key gradients. A launch with
    only one of them holds half the accumulators (d256: two fp32 64 x 256 tiles would not fit
    the registers); what it does not need of the shared tile (dV needs no dP) compiles away.
    With TMA, Q and DO are tensor descriptors (blocks (1, 1, BLOCK_M, BLOCK_D/DV))."""
    b, hk, _, _ = program_heads(n_kv_heads, 1)  # grid (blocks, kv heads, batch)
    b, start_n = packed_block(BLOCKS, b, BLOCK_N, VARLEN)
    if VARLEN:
        if b < 0:
            return
    n_heads = n_kv_heads * group
    rows_q, rows_k = seqlen_q, seqlen_k  # with VARLEN, the packed totals: the dropout counters' rows
    q0, seqlen_q, k0, seqlen_k, diag, _ = _sequence_pair(CU_SEQLENS_Q, CU_SEQLENS_K, SEED, b, hk, n_heads, seqlen_q,
                                                         seqlen_k, VARLEN, False)

    offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    k = load_rows(K, k_strides, b, hk, k0, offs_n, offs_d, col_ok, d_ok)
    v = load_rows(V, v_strides, b, hk, k0, offs_n, offs_dv, col_ok, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo, hi = _query_range(start_n, seqlen_q, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    offs_m0 = tl.arange(0, BLOCK_M)
    for g in range(0, group):
        h = hk * group + g
        frame = dropout_frame(b, h, n_heads, q0, rows_q, rows_k, SEED, VARLEN, TERMS.DROPOUT)
        bias_base = rows_base(BIAS, bias_strides, b, h, 0)
        slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
        q_src = _rows_source(Q, q_strides, b, h, q0, offs_m0, offs_d, TMA, VARLEN)
        do_src = _rows_source(DO, do_strides, b, h, q0, offs_m0, offs_dv, TMA, VARLEN)
        lse_base = b * lse_strides[0] + h * lse_strides[1] + tl.cast(q0, tl.int64) * lse_strides[2]
        for start_m in range(lo, hi, BLOCK_M):
            offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
            q = _row_tile(q_src, start_m, row_ok, d_ok, BLOCK_M, BLOCK_D, True, HEAD_DIM == BLOCK_D, TMA, VARLEN)
            do = _row_tile(do_src, start_m, row_ok, dv_ok, BLOCK_M, BLOCK_DV, True, HEAD_DIM_V == BLOCK_DV,
                           TMA, VARLEN)
            lse = tl.load(LSE + lse_base + offs_m * lse_strides[2], mask=row_ok, other=0.0)
            delta = tl.load(DELTA + lse_base + offs_m * lse_strides[2], mask=row_ok, other=0.0)
            # (keys, queries) tiles: the key block is the tall side of all four products.
            p_drop, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, start_n, seqlen_q, seqlen_k, diag,
                                         frame, seed, slope, bias_base, bias_strides, scalars,
                                         TERMS, True, DOT_FP32, PRECISION)
            if GRAD_V:
                dv += dot(cast(p_drop, do.dtype, BF16_RTNE), do, DOT_FP32, PRECISION)
            if GRAD_K:
                dk += dot(cast(ds_qk, q.dtype, BF16_RTNE), q, DOT_FP32, PRECISION)

    if GRAD_K:  # the scores were q.k * scale
        store_rows(DK, dk_strides, b, hk, k0, dk * scalars[0], offs_n, offs_d, col_ok, d_ok, BF16_RTNE)
    if GRAD_V:
        store_rows(DV, dv_strides, b, hk, k0, dv, offs_n, offs_dv, col_ok, dv_ok, BF16_RTNE)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, DS_ROWS, BIAS, ALIBI, SEED, SINKS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides, bias_strides, alibi_strides,
    n_heads, group, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, STORE_DS: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ for one block of queries (no atomics: deterministic). With STORE_DS it also writes
    dS, the gradient of the logits, which is the gradient of an additive bias; DS is
    contiguous (B * H, Lq, Lk) in the bias's dtype (no packed sequences). With sinks it writes each row's sum of
    dS into DS_ROWS (laid out as LSE), from which the launcher forms the sinks' gradient.
    With TMA, K and V are tensor descriptors (blocks (1, 1, BLOCK_N, BLOCK_D/DV))."""
    b, h, bh, hk = program_heads(n_heads, group)
    b, start_m = packed_block(BLOCKS, b, BLOCK_M, VARLEN)
    if VARLEN:
        if b < 0:
            return
    q0, seqlen_q, k0, seqlen_k, diag, frame = _sequence_pair(CU_SEQLENS_Q, CU_SEQLENS_K, SEED, b, h, n_heads,
                                                             seqlen_q, seqlen_k, VARLEN, TERMS.DROPOUT)

    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, q0 + start_m,
                                        offs_m - start_m, row_ok, offs_d, d_ok, offs_dv, dv_ok)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_src = _rows_source(K, k_strides, b, hk, k0, offs_n0, offs_d, TMA, VARLEN)
    v_src = _rows_source(V, v_strides, b, hk, k0, offs_n0, offs_dv, TMA, VARLEN)
    bias_base = rows_base(BIAS, bias_strides, b, h, 0)
    slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds_rows = tl.zeros([BLOCK_M], tl.float32)

    lo, hi = _key_range(start_m, seqlen_k, diag, scalars[3], scalars[4], BLOCK_M, BLOCK_N, TERMS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
        k = _row_tile(k_src, start_n, col_ok, d_ok, BLOCK_N, BLOCK_D, True, HEAD_DIM == BLOCK_D, TMA, VARLEN)
        v = _row_tile(v_src, start_n, col_ok, dv_ok, BLOCK_N, BLOCK_DV, True, HEAD_DIM_V == BLOCK_DV, TMA, VARLEN)
        _, ds, ds_qk = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, start_n, seqlen_q, seqlen_k, diag,
                                frame, seed, slope, bias_base, bias_strides, scalars, TERMS, False, DOT_FP32,
                                PRECISION)
        if STORE_DS:
            store_tile(DS + bh * seqlen_q * seqlen_k, cast(ds, DS.dtype.element_ty, BF16_RTNE), offs_m, offs_n,
                       seqlen_k, 1, row_ok, col_ok)
        dq += dot(cast(ds_qk, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)
        if TERMS.SINKS:
            ds_rows += tl.sum(ds, 1)

    if TERMS.SINKS:
        lse_row = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
        tl.store(DS_ROWS + lse_row, ds_rows, mask=row_ok)
    # The scores were q.k * scale.
    store_rows(DQ, dq_strides, b, h, q0, dq * scalars[0], offs_m, offs_d, row_ok, d_ok, BF16_RTNE)


@triton.jit
def attn_bwd_dbias_kernel(
    Q, K, V, DO, LSE, DELTA, DBIAS, BIAS, ALIBI, SEED,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dbias_strides, bias_strides, alibi_strides,
    n_heads, group, n_batch, seqlen_q, seqlen_k, scalars,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, BROADCAST_B: tl.constexpr, BROADCAST_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """The gradient of a bias broadcast over the batch (BROADCAST_B) and/or the heads
    (BROADCAST_H), for one (query block, key block) tile of one (bias batch row, bias head):
    dS of every (batch row, head) the tile is broadcast to, summed in registers in a fixed
    order (deterministic, no atomics). Grid (query blocks x key blocks, bias heads, bias batch
    rows); DBIAS (bias batch rows, bias heads, Lq, Lk), written whole (tiles outside the band
    get 0). Each (batch row, head) recomputes the tile's P and dP (``bwd_tile``)."""
    n_key_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    start_m = (tl.program_id(0) // n_key_blocks) * BLOCK_M
    start_n = (tl.program_id(0) % n_key_blocks) * BLOCK_N
    bias_h = tl.program_id(1).to(tl.int64)
    bias_b = tl.program_id(2).to(tl.int64)
    diag = seqlen_k - seqlen_q
    offs_m, row_ok = span(start_m, BLOCK_M, seqlen_q)
    offs_n, col_ok = span(start_n, BLOCK_N, seqlen_k)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    # The (batch row, head) pairs this bias entry is broadcast to: b_first + i, h_first + j.
    b_first, n_b = bias_b, 1
    if BROADCAST_B:
        b_first, n_b = bias_b * 0, n_batch
    h_first, n_h = bias_h, 1
    if BROADCAST_H:
        h_first, n_h = bias_h * 0, n_heads
    dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, n_b):
        b = b_first + i
        for j in range(0, n_h):
            h = h_first + j
            q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, start_m,
                                                offs_m - start_m, row_ok, offs_d, d_ok, offs_dv, dv_ok)
            k = load_rows(K, k_strides, b, h // group, 0, offs_n, offs_d, col_ok, d_ok)
            v = load_rows(V, v_strides, b, h // group, 0, offs_n, offs_dv, col_ok, dv_ok)
            slope, seed = _head_terms(ALIBI, SEED, b, h, alibi_strides, TERMS)
            frame = dropout_frame(b, h, n_heads, 0, seqlen_q, seqlen_k, SEED, False, TERMS.DROPOUT)
            _, ds, _ = bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, start_n, seqlen_q, seqlen_k, diag, frame,
                                seed, slope, rows_base(BIAS, bias_strides, b, h, 0), bias_strides, scalars, TERMS,
                                False, DOT_FP32, PRECISION)
            dbias += ds
    store_tile(rows_base(DBIAS, dbias_strides, bias_b, bias_h, 0), cast(dbias, DBIAS.dtype.element_ty, BF16_RTNE),
               offs_m, offs_n, dbias_strides[2], dbias_strides[3], row_ok, col_ok)


@triton.jit
def dropout_mask_kernel(KEEP, SEED, n_heads, seqlen_q, seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask the attention kernels draw, (B*H, Lq, Lk) uint8: for tests and
    for anyone who needs to reproduce a dropout pattern with the reference. SEED: int64 (7,),
    the seed and its place (``dropout_frame``)."""
    n_blocks = tl.cdiv(seqlen_k, BLOCK_N)  # grid (Lq blocks x Lk blocks, heads, batch)
    offs_m = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64) * n_heads + tl.program_id(1)
    frame = dropout_frame(tl.program_id(2), tl.program_id(1), n_heads, 0, seqlen_q, seqlen_k, SEED, False, True)
    keep = dropout_keep(tl.load(SEED), frame, offs_m, offs_n, (tl.program_id(0) % n_blocks) * BLOCK_N, dropout_p, False)
    store_tile(KEEP + bh * seqlen_q * seqlen_k, keep.to(tl.uint8), offs_m, offs_n, seqlen_k, 1,
               offs_m < seqlen_q, offs_n < seqlen_k)

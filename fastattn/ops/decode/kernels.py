"""Triton kernels for attention over a KV cache: append, split-KV attention, merge.

Layout: q (B, Hq, Lq, D), caches (B, Hkv, Lmax, D), any strides, each tensor's four strides
passed as one tuple (``q_strides``, ...) in (b, h, row, d) order; ``SEQLENS`` (B,) holds the
tokens already cached per sequence, so sequence b has ``seqlen_k = SEQLENS[b] + seqlen_new``
valid keys once the new ones are appended (see ``reference.py``). Paged caches (``PAGED``):
pages (num_pages, page_size, Hkv, D) and a block table (B, P) mapping each sequence's logical
slots to page rows; the kernels translate positions through the table (``table`` is the
tuple (row stride of the table, num_pages)). ``rotary`` is (row stride of the cos/sin tables,
their number of positions); ``ROT_DIM`` 0 is no rotary embedding.

Values the launcher does not check (on CUDA it reads none) are clamped, so a bad call never
leaves the buffers: cache lengths to [0, Lmax], rotary positions to the table's rows, page
indices to [0, num_pages).

Flash decoding: with one or a few new tokens there is only a handful of query rows per head,
so one program per (batch, head) would leave most of the GPU idle while it streams a long cache.
Instead the visible key range of every (batch, kv head) is cut into ``num_splits`` chunks, one
program each. A program holds ALL the query rows that share its kv head (``group`` query heads
times ``seqlen_q`` new tokens, row r = g * seqlen_q + i), so each K/V element is read from
memory once however large the GQA ratio (while those rows fit one row block, 64 on a GPU;
more rows, as in chunked prefill, take several row blocks). Each program writes its chunk's
normalised partial output and logsumexp in fp32; ``decode_merge_kernel`` then combines them
exactly: ``out = sum_s exp(lse_s - lse) * out_s`` with ``lse = logsumexp_s(lse_s)``.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import (
    LN2, LOG2E, cast, dot, load_rows, load_tile, round_fp8, row_lse, rows_base, softmax_finish, softmax_init,
    softmax_update, span, store_tile, term_logits,
)


@triton.jit
def _clamp(x, lo, hi):
    """min(max(x, lo), hi) as arithmetic (the interpreter turns tl.minimum of scalars into an array)."""
    x = x - (x - lo) * (x < lo)
    return x - (x - hi) * (x > hi)


@triton.jit
def _cached(SEQLENS, b, seqlen_max):
    """Tokens already in sequence b's cache, clamped to [0, seqlen_max] (an unchecked negative
    length would write before the cache, a long one past it)."""
    return _clamp(tl.load(SEQLENS + b).to(tl.int32), 0, seqlen_max)


@triton.jit
def _rotary(x, row_ptrs, stride_d, rows_ok, pos, COS, SIN, rotary, offs_d,
            ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """RoPE of the first ROT_DIM dims of the rows ``x`` (BLOCK, BLOCK_D), whose element d lies
    at ``row_ptrs + d * stride_d``; row r turns by the angles of position ``pos[r]`` (cos/sin
    tables (P, ROT_DIM / 2), ``rotary`` = (row stride, P)). Positions outside the table read
    its first or last row. Returns fp32."""
    half = ROT_DIM // 2
    if INTERLEAVED:
        # GPT-J pairs (2j, 2j + 1): out[2j] = x[2j] c - x[2j+1] s, out[2j+1] = x[2j+1] c + x[2j] s.
        j = offs_d // 2
        partner = offs_d + 1 - 2 * (offs_d % 2)
        sign = 2.0 * (offs_d % 2).to(tl.float32) - 1.0
    else:
        # GPT-NeoX halves (j, j + R/2): out[j] = x[j] c - x[j+R/2] s, out[j+R/2] = x[j+R/2] c + x[j] s.
        first = offs_d < half
        j = tl.where(first, offs_d, offs_d - half)
        partner = tl.where(first, offs_d + half, offs_d - half)
        sign = tl.where(first, -1.0, 1.0)
    in_rot = offs_d < ROT_DIM
    m = rows_ok[:, None] & in_rot[None, :]
    xp = tl.load(row_ptrs + partner[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
    pos = _clamp(pos.to(tl.int64), 0, rotary[1] - 1)  # never read outside the table
    cs_off = pos[:, None] * rotary[0] + j[None, :]
    # Outside the rotated dims cos = 1, sin = 0: those dims pass through unchanged.
    c = tl.load(COS + cs_off, mask=m, other=1.0).to(tl.float32)
    sn = tl.load(SIN + cs_off, mask=m, other=0.0).to(tl.float32)
    return x.to(tl.float32) * c + sign[None, :] * xp * sn


@triton.jit
def _page_of(BT, b, table, slot, ok, PAGE_SIZE: tl.constexpr):
    """int64 page holding logical slot ``slot`` (scalar or vector) of sequence b, read from the
    block table (``table`` = (row stride, num_pages)) and clamped to [0, num_pages) so that a
    bad table never leaves the buffer."""
    page = tl.load(BT + b * table[0] + slot // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
    page = page * (page > 0)
    return page - (page - (table[1] - 1)) * (page > table[1] - 1)


@triton.jit
def _e4m3_bits(x):
    """fp32 x on e4m3's grid (``round_fp8``) -> its float8_e4m3fn byte, as uint8. Every e4m3
    value / 256 is an fp16 with the same sign, exponent and top 3 mantissa bits (e4m3's bias 7
    is fp16's 15 less 8): the byte is that fp16's sign and its 7 bits below, shifted down."""
    h = (x * 0.00390625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)  # x / 256 is exact
    return (((h >> 8) & 0x80) | ((h >> 7) & 0x7F)).to(tl.uint8)


@triton.jit
def _e4m3_value(b):
    """float8_e4m3fn bytes (uint8) -> their values in fp32, exactly (``_e4m3_bits`` backwards:
    the byte's bits placed as an fp16's, which is the value / 256, subnormals included)."""
    b = b.to(tl.int32)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _scale_slots(BT, b, table, slot, ok, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(b or page, row) of the per-token scales of logical slots ``slot`` of sequence b: the
    scales (B, Hkv, Lmax) are indexed like the cache, paged ones (num_pages, page_size, Hkv)
    through the block table."""
    where = b
    row = slot.to(tl.int64)
    if PAGED:
        where = _page_of(BT, b, table, slot, ok, PAGE_SIZE)
        row = (slot % PAGE_SIZE).to(tl.int64)
    return where, row


@triton.jit
def _quantize_rows(x, S, s_strides, where, hk, row, ok, OUT_TY: tl.constexpr, PER_TOKEN: tl.constexpr):
    """New rows x (BLOCK_L, BLOCK_D) as 8-bit OUT_TY (int8, float8e4nv, or uint8 holding the
    bytes of float8_e4m3fn values): ``x / scale`` rounded to nearest even and saturated.
    PER_TOKEN: each row's scale is its absmax / QMAX (0 for a zero row), stored at ``S`` (b or
    page ``where``, kv head hk, ``row``); else ``S`` holds the one given scale. ``s_strides``:
    the scales' strides in (b or page, head, row) order."""
    qmax = 448.0
    if OUT_TY == tl.int8:
        qmax = 127.0
    x = x.to(tl.float32)
    if PER_TOKEN:
        amax = tl.max(tl.abs(x), 1)  # masked dims were loaded as 0
        tl.store(S + where * s_strides[0] + hk * s_strides[1] + row * s_strides[2], amax / qmax, mask=ok)
        y = x * tl.where(amax > 0, qmax / tl.where(amax > 0, amax, 1.0), 0.0)[:, None]
    else:
        y = x * (1.0 / tl.load(S))
    if OUT_TY == tl.int8:
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
        y = (y + 12582912.0) - 12582912.0  # around 1.5 * 2^23 fp32's ulp is 1: the add rounds to nearest even
        out = y.to(tl.int8)
    else:
        y = round_fp8(y, tl.float8e4nv)  # saturates at +-448
        if OUT_TY == tl.uint8:
            out = _e4m3_bits(y)
        else:
            out = y.to(OUT_TY)  # exact: y is on e4m3's grid
    return out


@triton.jit
def _dequantize(x, S, s_strides, where, hk, row, ok, DTYPE: tl.constexpr, BF16_RTNE: tl.constexpr):
    """An 8-bit (BLOCK_N, D) tile (int8, float8e4nv, or uint8 bytes of float8_e4m3fn) times the
    scales of its keys, at ``S`` (where, hk, row) (strides 0: one scale for all), rounded to
    DTYPE (q's)."""
    if x.dtype == tl.uint8:
        x = _e4m3_value(x)
    s = tl.load(S + where * s_strides[0] + hk * s_strides[1] + row * s_strides[2], mask=ok, other=0.0)
    return cast(x.to(tl.float32) * s[:, None], DTYPE, BF16_RTNE)


@triton.jit
def _dequantize_tiles(k, kt, v, KS, VS, ks_strides, vs_strides, BT, b, hk, table, offs_n, col_ok, DTYPE: tl.constexpr,
                      BF16_RTNE: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, TAIL: tl.constexpr):
    """8-bit key tiles (main part and, with TAIL, the tail: ``_key_tiles``) and value tile
    (BLOCK_N, Dv) of keys ``offs_n`` times their scales, in DTYPE: key j's scales at KS / VS +
    (b or page, head, slot) * ``ks_strides`` / ``vs_strides`` (per-tensor scales: strides 0,
    the same element for every key)."""
    where, s_row = _scale_slots(BT, b, table, offs_n, col_ok, PAGED, PAGE_SIZE)
    k = _dequantize(k, KS, ks_strides, where, hk, s_row, col_ok, DTYPE, BF16_RTNE)
    if TAIL > 0:
        kt = _dequantize(kt, KS, ks_strides, where, hk, s_row, col_ok, DTYPE, BF16_RTNE)
    v = _dequantize(v, VS, vs_strides, where, hk, s_row, col_ok, DTYPE, BF16_RTNE)
    return k, kt, v


@triton.jit
def kv_append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, COS, SIN, BT, CU_Q,
    kn_strides, vn_strides, k_strides, v_strides,
    n_kv_heads, seqlen_new, seqlen_max, rotary, table,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ROT_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, VARLEN: tl.constexpr, BF16_RTNE: tl.constexpr,
    KS=None, VS=None, ks_strides=(0, 0, 0), vs_strides=(0, 0, 0), KV_QUANT: tl.constexpr = False,
    SCALE_PER_TOKEN: tl.constexpr = False,
):
    """Copy new token t of (b, kv head) into cache slot SEQLENS[b] + t, for K and V; with
    ROT_DIM the key is first rotated by the angles of position SEQLENS[b] + t.

    PAGED: K/V are pages (num_pages, page_size, Hkv, D) (k_strides[0] is the page stride) and
    slot j of sequence b is row j % PAGE_SIZE of page BT[b, j // PAGE_SIZE]; seqlen_max is
    the table's P * PAGE_SIZE. VARLEN: k_new / v_new are packed (total, Hkv, D), sequence b's
    tokens are rows CU_Q[b] .. CU_Q[b+1] - 1 (batch strides 0), seqlen_new an upper bound on
    any sequence's count.

    KV_QUANT: K/V are 8-bit (int8, float8e4nv, or uint8 holding float8_e4m3fn bytes where
    compiled Triton takes no e4m3 pointer, before sm_89) and the rows go in quantized
    (``_quantize_rows``): with SCALE_PER_TOKEN their scales are written to KS / VS ((B, Hkv,
    Lmax), paged (num_pages, page_size, Hkv); ``ks_strides`` / ``vs_strides`` in (b or page,
    head, slot) order), else KS / VS hold the one scale of each cache.

    Grid (B * Hkv * token blocks,): one axis, which CUDA lets grow past 65535."""
    token_blocks = (seqlen_new + BLOCK_L - 1) // BLOCK_L
    bhk = tl.program_id(0) // token_blocks
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    offs_t = tl.program_id(0) % token_blocks * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    pos = _cached(SEQLENS, b, seqlen_max).to(tl.int64) + offs_t  # each sequence writes at its own offset
    # The launcher has checked pos < seqlen_max; the mask keeps a bad call inside the buffer.
    ok = (offs_t < seqlen_new) & (pos < seqlen_max)
    q_start = 0  # row of the sequence's first token in k_new / v_new
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        ok = ok & (offs_t < tl.load(CU_Q + b + 1) - q_start)
    k = load_rows(K_NEW, kn_strides, b, hk, q_start, offs_t, offs_d, ok, d_ok)
    if ROT_DIM > 0:
        k_rows = rows_base(K_NEW, kn_strides, b, hk, q_start) + offs_t[:, None].to(tl.int64) * kn_strides[2]
        k_rot = _rotary(k, k_rows, kn_strides[3], ok, pos, COS, SIN, rotary, offs_d, ROT_DIM, ROT_INTERLEAVED)
        k = cast(k_rot, k.dtype, BF16_RTNE)
    v = load_rows(V_NEW, vn_strides, b, hk, q_start, offs_t, offs_dv, ok, dv_ok)
    if KV_QUANT:
        where, s_row = _scale_slots(BT, b, table, pos, ok, PAGED, PAGE_SIZE)
        k = _quantize_rows(k, KS, ks_strides, where, hk, s_row, ok, K.dtype.element_ty, SCALE_PER_TOKEN)
        v = _quantize_rows(v, VS, vs_strides, where, hk, s_row, ok, V.dtype.element_ty, SCALE_PER_TOKEN)
    if PAGED:
        page = _page_of(BT, b, table, pos, ok, PAGE_SIZE)  # (BLOCK_L,) page of each token
        row = pos % PAGE_SIZE
        k_rows = rows_base(K, k_strides, page, hk, row)  # (BLOCK_L,) row pointers
        tl.store(k_rows[:, None] + offs_d[None, :].to(tl.int64) * k_strides[3], k, mask=ok[:, None] & d_ok[None, :])
        v_rows = rows_base(V, v_strides, page, hk, row)
        tl.store(v_rows[:, None] + offs_dv[None, :].to(tl.int64) * v_strides[3], v,
                 mask=ok[:, None] & dv_ok[None, :])
    else:
        store_tile(rows_base(K, k_strides, b, hk, 0), k, pos, offs_d, k_strides[2], k_strides[3], ok, d_ok)
        store_tile(rows_base(V, v_strides, b, hk, 0), v, pos, offs_dv, v_strides[2], v_strides[3], ok, dv_ok)


@triton.jit
def _rows(SEQLENS, CU_Q, b, hk, offs_r, group, seqlen_q, seqlen_new, seqlen_max, VARLEN: tl.constexpr):
    """What the query rows offs_r of (batch b, kv head hk) are: (row_ok, pos_q, h, tok, lq,
    seqlen_k): valid, the new token (0 .. lq - 1), the query head, the token's row in q / the
    output, this sequence's new tokens and its keys after the append.

    Rows are head-major (r = g * seqlen_q + i); VARLEN: token-major (r = i * group + g), so a
    sequence's valid rows are the prefix r < group * lq and a decoding sequence fills one row
    block whatever seqlen_q (there only an upper bound), and token i is row CU_Q[b] + i."""
    n = _cached(SEQLENS, b, seqlen_max)
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        lq = tl.load(CU_Q + b + 1) - q_start
        pos_q = offs_r // group
        h = hk * group + (offs_r % group).to(tl.int64)
        tok = q_start.to(tl.int64) + pos_q
        seqlen_k = n + lq * seqlen_new  # seqlen_new is a flag there: the sequence appended its own tokens
    else:
        lq = seqlen_q
        pos_q = offs_r % seqlen_q
        h = hk * group + (offs_r // seqlen_q).to(tl.int64)
        tok = pos_q.to(tl.int64)
        seqlen_k = n + seqlen_new
    row_ok = offs_r < group * lq
    # min(seqlen_k, seqlen_max) as arithmetic (interpreter): never read past the buffer.
    seqlen_k = seqlen_k - (seqlen_k - seqlen_max) * (seqlen_k > seqlen_max)
    return row_ok, pos_q, h, tok, lq, seqlen_k


@triton.jit
def _chunk(seqlen_k, diag, split, num_splits, window_left, window_right,
           BLOCK_N: tl.constexpr, PAGED: tl.constexpr, TERMS: tl.constexpr):
    """[start, end) of the keys split ``split`` streams: the keys any new token of the sequence
    may see (the band of its first and last token), cut into num_splits chunks of whole key
    blocks, so a sliding window never streams the whole cache; empty for trailing splits."""
    lo = seqlen_k * 0
    hi = seqlen_k
    if TERMS.LEFT:
        lo = diag - window_left
        lo = lo * (lo > 0)
    if TERMS.RIGHT:
        hi = seqlen_k + window_right  # one past the last token's last visible key
        hi = seqlen_k + (hi - seqlen_k) * (hi < seqlen_k)
        hi = hi * (hi > 0)
    if PAGED:
        lo = lo // BLOCK_N * BLOCK_N  # tiles aligned to BLOCK_N never straddle a page (the window masks the extra keys)
    hi = lo + (hi - lo) * (hi > lo)
    # Chunk of this split, a whole number of key blocks so loads stay aligned.
    chunk = (hi - lo + num_splits - 1) // num_splits
    chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * chunk
    end = start + chunk
    end = hi + (end - hi) * (end < hi)  # min(end, hi)
    return start, end


@triton.jit
def _fwd_order_tiles(t, row_ok, end, fwd_block_m, scalars, BLOCK_N: tl.constexpr, TERMS: tl.constexpr):
    """FWD_ORDER's walk for rows at key positions t: (ihi, start, n_first, n_second). The
    forward's row t lies in query block t // fwd_block_m, which sees whole the tiles below its
    first row + 1 + window_right (``_interior``): ihi (BLOCK_M,), that edge in multiples of
    BLOCK_N. The walk takes n_first tiles from start = min(ihi) up to end, then n_second from 0."""
    edge = t // fwd_block_m * fwd_block_m + 1
    if TERMS.RIGHT:
        edge = edge + scalars[4]
    else:
        edge = end + 0 * edge
    ihi = tl.where(row_ok, edge // BLOCK_N * BLOCK_N, 0)
    start = tl.min(ihi, 0)
    n_first = (end - start + BLOCK_N - 1) // BLOCK_N
    return ihi, start, n_first * (n_first > 0), tl.max(ihi, 0) // BLOCK_N


@triton.jit
def _fwd_order_update(qk, take, t, offs_n, col_ok, m_i, l_i, scalars, TERMS: tl.constexpr):
    """One tile of unscaled q.k scores ``qk`` into the running softmax with the flash forward's
    arithmetic: the max in score units, one fma before exp2. ``take`` (BLOCK_M,): the rows that
    take the tile (the others see it masked whole, which leaves their sums bitwise unchanged).
    Returns (p, alpha, m_i, l_i) as ``softmax_update``."""
    c = scalars[0] * LOG2E  # a q.k score times c is a logit in log2 units
    seen = take[:, None] & col_ok[None, :]
    if TERMS.RIGHT:
        seen = seen & (offs_n[None, :] <= t[:, None] + scalars[4])
    qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key keeps max -inf; 0 is subtracted instead (no NaN).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new * c)
    p = tl.math.exp2(tl.fma(qk, c, -m_sub[:, None]))  # one rounding, as the forward's
    alpha = tl.math.exp2(m_i * c - m_sub)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _scores(q, qt, k, kt, TAIL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Unscaled q.k^T (BLOCK_M, BLOCK_N) in fp32 over both parts of the head dim: q/k's main
    part and, with TAIL, its tail (qt/kt, the channels after the main part's). On a GPU the
    tail's product accumulates onto the main part's (one chain of MMAs over the channels in
    order)."""
    qk = dot(q, tl.trans(k), DOT_FP32, PRECISION)
    if TAIL > 0:
        if DOT_FP32 or PRECISION == "tf32-interpreted":  # the interpreter: exact products, summed
            qk = qk + dot(qt, tl.trans(kt), DOT_FP32, PRECISION)
        else:
            qk = tl.dot(qt, tl.trans(kt), acc=qk, input_precision=PRECISION)
    return qk


@triton.jit
def _head_spans(HEAD_DIM: tl.constexpr, WIDTHS: tl.constexpr):
    """(offs_d, d_ok, offs_t, t_ok): q/k's main channels 0 .. WIDTHS.D - 1 and its tail's,
    WIDTHS.D .. WIDTHS.D + WIDTHS.TAIL - 1 (without a tail: the main ones again, unused), and
    which of them are < HEAD_DIM."""
    offs_d, d_ok = span(0, WIDTHS.D, HEAD_DIM)
    offs_t, t_ok = offs_d, d_ok
    if WIDTHS.TAIL > 0:
        offs_t, t_ok = span(WIDTHS.D, WIDTHS.TAIL, HEAD_DIM)
    return offs_d, d_ok, offs_t, t_ok


@triton.jit
def _q_part(q_rows, q_strides, row_ok, offs, ok, pos, COS, SIN, rotary, ROT_DIM: tl.constexpr,
            ROT_INTERLEAVED: tl.constexpr, ROTATES: tl.constexpr, BF16_RTNE: tl.constexpr):
    """The query rows' channels ``offs`` (BLOCK_M, len(offs)), 0 where masked; with ROTATES
    (the part holds some of the first ROT_DIM channels) turned by the angles of key positions
    ``pos`` and rounded back to q's dtype, as a separately rotated q would be."""
    q = tl.load(q_rows + offs[None, :] * q_strides[3], mask=row_ok[:, None] & ok[None, :], other=0.0)
    if ROTATES:
        q_rot = _rotary(q, q_rows, q_strides[3], row_ok, pos, COS, SIN, rotary, offs, ROT_DIM, ROT_INTERLEAVED)
        q = cast(q_rot, q.dtype, BF16_RTNE)
    return q


@triton.jit
def _q_tiles(q_rows, q_strides, row_ok, pos, COS, SIN, rotary, offs_d, d_ok, offs_t, t_ok, ROT_DIM: tl.constexpr,
             ROT_INTERLEAVED: tl.constexpr, BF16_RTNE: tl.constexpr, WIDTHS: tl.constexpr):
    """(q, qt): the query rows' main channels and, with WIDTHS.TAIL, their tail (else q
    again), each with the rotary embedding of key positions ``pos`` where it holds rotated
    channels (``_q_part``)."""
    q = _q_part(q_rows, q_strides, row_ok, offs_d, d_ok, pos, COS, SIN, rotary, ROT_DIM, ROT_INTERLEAVED,
                ROT_DIM > 0, BF16_RTNE)
    qt = q
    if WIDTHS.TAIL > 0:
        qt = _q_part(q_rows, q_strides, row_ok, offs_t, t_ok, pos, COS, SIN, rotary, ROT_DIM, ROT_INTERLEAVED,
                     ROT_DIM > WIDTHS.D, BF16_RTNE)
    return q, qt


@triton.jit
def _key_tiles(K, V, k_strides, v_strides, k_base, v_base, BT, b, hk, table, start_n, offs_n, col_ok, end,
               offs_d, d_ok, offs_t, t_ok, offs_dv, dv_ok, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
               PAGE_SIZE: tl.constexpr, WIDTHS: tl.constexpr):
    """The (k, kt, v) tiles of keys offs_n (from k_base / v_base, or paged through the block
    table): k's main part (channels offs_d), with WIDTHS.TAIL its tail (offs_t; else kt is k),
    and v; with WIDTHS.V_IN_K (V is K's first Dv = WIDTHS.D channels: the same memory) v is the
    main tile itself, not loaded again. Where BLOCK_N divides PAGE_SIZE the tile lies in one
    page: one table read; otherwise (pages of 1, 48, 528, ...) one table read per key, each
    key's row on its own."""
    if PAGED and PAGE_SIZE % BLOCK_N != 0:
        page = _page_of(BT, b, table, offs_n, col_ok, PAGE_SIZE)  # (BLOCK_N,)
        # Each key's element offset from its head's base: page * page stride + row * row stride.
        k_rows = page * k_strides[0] + (offs_n % PAGE_SIZE).to(tl.int64) * k_strides[2]
        v_rows = page * v_strides[0] + (offs_n % PAGE_SIZE).to(tl.int64) * v_strides[2]
        k_base = K + hk * k_strides[1]
        v_base = V + hk * v_strides[1]
        k_step = 1  # k_rows / v_rows are element offsets
        v_step = 1
    else:
        k_rows = offs_n  # key rows from k_base / v_base
        if PAGED:
            page = _page_of(BT, b, table, start_n, start_n < end, PAGE_SIZE)
            k_rows = offs_n - start_n // PAGE_SIZE * PAGE_SIZE  # rows within the page, < PAGE_SIZE
            k_base = rows_base(K, k_strides, page, hk, 0)
            v_base = rows_base(V, v_strides, page, hk, 0)
        v_rows = k_rows
        k_step = k_strides[2]
        v_step = v_strides[2]
    k = load_tile(k_base, k_rows, offs_d, k_step, k_strides[3], col_ok, d_ok)
    kt = k
    if WIDTHS.TAIL > 0:
        kt = load_tile(k_base, k_rows, offs_t, k_step, k_strides[3], col_ok, t_ok)
    if WIDTHS.V_IN_K:
        v = k
    else:
        v = load_tile(v_base, v_rows, offs_dv, v_step, v_strides[3], col_ok, dv_ok)
    return k, kt, v


@triton.jit
def _store_rows(O, LSE, out, lse, o_strides, lse_strides, b, h, tok, pos_q, split, n_heads, seqlen_q, num_splits,
                row_ok, offs_dv, dv_ok, HEAD_DIM_V: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                VARLEN: tl.constexpr, BF16_RTNE: tl.constexpr):
    """A chunk's rows: with SINGLE_SPLIT the output and lse themselves, else the fp32 partials
    (``decode_split_kernel``'s layouts)."""
    if SINGLE_SPLIT:
        o_ptrs = (rows_base(O, o_strides, b, 0, 0) + h[:, None] * o_strides[1] + tok[:, None] * o_strides[2]
                  + offs_dv[None, :].to(tl.int64) * o_strides[3])
        tl.store(o_ptrs, cast(out, O.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(LSE + b * lse_strides[0] + h * lse_strides[1] + tok * lse_strides[2], lse, mask=row_ok)
    else:
        if VARLEN:
            part = (tok * n_heads + h) * num_splits + split  # packed row tok, head h
        else:
            part = ((b * n_heads + h) * seqlen_q + pos_q) * num_splits + split  # (b, h, i)
        store_tile(O, out, part, offs_dv, HEAD_DIM_V, 1, row_ok, dv_ok)
        tl.store(LSE + part, lse, mask=row_ok)


@triton.jit
def decode_split_kernel(
    Q, K, V, SEQLENS, ALIBI, COS, SIN, BT, CU_Q, SINKS, O, LSE, strides,
    n_heads, group, seqlen_q, seqlen_new, seqlen_max, num_splits, scalars, rotary, table, fwd_block_m,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDTHS: tl.constexpr, BLOCK_DV: tl.constexpr,
    TERMS: tl.constexpr, ROT_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, VARLEN: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
    FWD_ORDER: tl.constexpr,
    KS=None, VS=None, ks_strides=(0, 0, 0), vs_strides=(0, 0, 0), KV_QUANT: tl.constexpr = False,
):
    """One chunk of one (batch, kv head)'s keys for BLOCK_M of its group * seqlen_q query rows.

    Grid (B * Hkv * row blocks, num_splits): only axis 0 grows with the inputs (CUDA caps the
    others at 65535). ``scalars``: (scale, softcap, dropout_p, window_left, window_right) with ``TERMS``
    (``fastattn/ops/_launch.py: Terms``) saying which terms are on. ``strides``: those of
    (q, k, v, o, lse, alibi), each in (b, h, row, d) order.

    SINGLE_SPLIT: the result is final: O/LSE are the output (B, Hq, Lq, Dv) and the fp32 lse
    (B, Hq, Lq), with strides. Otherwise the contiguous fp32 partials per row and split:
    (B, Hq, Lq, num_splits, Dv) / (B, Hq, Lq, num_splits), VARLEN (total, Hq, num_splits[, Dv]).

    VARLEN: sequence b brings ``CU_Q[b+1] - CU_Q[b]`` new tokens, packed: q and the output are
    (total_q, Hq, D) (batch strides 0), seqlen_q an upper bound; seqlen_new 1 when each
    sequence also appended its tokens' keys, else 0 (``_rows``).

    TERMS.SINKS: SINKS (Hq,) holds a logit per query head that joins the softmax denominator
    once: split 0 starts its running softmax from it (max = sink, sum = 1, output 0), so
    the merge counts it once and the lse includes it.

    PAGED: pages of any size (``_key_tiles``).

    WIDTHS (``op.Widths``): q/k's channels as a main part and a tail (MLA: 512 + 64), two
    products summed (``_scores``); V_IN_K: K's main tile is the V tile (``_key_tiles``).

    FWD_ORDER (one split, no ALiBi, softcap, sinks or left window, scale > 0): each row
    reduces its keys as the flash forward's row at the same position of the whole sequence
    (queries = keys, query blocks of ``fwd_block_m`` rows, BLOCK_N its key block) does: the
    same tiles, in its order (the tiles from the first one its query block does not see whole
    up to its own key, then those from 0), with its arithmetic (unscaled q.k, the running max
    in score units, one fma before exp2). A tile the row does not take is masked whole, which
    leaves its running softmax bitwise unchanged (p = 0, alpha = exp2(0) = 1).

    KV_QUANT: 8-bit K/V with scales KS / VS (``_dequantize_tiles``), dequantized in registers
    to q's dtype: the products run in q's dtype, as with a 16-bit cache; only the loads shrink.
    """
    q_strides, k_strides, v_strides, o_strides, lse_strides, alibi_strides = strides
    row_blocks = (group * seqlen_q + BLOCK_M - 1) // BLOCK_M
    bhk = tl.program_id(0) // row_blocks
    start_m = tl.program_id(0) % row_blocks * BLOCK_M
    split = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    offs_r = start_m + tl.arange(0, BLOCK_M)
    row_ok, pos_q, h, tok, lq, seqlen_k = _rows(SEQLENS, CU_Q, b, hk, offs_r, group, seqlen_q, seqlen_new,
                                                seqlen_max, VARLEN)
    offs_d, d_ok, offs_t, t_ok = _head_spans(HEAD_DIM, WIDTHS)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    diag = seqlen_k - lq  # bottom-right: new token i sits at key position i + diag
    start, end = _chunk(seqlen_k, diag, split, num_splits, scalars[3], scalars[4], BLOCK_N, PAGED, TERMS)
    if VARLEN:  # a row block past this sequence's tokens streams no key
        end = tl.where(start_m < group * lq, end, start)

    q_rows = rows_base(Q, q_strides, b, 0, 0) + h[:, None] * q_strides[1] + tok[:, None] * q_strides[2]
    q, qt = _q_tiles(q_rows, q_strides, row_ok, pos_q + diag, COS, SIN, rotary, offs_d, d_ok, offs_t, t_ok,
                     ROT_DIM, ROT_INTERLEAVED, BF16_RTNE, WIDTHS)  # query row i is at key position i + diag
    k_base = rows_base(K, k_strides, b, hk, 0)
    v_base = rows_base(V, v_strides, b, hk, 0)
    slope = 0.0
    if TERMS.ALIBI:
        # One slope per row (its query head), as a column so it broadcasts over the keys.
        slope = tl.load(ALIBI + b * alibi_strides[0] + h * alibi_strides[1], mask=row_ok,
                        other=0.0).to(tl.float32)[:, None]

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)
    if TERMS.SINKS:
        first = (offs_r * 0 + split) == 0  # (a vector: the interpreter's where wants one)
        sink = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32)
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    n_first = (end - start + BLOCK_N - 1) // BLOCK_N  # tiles start, start + BLOCK_N, .. < end
    n_second = n_first * 0
    t = pos_q + diag  # the rows' key positions
    ihi = t * 0
    if FWD_ORDER:
        ihi, start, n_first, n_second = _fwd_order_tiles(t, row_ok, end, fwd_block_m, scalars, BLOCK_N, TERMS)
    for it in range(0, n_first + n_second):
        start_n = start + it * BLOCK_N
        if FWD_ORDER:  # first the tiles from start up (rows below their ihi skip them), then from 0
            start_n = start_n + ((it - n_first) * BLOCK_N - start_n) * (it >= n_first)
        offs_n, col_ok = span(start_n, BLOCK_N, end)  # keys of the next split belong to the next split
        k, kt, v = _key_tiles(K, V, k_strides, v_strides, k_base, v_base, BT, b, hk, table, start_n, offs_n,
                              col_ok, end, offs_d, d_ok, offs_t, t_ok, offs_dv, dv_ok, BLOCK_N, PAGED, PAGE_SIZE, WIDTHS)
        if KV_QUANT:
            k, kt, v = _dequantize_tiles(k, kt, v, KS, VS, ks_strides, vs_strides, BT, b, hk, table, offs_n, col_ok,
                                         Q.dtype.element_ty, BF16_RTNE, PAGED, PAGE_SIZE, WIDTHS.TAIL)
        qk = _scores(q, qt, k, kt, WIDTHS.TAIL, DOT_FP32, PRECISION)
        if FWD_ORDER:
            first = (ihi * 0 + it) < n_first  # (a vector: the interpreter's where wants one)
            take = tl.where(first, start_n >= ihi, start_n < ihi)  # (BLOCK_M,) whether the row takes this tile
            p, alpha, m_i, l_i = _fwd_order_update(qk, take, t, offs_n, col_ok, m_i, l_i, scalars, TERMS)
        else:
            # The logits mask keys >= their seqlen_k argument: pass `end`, the split's own limit.
            s = term_logits(qk * scalars[0], pos_q[:, None], offs_n[None, :], lq, end, diag, scalars, Q, (0, 0, 0, 0), slope,
                            TERMS)
            p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)

    out, lse = softmax_finish(acc, m_i, l_i)  # no visible key in this chunk: 0, -inf (weight 0 in the merge)
    if FWD_ORDER:  # m_i is in score units: lse = m_i * scale + log(l), l holding exp2(r) from m_i * c's rounding
        c = scalars[0] * LOG2E
        r = tl.fma(m_i, c, -(m_i * c))
        log_l = tl.log(tl.where(l_i == 0.0, 1.0, l_i)) - r * LN2
        lse = tl.where(l_i == 0.0, float("-inf"), tl.fma(m_i, scalars[0], log_l))
    _store_rows(O, LSE, out, lse, o_strides, lse_strides, b, h, tok, pos_q, split, n_heads, seqlen_q, num_splits,
                row_ok, offs_dv, dv_ok, HEAD_DIM_V, SINGLE_SPLIT, VARLEN, BF16_RTNE)


@triton.jit
def decode_merge_kernel(
    O_PART, LSE_PART, O, LSE, o_strides, lse_strides, n_heads, seqlen_q, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """Combine the num_splits partial results of one query row by their lse: row (b, h, i) =
    (b * n_heads + h) * seqlen_q + i, or with VARLEN packed row tok, head h = tok * n_heads + h
    (the output (total, Hq, Dv), batch strides 0)."""
    row = tl.program_id(0).to(tl.int64)
    if VARLEN:
        b = row * 0
        h = row % n_heads
        i = row // n_heads
    else:
        i = row % seqlen_q
        h = (row // seqlen_q) % n_heads
        b = row // seqlen_q // n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CHUNK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V

    lse_s = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights exp(-inf) = 0
    total = tl.sum(tl.math.exp2((lse_s - m_safe) * LOG2E), 0)  # = exp(lse - m)

    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):  # a few splits at a time keeps registers bounded
        s_idx = s0 + offs_c
        s_ok = s_idx < num_splits
        lse_c = tl.load(LSE_PART + row * num_splits + s_idx, mask=s_ok, other=float("-inf"))
        w = tl.math.exp2((lse_c - m_safe) * LOG2E)  # each split's share, up to the common exp(m)
        o = tl.load(O_PART + (row * num_splits + s_idx[:, None]) * HEAD_DIM_V + offs_dv[None, :],
                    mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], 0)

    out = acc / tl.where(total == 0.0, 1.0, total)  # every split empty: output 0, lse -inf
    tl.store(rows_base(O, o_strides, b, h, i) + offs_dv * o_strides[3], cast(out, O.dtype.element_ty, BF16_RTNE),
             mask=dv_ok)
    tl.store(LSE + b * lse_strides[0] + h * lse_strides[1] + i * lse_strides[2], row_lse(m_safe, total))

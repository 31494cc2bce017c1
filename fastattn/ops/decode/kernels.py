"""Triton kernels for attention over a KV cache: append, split-KV attention, merge.

Layout: q (B, Hq, Lq, D), caches (B, Hkv, Lmax, D), any strides; ``SEQLENS`` (B,) holds the
tokens already cached per sequence, so sequence b has ``seqlen_k = SEQLENS[b] + seqlen_new``
valid keys once the new ones are appended (see ``reference.py``). Paged caches (``PAGED``):
pages (num_pages, page_size, Hkv, D) and a block table (B, P) mapping each sequence's logical
slots to page rows; the kernels translate positions through the table.

Flash decoding: with one or a few new tokens there is only a handful of query rows per head,
so one program per (batch, head) would leave most of the GPU idle while it streams a long cache.
Instead the visible key range of every (batch, kv head) is cut into ``num_splits`` chunks, one
program each. A program holds ALL the query rows that share its kv head (``group`` query heads
times ``seqlen_q`` new tokens, row r = g * seqlen_q + i), so each K/V element is read from
memory once however large the GQA ratio (while those rows fit one row block, 64 on a GPU;
more rows, as in chunked prefill, take several row blocks). Each program writes its chunk's normalised partial
output and logsumexp in fp32; ``decode_merge_kernel`` then combines them exactly:
``out = sum_s exp(lse_s - lse) * out_s`` with ``lse = logsumexp_s(lse_s)``.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import (
    LOG2E, cast, dot, load_tile, logits, row_lse, softmax_finish, softmax_init, softmax_update, span,
    store_tile,
)


@triton.jit
def _rotary(x, row_ptrs, stride_d, rows_ok, pos, COS, SIN, stride_cs, offs_d,
            ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """RoPE of the first ROT_DIM dims of the rows ``x`` (BLOCK, BLOCK_D), whose element d lies
    at ``row_ptrs + d * stride_d``; row r turns by the angles of position ``pos[r]`` (cos/sin
    tables (P, ROT_DIM / 2), row stride stride_cs). Returns fp32."""
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
    cs_off = pos[:, None].to(tl.int64) * stride_cs + j[None, :]
    # Outside the rotated dims cos = 1, sin = 0: those dims pass through unchanged.
    c = tl.load(COS + cs_off, mask=m, other=1.0).to(tl.float32)
    sn = tl.load(SIN + cs_off, mask=m, other=0.0).to(tl.float32)
    return x.to(tl.float32) * c + sign[None, :] * xp * sn


@triton.jit
def _page_of(BT, b, stride_btb, slot, n_pages, ok, PAGE_SIZE: tl.constexpr):
    """int64 page holding logical slot ``slot`` (scalar or vector) of sequence b, read from the
    block table and clamped to [0, n_pages) so that a bad table never leaves the buffer."""
    page = tl.load(BT + b * stride_btb + slot // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
    page = page * (page > 0)
    return page - (page - (n_pages - 1)) * (page > n_pages - 1)


@triton.jit
def kv_append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, COS, SIN, BT, CU_Q,
    stride_knb, stride_knh, stride_knn, stride_knd,
    stride_vnb, stride_vnh, stride_vnn, stride_vnd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    n_kv_heads, seqlen_new, seqlen_max, stride_cs, stride_btb, n_pages,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_ROTARY: tl.constexpr, ROT_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, VARLEN: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """Copy new token t of (b, kv head) into cache slot SEQLENS[b] + t, for K and V; with
    HAS_ROTARY the key is first rotated by the angles of position SEQLENS[b] + t.

    PAGED: K/V are pages (num_pages, page_size, Hkv, D) (stride_kb is the page stride) and
    slot j of sequence b is row j % PAGE_SIZE of page BT[b, j // PAGE_SIZE]; seqlen_max is
    the table's P * PAGE_SIZE. VARLEN: k_new / v_new are packed (total, Hkv, D), sequence b's
    tokens are rows CU_Q[b] .. CU_Q[b+1] - 1 (stride_knb = stride_vnb = 0), seqlen_new an
    upper bound on any sequence's count."""
    bhk = tl.program_id(0)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    pos = tl.load(SEQLENS + b).to(tl.int64) + offs_t  # each sequence writes at its own offset
    # The launcher has checked pos < seqlen_max; the mask keeps a bad call inside the buffer.
    ok = (offs_t < seqlen_new) & (pos < seqlen_max)
    src = offs_t.to(tl.int64)  # row of the token in k_new / v_new
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        ok = ok & (offs_t < tl.load(CU_Q + b + 1) - q_start)
        src = q_start.to(tl.int64) + offs_t
    k_new = K_NEW + b * stride_knb + hk * stride_knh
    k = load_tile(k_new, src, offs_d, stride_knn, stride_knd, ok, d_ok)
    if HAS_ROTARY:
        k_rows = k_new + src[:, None] * stride_knn
        k_rot = _rotary(k, k_rows, stride_knd, ok, pos, COS, SIN, stride_cs, offs_d, ROT_DIM, ROT_INTERLEAVED)
        k = cast(k_rot, k.dtype, BF16_RTNE)
    v = load_tile(V_NEW + b * stride_vnb + hk * stride_vnh, src, offs_dv, stride_vnn, stride_vnd, ok, dv_ok)
    if PAGED:
        page = _page_of(BT, b, stride_btb, pos, n_pages, ok, PAGE_SIZE)  # (BLOCK_L,) page of each token
        row = pos % PAGE_SIZE
        k_rows = K + page * stride_kb + hk * stride_kh + row * stride_kn  # (BLOCK_L,) row pointers
        tl.store(k_rows[:, None] + offs_d[None, :].to(tl.int64) * stride_kd, k, mask=ok[:, None] & d_ok[None, :])
        v_rows = V + page * stride_vb + hk * stride_vh + row * stride_vn
        tl.store(v_rows[:, None] + offs_dv[None, :].to(tl.int64) * stride_vd, v, mask=ok[:, None] & dv_ok[None, :])
    else:
        store_tile(K + b * stride_kb + hk * stride_kh, k, pos, offs_d, stride_kn, stride_kd, ok, d_ok)
        store_tile(V + b * stride_vb + hk * stride_vh, v, pos, offs_dv, stride_vn, stride_vd, ok, dv_ok)


@triton.jit
def decode_split_kernel(
    Q, K, V, SEQLENS, ALIBI, COS, SIN, BT, CU_Q, SINKS, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    n_heads, group, seqlen_q, seqlen_new, seqlen_max, num_splits,
    scale, softcap, window_left, window_right, stride_cs, stride_btb, n_pages,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ROTARY: tl.constexpr, ROT_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """One chunk of one (batch, kv head)'s keys for BLOCK_M of its group * seqlen_q query rows.

    SINGLE_SPLIT: the chunk is the whole key range, so the result is final: O/LSE are the
    output (B, Hq, Lq, Dv) and the fp32 lse (B, Hq, Lq), both with strides. Otherwise O/LSE are
    the contiguous fp32 partials (B, Hq, Lq, num_splits, Dv) and (B, Hq, Lq, num_splits).

    VARLEN: sequence b brings its own ``CU_Q[b+1] - CU_Q[b]`` new tokens, packed: q and the
    output are (total_q, Hq, D) (stride_qb = stride_ob = stride_lb = 0, token t of sequence b
    is row CU_Q[b] + t) and seqlen_q is only an upper bound (the rows per head in the grid
    and the partials); seqlen_new is 1 when each sequence also appended its tokens' keys
    (so it has SEQLENS[b] + its own Lq keys), else 0. Rows are token-major there (r = i * group
    + g), and a row block holding none of the sequence's tokens streams no key.

    HAS_SINKS: SINKS (Hq,) holds a logit per query head that joins the softmax denominator
    once: split 0 starts its running softmax from it (max = sink, sum = 1, output 0), so
    the merge counts it once and the lse includes it.

    PAGED: K/V are pages (num_pages, page_size, Hkv, D), stride_kb / stride_vb the page
    stride, and BT the (B, P) block table (row stride stride_btb). BLOCK_N divides PAGE_SIZE
    and every key tile starts at a multiple of BLOCK_N, so a tile lies in one page: one table
    read per tile.
    """
    bhk = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    n_kv_heads = n_heads // group
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)

    offs_r = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_r < group * seqlen_q
    pos_q = offs_r % seqlen_q  # which new token the row is
    h = hk * group + (offs_r // seqlen_q).to(tl.int64)  # which query head: GQA heads stacked as rows
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)

    lq = seqlen_q  # this sequence's new tokens
    tok = pos_q.to(tl.int64)  # the row's token in q / the output
    seqlen_k = tl.load(SEQLENS + b).to(tl.int32) + seqlen_new
    if VARLEN:
        # Rows token-major (r = i * group + g): a sequence's valid rows are the prefix
        # r < group * lq, so a decoding sequence fills one row block, whatever seqlen_q.
        q_start = tl.load(CU_Q + b)
        lq = tl.load(CU_Q + b + 1) - q_start
        pos_q = offs_r // group
        h = hk * group + (offs_r % group).to(tl.int64)
        row_ok = offs_r < group * lq
        tok = q_start.to(tl.int64) + pos_q
        seqlen_k = tl.load(SEQLENS + b).to(tl.int32) + lq * seqlen_new
    # min(seqlen_k, seqlen_max) as arithmetic (interpreter): never read past the buffer.
    seqlen_k = seqlen_k - (seqlen_k - seqlen_max) * (seqlen_k > seqlen_max)
    diag = seqlen_k - lq  # bottom-right: new token i sits at key position i + diag

    # Keys any new token of this sequence may see (the band of the first and last token);
    # the splits divide this range, so a sliding window never streams the whole cache.
    lo = seqlen_k * 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = diag - window_left
        lo = lo * (lo > 0)
    if HAS_RIGHT:
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
    end = hi + (end - hi) * (end < hi)  # min(end, hi); empty (end <= start) for trailing splits
    if VARLEN:  # a row block past this sequence's tokens streams no key
        end = tl.where(start_m < group * lq, end, start)

    q_rows = Q + b * stride_qb + h[:, None] * stride_qh + tok[:, None] * stride_qm
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ROTARY:
        # Query row i is at key position i + diag (bottom-right); rounded back to q's dtype
        # as a separately rotated q would be.
        q_rot = _rotary(q, q_rows, stride_qd, row_ok, pos_q + diag, COS, SIN, stride_cs, offs_d,
                        ROT_DIM, ROT_INTERLEAVED)
        q = cast(q_rot, q.dtype, BF16_RTNE)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        # One slope per row (its query head), as a column so it broadcasts over the keys.
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0).to(tl.float32)[:, None]

    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)
    if HAS_SINKS:
        first = (offs_r * 0 + split) == 0  # (a vector: the interpreter's where wants one)
        sink = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32)
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    for start_n in range(start, end, BLOCK_N):
        offs_n, col_ok = span(start_n, BLOCK_N, end)  # keys of the next split belong to the next split
        rows_n = offs_n  # key rows from k_base / v_base
        if PAGED:
            page = _page_of(BT, b, stride_btb, start_n, n_pages, start_n < end, PAGE_SIZE)
            rows_n = offs_n - start_n // PAGE_SIZE * PAGE_SIZE  # rows within the page, < PAGE_SIZE
            k_base = K + page * stride_kb + hk * stride_kh
            v_base = V + page * stride_vb + hk * stride_vh
        k = load_tile(k_base, rows_n, offs_d, stride_kn, stride_kd, col_ok, d_ok)
        qk = dot(q, tl.trans(k), DOT_FP32, PRECISION) * scale
        # logits masks keys >= its seqlen_k argument: pass `end`, the split's own limit.
        s = logits(qk, pos_q[:, None], offs_n[None, :], lq, end, diag, softcap, window_left, window_right,
                   Q, 0, 0, slope,
                   False, False, HAS_ALIBI, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT)
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
        v = load_tile(v_base, rows_n, offs_dv, stride_vn, stride_vd, col_ok, dv_ok)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)

    out, lse = softmax_finish(acc, m_i, l_i)  # no visible key in this chunk: 0, -inf (weight 0 in the merge)
    row = (b * n_heads + h) * seqlen_q + pos_q  # (b, h, i) flattened
    if SINGLE_SPLIT:
        o_ptrs = (O + b * stride_ob + h[:, None] * stride_oh + tok[:, None] * stride_om
                  + offs_dv[None, :].to(tl.int64) * stride_od)
        tl.store(o_ptrs, cast(out, O.dtype.element_ty, BF16_RTNE), mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(LSE + b * stride_lb + h * stride_lh + tok * stride_lm, lse, mask=row_ok)
    else:
        part = row * num_splits + split
        store_tile(O, out, part, offs_dv, HEAD_DIM_V, 1, row_ok, dv_ok)
        tl.store(LSE + part, lse, mask=row_ok)


@triton.jit
def decode_merge_kernel(
    O_PART, LSE_PART, O, LSE, CU_Q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    n_heads, seqlen_q, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """Combine the num_splits partial results of one query row (b, h, i) by their lse.
    VARLEN: as in decode_split_kernel, token i of sequence b is output row CU_Q[b] + i, and
    rows i past the sequence's own tokens store nothing."""
    row = tl.program_id(0).to(tl.int64)  # (b * n_heads + h) * seqlen_q + i
    i = row % seqlen_q
    h = (row // seqlen_q) % n_heads
    b = row // seqlen_q // n_heads
    tok = i
    n_rows = seqlen_q  # tokens of sequence b
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        n_rows = tl.load(CU_Q + b + 1) - q_start
        tok = q_start + i
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CHUNK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    # (the row test as a vector: the interpreter cannot AND a scalar mask into a vector one)
    dv_ok = (offs_dv < HEAD_DIM_V) & ((offs_dv * 0 + i) < n_rows)

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
    tl.store(O + b * stride_ob + h * stride_oh + tok * stride_om + offs_dv * stride_od,
             cast(out, O.dtype.element_ty, BF16_RTNE), mask=dv_ok)
    tl.store(LSE + b * stride_lb + h * stride_lh + tok * stride_lm, row_lse(m_safe, total), mask=i < n_rows)

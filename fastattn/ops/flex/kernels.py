"""Triton kernels for FlexAttention: forward, dQ and dK/dV, with the user's mods inlined.

``SCORE_MOD``, ``SCORE_GRAD`` and ``MASK_MOD`` are compile-time ``@triton.jit`` functions made by
``translate.py`` from the user's plain-torch mods; ``CAP`` (the tensors they capture) and
``DIMS`` (those tensors' sizes and strides) are passed through to them. Logits are
``SCORE_MOD(q.k * scale, b, h, q_idx, kv_idx)``; no (Lq, Lk) tensor exists anywhere.

Which tiles are visited comes from a BlockMask (``blocks.py``), in blocks of Q_BLOCK query rows
by KV_BLOCK keys: ``LISTS`` = (KV_NUM, KV_IDX, FULL_NUM, FULL_IDX), ``list_strides`` their
stride tuples; for query block r of (b, h), ``KV_NUM[b, h, r]`` partial blocks listed in
``KV_IDX[b, h, r, :]`` (MASK_MOD applied per element) and ``FULL_NUM/FULL_IDX`` full ones (no
MASK_MOD); the dK/dV kernel walks the transposed lists (for each key block, its query blocks).
A block not listed is never visited. Kernel tiles divide the mask's blocks: BLOCK_M | Q_BLOCK,
BLOCK_N | KV_BLOCK. With VARLEN (packed sequences, ``flex_attention_varlen``) there are no lists:
every key tile of the sequence is visited, MASK_MOD applied when HAS_MASK, and b is the sequence.
The softmax is carried online in natural units (exp), as ``reference.py``.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import cast, dot, load_rows, packed_block, program_heads, sequence, span, store_rows


@triton.jit
def _block_list(LISTS, list_strides, FULL: tl.constexpr, b, h, row):
    """(pointer to the first index, step between indices, count) of block row ``row`` of (b, h):
    its partial blocks, or its full ones with FULL. LISTS = (NUM, IDX, FULL_NUM, FULL_IDX)
    pointers, list_strides their stride tuples."""
    NUM, IDX = LISTS[2 * FULL], LISTS[2 * FULL + 1]
    num_strides, idx_strides = list_strides[2 * FULL], list_strides[2 * FULL + 1]
    n = tl.load(NUM + b * num_strides[0] + h * num_strides[1] + row * num_strides[2])
    base = IDX + b * idx_strides[0] + h * idx_strides[1] + row * idx_strides[2]
    return base, idx_strides[3], n


@triton.jit
def _program_rows(n_heads, group, BLOCKS, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, BLOCK: tl.constexpr,
                  LENGTH_IS_Q: tl.constexpr, VARLEN: tl.constexpr):
    """(b, h, hk, start, q0, seqlen_q, k0, seqlen_k, offs, ok) of the program's tile of BLOCK
    rows (queries if LENGTH_IS_Q, else keys): its batch row, with VARLEN its sequence (-1 past
    the packed sequences' blocks: the caller returns; sequence 0's offsets are read instead),
    its head and kv head (``program_heads``), the tile's first row, the sequence's first query
    and key rows and lengths, the tile's rows and which of them exist."""
    b, h, _, hk = program_heads(n_heads, group)
    b, start = packed_block(BLOCKS, b, BLOCK, VARLEN)
    seq = b * (b >= 0)
    q0, seqlen_q = sequence(CU_SEQLENS_Q, seq, seqlen_q, VARLEN)
    k0, seqlen_k = sequence(CU_SEQLENS_K, seq, seqlen_k, VARLEN)
    offs, ok = span(start, BLOCK, seqlen_q if LENGTH_IS_Q else seqlen_k)
    return b, h, hk, start, q0, seqlen_q, k0, seqlen_k, offs, ok


@triton.jit
def _head_spans(HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(offs_d, d_ok, offs_dv, dv_ok): the q/k and v head-dim columns of a tile."""
    offs_d, d_ok = span(0, BLOCK_D, HEAD_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    return offs_d, d_ok, offs_dv, dv_ok


@triton.jit
def _block_span(IDX, i, step, BLOCK: tl.constexpr, seqlen):
    """(first position, width) of the i-th listed block: BLOCK positions, fewer at the end."""
    first = tl.load(IDX + i * step).to(tl.int32) * BLOCK
    width = seqlen - first
    return first, BLOCK + (width - BLOCK) * (width < BLOCK)


@triton.jit
def _logits(x, y, b, h, q_idx, kv_idx, seqlen_k, scale, CAP, DIMS,
            SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(score, logits, keep) of a tile: score = x.y^T * scale in fp32, logits = SCORE_MOD(score)
    where kept and -inf elsewhere; keep: the key is in the sequence and, in a partial block
    (APPLY_MASK), MASK_MOD keeps the pair. (x, y) = (q, k) with q_idx (BLOCK_M, 1) and kv_idx
    (1, BLOCK_N) for a (queries, keys) tile, or (k, q) with q_idx (1, BLOCK_M) and kv_idx
    (BLOCK_N, 1) for a (keys, queries) one: the mods are elementwise, either shape works."""
    score = dot(x, tl.trans(y), DOT_FP32, PRECISION) * scale
    keep = (kv_idx < seqlen_k) & (q_idx >= 0)
    if APPLY_MASK:
        keep = keep & MASK_MOD(b, h, q_idx, kv_idx, CAP, DIMS)
    logits = tl.where(keep, SCORE_MOD(score, b, h, q_idx, kv_idx, CAP, DIMS), float("-inf"))
    return score, logits, keep


@triton.jit
def _fwd_span(acc, m_i, l_i, visits, q, first, width, rows, CAP, DIMS,
              SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr):
    """Takes keys first .. first + width - 1 into the running softmax (m_i, l_i, acc), BLOCK_N a
    tile; ``visits`` counts the tiles."""
    K, V, k_strides, v_strides, b, h, hk, k0, offs_m, seqlen_k, scale = rows
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    for sub in range(0, width, BLOCK_N):
        offs_n, col_ok = span(first + sub, BLOCK_N, seqlen_k)
        k = load_rows(K, k_strides, b, hk, k0, offs_n, offs_d, col_ok, d_ok)
        _, s, _ = _logits(q, k, b, h, offs_m[:, None], offs_n[None, :], seqlen_k, scale, CAP, DIMS, SCORE_MOD,
                          MASK_MOD, APPLY_MASK, DOT_FP32, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no kept key yet keeps max -inf: subtract 0 so exp gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_sub[:, None])
        alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v = load_rows(V, v_strides, b, hk, k0, offs_n, offs_dv, col_ok, dv_ok)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, BF16_RTNE), v, DOT_FP32, PRECISION)
        visits += 1
    return acc, m_i, l_i, visits


@triton.jit
def flex_fwd_kernel(
    Q, K, V, O, LSE, VISITS, LISTS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS, CAP, DIMS,
    q_strides, k_strides, v_strides, o_strides, lse_strides, list_strides, n_heads, group, seqlen_q, seqlen_k,
    scale,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, COUNT_VISITS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """Output (B, Hq, Lq, Dv) and lse (B, Hq, Lq) of one block of BLOCK_M queries of one (b, h):
    first the partial blocks of its mask row (MASK_MOD applied), then the full ones. With
    VARLEN (packed sequences as ``fastattn/ops/flash/kernels.py`` takes them: (1, H, total, D)
    views, batch stride 0, CU_SEQLENS_Q/K, BLOCKS) b is the sequence, positions are local to it,
    and every key tile of the sequence is visited, MASK_MOD applied when HAS_MASK. With
    COUNT_VISITS, VISITS (grid-shaped int32) gets the number of key tiles each program took."""
    b, h, hk, start_m, q0, seqlen_q, k0, seqlen_k, offs_m, row_ok = _program_rows(
        n_heads, group, BLOCKS, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, BLOCK_M, True, VARLEN)
    if b < 0:  # past the packed sequences' blocks
        return
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    q = load_rows(Q, q_strides, b, h, q0, offs_m, offs_d, row_ok, d_ok)
    visits = start_m * 0
    rows = (K, V, k_strides, v_strides, b, h, hk, k0, offs_m, seqlen_k, scale)
    if VARLEN:
        acc, m_i, l_i, visits = _fwd_span(acc, m_i, l_i, visits, q, 0, seqlen_k, rows, CAP, DIMS, SCORE_MOD,
                                          MASK_MOD, HAS_MASK, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                          DOT_FP32, PRECISION, BF16_RTNE)
    else:
        for full in tl.static_range(2):  # the mask row's partial blocks, then its full ones
            idx, step, n = _block_list(LISTS, list_strides, full, b, h, start_m // Q_BLOCK)
            for i in range(0, n):
                first, width = _block_span(idx, i, step, KV_BLOCK, seqlen_k)
                acc, m_i, l_i, visits = _fwd_span(acc, m_i, l_i, visits, q, first, width, rows, CAP, DIMS,
                                                  SCORE_MOD, MASK_MOD, full == 0, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                                                  BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BF16_RTNE)
    # A row with no kept key: output 0 and lse -inf (torch's flex_attention does the same).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    store_rows(O, o_strides, b, h, q0, out, offs_m, offs_dv, row_ok, dv_ok, BF16_RTNE)
    lse_rows = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
    tl.store(LSE + lse_rows, lse, mask=row_ok)
    if COUNT_VISITS:
        grid_index = (b * n_heads + h) * tl.num_programs(0) + tl.program_id(0)
        tl.store(VISITS + grid_index, visits)


@triton.jit
def _bwd_tile(x, y, dx, dy, lse, delta, b, h, q_idx, kv_idx, seqlen_k, scale, CAP, DIMS,
              SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(p, ds) of a tile oriented as ``_logits``: the probabilities p = exp(logits - lse) and ds,
    the gradient of the unmodified score: dt = p * (dP - delta) through SCORE_GRAD. (x, y, dx,
    dy) = (q, k, dO, V) for (queries, keys), (k, q, V, dO) for (keys, queries); lse and delta
    are shaped like q_idx."""
    score, s, keep = _logits(x, y, b, h, q_idx, kv_idx, seqlen_k, scale, CAP, DIMS, SCORE_MOD, MASK_MOD,
                             APPLY_MASK, DOT_FP32, PRECISION)
    # A row that saw no key has lse -inf; +inf makes its p exp(-inf) = 0 instead of NaN.
    p = tl.exp(s - tl.where(lse == float("-inf"), float("inf"), lse))
    dp = dot(dx, tl.trans(dy), DOT_FP32, PRECISION)
    dt = p * (dp - delta)
    # Masked pairs get no gradient, even where the mod's derivative is not finite.
    ds = tl.where(keep, SCORE_GRAD(score, b, h, q_idx, kv_idx, CAP, DIMS, dt), 0.0)
    return p, ds


@triton.jit
def _dq_span(dq, q, do, lse, delta, first, width, rows, CAP, DIMS,
             SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr):
    """dq += dS @ K over keys first .. first + width - 1, BLOCK_N a tile."""
    K, V, k_strides, v_strides, b, h, hk, k0, offs_m, seqlen_k, scale = rows
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    for sub in range(0, width, BLOCK_N):
        offs_n, col_ok = span(first + sub, BLOCK_N, seqlen_k)
        k = load_rows(K, k_strides, b, hk, k0, offs_n, offs_d, col_ok, d_ok)
        v = load_rows(V, v_strides, b, hk, k0, offs_n, offs_dv, col_ok, dv_ok)
        _, ds = _bwd_tile(q, k, do, v, lse[:, None], delta[:, None], b, h, offs_m[:, None], offs_n[None, :],
                          seqlen_k, scale, CAP, DIMS, SCORE_MOD, SCORE_GRAD, MASK_MOD, APPLY_MASK, DOT_FP32,
                          PRECISION)
        dq += dot(cast(ds, k.dtype, BF16_RTNE), k, DOT_FP32, PRECISION)
    return dq


@triton.jit
def flex_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, LISTS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS, CAP, DIMS,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides, list_strides, n_heads, group, seqlen_q,
    seqlen_k, scale,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dQ of one block of queries of one (b, h), over the key tiles its mask row lists (no
    atomics: deterministic); VARLEN as the forward. DELTA = rowsum(dO * O), laid out as LSE."""
    b, h, hk, start_m, q0, seqlen_q, k0, seqlen_k, offs_m, row_ok = _program_rows(
        n_heads, group, BLOCKS, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, BLOCK_M, True, VARLEN)
    if b < 0:  # past the packed sequences' blocks
        return
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    q = load_rows(Q, q_strides, b, h, q0, offs_m, offs_d, row_ok, d_ok)
    do = load_rows(DO, do_strides, b, h, q0, offs_m, offs_dv, row_ok, dv_ok)
    lse_rows = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
    lse = tl.load(LSE + lse_rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + lse_rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rows = (K, V, k_strides, v_strides, b, h, hk, k0, offs_m, seqlen_k, scale)
    if VARLEN:
        dq = _dq_span(dq, q, do, lse, delta, 0, seqlen_k, rows, CAP, DIMS, SCORE_MOD, SCORE_GRAD, MASK_MOD,
                      HAS_MASK, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_FP32, PRECISION, BF16_RTNE)
    else:
        for full in tl.static_range(2):  # the mask row's partial blocks, then its full ones
            idx, step, n = _block_list(LISTS, list_strides, full, b, h, start_m // Q_BLOCK)
            for i in range(0, n):
                first, width = _block_span(idx, i, step, KV_BLOCK, seqlen_k)
                dq = _dq_span(dq, q, do, lse, delta, first, width, rows, CAP, DIMS, SCORE_MOD, SCORE_GRAD,
                              MASK_MOD, full == 0, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_FP32,
                              PRECISION, BF16_RTNE)
    # The score was q.k * scale.
    store_rows(DQ, dq_strides, b, h, q0, dq * scale, offs_m, offs_d, row_ok, d_ok, BF16_RTNE)


@triton.jit
def _dkdv_span(dk, dv, k, v, first, height, rows, CAP, DIMS,
               SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, GRAD_K: tl.constexpr, GRAD_V: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr):
    """dv += P^T dO (GRAD_V) and dk += dS^T Q (GRAD_K) over queries first .. first + height - 1
    of head h; what a launch without one of them does not need compiles away."""
    Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, q0, offs_n, seqlen_q, seqlen_k, scale = rows
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    for sub in range(0, height, BLOCK_M):
        offs_m, row_ok = span(first + sub, BLOCK_M, seqlen_q)
        q = load_rows(Q, q_strides, b, h, q0, offs_m, offs_d, row_ok, d_ok)
        do = load_rows(DO, do_strides, b, h, q0, offs_m, offs_dv, row_ok, dv_ok)
        lse_rows = b * lse_strides[0] + h * lse_strides[1] + (tl.cast(q0, tl.int64) + offs_m) * lse_strides[2]
        lse = tl.load(LSE + lse_rows, mask=row_ok, other=float("-inf"))
        delta = tl.load(DELTA + lse_rows, mask=row_ok, other=0.0)
        # (keys, queries) tiles: the key block is the tall side of all four products.
        p, ds = _bwd_tile(k, q, v, do, lse[None, :], delta[None, :], b, h, offs_m[None, :], offs_n[:, None],
                          seqlen_k, scale, CAP, DIMS, SCORE_MOD, SCORE_GRAD, MASK_MOD, APPLY_MASK, DOT_FP32,
                          PRECISION)
        if GRAD_V:
            dv += dot(cast(p, do.dtype, BF16_RTNE), do, DOT_FP32, PRECISION)
        if GRAD_K:
            dk += dot(cast(ds, q.dtype, BF16_RTNE), q, DOT_FP32, PRECISION)
    return dk, dv


@triton.jit
def flex_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, LISTS, CU_SEQLENS_Q, CU_SEQLENS_K, BLOCKS, CAP, DIMS,
    q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides, dv_strides, list_strides, n_kv_heads,
    group, seqlen_q, seqlen_k, scale,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, GRAD_K: tl.constexpr, GRAD_V: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """dK (GRAD_K) and dV (GRAD_V) of one block of BLOCK_N keys of one kv head (a launch with
    one of them holds half the accumulators: d256 on a GPU, ``_launch.key_grads``), summed over the ``group`` query
    heads that share it, over the query tiles the transposed mask lists for its key block
    (LISTS = (Q_NUM, Q_IDX, FULL_NUM, FULL_IDX): partial, then full; per query head); VARLEN as the forward
    (BLOCKS then walks key blocks). No atomics."""
    b, hk, _, start_n, q0, seqlen_q, k0, seqlen_k, offs_n, col_ok = _program_rows(
        n_kv_heads, 1, BLOCKS, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, BLOCK_N, False, VARLEN)
    if b < 0:  # past the packed sequences' blocks
        return
    offs_d, d_ok, offs_dv, dv_ok = _head_spans(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    k = load_rows(K, k_strides, b, hk, k0, offs_n, offs_d, col_ok, d_ok)
    v = load_rows(V, v_strides, b, hk, k0, offs_n, offs_dv, col_ok, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    col = start_n // KV_BLOCK
    for g in range(0, group):
        h = hk * group + g
        rows = (Q, DO, LSE, DELTA, q_strides, do_strides, lse_strides, b, h, q0, offs_n, seqlen_q, seqlen_k, scale)
        if VARLEN:
            dk, dv = _dkdv_span(dk, dv, k, v, 0, seqlen_q, rows, CAP, DIMS, SCORE_MOD, SCORE_GRAD, MASK_MOD,
                                HAS_MASK, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, GRAD_K, GRAD_V,
                                DOT_FP32, PRECISION, BF16_RTNE)
        else:
            for full in tl.static_range(2):
                idx, step, n = _block_list(LISTS, list_strides, full, b, h, col)
                for i in range(0, n):
                    first, height = _block_span(idx, i, step, Q_BLOCK, seqlen_q)
                    dk, dv = _dkdv_span(dk, dv, k, v, first, height, rows, CAP, DIMS, SCORE_MOD, SCORE_GRAD,
                                        MASK_MOD, full == 0, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                        GRAD_K, GRAD_V, DOT_FP32, PRECISION, BF16_RTNE)
    # The score was q.k * scale.
    if GRAD_K:
        store_rows(DK, dk_strides, b, hk, k0, dk * scale, offs_n, offs_d, col_ok, d_ok, BF16_RTNE)
    if GRAD_V:
        store_rows(DV, dv_strides, b, hk, k0, dv, offs_n, offs_dv, col_ok, dv_ok, BF16_RTNE)

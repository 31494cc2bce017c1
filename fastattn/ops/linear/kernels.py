"""Triton kernels for linear attention: the forward and one backward kernel (dQ, dK or dV).

Math (see ``reference.py``): with features phi (M of them per row),
``out_i = n_i / d_i``, ``n_i = sum_j a_ij v_j``, ``d_i = sum_j a_ij + eps_i``, ``a_ij = phi(q_i).phi(k_j)``
over all keys (non-causal) or keys j <= i (causal, Lq == Lk).

Every kernel runs one (sequence, query head) per program on a (blocks, heads, sequences) grid
and walks the sequence in chunks of BLOCK_C rows while it carries a state in fp32 registers:
- non-causal: a first pass sums the state over the whole sequence (e.g. S = phi(K)^T V,
  z = phi(K)^T 1), a second pass applies it to every chunk;
- causal: one pass; inside a chunk the masked quadratic form, across chunks the running state.
The state is split over programs along one of its two dims (the output's), so each program
keeps (M, BLOCK_DV) or (BLOCK_F, Dv) of it. GQA: query head h reads kv head h // group; the
key/value gradients are written per query head (fp32) and summed over the group by the
launcher.

Sequences: batch b of (B, H, L, .) tensors (L rows each), or with VARLEN packed sequences in
one batch row: sequence s is rows cu[s]:cu[s+1] of q, k and v alike (the launcher passes
(1, H, total, .) views of FlashAttention's (total, H, .) layout), read from the offsets CU on
the device. A program never reads a row outside its sequence, so the state starts empty at
each boundary.

Every tensor comes with its strides as one tuple, (batch, head, row, col) for 4-D tensors
and (batch, head, row) for the per-row fp32 buffers (normaliser, its gradient, eps).

Elementwise feature maps (FEATURE: 0 identity, 1 elu+1, 2 relu) are applied to the loaded
tiles, so phi(Q), phi(K) never go to memory; FAVOR+ features are computed in torch first
(they need a max over the sequence) and enter as FEATURE = 0.

Backward, with dn_i = dout_i / d_i and g_i = -(dout_i . out_i) / d_i (the gradient of d_i):
  dphi(q_i) = S_i dn_i + g_i z_i           (S_i, z_i over the keys query i sees)
  dphi(k_j) = dS_j v_j + dz_j,  dv_j = dS_j^T phi(k_j)
  with dS_j = sum_i phi(q_i) dn_i^T, dz_j = sum_i g_i phi(q_i) over the queries that see key j.
"""
import triton
import triton.language as tl

from fastattn.ops._triton import cast, dot, load_tile, sequence, span, store_tile

FEAT_IDENTITY = tl.constexpr(0)
FEAT_ELU = tl.constexpr(1)
FEAT_RELU = tl.constexpr(2)

# Which gradient linear_bwd_kernel computes.
GRAD_Q = tl.constexpr(0)
GRAD_K = tl.constexpr(1)
GRAD_V = tl.constexpr(2)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """Feature map of an fp32 tile."""
    if FEATURE == FEAT_ELU:
        # elu(x) + 1; exp of min(x, 0) so the unused branch cannot overflow.
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == FEAT_RELU:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """Derivative of the feature map, elementwise."""
    if FEATURE == FEAT_ELU:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == FEAT_RELU:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def _program(CU, group, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(b, h, hk, row0, n_q, n_k) of a program on a (blocks, heads, sequences) grid: its batch
    index, query head, the kv head h // group that GQA head h reads (no copy of K/V), the
    first row of its sequence and the sequence's query and key counts. Packed (VARLEN): batch
    0, rows cu[s]:cu[s+1]; else batch s, rows 0:seqlen_q of q and 0:seqlen_k of k/v.
    int64: they multiply strides."""
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    if VARLEN:
        row0, n_q = sequence(CU, s, seqlen_q, VARLEN)  # clamped into the packed rows
        row0 = row0.to(tl.int64)
        n_q = n_q.to(tl.int64)
        n_k = n_q
        b = s * 0
    else:
        row0 = s * 0
        n_q = seqlen_q
        n_k = seqlen_k
        b = s
    return b, h, h // group, row0, n_q, n_k


@triton.jit
def _rows(X, strides, b, h, row0):
    """Pointer to row row0 of (batch b, head h) of a tensor with (batch, head, row, ...) strides."""
    return X + b * strides[0] + h * strides[1] + row0 * strides[2]


@triton.jit
def _tile(base, strides, rows, cols, row_ok, col_ok):
    """load_tile of a (rows, cols) tile from base (a _rows pointer) with a 4-D tensor's strides."""
    return load_tile(base, rows, cols, strides[2], strides[3], row_ok, col_ok)


@triton.jit
def _features(base, strides, rows, cols, row_ok, col_ok, FEATURE: tl.constexpr):
    """phi of a tile, 0 outside the bounds (phi(0) = 1 for elu+1, so padding must be re-zeroed
    or padded keys would enter the state and padded features the dot products)."""
    x = _tile(base, strides, rows, cols, row_ok, col_ok).to(tl.float32)
    return tl.where(row_ok[:, None] & col_ok[None, :], _phi(x, FEATURE), 0.0)


@triton.jit
def _row_ptrs(X, strides, b, h, row0, offs):
    """Pointers to rows row0 + offs of (batch b, head h) of a (B, H, L) per-row buffer."""
    return X + b * strides[0] + h * strides[1] + (row0 + offs.to(tl.int64)) * strides[2]


@triton.jit
def _key_state(k_base, v_base, k_strides, v_strides, offs_f, offs_dv, f_ok, dv_ok, n_k,
               BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
               FEATURE: tl.constexpr, CAUSAL: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """The state (S, z) = (phi(K)^T V, phi(K)^T 1) of a program's (features, values) block
    before its first query chunk: over every key of the sequence when non-causal; empty when
    causal (it then grows chunk by chunk)."""
    s = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    if not CAUSAL:
        for start in range(0, n_k, BLOCK_C):
            offs_n, n_ok = span(start, BLOCK_C, n_k)
            phik = _features(k_base, k_strides, offs_n, offs_f, n_ok, f_ok, FEATURE)
            v = _tile(v_base, v_strides, offs_n, offs_dv, n_ok, dv_ok).to(tl.float32)
            s += dot(tl.trans(phik), v, False, STATE_PRECISION)
            z += tl.sum(phik, 0)
    return s, z


@triton.jit
def linear_fwd_kernel(
    Q, K, V, O, DEN, EPS, CU, q_strides, k_strides, v_strides, o_strides, den_strides, eps_strides,
    group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr,
):
    """out[:, dv block] (and the normaliser d, from the first dv block) for one (sequence, head).
    BLOCK_F covers all M features; the state is S[:, dv block] (M, BLOCK_DV) and z (M,)."""
    pid_v = tl.program_id(0)
    b, h, hk, row0, n_q, n_k = _program(CU, group, seqlen_q, seqlen_k, VARLEN)

    offs_c = tl.arange(0, BLOCK_C)
    offs_f, f_ok = span(0, BLOCK_F, FEAT_DIM)
    offs_dv, dv_ok = span(pid_v * BLOCK_DV, BLOCK_DV, HEAD_DIM_V)
    q_base = _rows(Q, q_strides, b, h, row0)
    k_base = _rows(K, k_strides, b, hk, row0)
    v_base = _rows(V, v_strides, b, hk, row0)
    o_base = _rows(O, o_strides, b, h, row0)

    # sum phi(k) v^T and sum phi(k) over the keys seen so far
    s, z = _key_state(k_base, v_base, k_strides, v_strides, offs_f, offs_dv, f_ok, dv_ok, n_k,
                      BLOCK_C, BLOCK_F, BLOCK_DV, FEATURE, CAUSAL, STATE_PRECISION)

    for start in range(0, n_q, BLOCK_C):
        offs_m, m_ok = span(start, BLOCK_C, n_q)
        phiq = _features(q_base, q_strides, offs_m, offs_f, m_ok, f_ok, FEATURE)
        num = dot(phiq, s, False, STATE_PRECISION)  # what the earlier chunks (or all keys) give
        den = tl.sum(phiq * z[None, :], 1)
        if CAUSAL:
            # Lq == Lk: the chunk's keys are the same rows as its queries.
            phik = _features(k_base, k_strides, offs_m, offs_f, m_ok, f_ok, FEATURE)
            v_in = _tile(v_base, v_strides, offs_m, offs_dv, m_ok, dv_ok)
            a = dot(cast(phiq, v_in.dtype, BF16_RTNE), tl.trans(cast(phik, v_in.dtype, BF16_RTNE)), DOT_FP32, PRECISION)
            a = tl.where(offs_m[:, None] >= offs_m[None, :], a, 0.0)  # key j <= query i
            if INTRA_FP32:
                # fp16: a (a sum of D products of features) can pass 65504, so it and its
                # product with V stay in fp32.
                num += dot(a, v_in.to(tl.float32), False, STATE_PRECISION)
                den += tl.sum(a, 1)
            else:
                # Rounded to the input dtype once, for the tensor-core dot, and the normaliser
                # sums the same rounded values so that their errors cancel in n / d.
                a = cast(a, v_in.dtype, BF16_RTNE)
                num += dot(a, v_in, DOT_FP32, PRECISION)
                den += tl.sum(a.to(tl.float32), 1)
            # Fold the chunk into the state only now: it must not see itself twice.
            s += dot(tl.trans(phik), v_in.to(tl.float32), False, STATE_PRECISION)
            z += tl.sum(phik, 0)
        if NORMALIZE:
            # eps per query row (FAVOR+ scales it with its stabilisers; a plain eps has stride 0)
            den = den + tl.load(_row_ptrs(EPS, eps_strides, b, h, row0, offs_m), mask=m_ok, other=1.0)
            num = num / den[:, None]
            # one dv block writes d
            tl.store(_row_ptrs(DEN, den_strides, b, h, row0, offs_m), den, mask=m_ok & (offs_c * 0 + pid_v == 0))
        store_tile(o_base, cast(num, O.dtype.element_ty, BF16_RTNE), offs_m, offs_dv, o_strides[2], o_strides[3],
                   m_ok, dv_ok)


@triton.jit
def _query_chunk(q_base, q_strides, do_base, do_strides, DEN, G, den_strides, b, h, row0, offs_m, offs_f,
                 offs_dv, m_ok, f_ok, dv_ok, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr):
    """For a chunk of query rows: phi(q), dout as loaded (input dtype, for the tensor-core
    dots), dn = dout / d (fp32), 1 / d and g = -(dout . out) / d (DEN and G share a layout)."""
    phiq = _features(q_base, q_strides, offs_m, offs_f, m_ok, f_ok, FEATURE)
    do = _tile(do_base, do_strides, offs_m, offs_dv, m_ok, dv_ok)
    rden = tl.full(offs_m.shape, 1.0, tl.float32)
    g = tl.zeros(offs_m.shape, tl.float32)
    if NORMALIZE:
        rden = 1.0 / tl.load(_row_ptrs(DEN, den_strides, b, h, row0, offs_m), mask=m_ok, other=1.0)
        g = tl.load(_row_ptrs(G, den_strides, b, h, row0, offs_m), mask=m_ok, other=0.0)
    return phiq, do, do.to(tl.float32) * rden[:, None], rden, g


@triton.jit
def linear_bwd_kernel(
    Q, K, V, DO, DEN, G, DX, CU, q_strides, k_strides, v_strides, do_strides, den_strides, dx_strides,
    group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr, GRAD: tl.constexpr,
):
    """One gradient (GRAD) of one (sequence, query head), a block of its columns per program:
    - GRAD_Q: dQ[:, f block] (DX in q's dtype). BLOCK_DV covers all of Dv; the state is
      S[f block, :] (BLOCK_F, Dv) and z[f block], walked from the start.
    - GRAD_K: dK[:, f block] from this query head (DX fp32, (B, Hq, Lk, M); the launcher sums
      the group). State dS[f block, :] (BLOCK_F, Dv), dz[f block], walked from the end.
    - GRAD_V: dV[:, dv block] from this query head (DX fp32, (B, Hq, Lk, Dv)). BLOCK_F covers
      all M features; state dS[:, dv block] (M, BLOCK_DV), walked from the end.
    DEN and G (the normaliser and its gradient) share den_strides."""
    pid = tl.program_id(0)
    b, h, hk, row0, n_q, n_k = _program(CU, group, seqlen_q, seqlen_k, VARLEN)
    if GRAD == GRAD_V:
        offs_f, f_ok = span(0, BLOCK_F, FEAT_DIM)
        offs_dv, dv_ok = span(pid * BLOCK_DV, BLOCK_DV, HEAD_DIM_V)
    else:
        offs_f, f_ok = span(pid * BLOCK_F, BLOCK_F, FEAT_DIM)
        offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    q_base = _rows(Q, q_strides, b, h, row0)
    k_base = _rows(K, k_strides, b, hk, row0)
    v_base = _rows(V, v_strides, b, hk, row0)
    do_base = _rows(DO, do_strides, b, h, row0)
    dx_base = _rows(DX, dx_strides, b, h, row0)

    if GRAD == GRAD_Q:
        # sum phi(k) v^T and sum phi(k) over the keys seen so far
        s, z = _key_state(k_base, v_base, k_strides, v_strides, offs_f, offs_dv, f_ok, dv_ok, n_k,
                          BLOCK_C, BLOCK_F, BLOCK_DV, FEATURE, CAUSAL, STATE_PRECISION)
        for start in range(0, n_q, BLOCK_C):
            offs_m, m_ok = span(start, BLOCK_C, n_q)
            _, do, dn, rden, g = _query_chunk(q_base, q_strides, do_base, do_strides, DEN, G, den_strides, b, h,
                                              row0, offs_m, offs_f, offs_dv, m_ok, f_ok, dv_ok, FEATURE, NORMALIZE)
            dphiq = dot(dn, tl.trans(s), False, STATE_PRECISION)  # S dn_i, from the state
            if NORMALIZE:
                dphiq += g[:, None] * z[None, :]  # g_i z: the normaliser's share
            if CAUSAL:
                phik = _features(k_base, k_strides, offs_m, offs_f, m_ok, f_ok, FEATURE)
                v_in = _tile(v_base, v_strides, offs_m, offs_dv, m_ok, dv_ok)
                # d a_ij = dn_i . v_j + g_i for the keys j <= i of this chunk.
                # dout (not dout / d, which can overflow fp16 when d is tiny) meets v in the dot.
                da = dot(do, tl.trans(v_in), DOT_FP32, PRECISION) * rden[:, None] + g[:, None]
                da = tl.where((offs_m[:, None] >= offs_m[None, :]) & m_ok[None, :], da, 0.0)
                # fp32 (tf32 on a GPU): da scales like 1 / d and would overflow fp16 where d is tiny.
                dphiq += dot(da, phik, False, STATE_PRECISION)
                s += dot(tl.trans(phik), v_in.to(tl.float32), False, STATE_PRECISION)
                z += tl.sum(phik, 0)
            x = _tile(q_base, q_strides, offs_m, offs_f, m_ok, f_ok).to(tl.float32)
            dq = dphiq * _dphi(x, FEATURE)  # chain rule through the fused feature map
            store_tile(dx_base, cast(dq, DX.dtype.element_ty, BF16_RTNE), offs_m, offs_f, dx_strides[2],
                       dx_strides[3], m_ok, f_ok)
    else:
        ds = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)  # sum phi(q_i) dn_i^T over the queries that see the key
        dz = tl.zeros([BLOCK_F], tl.float32)  # sum g_i phi(q_i) (dK only)
        if not CAUSAL:
            for start in range(0, n_q, BLOCK_C):
                offs_m, m_ok = span(start, BLOCK_C, n_q)
                phiq, do, dn, rden, g = _query_chunk(q_base, q_strides, do_base, do_strides, DEN, G, den_strides,
                                                     b, h, row0, offs_m, offs_f, offs_dv, m_ok, f_ok, dv_ok,
                                                     FEATURE, NORMALIZE)
                ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)
                if GRAD == GRAD_K:
                    dz += tl.sum(phiq * g[:, None], 0)
        n_chunks = (n_k + BLOCK_C - 1) // BLOCK_C
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK_C  # last chunk first: causal keys see later queries
            offs_n, n_ok = span(start, BLOCK_C, n_k)
            if GRAD == GRAD_K:
                v_in = _tile(v_base, v_strides, offs_n, offs_dv, n_ok, dv_ok)
                dx = dot(v_in.to(tl.float32), tl.trans(ds), False, STATE_PRECISION) + dz[None, :]  # dphi(k)
            else:
                phik = _features(k_base, k_strides, offs_n, offs_f, n_ok, f_ok, FEATURE)
                dx = dot(phik, ds, False, STATE_PRECISION)  # dS_j^T phi(k_j), from the later chunks
            if CAUSAL:
                phiq, do, dn, rden, g = _query_chunk(q_base, q_strides, do_base, do_strides, DEN, G, den_strides,
                                                     b, h, row0, offs_n, offs_f, offs_dv, n_ok, f_ok, dv_ok,
                                                     FEATURE, NORMALIZE)
                if GRAD == GRAD_K:
                    # d a_ij (rows: queries i, columns: keys j of this chunk), kept where j <= i.
                    # dout (not dout / d, which can overflow fp16 when d is tiny) meets v in the dot.
                    da = dot(do, tl.trans(v_in), DOT_FP32, PRECISION) * rden[:, None] + g[:, None]
                    da = tl.where((offs_n[:, None] >= offs_n[None, :]) & n_ok[:, None], da, 0.0)
                    dx += dot(tl.trans(da), phiq, False, STATE_PRECISION)  # fp32: da ~ 1 / d may exceed fp16
                    dz += tl.sum(phiq * g[:, None], 0)
                else:
                    # a exactly as the forward made it (features and product rounded to V's dtype):
                    # the forward divided by a normaliser summed from these rounded values, so any
                    # other a here would be off by their rounding, one unit of fp16/bf16 in dV.
                    a = dot(cast(phiq, V.dtype.element_ty, BF16_RTNE),
                            tl.trans(cast(phik, V.dtype.element_ty, BF16_RTNE)), DOT_FP32, PRECISION)
                    a = tl.where(offs_n[:, None] >= offs_n[None, :], a, 0.0)  # rows: queries, cols: keys
                    if not INTRA_FP32:
                        a = cast(a, V.dtype.element_ty, BF16_RTNE).to(tl.float32)
                    dx += dot(tl.trans(a), dn, False, STATE_PRECISION)
                ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)
            if GRAD == GRAD_K:
                x = _tile(k_base, k_strides, offs_n, offs_f, n_ok, f_ok).to(tl.float32)
                store_tile(dx_base, dx * _dphi(x, FEATURE), offs_n, offs_f, dx_strides[2], dx_strides[3], n_ok, f_ok)
            else:
                store_tile(dx_base, dx, offs_n, offs_dv, dx_strides[2], dx_strides[3], n_ok, dv_ok)

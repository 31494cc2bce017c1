"""Triton kernels for linear attention: forward, dQ, dK and dV.

Math (see ``reference.py``): with features phi (M of them per row),
``out_i = n_i / d_i``, ``n_i = sum_j a_ij v_j``, ``d_i = sum_j a_ij + eps_i``, ``a_ij = phi(q_i).phi(k_j)``
over all keys (non-causal) or keys j <= i (causal, Lq == Lk).

Every kernel runs one (batch, query head) per program and walks the sequence in chunks of
BLOCK_C rows while it carries a state in fp32 registers:
- non-causal: a first pass sums the state over the whole sequence (e.g. S = phi(K)^T V,
  z = phi(K)^T 1), a second pass applies it to every chunk;
- causal: one pass; inside a chunk the masked quadratic form, across chunks the running state.
The state is split over programs along one of its two dims (the output's), so each program
keeps (M, BLOCK_DV) or (BLOCK_F, Dv) of it. GQA: query head h reads kv head h // group; the
key/value gradients are written per query head (fp32) and summed over the group by the
launcher.

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

from fastattn.ops._triton import cast, dot, load_tile, program_heads, span, store_tile

FEAT_IDENTITY = tl.constexpr(0)
FEAT_ELU = tl.constexpr(1)
FEAT_RELU = tl.constexpr(2)


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
def _features(base, offs_r, offs_c, stride_r, stride_c, r_ok, c_ok, FEATURE: tl.constexpr):
    """phi of a tile, 0 outside the bounds (phi(0) = 1 for elu+1, so padding must be re-zeroed
    or padded keys would enter the state and padded features the dot products)."""
    x = load_tile(base, offs_r, offs_c, stride_r, stride_c, r_ok, c_ok).to(tl.float32)
    return tl.where(r_ok[:, None] & c_ok[None, :], _phi(x, FEATURE), 0.0)


@triton.jit
def _key_state(k_base, v_base, offs_f, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, f_ok, dv_ok,
               seqlen_k, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
               FEATURE: tl.constexpr, CAUSAL: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """The state (S, z) = (phi(K)^T V, phi(K)^T 1) of a program's (features, values) block
    before its first query chunk: over every key when non-causal; empty when causal (it
    then grows chunk by chunk)."""
    s = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    if not CAUSAL:
        for start in range(0, seqlen_k, BLOCK_C):
            offs_n, n_ok = span(start, BLOCK_C, seqlen_k)
            phik = _features(k_base, offs_n, offs_f, stride_kn, stride_kd, n_ok, f_ok, FEATURE)
            v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, n_ok, dv_ok).to(tl.float32)
            s += dot(tl.trans(phik), v, False, STATE_PRECISION)
            z += tl.sum(phik, 0)
    return s, z


@triton.jit
def linear_fwd_kernel(
    Q, K, V, O, DEN, EPS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_eb, stride_eh, stride_em,
    n_heads, group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr,
):
    """out[:, dv block] (and the normaliser d, from the first dv block) for one (batch, head).
    BLOCK_F covers all M features; the state is S[:, dv block] (M, BLOCK_DV) and z (M,)."""
    pid_v = tl.program_id(0)
    b, h, bh, hk = program_heads(n_heads, group)

    offs_c = tl.arange(0, BLOCK_C)
    offs_f, f_ok = span(0, BLOCK_F, FEAT_DIM)
    offs_dv, dv_ok = span(pid_v * BLOCK_DV, BLOCK_DV, HEAD_DIM_V)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    # sum phi(k) v^T and sum phi(k) over the keys seen so far
    s, z = _key_state(k_base, v_base, offs_f, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, f_ok, dv_ok,
                      seqlen_k, BLOCK_C, BLOCK_F, BLOCK_DV, FEATURE, CAUSAL, STATE_PRECISION)

    for start in range(0, seqlen_q, BLOCK_C):
        offs_m, m_ok = span(start, BLOCK_C, seqlen_q)
        phiq = _features(q_base, offs_m, offs_f, stride_qm, stride_qd, m_ok, f_ok, FEATURE)
        num = dot(phiq, s, False, STATE_PRECISION)  # what the earlier chunks (or all keys) give
        den = tl.sum(phiq * z[None, :], 1)
        if CAUSAL:
            # Lq == Lk: the chunk's keys are the same rows as its queries.
            phik = _features(k_base, offs_m, offs_f, stride_kn, stride_kd, m_ok, f_ok, FEATURE)
            v_in = load_tile(v_base, offs_m, offs_dv, stride_vn, stride_vd, m_ok, dv_ok)
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
            den = den + tl.load(EPS + b * stride_eb + h * stride_eh + offs_m.to(tl.int64) * stride_em, mask=m_ok, other=1.0)
            num = num / den[:, None]
            tl.store(DEN + bh.to(tl.int64) * seqlen_q + offs_m, den, mask=m_ok & (offs_c * 0 + pid_v == 0))  # one dv block writes d
        store_tile(o_base, cast(num, O.dtype.element_ty, BF16_RTNE), offs_m, offs_dv, stride_om, stride_od, m_ok, dv_ok)


@triton.jit
def _dn_g(DO, DEN, G, do_base, bh, offs_m, offs_dv, stride_dom, stride_dod, m_ok, dv_ok, seqlen_q,
          NORMALIZE: tl.constexpr):
    """For a chunk of query rows: dout as loaded (input dtype, for the tensor-core dots),
    dn = dout / d (fp32), 1 / d and g = -(dout . out) / d."""
    do = load_tile(do_base, offs_m, offs_dv, stride_dom, stride_dod, m_ok, dv_ok)
    rden = tl.full(offs_m.shape, 1.0, tl.float32)
    g = tl.zeros(offs_m.shape, tl.float32)
    if NORMALIZE:
        row = bh.to(tl.int64) * seqlen_q + offs_m
        rden = 1.0 / tl.load(DEN + row, mask=m_ok, other=1.0)
        g = tl.load(G + row, mask=m_ok, other=0.0)
    return do, do.to(tl.float32) * rden[:, None], rden, g


@triton.jit
def _query_chunk(q_base, DO, DEN, G, do_base, bh, offs_m, offs_f, offs_dv, stride_qm, stride_qd,
                 stride_dom, stride_dod, m_ok, f_ok, dv_ok, seqlen_q, FEATURE: tl.constexpr,
                 NORMALIZE: tl.constexpr):
    """phi(q) of a chunk of query rows, and their _dn_g."""
    phiq = _features(q_base, offs_m, offs_f, stride_qm, stride_qd, m_ok, f_ok, FEATURE)
    do, dn, rden, g = _dn_g(DO, DEN, G, do_base, bh, offs_m, offs_dv, stride_dom, stride_dod, m_ok, dv_ok,
                            seqlen_q, NORMALIZE)
    return phiq, do, dn, rden, g


@triton.jit
def linear_bwd_dq_kernel(
    Q, K, V, DO, DEN, G, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr,
):
    """dQ[:, f block] for one (batch, head) (DQ contiguous). BLOCK_DV covers all of Dv; the
    state is S[f block, :] (BLOCK_F, Dv) and z[f block]."""
    pid_f = tl.program_id(0)
    b, h, bh, hk = program_heads(n_heads, group)

    offs_f, f_ok = span(pid_f * BLOCK_F, BLOCK_F, FEAT_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh

    # sum phi(k) v^T and sum phi(k) over the keys seen so far
    s, z = _key_state(k_base, v_base, offs_f, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, f_ok, dv_ok,
                      seqlen_k, BLOCK_C, BLOCK_F, BLOCK_DV, FEATURE, CAUSAL, STATE_PRECISION)

    for start in range(0, seqlen_q, BLOCK_C):
        offs_m, m_ok = span(start, BLOCK_C, seqlen_q)
        do, dn, rden, g = _dn_g(DO, DEN, G, do_base, bh, offs_m, offs_dv, stride_dom, stride_dod, m_ok, dv_ok,
                      seqlen_q, NORMALIZE)
        dphiq = dot(dn, tl.trans(s), False, STATE_PRECISION)  # S dn_i, from the state
        if NORMALIZE:
            dphiq += g[:, None] * z[None, :]  # g_i z: the normaliser's share
        if CAUSAL:
            phik = _features(k_base, offs_m, offs_f, stride_kn, stride_kd, m_ok, f_ok, FEATURE)
            v_in = load_tile(v_base, offs_m, offs_dv, stride_vn, stride_vd, m_ok, dv_ok)
            # d a_ij = dn_i . v_j + g_i for the keys j <= i of this chunk.
            # dout (not dout / d, which can overflow fp16 when d is tiny) meets v in the dot.
            da = dot(do, tl.trans(v_in), DOT_FP32, PRECISION) * rden[:, None] + g[:, None]
            da = tl.where((offs_m[:, None] >= offs_m[None, :]) & m_ok[None, :], da, 0.0)
            # fp32 (tf32 on a GPU): da scales like 1 / d and would overflow fp16 where d is tiny.
            dphiq += dot(da, phik, False, STATE_PRECISION)
            s += dot(tl.trans(phik), v_in.to(tl.float32), False, STATE_PRECISION)
            z += tl.sum(phik, 0)
        x = load_tile(q_base, offs_m, offs_f, stride_qm, stride_qd, m_ok, f_ok).to(tl.float32)
        dq = dphiq * _dphi(x, FEATURE)  # chain rule through the fused feature map
        store_tile(DQ + bh * seqlen_q * FEAT_DIM, cast(dq, DQ.dtype.element_ty, BF16_RTNE),
                   offs_m, offs_f, FEAT_DIM, 1, m_ok, f_ok)


@triton.jit
def linear_bwd_dk_kernel(
    Q, K, V, DO, DEN, G, DK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr,
):
    """dK[:, f block] from one query head (DK is fp32 (B, Hq, Lk, M), contiguous; the launcher
    sums the group). State dS[f block, :] (BLOCK_F, Dv), dz[f block], walked from the end."""
    pid_f = tl.program_id(0)
    b, h, bh, hk = program_heads(n_heads, group)

    offs_f, f_ok = span(pid_f * BLOCK_F, BLOCK_F, FEAT_DIM)
    offs_dv, dv_ok = span(0, BLOCK_DV, HEAD_DIM_V)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh

    ds = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)  # sum phi(q_i) dn_i^T over the queries that see the key
    dz = tl.zeros([BLOCK_F], tl.float32)  # sum g_i phi(q_i)
    if not CAUSAL:
        for start in range(0, seqlen_q, BLOCK_C):
            offs_m, m_ok = span(start, BLOCK_C, seqlen_q)
            phiq, do, dn, rden, g = _query_chunk(q_base, DO, DEN, G, do_base, bh, offs_m, offs_f, offs_dv, stride_qm,
                                                 stride_qd, stride_dom, stride_dod, m_ok, f_ok, dv_ok, seqlen_q,
                                                 FEATURE, NORMALIZE)
            ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)
            dz += tl.sum(phiq * g[:, None], 0)

    n_chunks = (seqlen_k + BLOCK_C - 1) // BLOCK_C
    for i in range(0, n_chunks):
        start = (n_chunks - 1 - i) * BLOCK_C  # last chunk first: causal keys see later queries
        offs_n, n_ok = span(start, BLOCK_C, seqlen_k)
        v_in = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, n_ok, dv_ok)
        dphik = dot(v_in.to(tl.float32), tl.trans(ds), False, STATE_PRECISION) + dz[None, :]
        if CAUSAL:
            phiq, do, dn, rden, g = _query_chunk(q_base, DO, DEN, G, do_base, bh, offs_n, offs_f, offs_dv, stride_qm,
                                                 stride_qd, stride_dom, stride_dod, n_ok, f_ok, dv_ok, seqlen_q,
                                                 FEATURE, NORMALIZE)
            # d a_ij (rows: queries i, columns: keys j of this chunk), kept where j <= i.
            # dout (not dout / d, which can overflow fp16 when d is tiny) meets v in the dot.
            da = dot(do, tl.trans(v_in), DOT_FP32, PRECISION) * rden[:, None] + g[:, None]
            da = tl.where((offs_n[:, None] >= offs_n[None, :]) & n_ok[:, None], da, 0.0)
            dphik += dot(tl.trans(da), phiq, False, STATE_PRECISION)  # fp32: da ~ 1 / d may exceed fp16
            ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)
            dz += tl.sum(phiq * g[:, None], 0)
        x = load_tile(k_base, offs_n, offs_f, stride_kn, stride_kd, n_ok, f_ok).to(tl.float32)
        dk = dphik * _dphi(x, FEATURE)
        store_tile(DK + bh * seqlen_k * FEAT_DIM, dk, offs_n, offs_f, FEAT_DIM, 1, n_ok, f_ok)


@triton.jit
def linear_bwd_dv_kernel(
    Q, K, V, DO, DEN, G, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, group, seqlen_q, seqlen_k,
    FEAT_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BF16_RTNE: tl.constexpr, STATE_PRECISION: tl.constexpr,
    INTRA_FP32: tl.constexpr,
):
    """dV[:, dv block] from one query head (DV is fp32 (B, Hq, Lk, Dv), contiguous). BLOCK_F
    covers all M features; state dS[:, dv block] (M, BLOCK_DV), walked from the end."""
    pid_v = tl.program_id(0)
    b, h, bh, hk = program_heads(n_heads, group)

    offs_f, f_ok = span(0, BLOCK_F, FEAT_DIM)
    offs_dv, dv_ok = span(pid_v * BLOCK_DV, BLOCK_DV, HEAD_DIM_V)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    do_base = DO + b * stride_dob + h * stride_doh

    ds = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    if not CAUSAL:
        for start in range(0, seqlen_q, BLOCK_C):
            offs_m, m_ok = span(start, BLOCK_C, seqlen_q)
            phiq, do, dn, rden, g = _query_chunk(q_base, DO, DEN, G, do_base, bh, offs_m, offs_f, offs_dv, stride_qm,
                                                 stride_qd, stride_dom, stride_dod, m_ok, f_ok, dv_ok, seqlen_q,
                                                 FEATURE, NORMALIZE)
            ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)

    n_chunks = (seqlen_k + BLOCK_C - 1) // BLOCK_C
    for i in range(0, n_chunks):
        start = (n_chunks - 1 - i) * BLOCK_C
        offs_n, n_ok = span(start, BLOCK_C, seqlen_k)
        phik = _features(k_base, offs_n, offs_f, stride_kn, stride_kd, n_ok, f_ok, FEATURE)
        dv = dot(phik, ds, False, STATE_PRECISION)  # dS_j^T phi(k_j), from the later chunks
        if CAUSAL:
            phiq, do, dn, rden, g = _query_chunk(q_base, DO, DEN, G, do_base, bh, offs_n, offs_f, offs_dv, stride_qm,
                                                 stride_qd, stride_dom, stride_dod, n_ok, f_ok, dv_ok, seqlen_q,
                                                 FEATURE, NORMALIZE)
            # a exactly as the forward made it (features and product rounded to V's dtype): the
            # forward divided by a normaliser summed from these rounded values, so any other
            # a here would be off by their rounding, one unit of fp16/bf16 in dV.
            a = dot(cast(phiq, V.dtype.element_ty, BF16_RTNE), tl.trans(cast(phik, V.dtype.element_ty, BF16_RTNE)),
                     DOT_FP32, PRECISION)
            a = tl.where(offs_n[:, None] >= offs_n[None, :], a, 0.0)  # rows: queries, cols: keys
            if not INTRA_FP32:
                a = cast(a, V.dtype.element_ty, BF16_RTNE).to(tl.float32)
            dv += dot(tl.trans(a), dn, False, STATE_PRECISION)
            ds += dot(tl.trans(phiq), dn, False, STATE_PRECISION)
        store_tile(DV + bh * seqlen_k * HEAD_DIM_V, dv, offs_n, offs_dv, HEAD_DIM_V, 1, n_ok, dv_ok)

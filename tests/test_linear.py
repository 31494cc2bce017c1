"""Linear attention: kernels vs the float64 quadratic oracle (docs/design.md rule), forward and
backward, causal and not; chunked = recurrent = quadratic; FAVOR+ as an estimator of softmax
attention; Linformer.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py).
Kernel calls go through ``use_backend("triton")`` so a silent fallback cannot pass a test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.ops.linear import reference as R  # noqa: E402
from helpers import (DTYPE_IDS, DTYPES, as64, assert_close_rule, check_op, cu_seqlens, max_err,  # noqa: E402
                     pairwise, qkv, randn, same_dtype_copy)


def features_fn(kind, projection=None):
    """The reference's (phi_q, phi_k, eps) for a public call, and the public call's arguments."""
    if kind == "performer":
        def phis(q, k):
            w = projection.to(q.dtype)
            sq = R.favor_stabiliser(q, w, is_query=True)
            sk = R.favor_stabiliser(k, w, is_query=False)
            return (R.favor_features(q, w, is_query=True, stabiliser=sq),
                    R.favor_features(k, w, is_query=False, stabiliser=sk), R.favor_eps(R.DEFAULT_EPS, sq, sk))
        return phis, dict(projection=projection)
    name, _, _ = kind.partition("-")
    return (lambda q, k: (R.feature_map(q, name), R.feature_map(k, name), R.DEFAULT_EPS)), dict(feature_map=name)


def run_public(kind, q, k, v, causal, kw):
    if kind == "performer":
        return fastattn.performer_attention(q, k, v, kw["projection"].to(q.dtype), causal=causal)
    return fastattn.linear_attention(q, k, v, causal=causal, normalize=kind != "identity-unnormalized",
                                     feature_map=kw["feature_map"])


def check_against_reference(kind, q, k, v, causal, projection=None):
    """check_op for the public call of ``kind``: output and dq/dk/dv vs the float64
    quadratic oracle. Returns the output."""
    phis, kw = features_fn(kind, projection)
    normalize = kind != "identity-unnormalized"

    def reference(q, k, v):
        fq, fk, eps = phis(q, k)
        return R.linear_attention_quadratic(fq, fk, v, causal=causal, normalize=normalize, eps=eps)

    return check_op(lambda q, k, v: run_public(kind, q, k, v, causal, kw), reference, dict(q=q, k=k, v=v))


# (B, Hq, Hkv, L, D, Dv): seq 1 and lengths that leave partial chunks, head dims that are not
# powers of two, Dv != D, GQA 2:1 and MQA.
SHAPES = [
    (1, 1, 1, 1, 16, 16),
    (2, 2, 2, 17, 40, 24),
    (1, 4, 2, 63, 64, 64),
    (1, 3, 1, 97, 32, 80),
    (1, 2, 2, 70, 128, 40),
]


def shape_id(s):
    return "b{}-h{}:{}-l{}-d{}-dv{}".format(*s)


def make_qkv(shape, dtype, device, lk_extra=0):
    b, hq, hkv, l, d, dv = shape
    return qkv(dtype, device, b=b, hq=hq, hkv=hkv, lq=l, lk=l + lk_extra, d=d, dv=dv, transposed=True)


def causal_id(causal):
    return "causal" if causal else "full"


# Every pair of shape, dtype and causal.
ELU_CASES = pairwise(SHAPES, DTYPES, [False, True])


@pytest.mark.parametrize("shape,dtype,causal", ELU_CASES, ids=[
    f"{shape_id(s)}-{DTYPE_IDS[DTYPES.index(dt)]}-{causal_id(c)}" for s, dt, c in ELU_CASES])
def test_elu_kernels_match_reference(shape, dtype, causal, device):
    # Non-causal also gets Lk != Lq.
    q, k, v = make_qkv(shape, dtype, device, lk_extra=0 if causal else 11)
    check_against_reference("elu", q, k, v, causal)


# Every pair of feature map, dtype and causal.
MAP_CASES = pairwise(["relu", "identity-unnormalized", "performer"], DTYPES, [False, True])


@pytest.mark.parametrize("kind,dtype,causal", MAP_CASES, ids=[
    f"{kind}-{DTYPE_IDS[DTYPES.index(dt)]}-{causal_id(c)}" for kind, dt, c in MAP_CASES])
def test_feature_maps_match_reference(kind, dtype, causal, device):
    shape = (1, 4, 2, 45, 48, 32)
    q, k, v = make_qkv(shape, dtype, device, lk_extra=0 if causal else 20)
    projection = None
    if kind == "performer":
        projection = fastattn.performer_projection(96, 48, device=device)
    check_against_reference(kind, q, k, v, causal, projection)


def test_large_sequence_state_stays_accurate_in_fp16(device):
    # Many chunks: the running state must be carried in fp32.
    q, k, v = make_qkv((1, 1, 1, 203, 16, 16), torch.float16, device)
    check_against_reference("elu", q, k, v, True)


# ------------------------------------------------------------- the forms agree (float64)

@pytest.mark.parametrize("gqa", [1, 3], ids=["mha", "gqa3"])
def test_chunked_recurrent_and_quadratic_forms_agree(gqa, device):
    b, hkv, l, m, dv = 2, 2, 75, 24, 20
    phi_q = torch.rand(b, hkv * gqa, l, m, device=device, dtype=torch.float64)
    phi_k = torch.rand(b, hkv, l, m, device=device, dtype=torch.float64)
    v = torch.randn(b, hkv, l, dv, device=device, dtype=torch.float64)
    for causal in (False, True):
        quad = R.linear_attention_quadratic(phi_q, phi_k, v, causal=causal)
        for chunk in (1, 16, 64, 128):
            chunked = R.linear_attention_chunked(phi_q, phi_k, v, causal=causal, chunk_size=chunk)
            assert max_err(chunked, quad) < 1e-12
    cumsum = R.linear_attention_cumsum(phi_q, phi_k, v)
    assert max_err(cumsum, quad) < 1e-12
    state, steps = None, []
    for t in range(l):
        out_t, state = R.linear_attention_step(phi_q[:, :, t:t + 1], phi_k[:, :, t:t + 1],
                                               v[:, :, t:t + 1], state)
        steps.append(out_t)
    assert max_err(torch.cat(steps, 2), quad) < 1e-12
    # The state is exactly sum phi(k) v^T and sum phi(k).
    s, z = state
    assert max_err(s, phi_k.transpose(-1, -2) @ v) < 1e-12 and max_err(z, phi_k.sum(2)) < 1e-12


def test_step_matches_kernel_prefill_then_decode(device):
    """Prefill L tokens with the causal kernel, then decode 5 tokens with the recurrent step
    from a state built from the prefix: together they equal one causal call on L + 5 tokens."""
    b, h, l, d, n_new = 1, 2, 40, 32, 5
    q, k, v = (torch.randn(b, h, l + n_new, d, device=device) for _ in range(3))
    with fastattn.use_backend("triton"):
        full = fastattn.linear_attention(q, k, v, causal=True)
    fq, fk = R.elu_features(q), R.elu_features(k)
    state = (fk[:, :, :l].transpose(-1, -2) @ v[:, :, :l], fk[:, :, :l].sum(2))
    for t in range(l, l + n_new):
        out_t, state = R.linear_attention_step(fq[:, :, t:t + 1], fk[:, :, t:t + 1], v[:, :, t:t + 1], state)
        assert max_err(out_t, full[:, :, t:t + 1]) < 1e-5


def test_torch_fallback_is_the_chunked_reference(device):
    q, k, v = make_qkv((1, 2, 2, 50, 32, 32), torch.float32, device)
    with fastattn.use_backend("torch"):
        got = fastattn.linear_attention(q, k, v, causal=True)
    want = R.linear_attention_chunked(R.elu_features(q), R.elu_features(k), v, causal=True)
    assert torch.equal(got, want)


# ------------------------------------------------------------- FAVOR+ as an estimator

def _softmax_setup(seed, device, l=64, d=16, h=4, qk_scale=0.4):
    """Inputs for the FAVOR+ statistics. The estimator's relative variance grows like
    exp(|q'|^2 + |k'|^2) (q' = q / D^(1/4)), so q, k are scaled to |q'| ~ 0.8, where 16 to 256
    features span the 1/sqrt(M) regime."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, h, l, d, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    q, k = q * qk_scale, k * qk_scale
    exact = F.scaled_dot_product_attention(q, k, v)
    return q, k, v, exact


def _performer_error(q, k, v, exact, m, orthogonal, seed, causal=False):
    w = fastattn.performer_projection(m, q.shape[-1], orthogonal=orthogonal,
                                      generator=torch.Generator().manual_seed(seed),
                                      device=q.device, dtype=torch.float64)
    with fastattn.use_backend("torch"):
        approx = fastattn.performer_attention(q, k, v, w, causal=causal)
    return (approx - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_favor_error_falls_with_more_features(orthogonal, device):
    q, k, v, exact = _softmax_setup(0, device)
    errs = {m: sum(_performer_error(q, k, v, exact, m, orthogonal, s) for s in range(8)) / 8
            for m in (16, 64, 256)}
    # Monte Carlo error ~ 1/sqrt(M): each x4 in features should roughly halve it.
    assert errs[64] < 0.75 * errs[16] and errs[256] < 0.75 * errs[64], errs
    assert errs[256] < 0.5 * errs[16], errs
    # With 256 features it beats the trivial estimate (uniform attention, the mean of v).
    uniform = (v.mean(2, keepdim=True) - exact).pow(2).mean().sqrt().item()
    assert errs[256] < uniform, (errs, uniform)


@pytest.mark.parametrize("seed", [0, 1])
def test_favor_orthogonal_features_beat_iid_on_average(seed, device):
    q, k, v, exact = _softmax_setup(seed, device)
    for m in (16, 64):
        ortho = sum(_performer_error(q, k, v, exact, m, True, s) for s in range(24)) / 24
        iid = sum(_performer_error(q, k, v, exact, m, False, 100 + s) for s in range(24)) / 24
        assert ortho < iid, (m, ortho, iid)


def test_favor_kernel_estimate_is_unbiased(device):
    """E_W[phi(q).phi(k)] = exp(q.k / sqrt(D)) (no stabiliser): the mean over many i.i.d.
    features is within 4 standard errors of the exact kernel for every pair."""
    g = torch.Generator().manual_seed(3)
    d, m = 8, 20000
    q = torch.randn(6, d, generator=g, dtype=torch.float64) * 0.6
    k = torch.randn(6, d, generator=g, dtype=torch.float64) * 0.6
    w = fastattn.performer_projection(m, d, orthogonal=False, generator=g, dtype=torch.float64)
    fq = R.favor_features(q, w, is_query=True, stabiliser=0.0) * math.sqrt(m)  # one sample per feature
    fk = R.favor_features(k, w, is_query=False, stabiliser=0.0) * math.sqrt(m)
    samples = fq[:, None, :] * fk[None, :, :]  # (6, 6, m)
    exact = torch.exp(q @ k.t() / math.sqrt(d))
    stderr = samples.std(-1) / math.sqrt(m)
    assert ((samples.mean(-1) - exact).abs() < 4 * stderr).all()


def test_projection_redraws_and_is_orthogonal_in_blocks():
    a = fastattn.performer_projection(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = fastattn.performer_projection(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = fastattn.performer_projection(40, 16, dtype=torch.float64)
    assert a.shape == (40, 16) and torch.equal(a, b) and not torch.equal(a, c)
    block = a[:16] / a[:16].norm(dim=1, keepdim=True)
    assert max_err(block @ block.t(), torch.eye(16, dtype=torch.float64)) < 1e-12


# fp16 is left out on purpose: its features underflow (below ~6e-8) once a key's logits fall ~17
# below the sequence's largest, so there a much larger future key can still zero past features.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_performer_causal_output_ignores_future_keys(dtype, device):
    """Causal FAVOR+: the key stabiliser is a max over the whole sequence, so large keys at the
    end raise it for every key. The outputs of the earlier tokens must not move: they equal
    performer attention over the prefix alone (the stabilisers cancel, eps included)."""
    q, k, v = (randn((1, 2, 40, 16), dtype, device) for _ in range(3))
    k[:, :, 30:] *= 6  # the stabiliser grows by ~30: past features shrink by ~e^-30
    w = fastattn.performer_projection(64, 16, generator=torch.Generator().manual_seed(1), device=device)
    with fastattn.use_backend("triton"):
        out = fastattn.performer_attention(q, k, v, w.to(dtype), causal=True)

    def prefix_only(convert):
        with fastattn.use_backend("torch"):
            return fastattn.performer_attention(*(convert(t)[:, :, :30] for t in (q, k, v)),
                                                w.to(convert(q).dtype), causal=True)

    assert_close_rule("past out", out[:, :, :30], prefix_only(as64), prefix_only(same_dtype_copy))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_kernel_matches_torch_backend(causal, device):
    q, k, v, _ = _softmax_setup(2, device, l=48, d=32, h=2, qk_scale=1.0)
    q, k, v = q.float(), k.float(), v.float()
    w = fastattn.performer_projection(256, 32, generator=torch.Generator().manual_seed(0), device=device)
    with fastattn.use_backend("triton"):
        got = fastattn.performer_attention(q, k, v, w, causal=causal)
    with fastattn.use_backend("torch"):
        want = fastattn.performer_attention(q, k, v, w, causal=causal)
    assert torch.isfinite(got).all() and max_err(got, want) < 1e-5


# ------------------------------------------------------------- Linformer

@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_linformer_matches_projected_softmax_attention(per_head, device):
    b, hq, hkv, lq, lk, d, p = 2, 4, 2, 30, 50, 32, 12
    q = torch.randn(b, hq, lq, d, device=device, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, hkv, lk, d, device=device, dtype=torch.float64) for _ in range(2))
    shape = (hkv, p, lk) if per_head else (p, lk)
    e = (torch.randn(shape, device=device, dtype=torch.float64) / math.sqrt(lk)).requires_grad_()
    f = torch.randn(shape, device=device, dtype=torch.float64) / math.sqrt(lk)
    with fastattn.use_backend("torch"):
        got = fastattn.linformer_attention(q, k, v, e, f)
    want = F.scaled_dot_product_attention(q, e @ k, f @ v, enable_gqa=True)
    assert got.shape == (b, hq, lq, d) and max_err(got, want) < 1e-12
    ge, = torch.autograd.grad(got.sum(), [e])  # the projections train
    we, = torch.autograd.grad(want.sum(), [e])
    assert max_err(ge, we) < 1e-10


def test_linformer_with_identity_projection_is_exact_attention(device):
    q, k, v = (torch.randn(1, 2, 40, 16, device=device, dtype=torch.float64) for _ in range(3))
    eye = torch.eye(40, device=device, dtype=torch.float64)
    with fastattn.use_backend("torch"):
        got = fastattn.linformer_attention(q, k, v, eye, eye)
    assert max_err(got, F.scaled_dot_product_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linformer_through_flash_kernels(dtype, device):
    b, hq, hkv, lq, lk, d, p = 1, 4, 2, 33, 70, 64, 16
    q = randn((b, hq, lq, d), dtype, device, requires_grad=True)
    k, v = (randn((b, hkv, lk, d), dtype, device) for _ in range(2))
    e, f = (randn((p, lk), dtype, device, scale=lk ** -0.5) for _ in range(2))
    check_op(lambda q, k, v, e, f: fastattn.linformer_attention(q, k, v, e, f, scale=0.1),
             lambda q, k, v, e, f: F.scaled_dot_product_attention(q, e @ k, f @ v, scale=0.1, enable_gqa=True),
             dict(q=q, k=k, v=v, e=e, f=f))


def test_linformer_causal_raises_with_the_reason(device):
    q = torch.randn(1, 2, 16, 16, device=device)
    e = torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="non-causal by design"):
        fastattn.linformer_attention(q, q, q, e, e, causal=True)


@pytest.mark.parametrize("bad", ["wrong-length", "wrong-heads", "mismatched-rows", "dtype"])
def test_linformer_bad_projections_raise(bad, device):
    q, k, v = (torch.randn(1, 2, 16, 8, device=device) for _ in range(3))
    e = torch.randn(4, 16, device=device)
    f = {"wrong-length": torch.randn(4, 15, device=device),
         "wrong-heads": torch.randn(3, 4, 16, device=device),
         "mismatched-rows": torch.randn(5, 16, device=device),
         "dtype": torch.randn(4, 16, device=device, dtype=torch.float64)}[bad]
    with pytest.raises(ValueError, match="f_proj"):
        fastattn.linformer_attention(q, k, v, e, f)


# ------------------------------------------------------------- packed sequences (cu_seqlens)

# Awkward length mixes: one row, partial chunks, an empty sequence in the middle and at the end.
VARLEN_MIXES = {"1-17-0-63-113": [1, 17, 0, 63, 113], "40-0": [40, 0]}


def packed_qkv(lengths, dtype, device, hq=4, hkv=2, d=32, dv=24):
    """Packed (total, H, .) q, k, v (k a non-contiguous view of an (H, total, D) buffer) and
    their offsets."""
    total = sum(lengths)
    q = torch.randn(total, hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(hkv, total, d, device=device).to(dtype).transpose(0, 1).requires_grad_()
    v = torch.randn(total, hkv, dv, device=device).to(dtype).requires_grad_()
    return q, k, v, cu_seqlens(lengths, device)


# (feature map, mix, dtype): elu+1 on every mix and dtype, the other maps once in fp32
VARLEN_CASES = [("elu", mix, dtype) for mix in VARLEN_MIXES for dtype in DTYPES]
VARLEN_CASES += [(kind, "1-17-0-63-113", torch.float32) for kind in ("relu", "identity-unnormalized")]


@pytest.mark.parametrize("kind,mix,dtype", VARLEN_CASES,
                         ids=[f"{kind}-{mix}-{DTYPE_IDS[DTYPES.index(dt)]}" for kind, mix, dt in VARLEN_CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_kernels_match_the_per_sequence_oracle(causal, kind, mix, dtype, device):
    """Packed sequences through the kernels vs the per-sequence float64 oracle (error rule),
    forward and gradients."""
    q, k, v, cu = packed_qkv(VARLEN_MIXES[mix], dtype, device)
    name, normalize = kind.partition("-")[0], kind != "identity-unnormalized"
    out = check_op(lambda q, k, v: fastattn.linear_attention_varlen(q, k, v, cu, causal=causal, feature_map=name,
                                                                   normalize=normalize),
                   lambda q, k, v: R.linear_attention_varlen(R.feature_map(q, name), R.feature_map(k, name), v, cu,
                                                             causal=causal, normalize=normalize),
                   dict(q=q, k=k, v=v))
    assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and out.is_contiguous()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_changing_one_document_never_changes_another(causal, device):
    """Bit for bit: the outputs and gradients of sequences 0 and 2 do not move when sequence
    1's tokens change, and each sequence gives what linear_attention gives on it alone."""
    lengths = [17, 30, 9]
    q, k, v, cu = packed_qkv(lengths, torch.float32, device)
    do = torch.randn(q.shape[0], q.shape[1], v.shape[-1], device=device)

    def run(q, k, v):
        with fastattn.use_backend("triton"):
            out = fastattn.linear_attention_varlen(q, k, v, cu, causal=causal)
        return out, torch.autograd.grad(out, (q, k, v), do)

    out1, g1 = run(q, k, v)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[17:47] = torch.randn_like(t[17:47]) * 3
    out2, g2 = run(*(t.requires_grad_() for t in (q2, k2, v2)))
    others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    others[17:47] = False
    assert not torch.equal(out1[~others], out2[~others])
    assert torch.equal(out1[others], out2[others])
    for a, b in zip(g1, g2):
        assert torch.equal(a[others], b[others])
    # sequence 2 on its own: (L, H, .) -> (1, H, L, .)
    alone = [t[47:].detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v)]
    with fastattn.use_backend("triton"):
        want = fastattn.linear_attention(*alone, causal=causal)
    assert torch.equal(out1[47:], want[0].transpose(0, 1))
    for g, ga in zip(g1, torch.autograd.grad(want, alone, do[47:].transpose(0, 1)[None])):
        assert torch.equal(g[47:], ga[0].transpose(0, 1))


def test_varlen_torch_backend_is_the_per_sequence_chunked_fallback(device):
    q, k, v, cu = packed_qkv([5, 0, 70], torch.float32, device)
    with fastattn.use_backend("torch"):
        got = fastattn.linear_attention_varlen(q, k, v, cu, causal=True)
    want = R.linear_attention_varlen(*(R.feature_map(t, "elu") for t in (q, k)), v, cu, causal=True)
    assert_close_rule("out", got, as64(want), want)
    for s, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):  # the chunked form, one sequence at a time
        seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        chunked = R.linear_attention_chunked(R.feature_map(seq[0], "elu"), R.feature_map(seq[1], "elu"), seq[2],
                                             causal=True)
        assert torch.equal(got[a:b], chunked[0].transpose(0, 1)), f"sequence {s}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_with_no_tokens_gives_empty_output_and_gradients(backend, device):
    q, k, v, cu = packed_qkv([0, 0], torch.float32, device)
    with fastattn.use_backend(backend):
        out = fastattn.linear_attention_varlen(q, k, v, cu, causal=True)
    assert out.shape == (0, q.shape[1], v.shape[-1])
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


def test_varlen_bad_inputs_raise_value_errors(device):
    q, k, v, cu = packed_qkv([3, 5], torch.float32, device)
    with pytest.raises(ValueError, match="cu_seqlens_q must be an int32"):
        fastattn.linear_attention_varlen(q, k, v, cu.long())
    with pytest.raises(ValueError, match="end at the packed total 8"):
        fastattn.linear_attention_varlen(q, k, v, cu_seqlens([3, 4], device))
    with pytest.raises(ValueError, match="3-D"):
        fastattn.linear_attention_varlen(q[None], k, v, cu)
    with pytest.raises(ValueError, match=r"feature_map\(q\) must keep"):
        fastattn.linear_attention_varlen(q, k, v, cu, feature_map=lambda x: x[:4])
    with pytest.raises(ValueError, match="feature_map"):
        fastattn.linear_attention_varlen(q, k, v, cu, feature_map="softmax")


def test_varlen_triton_backend_refuses_more_sequences_than_the_grid_takes(device):
    n = 65536
    q = torch.randn(n, 1, 16, device=device)
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)  # n sequences of one token
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="65536 sequences exceed 65535"):
        fastattn.linear_attention_varlen(q, q, q, cu)
    with fastattn.use_backend("torch"):  # the per-sequence fallback takes them (just slowly)
        small = fastattn.linear_attention_varlen(q[:3], q[:3], q[:3], cu[:4])
    assert torch.allclose(small, q[:3])  # one key each: out = v * a / (a + eps)


# ------------------------------------------------------------- validation and dispatch

def test_bad_inputs_raise_value_errors(device):
    q, k, v = (torch.randn(1, 2, 16, 8, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="Lq == Lk"):
        fastattn.linear_attention(q, k[:, :, :10], v[:, :, :10], causal=True)
    with pytest.raises(ValueError, match="feature_map"):
        fastattn.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        fastattn.linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="projection"):
        fastattn.performer_attention(q, k, v, torch.randn(16, 7, device=device))
    with pytest.raises(ValueError, match="kernel"):
        fastattn.performer_attention(q, k, v, torch.randn(16, 8, device=device), kernel="cos")
    with pytest.raises(ValueError, match="multiple"):
        fastattn.linear_attention(torch.randn(1, 3, 16, 8, device=device), k, v)
    with pytest.raises(ValueError, match="num_features"):
        fastattn.performer_projection(0, 8)


def test_triton_backend_refuses_too_many_features(device):
    q, k, v = (torch.randn(1, 1, 16, 8, device=device) for _ in range(3))
    w = fastattn.performer_projection(300, 8, device=device)
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="feature dim 300"):
        fastattn.performer_attention(q, k, v, w)
    with fastattn.use_backend("auto"):  # falls back to the reference
        assert fastattn.performer_attention(q, k, v, w).shape == v.shape


def test_callable_feature_map_and_generalized_relu(device):
    q, k, v = make_qkv((1, 2, 2, 30, 16, 16), torch.float32, device)
    w = fastattn.performer_projection(64, 16, device=device)
    with fastattn.use_backend("triton"):
        got = fastattn.linear_attention(q, k, v, causal=True, feature_map=lambda x: R.relu_features(x, w) + 1e-3)
        relu_kernel = fastattn.performer_attention(q, k, v, w, kernel="relu")
    fq, fk = R.relu_features(q, w) + 1e-3, R.relu_features(k, w) + 1e-3
    assert max_err(got, R.linear_attention_quadratic(fq, fk, v, causal=True)) < 1e-5
    want = R.linear_attention_quadratic(R.relu_features(q, w), R.relu_features(k, w), v)
    assert max_err(relu_kernel, want) < 1e-5


# ------------------------------------------------------------- torch.library / torch.compile

@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_opcheck_forward_and_backward(packed, device):
    from fastattn.ops.linear import op

    q = randn((1, 2, 20, 16), torch.float16, device, requires_grad=True)  # GQA 2:1
    k, v = (randn((1, 1, 20, 16), torch.float16, device, requires_grad=True) for _ in range(2))
    eps = torch.full((1, 2, 20), 1e-6, device=device)  # one per query row (FAVOR+ scales it)
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=device) if packed else None
    fwd_args = (q, k, v, "elu", True, True, eps, cu)
    torch.library.opcheck(op.linear_fwd, fwd_args)
    with torch.no_grad():
        out, den = op.linear_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, den, "elu", True, True, cu)
    torch.library.opcheck(op.linear_bwd, bwd_args)


def test_torch_compile_fullgraph(device):
    def block(x, wq, wk, wv, projection):
        b, l, _ = x.shape
        q = (x @ wq).view(b, l, 4, 16).transpose(1, 2)
        k = (x @ wk).view(b, l, 2, 16).transpose(1, 2)
        v = (x @ wv).view(b, l, 2, 16).transpose(1, 2)
        o = fastattn.linear_attention(q, k, v, causal=True) + fastattn.performer_attention(q, k, v, projection)
        return o.transpose(1, 2).reshape(b, l, 64)

    x = randn((2, 24, 64), torch.float32, device, requires_grad=True)
    wq, wk, wv = (randn((64, n), torch.float32, device, requires_grad=True, scale=0.1) for n in (64, 32, 32))
    w = fastattn.performer_projection(32, 16, device=device)
    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(x, wq, wk, wv, w)
        want = block(x, wq, wk, wv, w)
        assert max_err(got, want) < 1e-6
        got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_varlen_torch_compile_fullgraph(device):
    """Packed sequences compile into one graph: nothing reads the offsets on the host."""
    q, k, v, cu = packed_qkv([9, 0, 20], torch.float32, device)
    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        compiled = torch.compile(lambda q, k, v, cu: fastattn.linear_attention_varlen(q, k, v, cu, causal=True),
                                 fullgraph=True, backend="aot_eager")
        got = compiled(q, k, v, cu)
        want = fastattn.linear_attention_varlen(q, k, v, cu, causal=True)
        assert torch.equal(got, want)
        got.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

"""Flash kernels against the float64 reference, forward and backward, by the docs/design.md rule.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py).
Every call goes through ``use_backend("triton")`` so a silent fallback cannot pass a test.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.ops.flash.reference import attention_reference  # noqa: E402
from helpers import (  # noqa: E402
    DTYPE_IDS, DTYPES, as64, assert_close_rule, check_op, pairwise, qkv, randn, same_dtype_copy,
)


def check_against_reference(q, k, v, *, grad=True, **kw):
    """check_op for flash_attention: output and lse vs the float64 oracle, and the gradients
    of q, k, v and of every keyword tensor with requires_grad. Returns the output."""
    out, _ = check_op(lambda **a: fastattn.flash_attention(**a, return_lse=True),
                      lambda **a: attention_reference(**a, return_lse=True),
                      dict(q=q, k=k, v=v, **kw), names=("out", "lse"), grad=grad)
    return out


# (B, Hq, Hkv, Lq, Lk, D): the awkward shapes of docs/design.md. Lq != Lk both ways, GQA
# ratios 1/2/3/8 and MQA, head dims that are not powers of two.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 17, 17, 40),
    (1, 3, 1, 63, 97, 64),      # MQA, Lq < Lk
    (1, 8, 1, 1, 113, 32),      # decode-like: one query
    (1, 6, 2, 113, 63, 80),     # GQA 3:1, Lq > Lk
    (1, 8, 1, 33, 47, 96),      # GQA 8:1 (= MQA with 8 heads)
    (1, 2, 1, 65, 203, 128),
    (1, 2, 2, 47, 31, 160),
    (1, 1, 1, 40, 33, 256),
]


def shape_id(s):
    return "b{}-h{}:{}-q{}-k{}-d{}".format(*s)


# Every pair of shape, dtype and causal (not every triple: the dtype only changes casts).
SHAPE_CASES = pairwise(SHAPES, DTYPES, [False, True])


@pytest.mark.parametrize("shape,dtype,causal", SHAPE_CASES, ids=[
    f"{shape_id(s)}-{DTYPE_IDS[DTYPES.index(dt)]}-{'causal' if c else 'full'}" for s, dt, c in SHAPE_CASES])
def test_shapes(shape, dtype, causal, device):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(dtype, device, b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, transposed=True)
    check_against_reference(q, k, v, causal=causal)


def _features(b, h, lq, lk, dtype, device):
    """name -> kwargs for flash_attention, built fresh for each test."""
    def bias_float(grad):
        return randn((1, h, lq, lk), dtype, device, requires_grad=grad)

    return {
        "window": dict(window=(7, 3)),
        "window-left-causal": dict(window=(20, None), causal=True),
        "window-right-only": dict(window=(None, 0)),
        "bias": dict(attn_bias=bias_float(False)),
        "bias-grad": dict(attn_bias=bias_float(True)),
        "bias-fp32-keypad": dict(attn_bias=randn((b, 1, 1, lk), torch.float32, device)),
        "mask-bool": dict(attn_bias=torch.rand(b, h, lq, lk, device=device) > 0.3),
        "mask-bool-keypad": dict(attn_bias=torch.rand(b, 1, 1, lk, device=device) > 0.5),
        "alibi": dict(alibi_slopes=torch.rand(h, device=device)),
        "alibi-per-batch-causal": dict(alibi_slopes=torch.rand(b, h, device=device), causal=True),
        "softcap": dict(softcap=2.0, scale=2.0),
        "everything": dict(causal=True, window=(12, None), softcap=5.0, alibi_slopes=torch.rand(h, device=device),
                           attn_bias=bias_float(True), scale=0.3),
    }


FEATURES = list(_features(1, 1, 1, 1, torch.float32, "cpu"))


# Every pair of feature, Lq < Lk or Lq > Lk, and dtype.
FEATURE_CASES = pairwise(FEATURES, [(45, 70), (70, 45)], DTYPES)


@pytest.mark.parametrize("feature,lengths,dtype", FEATURE_CASES, ids=[
    f"{f}-q{lq}-k{lk}-{DTYPE_IDS[DTYPES.index(dt)]}" for f, (lq, lk), dt in FEATURE_CASES])
def test_features(feature, lengths, dtype, device):
    lq, lk = lengths
    b, hq, hkv, d = 2, 2, 1, 48  # batch 2 and GQA 2:1: every stride and head mapping
    q, k, v = qkv(dtype, device, b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d)
    check_against_reference(q, k, v, **_features(b, hq, lq, lk, dtype, device)[feature])


def test_value_head_dim_may_differ(device):
    q, k, v = qkv(torch.float32, device, lq=33, lk=40, d=64, dv=24)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_give_zero_and_neg_inf_lse(dtype, device):
    b, h, lq, lk, d = 1, 2, 40, 50, 32
    q, k, v = qkv(dtype, device, b=b, hq=h, lq=lq, lk=lk, d=d)
    mask = torch.rand(b, h, lq, lk, device=device) > 0.5
    mask[:, :, ::3] = False  # every third query sees nothing
    out = check_against_reference(q, k, v, attn_bias=mask)
    assert torch.all(out[:, :, ::3] == 0)
    with fastattn.use_backend("triton"):
        _, lse = fastattn.flash_attention(q, k, v, attn_bias=mask, return_lse=True)
        # A window that leaves the first rows with no key at all (Lq > Lk, causal).
        out2, lse2 = fastattn.flash_attention(k, q, q, causal=True, return_lse=True)
    assert torch.all(torch.isneginf(lse[:, :, ::3]))
    assert torch.all(out2[:, :, : lk - lq] == 0) and torch.all(torch.isneginf(lse2[:, :, : lk - lq]))
    dq, = torch.autograd.grad(out2.sum(), [k])
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_logits_stay_finite(dtype, device):
    """Logits of order 1e3-1e4: the online softmax must subtract the running max before exp.
    Outputs meet the error rule. q and k hold integers, so every q.k is exact in fp32 whatever
    the summation order: with random reals the output error at these logits was the dot's
    rounding, of which the kernel's and torch's orders are equally good samples, and the 2x
    rule failed about 1 run in 40 on the luck of one near-tied row. Gradients must be finite;
    they are not held to the rule here: the backward recomputes P from the stored fp32 lse
    (as FlashAttention does), whose rounding at |lse| ~ 4e3 is ~1e-4 relative, while torch's
    math backward keeps P itself."""
    q = torch.randint(-12, 13, (1, 2, 37, 64), device=device).to(dtype).requires_grad_()
    k = torch.randint(-12, 13, (1, 2, 29, 64), device=device).to(dtype).requires_grad_()
    v = randn((1, 2, 29, 64), dtype, device, requires_grad=True)
    out = check_against_reference(q, k, v, scale=1.0, grad=False)
    assert torch.isfinite(out).all()
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, scale=1.0)
    grads = torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


def test_dropout_matches_reference_with_the_kernels_mask(device):
    from fastattn.ops.flash import op

    b, hq, hkv, lq, lk, d, p = 2, 4, 2, 37, 53, 32, 0.3
    q, k, v = qkv(torch.float32, device, b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d)
    seed = torch.randint(0, 2**62, (1,), device=device)
    keep = op.dropout_keep_mask(seed, b, hq, lq, lk, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    check_op(lambda q, k, v: op.flash_attn(q, k, v, seed=seed, scale=d ** -0.5, dropout_p=p, window_right=0)[0],
             lambda q, k, v: attention_reference(q, k, v, causal=True, dropout_p=p, dropout_mask=keep),
             dict(q=q, k=k, v=v))


def test_dropout_place_draws_the_block_of_the_larger_calls_mask(device):
    """A call on heads 2..3 (kv head 1), query rows 9..29 and keys 12..44 of a larger call,
    placed there, draws exactly that block of the larger call's mask: the mask itself (both
    equal to the plain-PyTorch Philox of ``dropout_keep_reference``, bit for bit), and the
    kernels' forward and backward against the reference with the block of the mask."""
    from fastattn.ops.flash import op
    from fastattn.ops.flash.reference import dropout_keep_reference

    b, hq, lq, lk, d, p = 2, 4, 40, 52, 32, 0.3
    seed = torch.randint(0, 2**62, (1,), device=device)
    whole = op.dropout_keep_mask(seed, b, hq, lq, lk, p)
    assert torch.equal(whole.cpu(), dropout_keep_reference(int(seed), b, hq, lq, lk, p))
    keep = whole[:, 2:4, 9:30, 12:45]
    place = (2, hq, 9, lq, 12, lk)
    assert torch.equal(op.dropout_keep_mask(seed, b, 2, 21, 33, p, place), keep)
    assert torch.equal(dropout_keep_reference(int(seed), b, 2, 21, 33, p, place), keep.cpu())
    q, k, v = qkv(torch.float32, device, b=b, hq=2, hkv=1, lq=21, lk=33, d=d)
    check_op(lambda q, k, v: op.flash_attn(q, k, v, seed=seed, scale=d ** -0.5, dropout_p=p,
                                           dropout_place=place)[0],
             lambda q, k, v: attention_reference(q, k, v, dropout_p=p, dropout_mask=keep), dict(q=q, k=k, v=v))


@pytest.mark.parametrize("place", [(2, 4, 9, 40, 13, 52), (3, 4, 0, 40, 0, 52), (0, 4, 20, 40, 0, 52)],
                         ids=["key-offset-not-multiple-of-4", "heads-past-the-end", "rows-past-the-end"])
def test_dropout_place_outside_the_larger_scores_raises(place, device):
    from fastattn.ops.flash import op

    seed = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"dropout_place .* \(H, Lq, Lk\) = \(2, 21, 33\)"):
        op.dropout_seed(seed, 2, 21, 33, place)


def test_dropout_is_repeatable_under_manual_seed(device):
    q, k, v = (randn((1, 2, 40, 32), torch.float16, device) for _ in range(3))
    with fastattn.use_backend("triton"):
        torch.manual_seed(1)
        a = fastattn.flash_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(1)
        b = fastattn.flash_attention(q, k, v, dropout_p=0.5)
        c = fastattn.flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_is_deterministic(device):
    q = randn((1, 4, 50, 32), torch.float16, device, requires_grad=True)
    k = randn((1, 2, 60, 32), torch.float16, device, requires_grad=True)
    v = randn((1, 2, 60, 32), torch.float16, device, requires_grad=True)
    do = torch.randn(1, 4, 50, 32, device=device, dtype=torch.float16)

    def grads():
        with fastattn.use_backend("triton"):
            out = fastattn.flash_attention(q, k, v, causal=True)
        return torch.autograd.grad(out, [q, k, v], do)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v = (randn((1, 1, 9, 36), torch.float32, device) for _ in range(3))
    with fastattn.use_backend("triton"):
        a = fastattn.flash_attention(q, k, v)
        b = fastattn.flash_attention(q, k, v, scale=1 / math.sqrt(36))
    assert torch.equal(a, b)


def test_blocks_outside_the_band_are_never_read(device):
    """Causal: the first query block must not touch later key blocks. NaN there would leak
    into its output if they were loaded and masked rather than skipped."""
    from fastattn.ops.flash import op

    block_m, _, _ = op.block_config(64, torch.float16, "fwd")
    length = 4 * block_m
    q, k, v = (randn((1, 2, length, 64), torch.float16, device) for _ in range(3))
    v[:, :, block_m:] = float("nan")
    k[:, :, block_m:] = float("nan")
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, causal=True)
    assert torch.isfinite(out[:, :, :block_m]).all()
    assert torch.isnan(out[:, :, block_m:]).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """Before: no device guard. Triton launches on the current device, so tensors on cuda:1
    (Hugging Face's device_map="auto") were read by a launch on cuda:0. Every kernel family,
    forward and backward, on cuda:1 while cuda:0 is current, gives cuda:0's bits."""
    from fastattn import sparse

    def run(device):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 128, 64, device=device, dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        with fastattn.use_backend("triton"):
            outs = [fastattn.flash_attention(q, k, v, causal=True),
                    fastattn.sparse_attention(q, k, v, sparse.local(128, 32, block_size=32)),
                    fastattn.linear_attention(q, k, v, causal=True)]
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), (q, k, v))
        return [t.cpu() for t in (*outs, *grads)]

    torch.cuda.set_device(0)
    for a, b in zip(run("cuda:0"), run("cuda:1")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 4, 45, 70), (2, 1, 45, 70), (45, 70), (2, 1, 1, 70)],
                         ids=["heads", "batch", "shared", "keys"])
def test_broadcast_bias_gradient_comes_in_its_own_shape(shape, monkeypatch, device):
    """Before: a bias that broadcasts and needs a gradient got a float32 (B, H, Lq, Lk) gradient
    plus a cast copy, summed by autograd (a learned (1, 16, 16k, 16k) bias at batch 2: 48 GiB).
    Now the backward allocates nothing of that size, and the gradient meets the rule."""
    from fastattn.ops import _launch

    b, h, lq, lk = 2, 4, 45, 70
    sizes = []
    for module, name in ((_launch, "empty"), (torch, "zeros")):
        def record(*size, _alloc=getattr(module, name), **kw):
            sizes.append(math.prod(size[0] if len(size) == 1 and not isinstance(size[0], int) else size))
            return _alloc(*size, **kw)
        monkeypatch.setattr(module, name, record)
    q, k, v = (randn((b, h, n, 32), torch.float32, device, requires_grad=True) for n in (lq, lk, lk))
    bias = randn(shape, torch.float32, device, requires_grad=True)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, attn_bias=bias, causal=True)
    do = torch.randn_like(out)
    sizes.clear()
    (dbias,) = torch.autograd.grad(out, [bias], do)
    assert dbias.shape == bias.shape and max(sizes) < b * h * lq * lk
    args64 = [as64(t) for t in (q, k, v, bias)]
    args32 = [same_dtype_copy(t) for t in (q, k, v, bias)]
    ref = attention_reference(*args64[:3], attn_bias=args64[3], causal=True)
    base = attention_reference(*args32[:3], attn_bias=args32[3], causal=True)
    (g64,) = torch.autograd.grad(ref, [args64[3]], do.double())
    (g32,) = torch.autograd.grad(base, [args32[3]], do)
    assert_close_rule("dbias", dbias, g64, g32, factor=3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory at 8k tokens needs a GPU")
def test_learned_broadcast_bias_backward_memory_at_8k():
    """A learned (1, 16, 8k, 8k) bf16 bias at batch 2 (2 GiB): the backward's peak stays near
    the bias's own size; before it allocated a float32 (2, 16, 8k, 8k) gradient and a bf16
    copy (12 GiB)."""
    b, h, length = 2, 16, 8192
    q, k, v = (torch.randn(b, h, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(1, h, length, length, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, attn_bias=bias, causal=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    bias_bytes = bias.numel() * bias.element_size()
    assert torch.cuda.max_memory_allocated() - before < 2 * bias_bytes, torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(bias.grad).all()


def test_softmax_delta_reads_do_and_o_in_place(monkeypatch, device):
    """Before: rowsum(dO * O) made float32 copies of dO and O (4x O's bytes in bf16). Now one
    kernel reads both once, in place, and its fp32 sum meets the rule."""
    from fastattn.ops import _launch

    do = randn((2, 3, 45, 80), torch.bfloat16, device, transposed=True)
    out = randn((2, 3, 45, 80), torch.bfloat16, device)
    yardstick = torch.linalg.vecdot(do.float(), out.float())
    oracle = torch.linalg.vecdot(do.double(), out.double())

    def no_copy(self, *args, **kwargs):
        raise AssertionError("softmax_delta copied a tensor to float32")
    monkeypatch.setattr(torch.Tensor, "float", no_copy)
    delta = _launch.softmax_delta(do, out)
    monkeypatch.undo()
    assert delta.dtype == torch.float32 and delta.is_contiguous()
    assert_close_rule("delta", delta, oracle, yardstick)


def test_dropout_draws_one_philox_counter_per_four_scores(monkeypatch, device):
    """Before: one Philox call per score, which makes four numbers and kept one. Now each
    counter's four numbers serve four keys: the forward runs Philox on B*H*Lq*Lk/4 counters.
    (Interpreter only: it runs triton.language.random's Python code, which this counts.)"""
    import triton
    import triton.language.random as tl_random

    from fastattn.ops.flash import op

    if not triton.knobs.runtime.interpret:
        pytest.skip("counts the interpreter's Philox calls")
    counted = []
    philox = tl_random.philox

    def spy(seed, c0, *args, **kwargs):
        counted.append(math.prod(c0.shape))
        return philox(seed, c0, *args, **kwargs)
    monkeypatch.setattr(tl_random, "philox", spy)
    q, k, v = (randn((1, 2, 64, 32), torch.float32, device) for _ in range(3))
    seed = torch.randint(0, 2**62, (1,), device=device)
    op.flash_attn(q, k, v, seed=seed, scale=0.2, dropout_p=0.3)
    assert sum(counted) == 2 * 64 * 64 // 4


# Head dims past 256: Gemma's global layers (512) and absorbed MLA (q/k 576 = 512 latent + 64
# rotary, v 512), and a value dim wider than q/k's. (Dqk, Dv, dtype, feature), small L.
HD512_CASES = [
    (512, 512, torch.float16, "gqa-causal"),
    (576, 512, torch.bfloat16, "everything"),
    (512, 512, torch.float32, "sinks-window"),
    (576, 512, torch.float16, "mqa-causal"),
    (128, 512, torch.bfloat16, "window"),
]


@pytest.mark.parametrize("d,dv,dtype,feature", HD512_CASES, ids=[
    f"d{d}-dv{dv}-{DTYPE_IDS[DTYPES.index(dt)]}-{f}" for d, dv, dt, f in HD512_CASES])
def test_head_dims_up_to_512_and_mla(d, dv, dtype, feature, device):
    b, hq, hkv, lq, lk = 1, 4, 2, 19, 23
    if feature == "mqa-causal":
        hkv = 1
    q, k, v = qkv(dtype, device, b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, dv=dv, transposed=True)
    kw = {
        "gqa-causal": dict(causal=True),
        "mqa-causal": dict(causal=True),
        "everything": dict(causal=True, window=(9, None), softcap=5.0, alibi_slopes=torch.rand(hq, device=device),
                           attn_bias=randn((1, hq, lq, lk), dtype, device, requires_grad=True), scale=0.05),
        "sinks-window": dict(window=(6, 4), sinks=torch.randn(hq, device=device).requires_grad_()),
        "window": dict(window=(5, 2)),
    }[feature]
    check_against_reference(q, k, v, **kw)


def test_dropout_at_mla_head_dims(device):
    """The public call draws its seed from torch's generator: the same manual seed redraws it,
    and the kernels' mask for it is the reference's."""
    from fastattn.ops.flash import op

    b, hq, lq, lk, p = 1, 2, 21, 26, 0.25
    q, k, v = qkv(torch.float32, device, b=b, hq=hq, hkv=1, lq=lq, lk=lk, d=576, dv=512)
    torch.manual_seed(7)
    keep = op.dropout_keep_mask(torch.randint(0, 2**62, (1,), device=device), b, hq, lq, lk, p)

    def kernel(q, k, v):
        torch.manual_seed(7)
        return fastattn.flash_attention(q, k, v, scale=0.05, dropout_p=p)
    check_op(kernel, lambda q, k, v: attention_reference(q, k, v, scale=0.05, dropout_p=p, dropout_mask=keep),
             dict(q=q, k=k, v=v))


def test_varlen_at_head_dim_512(device):
    from fastattn.ops.flash.reference import varlen_attention_reference
    from helpers import cu_seqlens

    lengths_q, lengths_k = [7, 13], [11, 9]
    q = torch.randn(sum(lengths_q), 2, 576, device=device).to(torch.bfloat16).requires_grad_()
    k = torch.randn(sum(lengths_k), 1, 576, device=device).to(torch.bfloat16).requires_grad_()
    v = torch.randn(sum(lengths_k), 1, 512, device=device).to(torch.bfloat16).requires_grad_()
    cq, ck = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    check_op(lambda q, k, v: fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True),
             lambda q, k, v: varlen_attention_reference(q, k, v, cq, ck, window=(None, 0), return_lse=True),
             dict(q=q, k=k, v=v), names=("out", "lse"))


def test_sdpa_drop_in_runs_the_kernels_at_head_dim_512(device):
    import torch.nn.functional as F

    q, k, v = qkv(torch.float16, device, b=1, hq=4, hkv=2, lq=17, lk=17, d=512)
    # The triton backend raises rather than fall back: this runs the kernels.
    check_op(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             dict(q=q, k=k, v=v), yardstick=lambda q, k, v: attention_reference(q, k, v, causal=True))


def test_head_dims_past_the_kernels_limits_are_refused():
    q, k, v = (torch.zeros(1, 1, 4, d) for d in (640, 640, 512))
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="head_dim 640 / value dim 512 exceeds 576"):
        fastattn.flash_attention(q, k, v)
    q, k, v = (torch.zeros(1, 1, 4, d) for d in (64, 64, 520))
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="value dim 520 exceeds 576 / 512"):
        fastattn.flash_attention(q, k, v)

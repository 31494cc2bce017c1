"""Learnable attention sinks (gpt-oss): a per-head logit that joins every softmax denominator.
The kernels against the float64 reference by the error rule, forward, lse and gradients
(dsinks included), padded and packed; the reference against the softmax-with-a-column
definition."""
import pytest
import torch

import fastattn
from fastattn.ops.flash.reference import attention_reference, band_from, varlen_attention_reference
from helpers import as64, assert_close_rule, randn, same_dtype_copy

FEATURES = {"plain": {}, "causal": dict(causal=True), "window": dict(window=(7, 0)), "softcap": dict(softcap=4.0),
            "gqa-causal-lq<lk": dict(causal=True, lk=53)}


# Every feature in fp16; fp32 and bf16 on the plain and the GQA causal cases.
SINK_CASES = [(f, torch.float16) for f in FEATURES] + [
    (f, d) for d in (torch.float32, torch.bfloat16) for f in ("plain", "gqa-causal-lq<lk")]


@pytest.mark.parametrize("feature,dtype", SINK_CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in SINK_CASES])
def test_sinks_kernels_match_the_reference(feature, dtype, device):
    kw = dict(FEATURES[feature])
    lk = kw.pop("lk", 41)
    q = randn((2, 4, 41, 32), dtype, device, requires_grad=True)
    k = randn((2, 2, lk, 32), dtype, device, requires_grad=True)
    v = randn((2, 2, lk, 32), dtype, device, requires_grad=True)
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()  # sinks of size ~2, as gpt-oss's
    with fastattn.use_backend("triton"):
        out, lse = fastattn.flash_attention(q, k, v, sinks=sinks, return_lse=True, **kw)
    ref_kw = dict(window=band_from(kw.pop("causal", False), kw.pop("window", None)), **kw)
    args64 = [as64(t) for t in (q, k, v, sinks)]
    oracle, lse64 = attention_reference(*args64[:3], sinks=args64[3], return_lse=True, **ref_kw)
    args_t = [same_dtype_copy(t) for t in (q, k, v)] + [sinks.detach().to(dtype).requires_grad_()]
    base, lse_t = attention_reference(*args_t[:3], sinks=args_t[3], return_lse=True, **ref_kw)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, lse64, lse_t)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), do)
    grads64 = torch.autograd.grad(oracle, args64, do.double())
    grads_t = torch.autograd.grad(base, args_t, do)
    for name, g, g64, gt in zip(("q", "k", "v", "sinks"), grads, grads64, grads_t):
        assert_close_rule(f"d{name}", g, g64, gt, factor=3.0)


def test_sinks_reference_is_a_softmax_with_one_more_column():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([1.5, -0.5], dtype=torch.float64)
    out, lse = attention_reference(q, k, v, sinks=sinks, causal=True, return_lse=True)
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    s = torch.cat([s, sinks.view(1, 2, 1, 1).expand(1, 2, 5, 1)], dim=-1)
    assert torch.allclose(out, torch.softmax(s, -1)[..., :5] @ v)
    assert torch.allclose(lse, torch.logsumexp(s, -1))


def test_a_row_with_every_key_masked_gives_zero_and_the_sink_as_lse(device):
    q = randn((1, 2, 4, 16), torch.float32, device)
    k = randn((1, 2, 6, 16), torch.float32, device)
    v = randn((1, 2, 6, 16), torch.float32, device)
    sinks = torch.tensor([0.5, 2.0], device=device)
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.bool, device=device)  # nothing may be seen
    for backend in ("triton", "torch"):
        with fastattn.use_backend(backend):
            out, lse = fastattn.flash_attention(q, k, v, attn_bias=mask, sinks=sinks, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)), backend
        assert torch.equal(lse, sinks.view(1, 2, 1).expand(1, 2, 4)), backend


def test_packed_sinks_match_the_per_sequence_reference(device):
    lengths = [17, 1, 30]
    cu = torch.tensor([0, 17, 18, 48], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lengths), 4, 32, device=device).half().requires_grad_() for _ in range(3))
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, sinks=sinks)
    args64 = [as64(t) for t in (q, k, v, sinks)]
    oracle = varlen_attention_reference(*args64[:3], cu, cu, window=(None, 0), sinks=args64[3])
    args_t = [same_dtype_copy(t) for t in (q, k, v)] + [sinks.detach().half().requires_grad_()]
    base = varlen_attention_reference(*args_t[:3], cu, cu, window=(None, 0), sinks=args_t[3])
    assert_close_rule("out", out, oracle, base)
    do = torch.randn_like(out)
    for name, g, g64, gt in zip(("q", "k", "v", "sinks"), torch.autograd.grad(out, (q, k, v, sinks), do),
                                torch.autograd.grad(oracle, args64, do.double()),
                                torch.autograd.grad(base, args_t, do)):
        assert_close_rule(f"d{name}", g, g64, gt, factor=3.0)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_sinks_raise_naming_them(bad):
    q, k, v = (torch.randn(1, 4, 3, 8) for _ in range(3))
    sinks = torch.zeros(3) if bad == "shape" else torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="sinks"):
        fastattn.flash_attention(q, k, v, sinks=sinks)


def test_flash_attn_interface_takes_sinks(device):
    """fastattn's keyword addition to FlashAttention's functions: the same as the native call."""
    from fastattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    q, k, v = (randn((2, 4, 9, 16), torch.float32, device) for _ in range(3))
    sinks = torch.randn(4, device=device) * 2
    with fastattn.use_backend("triton"):
        want = fastattn.flash_attention(q, k, v, causal=True, sinks=sinks)
        got = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, sinks=sinks)
        assert torch.equal(got, want.transpose(1, 2))
        cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=device)
        packed = [t.transpose(1, 2).reshape(18, 4, 16) for t in (q, k, v)]  # (B, H, L, D) -> (B*L, H, D)
        got = flash_attn_varlen_func(*packed, cu, cu, 9, 9, causal=True, sinks=sinks)
        assert torch.equal(got, want.transpose(1, 2).reshape(18, 4, 16))  # the same tiles, in the same order
    k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (k, v))  # (B, L, H, D)
    out = flash_attn_with_kvcache(q[:, :, -1:].transpose(1, 2), k_cache, v_cache,
                                  cache_seqlens=torch.full((2,), 9, dtype=torch.int32, device=device), sinks=sinks)
    ref = attention_reference(*(as64(t) for t in (q[:, :, -1:], k, v)), sinks=sinks.double())
    base = attention_reference(q[:, :, -1:], k, v, sinks=sinks)
    assert_close_rule("kvcache", out.transpose(1, 2), ref, base)

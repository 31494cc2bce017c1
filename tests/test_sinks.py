"""Learnable attention sinks (gpt-oss): a per-head logit that joins every softmax denominator.
The kernels against the float64 reference by the error rule, forward, lse and gradients
(dsinks included), padded and packed; the reference against the softmax-with-a-column
definition."""
import pytest
import torch

import fastattn
from fastattn.ops.flash.reference import attention_reference, band_from, varlen_attention_reference
from helpers import as64, assert_close_rule, check_op, packed, qkv, randn

FEATURES = {"plain": {}, "causal": dict(causal=True), "window": dict(window=(7, 0)), "softcap": dict(softcap=4.0),
            "gqa-causal-lq<lk": dict(causal=True, lk=53)}


def in_dtype(dtype):
    """The yardstick's inputs: plain torch with every input, the fp32 sinks too, in ``dtype``."""
    return lambda t: t.detach().to(dtype).requires_grad_(t.requires_grad)


# Every feature in fp16; fp32 and bf16 on the plain and the GQA causal cases.
SINK_CASES = [(f, torch.float16) for f in FEATURES] + [
    (f, d) for d in (torch.float32, torch.bfloat16) for f in ("plain", "gqa-causal-lq<lk")]


@pytest.mark.parametrize("feature,dtype", SINK_CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in SINK_CASES])
def test_sinks_kernels_match_the_reference(feature, dtype, device):
    kw = dict(FEATURES[feature])
    lk = kw.pop("lk", 41)
    q, k, v = qkv(dtype, device, b=2, hq=4, hkv=2, lq=41, lk=lk, d=32)
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()  # sinks of size ~2, as gpt-oss's
    ref_kw = {n: x for n, x in kw.items() if n not in ("causal", "window")}
    ref_kw["window"] = band_from(kw.get("causal", False), kw.get("window"))
    check_op(lambda **a: fastattn.flash_attention(**a, return_lse=True, **kw),
             lambda **a: attention_reference(**a, return_lse=True, **ref_kw),
             dict(q=q, k=k, v=v, sinks=sinks), names=("out", "lse"), same_dtype=in_dtype(dtype))


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
    q, k, v, cu, _ = packed([17, 1, 30], [17, 1, 30], torch.float16, device, hq=4, hkv=4)
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()
    check_op(lambda q, k, v, sinks: fastattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, sinks=sinks),
             lambda q, k, v, sinks: varlen_attention_reference(q, k, v, cu, cu, window=(None, 0), sinks=sinks),
             dict(q=q, k=k, v=v, sinks=sinks), same_dtype=in_dtype(torch.float16))


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

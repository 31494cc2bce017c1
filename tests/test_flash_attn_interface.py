"""fastattn.flash_attn_interface: FlashAttention 2's calls, unchanged but for the import,
checked against the reference by the error rule."""
import pytest
import torch

import fastattn
from fastattn.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                           flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                           flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from fastattn.ops.decode.reference import decode_reference
from fastattn.ops.flash.reference import attention_reference
from helpers import as64, assert_close_rule


def bhld(t):
    return t.transpose(1, 2)  # (B, L, H, D) <-> (B, H, L, D)


def reference(q, k, v, **kw):
    """FlashAttention layouts in, the reference out, (B, L, H, D)."""
    return bhld(attention_reference(bhld(q), bhld(k), bhld(v), **kw))


CALLS = {  # FlashAttention keyword arguments -> the reference's
    "defaults": ({}, {}),
    "causal": (dict(causal=True), dict(causal=True)),
    "window": (dict(window_size=(8, 0)), dict(window=(8, 0))),
    "window-left-unbounded": (dict(window_size=(-1, 3)), dict(window=(None, 3))),
    "softcap-scale": (dict(softcap=4.0, softmax_scale=0.3), dict(softcap=4.0, scale=0.3)),
    "alibi": (dict(alibi_slopes="alibi", causal=True), dict(alibi_slopes="alibi", causal=True)),
}


@pytest.mark.parametrize("lq,lk", [(33, 33), (17, 40), (40, 17)], ids=["q=k", "q<k", "q>k"])
@pytest.mark.parametrize("call", list(CALLS))
def test_flash_attn_func(call, lq, lk, device):
    fa_kw, ref_kw = (dict(d) for d in CALLS[call])
    q = torch.randn(2, lq, 4, 32, device=device, dtype=torch.float16, requires_grad=True)   # (B, L, H, D)
    k, v = (torch.randn(2, lk, 2, 32, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    if "alibi_slopes" in fa_kw:
        fa_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(4, device=device)
    out = flash_attn_func(q, k, v, **fa_kw)
    assert out.shape == (2, lq, 4, 32) and out.is_contiguous()
    oracle = reference(*map(as64, (q, k, v)), **ref_kw)
    assert_close_rule("out", out, oracle, reference(q, k, v, **ref_kw))
    do = torch.randn_like(out)
    args64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for name, g, g64 in zip("qkv", torch.autograd.grad(out, (q, k, v), do),
                            torch.autograd.grad(reference(*args64, **ref_kw), args64, do.double())):
        gt = torch.autograd.grad(reference(q, k, v, **ref_kw), {"q": q, "k": k, "v": v}[name], do)[0]
        assert_close_rule(f"d{name}", g, g64, gt, factor=3.0)


def test_packed_forms_equal_the_plain_call(device):
    qkv = torch.randn(2, 20, 3, 4, 16, device=device)  # (B, L, 3, H, D)
    want = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True), want)
    assert torch.equal(flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=True), want)


def test_varlen_functions(device):
    lengths = [5, 17, 1]
    cu = torch.tensor([0, 5, 22, 23], dtype=torch.int32, device=device)
    qkv = torch.randn(23, 3, 4, 16, device=device)  # (total, 3, H, D)
    out = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 17, 17, causal=True)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(qkv, cu, 17, causal=True), out)
    assert torch.equal(flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 17, 17, causal=True), out)
    for b, (s, n) in enumerate(zip(cu.tolist(), lengths)):
        seq = qkv[s:s + n][None]  # (1, L, 3, H, D)
        want = flash_attn_func(seq[:, :, 0], seq[:, :, 1], seq[:, :, 2], causal=True)[0]
        assert_close_rule(f"seq{b}", out[s:s + n], reference(*(as64(seq[:, :, i]) for i in range(3)), causal=True)[0],
                          want)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_flash_attn_with_kvcache(rotary, device):
    """A decoding step with FlashAttention's defaults (causal=False, rotary_interleaved=True)
    and (B, Lmax, H, D) caches, written in place."""
    b, lmax, hq, hkv, d = 2, 32, 4, 2, 16
    k_cache, v_cache = (torch.randn(b, lmax, hkv, d, device=device) for _ in range(2))
    seqlens = torch.tensor([5, 11], dtype=torch.int32, device=device)
    q = torch.randn(b, 1, hq, d, device=device)
    k, v = (torch.randn(b, 1, hkv, d, device=device) for _ in range(2))
    rot = {}
    if rotary:
        angles = torch.arange(lmax, device=device)[:, None] * 0.1 * torch.arange(1, d // 2 + 1, device=device)
        rot = dict(rotary_cos=angles.cos(), rotary_sin=angles.sin())
    want, want_lse = decode_reference(bhld(q), bhld(k_cache).clone(), bhld(v_cache).clone(), seqlens, bhld(k),
                                      bhld(v), causal=False, return_lse=True, rotary_interleaved=True, **rot)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, return_softmax_lse=True,
                                       **rot)
    assert out.shape == (b, 1, hq, d) and out.is_contiguous() and lse.shape == (b, hq, 1)
    torch.testing.assert_close(bhld(out), want)
    torch.testing.assert_close(lse, want_lse.float())
    for i, n in enumerate(seqlens.tolist()):  # the new token landed in the cache at its sequence's length
        assert torch.equal(v_cache[i, n], v[i, 0])


def test_what_fastattn_cannot_give_raises_clearly():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="return_attn_probs"):
        flash_attn_func(q, q, q, return_attn_probs=True)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, q, q, cache_seqlens=4, cache_batch_idx=torch.zeros(1, dtype=torch.int32))
    assert fastattn.flash_attn_interface.flash_attn_func is flash_attn_func

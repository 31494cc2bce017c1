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
from helpers import as64, assert_close_rule, check_op


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
    """The arguments' translation (the kernels' numbers are test_flash's): batch 2, GQA 2:1."""
    fa_kw, ref_kw = (dict(d) for d in CALLS[call])
    q = torch.randn(2, lq, 2, 16, device=device, dtype=torch.float16, requires_grad=True)   # (B, L, H, D)
    k, v = (torch.randn(2, lk, 1, 16, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    if "alibi_slopes" in fa_kw:
        fa_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(2, device=device)
    out = check_op(lambda q, k, v: flash_attn_func(q, k, v, **fa_kw), lambda q, k, v: reference(q, k, v, **ref_kw),
                   dict(q=q, k=k, v=v))
    assert out.shape == (2, lq, 2, 16) and out.is_contiguous()


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
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, q, q, cache_seqlens=4, cache_batch_idx=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot be combined"):
        flash_attn_with_kvcache(q, q, q, cache_seqlens=4, block_table=torch.zeros(1, 1, dtype=torch.int32),
                                cache_leftpad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, q, q, cache_seqlens=4, cache_leftpad=torch.full((1,), 5, dtype=torch.int32))
    assert fastattn.flash_attn_interface.flash_attn_func is flash_attn_func


def _paged_of(cache, page):
    """(B, Lmax, Hkv, D) FlashAttention cache -> pages (B * Lmax / page, page, Hkv, D) in shuffled
    order and the int32 block table that maps each sequence onto them."""
    b, lmax = cache.shape[:2]
    per = lmax // page
    perm = torch.randperm(b * per, device=cache.device)
    pages = torch.empty(b * per, page, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    pages[perm] = cache.reshape(b * per, page, *cache.shape[2:])  # logical page j of seq i -> perm[i * per + j]
    return pages, perm.view(b, per).to(torch.int32)


@pytest.mark.parametrize("mode", ["block_table", "cache_batch_idx", "cache_leftpad"])
def test_flash_attn_with_kvcache_indirection(mode, device):
    """FlashAttention 2's paged and indirect caches give what the plain call gives on the
    equivalent contiguous cache, and write the new token to the same place."""
    b, lmax, hq, hkv, d = 3, 64, 4, 2, 16
    k_cache, v_cache = (torch.randn(b, lmax, hkv, d, device=device) for _ in range(2))
    seqlens = torch.tensor([5, 40, 17], dtype=torch.int32, device=device)
    q = torch.randn(b, 2, hq, d, device=device)
    k, v = (torch.randn(b, 2, hkv, d, device=device) for _ in range(2))
    kw = dict(cache_seqlens=seqlens, causal=True, return_softmax_lse=True)
    if mode == "cache_leftpad":
        pad = torch.tensor([2, 0, 9], dtype=torch.int32, device=device)
        want, want_lse = [], []
        for i in range(b):  # the same sequence moved to the left of its own cache
            kc, vc = k_cache[i:i + 1, pad[i]:].clone(), v_cache[i:i + 1, pad[i]:].clone()
            o, lse = flash_attn_with_kvcache(q[i:i + 1], kc, vc, k[i:i + 1], v[i:i + 1], causal=True,
                                             cache_seqlens=int(seqlens[i] - pad[i]), return_softmax_lse=True)
            want.append(o)
            want_lse.append(lse)
        want, want_lse = torch.cat(want), torch.cat(want_lse)
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_leftpad=pad, **kw)
        for i in range(b):
            assert torch.equal(k_cache[i, seqlens[i]:seqlens[i] + 2], k[i])
    elif mode == "cache_batch_idx":
        rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
        big_k, big_v = (torch.randn(5, lmax, hkv, d, device=device) for _ in range(2))
        big_k[rows.long()], big_v[rows.long()] = k_cache, v_cache
        untouched = big_k[[1, 3]].clone()
        want, want_lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw)
        out, lse = flash_attn_with_kvcache(q, big_k, big_v, k, v, cache_batch_idx=rows, **kw)
        assert torch.equal(big_k[rows.long()], k_cache) and torch.equal(big_v[rows.long()], v_cache)
        assert torch.equal(big_k[[1, 3]], untouched)
    else:
        kp, table = _paged_of(k_cache, 16)
        vp = torch.empty_like(kp)
        vp[table.flatten().long()] = v_cache.reshape(-1, 16, hkv, d)
        want, want_lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw)
        out, lse = flash_attn_with_kvcache(q, kp, vp, k, v, block_table=table, **kw)
        assert torch.equal(kp[table.flatten().long()].reshape(b, lmax, hkv, d), k_cache)
        assert torch.equal(vp[table.flatten().long()].reshape(b, lmax, hkv, d), v_cache)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


def test_flash_attn_varlen_func_over_pages(device):
    """flash_attn_varlen_func(block_table=...): packed queries over paged keys, equal to one
    flash_attn_func per sequence (bottom-right causal)."""
    hq, hkv, d, page = 4, 2, 16, 16
    lq, lk = [3, 1, 6], [20, 9, 6]
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 20, 29, 35], dtype=torch.int32, device=device)
    keys = [torch.randn(n, hkv, d, device=device) for n in lk]
    values = [torch.randn(n, hkv, d, device=device) for n in lk]
    kp, vp = torch.zeros(8, page, hkv, d, device=device), torch.zeros(8, page, hkv, d, device=device)
    table = torch.tensor([[5, 1], [7, 0], [2, 3]], dtype=torch.int32, device=device)
    for i, n in enumerate(lk):
        for j in range(n):
            kp[table[i, j // page], j % page], vp[table[i, j // page], j % page] = keys[i][j], values[i][j]
    q = torch.randn(10, hq, d, device=device)
    out = flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 6, 20, causal=True, block_table=table)
    for i in range(3):
        s, e = cu_q[i].item(), cu_q[i + 1].item()
        want = flash_attn_func(q[None, s:e], keys[i][None], values[i][None], causal=True)[0]
        torch.testing.assert_close(out[s:e], want)


def _per_sequence(q, keys, values, cu, used, dtype):
    """Each sequence's queries over the first used[i] of its keys, bottom-right causal, by the
    reference in ``dtype``: packed out (T_q, Hq, Dv) and lse (T_q, Hq)."""
    outs, lses = [], []
    for i, n in enumerate(used):
        s, e = cu[i], cu[i + 1]
        qi, ki, vi = (t.to(dtype).transpose(0, 1)[None] for t in (q[s:e], keys[i][:n], values[i][:n]))
        out, lse = attention_reference(qi, ki, vi, causal=True, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("layout", ["paged-48", "packed", "cache"])
def test_seqused_k_equals_per_sequence(layout, device):
    """K/V already written (seqused_k): a prefill chunk of 6 over 20 keys, two decodes and a
    sequence with no query, in one call on the kernels, through torch's varlen_attn signature
    (pages of 48, or packed keys) or attention_with_kvcache (a contiguous cache): per-sequence
    attention over the first seqused_k keys by the error rule, the lse too."""
    from torch.nn.attention.varlen import AuxRequest

    from fastattn.flash_attn_interface import varlen_attn

    hq, hkv, d = 4, 2, 16
    counts, used = [6, 1, 0, 1], [20, 9, 5, 50]
    keys = [torch.randn(n + 3, hkv, d, device=device) for n in used]  # 3 unused keys past each seqused_k
    values = [torch.randn(n + 3, hkv, d, device=device) for n in used]
    cu_q = torch.tensor([0, 6, 7, 7, 8], dtype=torch.int32, device=device)
    q = torch.randn(8, hq, d, device=device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    with fastattn.use_backend("triton"):
        if layout == "packed":
            cu_k = torch.tensor([0] + torch.tensor([n + 3 for n in used]).cumsum(0).tolist(), dtype=torch.int32,
                                device=device)
            out, lse = varlen_attn(q, torch.cat(keys), torch.cat(values), cu_q, cu_k, 6, 53, window_size=(-1, 0),
                                   enable_gqa=True, seqused_k=seqused, return_aux=AuxRequest(lse=True))
        elif layout == "paged-48":
            kp, vp = torch.full((6, 48, hkv, d), float("nan"), device=device), torch.full((6, 48, hkv, d), 0.0,
                                                                                           device=device)
            table = torch.tensor([[4, 0], [1, -1], [5, -1], [2, 3]], dtype=torch.int32, device=device)
            for i, n in enumerate(used):
                for j in range(n):
                    kp[table[i, j // 48], j % 48], vp[table[i, j // 48], j % 48] = keys[i][j], values[i][j]
            out, lse = varlen_attn(q, kp, vp, cu_q, None, 6, 50, window_size=(-1, 0), enable_gqa=True,
                                   seqused_k=seqused, block_table=table, return_aux=AuxRequest(lse=True))
        else:
            kc, vc = (torch.full((4, hkv, 56, d), float("nan"), device=device) for _ in range(2))
            for i, n in enumerate(used):
                kc[i, :, :n + 3], vc[i, :, :n + 3] = keys[i].transpose(0, 1), values[i].transpose(0, 1)
            out, lse = fastattn.attention_with_kvcache(q, kc, vc, seqused_k=seqused, cu_seqlens_q=cu_q,
                                                       return_lse=True)
            lse = lse.transpose(0, 1)
    cu = cu_q.tolist()
    oracle, oracle_lse = _per_sequence(q, keys, values, cu, used, torch.float64)
    base, base_lse = _per_sequence(q, keys, values, cu, used, torch.float32)
    assert out.shape == (8, hq, d) and lse.shape == (8, hq)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)


def test_seqused_k_bad_input_raises():
    q, kc = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 8, 16)
    n = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="not both"):
        fastattn.attention_with_kvcache(q, kc, kc, n, seqused_k=n)
    with pytest.raises(ValueError, match="k_new"):
        fastattn.attention_with_kvcache(q, kc, kc.clone(), seqused_k=n, k_new=kc[:, :, :1], v_new=kc[:, :, :1])
    with pytest.raises(ValueError, match="cache_seqlens"):
        fastattn.attention_with_kvcache(q, kc, kc)


def _rotate_gptj(x, cos, sin, positions):
    """FlashAttention's interleaved rotary written out: x (L, H, D) at positions (L,); pair
    (2j, 2j + 1) of the first R = 2 * cos.shape[1] dims turns by the angle of row p, column j."""
    c, s = cos[positions][:, None], sin[positions][:, None]  # (L, 1, R/2)
    r = 2 * cos.shape[1]
    x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
    turned = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., r:]], dim=-1)


# name -> (cache_seqlens, cache_leftpad, cache_batch_idx, Lq, Lnew, causal): the cases where
# FlashAttention's rotary positions differ from fastattn's own convention.
FA_ROTARY = {
    "fewer-new-than-queries": ([5, 9], None, None, 4, 2, True),
    "noncausal-several-queries": ([5, 9], None, None, 3, 3, False),
    "leftpad": ([10, 12], [3, 0], None, 1, 1, True),
    "leftpad-with-batch-idx": ([10, 7], [3, 2], [2, 0], 2, 2, True),
}


@pytest.mark.parametrize("case", list(FA_ROTARY))
def test_rotary_positions_as_flash_attention(case, device):
    """flash_attn_with_kvcache's rotary as FlashAttention documents it: new key t at cache slot
    cache_seqlens + t, query i at cache_seqlens + i (causal or local) or cache_seqlens, all
    absolute slots (with cache_leftpad too); sequence b is cache row cache_batch_idx[b] with keys
    from slot cache_leftpad[b]. The float64 oracle by the error rule; the rotated keys written."""
    lengths, pads, rows, lq, lnew, causal = FA_ROTARY[case]
    b, lmax, hq, hkv, d = 2, 24, 4, 2, 32
    k_cache, v_cache = (torch.randn(b if rows is None else 3, lmax, hkv, d, device=device) for _ in range(2))
    q = torch.randn(b, lq, hq, d, device=device)
    k, v = (torch.randn(b, lnew, hkv, d, device=device) for _ in range(2))
    angles = torch.arange(lmax, device=device)[:, None] * 0.3 * torch.arange(1, 9, device=device)  # R = 16
    cos, sin = angles.cos(), angles.sin()
    t = (lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=device))  # noqa: E731
    before = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=t(lengths),
                                  cache_leftpad=t(pads), cache_batch_idx=t(rows), causal=causal)
    want = {}
    for dtype in (torch.float64, torch.float32):
        outs = []
        for i, n in enumerate(lengths):
            row, pad = (i if rows is None else rows[i]), (0 if pads is None else pads[i])
            q_pos = torch.arange(n, n + lq) if causal else torch.full((lq,), n)
            qi = _rotate_gptj(q[i].to(dtype), cos.to(dtype), sin.to(dtype), q_pos)
            ki = _rotate_gptj(k[i].to(dtype), cos.to(dtype), sin.to(dtype), torch.arange(n, n + lnew))
            keys = torch.cat([before[row, pad:n].to(dtype), ki])
            values = torch.cat([v_cache[row, pad:n].to(dtype), v[i].to(dtype)])
            outs.append(reference(qi[None], keys[None], values[None], causal=causal))
            if dtype == torch.float32:
                torch.testing.assert_close(k_cache[row, n:n + lnew], ki)
        want[dtype] = torch.cat(outs)
    assert_close_rule("out", out, want[torch.float64], want[torch.float32])


def test_return_attn_probs_gives_lse_and_no_probabilities(device):
    """return_attn_probs=True: (out, softmax_lse, None) as FlashAttention's layout has them."""
    q, k, v = (torch.randn(2, 12, 2, 16, device=device) for _ in range(3))
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    want, want_lse = fastattn.flash_attention(bhld(q), bhld(k), bhld(v), causal=True, return_lse=True)
    assert probs is None and lse.shape == (2, 2, 12)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True)) and torch.equal(lse, want_lse)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    qp, kp, vp = (t[0] for t in (q, k, v))  # (12, H, D) packed
    out, lse, probs = flash_attn_varlen_func(qp, kp, vp, cu, cu, 7, 7, causal=True, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 12) and out.shape == (12, 2, 16)


def test_window_size_as_any_pair(device):
    """window_size as a tuple, a list or a tensor gives the same call."""
    q, k, v = (torch.randn(1, 20, 2, 16, device=device) for _ in range(3))
    want = flash_attn_func(q, k, v, window_size=(4, 0))
    assert torch.equal(flash_attn_func(q, k, v, window_size=[4, 0]), want)
    assert torch.equal(flash_attn_func(q, k, v, window_size=torch.tensor([4, 0])), want)

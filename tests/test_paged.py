"""Paged KV caches (``attention_with_kvcache(..., block_table=...)``): the kernels, the reference
and the fallbacks against the contiguous path, with random (permuted) block tables, NaN in every
page row outside the valid prefixes, unused table entries set to -1, and pages outside the table
that must come back bit for bit unchanged.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py).
"""
import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.ops.decode.reference import (  # noqa: E402
    append_paged_reference, append_reference, decode_reference, gather_pages)
from helpers import assert_close_rule, max_err  # noqa: E402
from fastattn.nn import PagedKVCache  # noqa: E402
from fastattn.ops.decode.reference import apply_rotary  # noqa: E402
from fastattn.ops.flash.reference import attention_reference  # noqa: E402
from test_decode import TinyStack, _features, bits, rope_tables  # noqa: E402


def make_paged(hkv, d, lengths, lnew, page_size, dtype, device, *, spare_pages=3, extra_table=1):
    """Pages (num_pages, page_size, Hkv, D), NaN everywhere but each sequence's valid prefix,
    and an int32 block table (B, P) whose used entries are distinct pages in random order;
    entries past each sequence's last page after the append are -1 (never to be read).
    ``spare_pages`` pages belong to no sequence. Returns (k_pages, v_pages, block_table)."""
    used = [-(-(n + lnew) // page_size) for n in lengths]  # pages per sequence after the append
    p = max(max(used), 1) + extra_table
    n_pages = sum(used) + spare_pages
    order = torch.randperm(n_pages).tolist()
    table = torch.full((len(lengths), p), -1, dtype=torch.int32)
    for b, u in enumerate(used):
        table[b, :u] = torch.tensor([order.pop() for _ in range(u)], dtype=torch.int32)
    pages = []
    for dim in (d, d):
        t = torch.full((n_pages, page_size, hkv, dim), float("nan"), dtype=dtype)
        for b, n in enumerate(lengths):
            for j in range(n):
                t[table[b, j // page_size], j % page_size] = torch.randn(hkv, dim).to(dtype)
        pages.append(t.to(device))
    return pages[0], pages[1], table.to(device)


def contiguous_of(pages, table, lengths):
    """The logical (B, Hkv, P * page_size, D) cache of paged storage, NaN beyond each prefix."""
    c = gather_pages(pages, table).contiguous()
    for b, n in enumerate(lengths):
        c[b, :, n:] = float("nan")
    return c


def run_paged_and_contiguous(q, lengths, lnew, page_size, dtype, num_splits, backend="triton", **kw):
    """The paged call vs the float64 oracle (error rule), and its page writes bit for bit equal
    to the contiguous call's slot writes, every other page row unchanged."""
    device = q.device
    b, hkv, d = q.shape[0], None, q.shape[-1]
    hkv = 2 if q.shape[1] % 2 == 0 else 1
    kp, vp, table = make_paged(hkv, d, lengths, lnew, page_size, dtype, device)
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    k_new = v_new = None
    if lnew:
        k_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
        v_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    as64 = (lambda t: None if t is None else t.double())
    oracle, oracle_lse = decode_reference(q.double(), kc.double(), vc.double(), seqlens, as64(k_new), as64(v_new),
                                          return_lse=True, **kw)
    base, base_lse = decode_reference(q, kc, vc, seqlens, k_new, v_new, return_lse=True, **kw)
    kp_before, vp_before = kp.clone(), vp.clone()
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention_with_kvcache(q, kp, vp, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                                   num_splits=num_splits, return_lse=True, **kw)
        # only its cache writes are compared: one split spares the merge of an unused output
        fastattn.attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, num_splits=1, **kw)
    assert out.shape == oracle.shape and out.dtype == q.dtype
    assert torch.isfinite(oracle).all() and torch.isfinite(out).all()  # (the rule passes NaN == NaN)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)
    assert seqlens.tolist() == list(lengths)
    want_k, want_v = kp_before, vp_before
    if lnew:  # the contiguous call's writes (rotated keys included), into the same page rows
        k_written = torch.stack([kc[i, :, n:n + lnew] for i, n in enumerate(lengths)])
        v_written = torch.stack([vc[i, :, n:n + lnew] for i, n in enumerate(lengths)])
        append_paged_reference(want_k, want_v, table, seqlens, k_written, v_written)
    assert torch.equal(bits(kp), bits(want_k)), "k pages differ from old contents + the contiguous writes"
    assert torch.equal(bits(vp), bits(want_v)), "v pages differ from old contents + the contiguous writes"
    return out


# name -> (B, Hq, Lq = Lnew, D, lengths, page_size, num_splits): page sizes 16/32/64, ragged
# lengths that end mid-page, an empty sequence, several new tokens crossing a page boundary,
# more splits than pages, no new tokens.
CASES = {
    "p16-1tok-split3": (3, 4, 1, 32, [0, 15, 70], 16, 3),
    "p32-4tok-cross-split2": (2, 8, 4, 16, [30, 61], 32, 2),
    "p64-2tok-split1": (2, 2, 2, 64, [5, 100], 64, 1),
    "p16-nonew-split8": (2, 4, 0, 32, [16, 47], 16, 8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_kernel_matches_contiguous(case, dtype, device):
    b, hq, lnew, d, lengths, page, splits = CASES[case]
    q = torch.randn(b, hq, max(lnew, 1), d, device=device).to(dtype)
    run_paged_and_contiguous(q, lengths, lnew, page, dtype, splits)


# name -> (lengths, page_size): pages that are not a power of two (the kernels' key tiles may
# straddle pages: 1 and 24 do in the interpreter's 16-key tiles, 48 and 528 do on a GPU's 64),
# with 3 new tokens crossing a page boundary, an empty sequence and one that ends mid-page.
ANY_PAGE = {"p1": ([0, 37], 1), "p24": ([23, 50], 24), "p48": ([46, 0], 48), "p528": ([527, 40], 528)}


@pytest.mark.parametrize("case", list(ANY_PAGE))
def test_any_page_size_matches_contiguous(case, device):
    """Any page size, on the kernels: the float64 oracle by the error rule, page writes bit for
    bit the contiguous call's; GQA 2, 3 new tokens, 3 splits."""
    lengths, page = ANY_PAGE[case]
    q = torch.randn(2, 4, 3, 32, device=device).to(torch.float16)
    run_paged_and_contiguous(q, lengths, 3, page, torch.float16, 3)


@pytest.mark.parametrize("page", [1, 48])
def test_any_page_size_ragged_and_fallback(page, device):
    """Ragged new tokens (a decode and a 9-token chunk) on pages of 1 and 48 tokens: kernels and
    the torch fallback give the per-sequence oracle (error rule) and the same cache writes."""
    hq, hkv, d = 4, 2, 16
    lengths, counts = [47, 5], [1, 9]
    cu = torch.tensor([0, 1, 10], dtype=torch.int32, device=device)
    kp, vp, table = make_paged(hkv, d, lengths, 9, page, torch.float32, device)
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    q, kn, vn = (torch.randn(10, h, d, device=device) for h in (hq, hkv, hkv))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    oracle, _ = ragged_oracle(q.double(), kc.double(), vc.double(), seqlens, cu, kn.double(), vn.double(), {})
    base, _ = ragged_oracle(q, kc, vc, seqlens, cu, kn, vn, {})
    pages = []
    for backend in ("triton", "torch"):
        k2, v2 = kp.clone(), vp.clone()
        with fastattn.use_backend(backend):
            out = fastattn.attention_with_kvcache(q, k2, v2, seqlens, k_new=kn, v_new=vn, cu_seqlens_q=cu,
                                                  block_table=table, num_splits=2)
        assert_close_rule(f"out ({backend})", out, oracle, base)
        pages.append((k2, v2))
    assert torch.equal(bits(pages[0][0]), bits(pages[1][0])) and torch.equal(bits(pages[0][1]), bits(pages[1][1]))


FEATURES = ["window-left", "window-both-noncausal", "noncausal", "alibi", "alibi-per-batch", "softcap",
            "everything", "rotary-neox", "rotary-gptj"]


def _feature(name, b, hq, device, d=32):
    if name.startswith("rotary"):
        cos, sin = rope_tables(200, min(24, d), device)
        return dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=name == "rotary-gptj")
    return _features(b, hq, device)[name]


# Every feature on 16-token pages (one interpreter key tile a page), and everything at once on
# 32-token pages (two tiles a page).
FEATURE_CASES = [(f, 16) for f in FEATURES] + [("everything", 32)]


@pytest.mark.parametrize("feature,page", FEATURE_CASES, ids=[f"{f}-p{p}" for f, p in FEATURE_CASES])
def test_paged_kernel_features(feature, page, device):
    """Every feature of the contiguous path, on pages: a left window that starts mid-tile,
    a right window, ALiBi, softcap, rotary inside the kernels; GQA 2, 3 new tokens, 3 splits."""
    b, hq, lnew, d, lengths = 2, 4, 3, 32, [21, 90]
    q = torch.randn(b, hq, lnew, d, device=device).to(torch.float16)
    run_paged_and_contiguous(q, lengths, lnew, page, torch.float16, 3, **_feature(feature, b, hq, device))


@pytest.mark.parametrize("feature", ["plain", "window-left", "alibi", "rotary-neox"])
@pytest.mark.parametrize("backend", ["torch", "auto-sdpa"])
def test_paged_fallbacks(backend, feature, device, monkeypatch):
    """Without kernels: the reference (use_backend("torch"), differentiable, with lse) and the
    auto path's fused-SDPA fallback (no kernels, no lse) give the same pages and outputs."""
    b, hq, lnew, d, lengths = 3, 4, 2, 16, [0, 17, 33]
    kw = {} if feature == "plain" else _feature(feature, b, hq, "cpu", d)
    q = torch.randn(b, hq, lnew, d)
    if backend == "auto-sdpa":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        kp, vp, table = make_paged(2, d, lengths, lnew, 16, torch.float32, "cpu")
        kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
        k_new, v_new = torch.randn(b, 2, lnew, d), torch.randn(b, 2, lnew, d)
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        oracle = decode_reference(q.double(), kc.double(), vc.double(), seqlens, k_new.double(), v_new.double(), **kw)
        base = decode_reference(q, kc, vc, seqlens, k_new, v_new, **kw)
        before = kp.clone(), vp.clone()
        with torch.no_grad():
            out = fastattn.attention_with_kvcache(q, kp, vp, seqlens, k_new=k_new, v_new=v_new, block_table=table, **kw)
            fastattn.attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, **kw)
        assert_close_rule("out", out, oracle, base)
        want_k, want_v = before
        append_paged_reference(want_k, want_v, table, seqlens,
                               torch.stack([kc[i, :, n:n + lnew] for i, n in enumerate(lengths)]),
                               torch.stack([vc[i, :, n:n + lnew] for i, n in enumerate(lengths)]))
        assert torch.equal(bits(kp), bits(want_k)) and torch.equal(bits(vp), bits(want_v))
    else:
        run_paged_and_contiguous(q, lengths, lnew, 16, torch.float32, None, backend="torch", **kw)


def test_paged_reference_is_differentiable(device):
    """A call that needs gradients runs the reference on the gathered pages: its gradients
    equal those of the same call on the contiguous cache."""
    b, hq, lnew, d, lengths = 2, 2, 2, 16, [5, 20]
    kp, vp, table = make_paged(2, d, lengths, lnew, 16, torch.float32, device)
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(b, hq, lnew, d, device=device, requires_grad=True)
    k_new = torch.randn(b, 2, lnew, d, device=device, requires_grad=True)
    v_new = torch.randn(b, 2, lnew, d, device=device, requires_grad=True)
    grads = []
    for kk, vv, bt in ((kp, vp, table), (kc, vc, None)):
        out = fastattn.attention_with_kvcache(q, kk, vv, seqlens, k_new=k_new, v_new=v_new, block_table=bt)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k_new, v_new)))
    for g_paged, g_contig in zip(*grads):
        assert max_err(g_paged, g_contig) < 1e-5


def test_paged_torch_compile_fullgraph(device):
    """The paged kernels (mutating append + attention) compile without graph breaks; the
    split count comes from the shapes."""
    b, hq, d, lengths = 2, 4, 32, [3, 40]
    kp, vp, table = make_paged(2, d, lengths, 1, 16, torch.float32, device)
    kp2, vp2 = kp.clone(), vp.clone()
    sl = torch.tensor(lengths, dtype=torch.int32, device=device)

    def step(q, k_new, v_new, kp, vp, sl, table):
        return fastattn.attention_with_kvcache(q, kp, vp, sl, k_new=k_new, v_new=v_new, block_table=table) * 2

    q = torch.randn(b, hq, 1, d, device=device)
    kn, vn = torch.randn(b, 2, 1, d, device=device), torch.randn(b, 2, 1, d, device=device)
    with fastattn.use_backend("triton"):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kn, vn, kp, vp, sl, table)
        want = step(q, kn, vn, kp2, vp2, sl, table)
    assert max_err(got, want) < 1e-6
    assert torch.equal(bits(kp), bits(kp2)) and torch.equal(bits(vp), bits(vp2))


def test_paged_compiled_fallback_has_no_graph_break():
    """Under torch.compile without kernels (use_backend("torch")) the masked fallback runs on
    the gathered pages and the paged append is a scatter: one graph, the same answer."""
    b, hq, d, lengths = 2, 4, 16, [3, 20]
    kp, vp, table = make_paged(2, d, lengths, 1, 16, torch.float32, "cpu")
    kp2, vp2 = kp.clone(), vp.clone()
    sl = torch.tensor(lengths, dtype=torch.int32)
    q, kn, vn = torch.randn(b, hq, 1, d), torch.randn(b, 2, 1, d), torch.randn(b, 2, 1, d)

    def step(q, k_new, v_new, kp, vp, sl, table):
        return fastattn.attention_with_kvcache(q, kp, vp, sl, k_new=k_new, v_new=v_new, block_table=table)

    with fastattn.use_backend("torch"), torch.no_grad():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kn, vn, kp, vp, sl, table)
        want = step(q, kn, vn, kp2, vp2, sl, table)
    assert max_err(got, want) < 1e-5
    assert torch.equal(bits(kp), bits(kp2)) and torch.equal(bits(vp), bits(vp2))


# --- validation --------------------------------------------------------------------------

def _paged_small(page=16, lengths=(3, 20), lnew=1, p=2):
    b, hq, hkv, d = len(lengths), 4, 2, 16
    q = torch.randn(b, hq, lnew, d)
    kp, vp = torch.zeros(6, page, hkv, d), torch.zeros(6, page, hkv, d)
    table = torch.arange(b * p, dtype=torch.int32).view(b, p)  # (B, P)
    kn, vn = torch.randn(b, hkv, lnew, d), torch.randn(b, hkv, lnew, d)
    return q, kp, vp, torch.tensor(lengths, dtype=torch.int32), kn, vn, table


@pytest.mark.parametrize("bad,match", [
    ("page-empty", ">= 1"), ("table-int64", "int32"),
    ("table-rank", "int32"), ("table-batch", "block_table"), ("table-negative", r"block_table\[1, 1\]"),
    ("table-too-big", "not a page index"), ("shared-write", "same page row"), ("overflow", "overflow"),
    ("pages-differ", "agree"), ("heads", "multiple"),
])
def test_paged_bad_input_raises_value_error(bad, match):
    q, kp, vp, sl, kn, vn, table = _paged_small()
    if bad == "page-empty":
        kp, vp = torch.zeros(6, 0, 2, 16), torch.zeros(6, 0, 2, 16)
    elif bad == "table-int64":
        table = table.long()
    elif bad == "table-rank":
        table = table.flatten()
    elif bad == "table-batch":
        table = table[:1]
    elif bad == "table-negative":
        table[1, 1] = -1  # sequence 1 holds 20 + 1 tokens: it uses both of its pages
    elif bad == "table-too-big":
        table[0, 0] = 6
    elif bad == "shared-write":
        table[1, 0] = table[0, 0]
        sl = torch.tensor([3, 3], dtype=torch.int32)
    elif bad == "overflow":
        sl = torch.tensor([3, 32], dtype=torch.int32)  # 2 pages of 16: 32 + 1 does not fit
    elif bad == "pages-differ":
        vp = vp[:5]
    elif bad == "heads":
        q = torch.randn(2, 3, 1, 16)
    before = kp.clone()
    with pytest.raises(ValueError, match=match):
        fastattn.attention_with_kvcache(q, kp, vp, sl, k_new=kn, v_new=vn, block_table=table)
    assert torch.equal(kp, before), "a refused call must not write"


def test_unused_table_entries_are_never_read(device):
    """Entries past a sequence's last page may hold anything (here -1 and a huge index):
    the call neither raises nor reads them."""
    q, kp, vp, sl, kn, vn, table = _paged_small(lengths=(3, 5), p=3)
    table[:, 1:] = torch.tensor([[-1, 10 ** 6], [-7, -1]], dtype=torch.int32)
    q, kp, vp, sl, kn, vn, table = (t.to(device) for t in (q, kp, vp, sl, kn, vn, table))
    with fastattn.use_backend("triton"):
        out = fastattn.attention_with_kvcache(q, kp, vp, sl, k_new=kn, v_new=vn, block_table=table)
    assert torch.isfinite(out).all()


# --- ragged new tokens (cu_seqlens_q) ----------------------------------------------------

def ragged_oracle(q, kc, vc, seqlens, cu, k_new, v_new, kw):
    """Per-sequence decode_reference of packed inputs (total, H, D) -> (out (total, Hq, Dv),
    lse (Hq, total)); kw's per-batch ALiBi slopes are sliced per sequence."""
    outs, lses = [], []
    bounds = cu.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        def one(t):  # (total, H, D) -> (1, H, L_b, D)
            return None if t is None else t[s:e].transpose(0, 1)[None]
        kwi = dict(kw)
        if kwi.get("alibi_slopes") is not None and kwi["alibi_slopes"].dim() == 2:
            kwi["alibi_slopes"] = kwi["alibi_slopes"][i:i + 1]
        out, lse = decode_reference(one(q), kc[i:i + 1], vc[i:i + 1], seqlens[i:i + 1], one(k_new), one(v_new),
                                    return_lse=True, **kwi)
        outs.append(out[0].transpose(0, 1))  # (L_b, Hq, Dv)
        lses.append(lse[0])  # (Hq, L_b)
    return torch.cat(outs), torch.cat(lses, dim=1)


RAGGED_FEATURES = ["plain", "window-left", "alibi-per-batch", "softcap", "rotary-neox", "noncausal"]


# Every feature on pages with appends; the contiguous layout and "no k_new" on a few.
RAGGED_CASES = [(f, "paged", "append") for f in RAGGED_FEATURES] + [
    ("plain", "contiguous", "append"), ("rotary-neox", "contiguous", "append"),
    ("alibi-per-batch", "contiguous", "append"), ("plain", "paged", "cached"), ("window-left", "contiguous", "cached")]


@pytest.mark.parametrize("feature,layout,new_keys", RAGGED_CASES, ids=["-".join(c) for c in RAGGED_CASES])
def test_ragged_kernel_equals_per_sequence(feature, layout, new_keys, device):
    """One batch mixing decoding (1 token), chunked prefill (an 11-token chunk after 40 cached,
    across a page boundary; a first chunk of 5 into an empty cache) and a sequence with no
    token this step: the kernels vs per-sequence float64 calls (error rule), the caches bit for
    bit as a per-sequence kernel call leaves them. ``cached``: no k_new, the keys are already
    there."""
    hq, hkv, d, page = 4, 2, 32, 16
    lengths, counts = [30, 40, 0, 12], [1, 11, 5, 0]
    dtype = torch.float16
    b = len(lengths)
    cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = sum(counts)
    append = new_keys == "append"
    if not append:  # the tokens' keys are in the cache already: they count in the lengths
        lengths = [n + c for n, c in zip(lengths, counts)]
    kw = {} if feature == "plain" else _feature(feature, b, hq, device)
    kp, vp, table = make_paged(hkv, d, lengths, max(counts) if append else 0, page, dtype, device)
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    q = torch.randn(total, hq, d, device=device).to(dtype)
    k_new = v_new = None
    if append:
        k_new = torch.randn(total, hkv, d, device=device).to(dtype)
        v_new = torch.randn(total, hkv, d, device=device).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    as64 = (lambda t: None if t is None else t.double())
    oracle, oracle_lse = ragged_oracle(q.double(), kc.double(), vc.double(), seqlens, cu, as64(k_new), as64(v_new), kw)
    base, base_lse = ragged_oracle(q, kc, vc, seqlens, cu, k_new, v_new, kw)
    paged = layout == "paged"
    kk, vv = (kp, vp) if paged else (kc.clone(), vc.clone())
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_with_kvcache(
            q, kk, vv, seqlens, k_new=k_new, v_new=v_new, cu_seqlens_q=cu, max_seqlen_q=11 if paged else None,
            block_table=table if paged else None, num_splits=2, return_lse=True, **kw)
        # The caches as per-sequence kernel calls leave them (one split: only their writes count).
        want_k, want_v = kc.clone(), vc.clone()
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            if append and e > s:
                kwi = {n: a for n, a in kw.items() if n.startswith("rotary")}
                fastattn.attention_with_kvcache(q[s:e].transpose(0, 1)[None], want_k[i:i + 1], want_v[i:i + 1],
                                                seqlens[i:i + 1], k_new=k_new[s:e].transpose(0, 1)[None],
                                                v_new=v_new[s:e].transpose(0, 1)[None], num_splits=1, **kwi)
    assert out.shape == (total, hq, d) and lse.shape == (hq, total)
    assert torch.isfinite(oracle).all() and torch.isfinite(out).all()  # (the rule passes NaN == NaN)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)
    got_k, got_v = (contiguous_of(kp, table, [n + c for n, c in zip(lengths, counts)] if append else lengths),
                    contiguous_of(vp, table, [n + c for n, c in zip(lengths, counts)] if append else lengths)) \
        if paged else (kk, vv)
    ends = [n + c for n, c in zip(lengths, counts)] if append else lengths
    for i, n in enumerate(ends):
        assert torch.equal(bits(got_k[i, :, :n]), bits(want_k[i, :, :n])), f"k cache of sequence {i}"
        assert torch.equal(bits(got_v[i, :, :n]), bits(want_v[i, :, :n])), f"v cache of sequence {i}"
    if not paged:  # beyond each sequence's keys nothing was written (NaN stays NaN)
        for i, n in enumerate(ends):
            assert torch.isnan(kk[i, :, n:]).all() and torch.isnan(vv[i, :, n:]).all()


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_ragged_fallback_equals_kernel(layout, device):
    """use_backend("torch") runs one call per sequence: same output, same cache writes."""
    hq, hkv, d = 4, 2, 16
    lengths, counts = [3, 0, 20], [2, 5, 1]
    cu = torch.tensor([0, 2, 7, 8], dtype=torch.int32, device=device)
    kp, vp, table = make_paged(hkv, d, lengths, 5, 16, torch.float32, device)
    if layout == "contiguous":
        kp, vp, table = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths), None
    q, kn, vn = (torch.randn(8, h, d, device=device) for h in (hq, hkv, hkv))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    results = []
    for backend in ("torch", "triton"):
        k2, v2 = kp.clone(), vp.clone()
        with fastattn.use_backend(backend):
            out, lse = fastattn.attention_with_kvcache(q, k2, v2, seqlens, k_new=kn, v_new=vn, cu_seqlens_q=cu,
                                                       block_table=table, return_lse=True)
        results.append((out, lse, k2, v2))
    (o1, l1, k1, v1), (o2, l2, k2, v2) = results
    assert max_err(o1, o2) < 1e-5 and max_err(l1, l2) < 1e-5
    assert torch.equal(bits(k1), bits(k2)) and torch.equal(bits(v1), bits(v2))


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_ragged_cpu_step_is_one_fused_sdpa_call(layout, monkeypatch):
    """Without kernels, ragged new tokens (a decode, a 5-token chunk into an empty cache, a
    sequence with none, a chunk across a page boundary) run as one fused SDPA call for the whole
    batch: the per-sequence float64 oracle by the error rule, the caches bit for bit as the
    reference's appends leave them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hq, hkv, d = 4, 2, 16
    lengths, counts = [3, 0, 20, 9], [1, 5, 0, 9]
    cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    kp, vp, table = make_paged(hkv, d, lengths, max(counts), 16, torch.float32, "cpu")
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    q, kn, vn = (torch.randn(sum(counts), h, d) for h in (hq, hkv, hkv))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    oracle, _ = ragged_oracle(q.double(), kc.double(), vc.double(), seqlens, cu, kn.double(), vn.double(), {})
    base, _ = ragged_oracle(q, kc, vc, seqlens, cu, kn, vn, {})
    want_k, want_v = kc.clone(), vc.clone()
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        append_reference(want_k[i:i + 1], want_v[i:i + 1], seqlens[i:i + 1], kn[s:e].transpose(0, 1)[None],
                         vn[s:e].transpose(0, 1)[None])
    kk, vv, tt = (kp, vp, table) if layout == "paged" else (kc, vc, None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fastattn.attention_with_kvcache(q, kk, vv, seqlens, k_new=kn, v_new=vn, cu_seqlens_q=cu, block_table=tt)
    calls = [e.name for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert len(calls) == 1, calls
    assert_close_rule("out", out, oracle, base)
    ends = [n + c for n, c in zip(lengths, counts)]
    got_k, got_v = (contiguous_of(kp, table, ends), contiguous_of(vp, table, ends)) if tt is not None else (kk, vv)
    for i, n in enumerate(ends):
        assert torch.equal(bits(got_k[i, :, :n]), bits(want_k[i, :, :n])), f"k cache of sequence {i}"
        assert torch.equal(bits(got_v[i, :, :n]), bits(want_v[i, :, :n])), f"v cache of sequence {i}"


@pytest.mark.parametrize("bad,match", [
    ("cu-int64", "int32"), ("cu-not-zero", "start at 0"), ("cu-decreasing", "never decrease"),
    ("cu-total", "packed total"), ("q-4d", "3-D"), ("knew-total", "same packed tokens"),
    ("max-below", "max_seqlen_q"), ("cu-batch", "batch sizes differ"),
])
def test_ragged_bad_input_raises_value_error(bad, match):
    hq, hkv, d = 4, 2, 16
    q, kn, vn = (torch.randn(6, h, d) for h in (hq, hkv, hkv))
    kc, vc = torch.zeros(2, hkv, 32, d), torch.zeros(2, hkv, 32, d)
    cu, sl, kw = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([1, 4], dtype=torch.int32), {}
    if bad == "cu-int64":
        cu = cu.long()
    elif bad == "cu-not-zero":
        cu = torch.tensor([1, 2, 6], dtype=torch.int32)
    elif bad == "cu-decreasing":
        cu = torch.tensor([0, 4, 3, 6], dtype=torch.int32)
        sl = torch.tensor([1, 4, 0], dtype=torch.int32)
        kc, vc = torch.zeros(3, hkv, 32, d), torch.zeros(3, hkv, 32, d)
    elif bad == "cu-total":
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    elif bad == "q-4d":
        q = q[None]
    elif bad == "knew-total":
        kn = kn[:5]
    elif bad == "max-below":
        kw = dict(max_seqlen_q=3)
    elif bad == "cu-batch":
        cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn, cu_seqlens_q=cu, **kw)


# --- no host sync per step ---------------------------------------------------------------

def _step_inputs(device, ragged=False):
    hq, hkv, d, lengths = 4, 2, 32, [9, 40, 0]
    kp, vp, table = make_paged(hkv, d, lengths, 3, 16, torch.float16, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if ragged:
        cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32, device=device)
        q, kn, vn = (torch.randn(6, h, d, device=device).half() for h in (hq, hkv, hkv))
        return q, kp, vp, seqlens, kn, vn, table, dict(cu_seqlens_q=cu, max_seqlen_q=3)
    q, kn, vn = (torch.randn(3, h, 1, d, device=device).half() for h in (hq, hkv, hkv))
    return q, kp, vp, seqlens, kn, vn, table, {}


@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
def test_kernel_step_reads_no_value_on_the_host(ragged, device, monkeypatch):
    """Where the values are not read for validation (CUDA), a paged decode step through the
    kernels never asks the device for a value: .item(), .tolist() and bool() of a tensor
    raise here, and the step still runs (split count from shapes)."""
    from fastattn import validation

    q, kp, vp, seqlens, kn, vn, table, kw = _step_inputs(device, ragged)
    monkeypatch.setattr(validation, "values_readable", lambda q: False)

    def sync(*args, **kwargs):
        raise AssertionError("a decode step read a tensor value on the host")

    with fastattn.use_backend("triton"):
        want = fastattn.attention_with_kvcache(q, kp.clone(), vp.clone(), seqlens, k_new=kn, v_new=vn,
                                               block_table=table, **kw)
        for name in ("item", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        got = fastattn.attention_with_kvcache(q, kp, vp, seqlens, k_new=kn, v_new=vn, block_table=table, **kw)
    monkeypatch.undo()
    assert torch.equal(bits(got), bits(want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("ragged", [False, True], ids=["decode", "ragged"])
def test_cuda_graph_capture_and_replay(ragged, device):
    """A paged decode step (append + attention) captured in a CUDA graph and replayed with new
    inputs and lengths written into the same buffers equals the eager step."""
    q, kp, vp, seqlens, kn, vn, table, kw = _step_inputs(device, ragged)
    torch.cuda.set_sync_debug_mode("error")  # any device sync in the step raises
    try:
        with fastattn.use_backend("triton"):
            step = lambda: fastattn.attention_with_kvcache(q, kp, vp, seqlens, k_new=kn, v_new=vn,  # noqa: E731
                                                           block_table=table, **kw)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm up (compiles the kernels) outside the capture
                step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            for _ in range(2):  # replay: new tokens, lengths advanced in place
                kp_ref, vp_ref = kp.clone(), vp.clone()
                q.copy_(torch.randn_like(q))
                kn.copy_(torch.randn_like(kn))
                vn.copy_(torch.randn_like(vn))
                graph.replay()
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(0)
                want = fastattn.attention_with_kvcache(q, kp_ref, vp_ref, seqlens, k_new=kn, v_new=vn,
                                                       block_table=table, **kw)
                torch.cuda.set_sync_debug_mode("error")
                assert torch.equal(out, want)
                assert torch.equal(bits(kp), bits(kp_ref)) and torch.equal(bits(vp), bits(vp_ref))
                seqlens.add_(0 if ragged else 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --- PagedKVCache ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,rope", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-rope"])
def test_paged_cache_decoding_equals_full_sequence(dtype, rope, device):
    """Prefill then one token at a time through PagedKVCache (kernels, pages of 16, a ragged
    pair of prompts, both decoding across a page boundary) gives the logits of the whole
    sequences run at once."""
    length, prompts = 19, [12, 14]
    model = TinyStack(device=device)
    x = torch.randn(2, length, 64, device=device)
    cos, sin = rope_tables(32, model.hd, device)
    rot = dict(rotary_cos=cos, rotary_sin=sin) if rope else {}

    def full_attend(i, q, k, v):
        if rope:
            pos = torch.arange(length, device=device).expand(q.shape[0], length)
            q, k = apply_rotary(q, cos, sin, pos), apply_rotary(k, cos, sin, pos)
        return attention_reference(q, k, v, causal=True)

    oracle, base = (model.forward(x.to(dt), full_attend) for dt in (torch.float64, dtype))
    cache = PagedKVCache(len(model.layers), model.hkv, model.hd, num_pages=8, page_size=16, dtype=dtype,
                         device=device)
    ids = [cache.add(), cache.add()]
    got = [[], []]
    attend = (lambda i, q, k, v: cache.attend(i, q, k, v, **rot))  # noqa: E731
    with fastattn.use_backend("triton"):
        for b, n in enumerate(prompts):  # prefill each prompt alone
            cache.set_batch([ids[b]])
            got[b].append(model.forward(x[b:b + 1, :n].to(dtype), attend))
        cache.set_batch(ids)
        for t in range(length - max(prompts)):  # then both together, one token per step, ragged lengths
            steps = [x[b:b + 1, n + t:n + t + 1] for b, n in enumerate(prompts)]
            out = model.forward(torch.cat(steps).to(dtype), attend)
            for b in range(2):
                got[b].append(out[b:b + 1])
    assert cache.used_pages() == sum(cache.pages_for(cache.length(i)) for i in ids) == 4
    for b, n in enumerate(prompts):
        end = length - max(prompts) + n
        assert_close_rule(f"logits of sequence {b}", torch.cat(got[b], dim=1), oracle[b:b + 1, :end],
                          base[b:b + 1, :end])


def test_paged_cache_pool_allocates_and_frees():
    cache = PagedKVCache(2, 1, 16, num_pages=4, page_size=16)
    a, b = cache.add(), cache.add()
    cache.set_batch([a, b])
    k = torch.randn(2, 1, 20, 16)
    cache.attend(0, torch.randn(2, 1, 20, 16), k, k)
    cache.attend(1, torch.randn(2, 1, 20, 16), k, k)
    assert cache.used_pages() == 4 and cache.free_pages() == 0 and cache.peak_pages == 4
    assert not cache.can_fit(a, 13) and cache.can_fit(a, 12)  # 20 + 12 = 32 fills its second page exactly
    with pytest.raises(ValueError, match="pages"):
        cache.attend(0, torch.randn(2, 1, 13, 16), *(torch.randn(2, 1, 13, 16),) * 2)
    with pytest.raises(ValueError, match="in the current batch"):
        cache.free(a)
    cache.set_batch([b])
    cache.free(a)
    assert cache.free_pages() == 2 and cache.add() not in (a, b)  # ids are never reused
    with pytest.raises(ValueError, match="no sequence"):
        cache.length(a)
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 1, 16, num_pages=2, page_size=0)


def test_paged_cache_fork_shares_a_prompt_and_copies_on_write(device):
    """Two forks of one 20-token prompt share its full page and copy the partly filled one on
    their first write; each continues exactly as an unshared sequence would, and the parent's
    tokens are unchanged."""
    hkv, d = 2, 16
    cache = PagedKVCache(1, hkv, d, num_pages=8, page_size=16, device=device)
    alone = PagedKVCache(1, hkv, d, num_pages=8, page_size=16, device=device)
    prompt = torch.randn(1, hkv, 20, d, device=device)
    parent = cache.add()
    cache.set_batch([parent])
    with fastattn.use_backend("triton"):
        cache.attend(0, torch.randn(1, 4, 20, d, device=device), prompt, prompt)
        parent_pages = cache.pages(parent)
        snapshot = [cache.keys(0)[p].clone() for p in parent_pages]
        kids = [cache.fork(parent), cache.fork(parent)]
        assert cache.used_pages() == 2  # forks copy nothing
        cache.set_batch(kids)
        singles = [alone.add(), alone.add()]
        alone.set_batch(singles)
        alone.attend(0, torch.randn(2, 4, 20, d, device=device), prompt.expand(2, -1, -1, -1).contiguous(),
                     prompt.expand(2, -1, -1, -1).contiguous())
        for _ in range(3):
            q = torch.randn(2, 4, 1, d, device=device)
            kn, vn = torch.randn(2, hkv, 1, d, device=device), torch.randn(2, hkv, 1, d, device=device)
            got, want = cache.attend(0, q, kn, vn), alone.attend(0, q, kn, vn)
            assert torch.equal(got, want)
    kid_pages = [cache.pages(k) for k in kids]
    assert kid_pages[0][0] == kid_pages[1][0] == parent_pages[0]  # the full page is still shared
    assert len({kid_pages[0][1], kid_pages[1][1], parent_pages[1]}) == 3  # the partly filled one was copied
    for p, before in zip(parent_pages, snapshot):
        assert torch.equal(cache.keys(0)[p], before)
    cache.set_batch([])
    for k in kids + [parent]:
        cache.free(k)
    assert cache.free_pages() == 8


def test_gpt_generate_with_a_paged_cache():
    """GPT.generate(paged=True) gives the tokens of the contiguous cache and of no cache."""
    from fastattn.models import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64,
                      positional="rope"))
    prompt = torch.randint(0, 32, (2, 5))
    with fastattn.use_backend("torch"):  # the plumbing; the kernels' paged path is tested above
        paged = m.generate(prompt, 14, paged=True)  # 19 tokens: two pages each
        assert torch.equal(paged, m.generate(prompt, 14))
        assert torch.equal(paged, m.generate(prompt, 14, use_cache=False))


def test_gpt_ragged_steps_mix_prefill_chunks_and_decoding(device):
    """Chunked prefill mixed with decoding through a PagedKVCache (pages of 3, so chunks
    straddle pages), one GPT call per step on the kernels: a prompt in two chunks, then its
    decode tokens beside another prompt's chunk, then both decoding, give the logits of each
    whole sequence run alone (error rule against float64)."""
    from fastattn.models import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64,
                      positional="rope", init_std=0.3)).to(device).eval()
    seqs = [torch.randint(0, 32, (9,), device=device), torch.randint(0, 32, (6,), device=device)]
    steps = [[4, 0], [3, 0], [1, 5], [1, 1]]  # new tokens of each sequence per step
    cache = PagedKVCache(2, 2, 8, num_pages=12, page_size=3, device=device)
    ids = [cache.add(), cache.add()]
    fed, got = [0, 0], [[], []]
    with torch.no_grad(), fastattn.use_backend("triton"):
        for counts in steps:
            run = [b for b in range(2) if counts[b]]
            cache.set_batch([ids[b] for b in run], [counts[b] for b in run])
            tokens = torch.cat([seqs[b][fed[b]:fed[b] + counts[b]] for b in run])[None]
            logits, _ = m(tokens, cache=cache, cu_seqlens=cache.cu_seqlens())
            for b, part in zip(run, logits[0].split([counts[b] for b in run])):
                got[b].append(part)
                fed[b] += counts[b]
    with torch.no_grad():
        whole = [(m(s[None])[0][0], m.double()(s[None])[0][0]) for s in seqs]
    assert fed == [9, 6] and [cache.length(i) for i in ids] == [9, 6]
    for b in range(2):
        assert_close_rule(f"logits of sequence {b}", torch.cat(got[b]), whole[b][1], whole[b][0])
    with pytest.raises(ValueError, match="new_tokens"):
        cache.set_batch(ids, [1])
    cache.set_batch(ids)
    with pytest.raises(ValueError, match="no ragged step"):
        cache.cu_seqlens()


# --- attention sinks ---------------------------------------------------------------------

def test_sink_reference_is_an_extra_key_with_no_value():
    """decode_reference(sinks=...) equals attention over one more key whose logit is the sink
    and whose value is 0 (an independent formulation), forward and gradients, float64."""
    b, hq, hkv, lq, d, lengths = 2, 4, 2, 3, 16, [5, 12]
    q = torch.randn(b, hq, lq, d, dtype=torch.float64, requires_grad=True)
    kc, vc = torch.randn(b, hkv, 16, d, dtype=torch.float64), torch.randn(b, hkv, 16, d, dtype=torch.float64)
    sinks = (2 * torch.randn(hq, dtype=torch.float64)).requires_grad_(True)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = decode_reference(q, kc, vc, seqlens, sinks=sinks, return_lse=True)
    want, want_lse = [], []
    for i, n in enumerate(lengths):
        k = torch.cat([kc[i:i + 1, :, :n].repeat_interleave(2, 1), torch.zeros(1, hq, 1, d, dtype=torch.float64)], 2)
        v = torch.cat([vc[i:i + 1, :, :n].repeat_interleave(2, 1), torch.zeros(1, hq, 1, d, dtype=torch.float64)], 2)
        keep = torch.ones(lq, n + 1, dtype=torch.bool).tril(n - lq)  # bottom-right causal over the real keys
        keep[:, n] = True  # the sink is seen by every query
        bias = torch.zeros(1, hq, lq, n + 1, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        bias[..., n] = sinks[:, None]  # the sink's logit (its key is 0, so it scores 0 before the bias)
        o, l = attention_reference(q[i:i + 1], k, v, attn_bias=bias, return_lse=True)
        want.append(o)
        want_lse.append(l)
    want, want_lse = torch.cat(want), torch.cat(want_lse)
    assert max_err(out, want) < 1e-12 and max_err(lse, want_lse) < 1e-12
    g = torch.autograd.grad((out.square().sum() + lse.sum()), (q, sinks))
    g2 = torch.autograd.grad((want.square().sum() + want_lse.sum()), (q, sinks))
    assert max_err(g[0], g2[0]) < 1e-10 and max_err(g[1], g2[1]) < 1e-10


@pytest.mark.parametrize("layout", ["contiguous", "paged", "ragged-paged"])
@pytest.mark.parametrize("splits", [1, 3])
def test_sinks_in_the_kernels(layout, splits, device):
    """The kernels' sinks (the first split starts from the sink) vs the float64 reference, with
    an empty sequence (out 0, lse = the sink) and large sinks (~2), fp16."""
    dtype, hq, hkv, d, lengths = torch.float16, 4, 2, 32, [0, 21, 70]
    sinks = (2 * torch.randn(hq, device=device)).float()
    b = len(lengths)
    kp, vp, table = make_paged(hkv, d, lengths, 0, 16, dtype, device)
    kc, vc = contiguous_of(kp, table, lengths), contiguous_of(vp, table, lengths)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if layout == "ragged-paged":
        cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32, device=device)  # 1, 3 and 2 queries
        q = torch.randn(6, hq, d, device=device).to(dtype)
        kw = dict(cu_seqlens_q=cu, block_table=table)
        oracle, oracle_lse = ragged_oracle(q.double(), kc.double(), vc.double(), seqlens, cu, None, None,
                                           dict(sinks=sinks.double(), causal=False))
        base, base_lse = ragged_oracle(q, kc, vc, seqlens, cu, None, None, dict(sinks=sinks, causal=False))
    else:
        q = torch.randn(b, hq, 1, d, device=device).to(dtype)
        kw = dict(block_table=table) if layout == "paged" else {}
        oracle, oracle_lse = decode_reference(q.double(), kc.double(), vc.double(), seqlens, sinks=sinks.double(),
                                              causal=False, return_lse=True)
        base, base_lse = decode_reference(q, kc, vc, seqlens, sinks=sinks, causal=False, return_lse=True)
    assert torch.isfinite(oracle).all()
    caches = (kp, vp) if "paged" in layout else (kc, vc)
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_with_kvcache(q, *caches, seqlens, sinks=sinks, causal=False,
                                                   num_splits=splits, return_lse=True, **kw)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)
    if layout != "ragged-paged":  # sequence 0 holds no key: only its sink
        assert torch.all(out[0] == 0) and torch.equal(lse[0, :, 0], sinks)


@pytest.mark.parametrize("lq", [1, 3])
def test_sinks_in_the_fallbacks(lq, monkeypatch):
    """Without kernels: the masked single-token path and the reference give the sinks' result;
    a call needing the sinks' gradient runs the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hq, hkv, d, lengths = 4, 2, 16, [0, 9, 30]
    kc, vc = torch.randn(3, hkv, 40, d), torch.randn(3, hkv, 40, d)
    q, kn, vn = torch.randn(3, hq, lq, d), torch.randn(3, hkv, lq, d), torch.randn(3, hkv, lq, d)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    sinks = 2 * torch.randn(hq)
    oracle = decode_reference(q.double(), kc.double(), vc.double(), seqlens, kn.double(), vn.double(),
                              sinks=sinks.double())
    base = decode_reference(q, kc, vc, seqlens, kn, vn, sinks=sinks)
    with torch.no_grad():
        out = fastattn.attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, k_new=kn, v_new=vn, sinks=sinks)
    assert_close_rule("out", out, oracle, base)
    sinks.requires_grad_(True)
    out = fastattn.attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, k_new=kn, v_new=vn, sinks=sinks)
    (g,) = torch.autograd.grad(out.sum(), sinks)
    assert torch.isfinite(g).all() and (g != 0).any()
    with pytest.raises(ValueError, match="sinks"):
        fastattn.attention_with_kvcache(q, kc, vc, seqlens, sinks=torch.zeros(3))


def test_opcheck_paged_ragged_sinks(device):
    """The custom ops' schemas and fake implementations hold with pages, packed tokens and sinks."""
    from fastattn.ops.decode import op as decode_op

    hq, hkv, d = 4, 2, 16
    kp, vp, table = make_paged(hkv, d, [3, 20], 4, 16, torch.float16, device)
    kp, vp = kp.nan_to_num(), vp.nan_to_num()
    sl = torch.tensor([3, 20], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
    q, kn, vn = (torch.randn(4, h, d, device=device).half() for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, device=device)
    torch.library.opcheck(decode_op.kvcache_append, (kp, vp, sl, kn, vn, None, None, table, cu), dict(max_seqlen_q=3))
    # one split: the fake implementation does not depend on the split count (spares the merge kernel)
    torch.library.opcheck(decode_op.decode_fwd, (q, kp, vp, sl, None, None, None, table, cu, sinks),
                          dict(scale=0.25, window_right=0, seqlen_new=1, num_splits=1, max_seqlen_q=3))


def test_ragged_rows_over_several_row_blocks(device):
    """A 19-token chunk next to a decoding sequence: with GQA 4 the chunk's 76 query rows take
    two row blocks (64 rows each at most), the decoding sequence's second block streams nothing."""
    hq, hkv, d, lengths = 4, 1, 16, [51, 45]  # the tokens' keys (1 and 19 of them) already cached
    kc, vc = (make_cache_nan(2, hkv, 64, d, lengths, device) for _ in range(2))
    cu = torch.tensor([0, 1, 20], dtype=torch.int32, device=device)
    q = torch.randn(20, hq, d, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    oracle, _ = ragged_oracle(q.double(), kc.double(), vc.double(), seqlens, cu, None, None, {})
    base, _ = ragged_oracle(q, kc, vc, seqlens, cu, None, None, {})
    with fastattn.use_backend("triton"):
        out = fastattn.attention_with_kvcache(q, kc, vc, seqlens, cu_seqlens_q=cu, max_seqlen_q=19, num_splits=2)
    assert torch.isfinite(oracle).all() and torch.isfinite(out).all()
    assert_close_rule("out", out, oracle, base)


def make_cache_nan(b, hkv, lmax, d, lengths, device):
    """(B, Hkv, Lmax, D) fp32: random below each length, NaN beyond."""
    c = torch.full((b, hkv, lmax, d), float("nan"), device=device)
    for i, n in enumerate(lengths):
        c[i, :, :n] = torch.randn(hkv, n, d, device=device)
    return c


def test_ragged_scratch_is_sized_by_the_packed_tokens(device, monkeypatch):
    """Without max_seqlen_q the launcher knows only the packed total: the split partials are
    kept per packed row (total x Hq x splits x Dv), not per sequence x total rows."""
    from fastattn.ops import _launch
    from fastattn.ops.decode import op as decode_op

    b, hq, hkv, d, splits = 4, 4, 2, 16, 2
    kc, vc = torch.randn(b, hkv, 32, d, device=device), torch.randn(b, hkv, 32, d, device=device)
    q = torch.randn(b, hq, d, device=device)  # one new token per sequence, packed
    cu = torch.arange(b + 1, dtype=torch.int32, device=device)
    sl = torch.tensor([3, 17, 0, 30], dtype=torch.int32, device=device)
    sizes, poisoned = [], _launch.empty

    def recorded(*shape, like, dtype=None):
        sizes.append(torch.Size(shape).numel())
        return poisoned(*shape, like=like, dtype=dtype)

    monkeypatch.setattr(_launch, "empty", recorded)
    out, lse = decode_op.decode_attn(q, kc, vc, sl, scale=0.25, window_right=0, num_splits=splits, cu_seqlens_q=cu)
    assert max(sizes) <= b * hq * splits * d, sizes
    want, want_lse = decode_op.decode_attn(q, kc, vc, sl, scale=0.25, window_right=0, num_splits=splits,
                                           cu_seqlens_q=cu, max_seqlen_q=1)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vllm_combined_cache_layout_by_strides(backend, device):
    """vLLM's cache: one tensor (num_blocks, 2, block_size, Hkv, D), K and V its ``unbind(1)``
    views (a page stride of 2 * block_size * Hkv * D). Keys written as vLLM's
    reshape_and_cache does (by slot = block * block_size + offset), then a step that appends
    one token per sequence: the per-sequence oracle by the error rule, and the new tokens land
    in the combined tensor itself (read and written by strides, no copy)."""
    hq, hkv, d, block = 4, 2, 16, 16
    lengths = [19, 0, 33]
    kv = torch.full((8, 2, block, hkv, d), float("nan"), device=device)
    k_cache, v_cache = kv.unbind(1)
    table = torch.tensor([[6, 2, 0], [5, -1, -1], [1, 7, 3]], dtype=torch.int32, device=device)
    keys = [torch.randn(n + 1, hkv, d, device=device) for n in lengths]  # the cached ones and the new one
    values = [torch.randn(n + 1, hkv, d, device=device) for n in lengths]
    for i, n in enumerate(lengths):  # reshape_and_cache: one row per token at its slot
        j = torch.arange(n, device=device)
        slots = table[i, j // block].long() * block + j % block
        k_cache[slots // block, slots % block] = keys[i][:n]
        v_cache[slots // block, slots % block] = values[i][:n]
    q = torch.randn(3, hq, 1, d, device=device)
    k_new = torch.stack([k[-1] for k in keys])[:, :, None]  # (B, Hkv, 1, D)
    v_new = torch.stack([v[-1] for v in values])[:, :, None]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                              block_table=table)
    oracle = torch.cat([attention_reference(q[i:i + 1].double(), keys[i].double().transpose(0, 1)[None],
                                            values[i].double().transpose(0, 1)[None], causal=True)
                        for i in range(3)])
    base = torch.cat([attention_reference(q[i:i + 1], keys[i].transpose(0, 1)[None], values[i].transpose(0, 1)[None],
                                          causal=True) for i in range(3)])
    assert_close_rule("out", out, oracle, base)
    for i, n in enumerate(lengths):  # the appended token, in the combined tensor
        page, row = int(table[i, n // block]), n % block
        assert torch.equal(kv[page, 0, row], keys[i][-1]) and torch.equal(kv[page, 1, row], values[i][-1])

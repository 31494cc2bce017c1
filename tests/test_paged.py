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
    append_paged_reference, decode_reference, gather_pages)
from helpers import assert_close_rule, max_err  # noqa: E402
from test_decode import _features, bits, rope_tables  # noqa: E402


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
        fastattn.attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, num_splits=num_splits, **kw)
    assert out.shape == oracle.shape and out.dtype == q.dtype
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


FEATURES = ["window-left", "window-both-noncausal", "noncausal", "alibi", "alibi-per-batch", "softcap",
            "everything", "rotary-neox", "rotary-gptj"]


def _feature(name, b, hq, device, d=32):
    if name.startswith("rotary"):
        cos, sin = rope_tables(200, min(24, d), device)
        return dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=name == "rotary-gptj")
    return _features(b, hq, device)[name]


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("feature", FEATURES)
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
    ("page-not-pow2", "power of two"), ("page-small", "power of two"), ("table-int64", "int32"),
    ("table-rank", "int32"), ("table-batch", "block_table"), ("table-negative", r"block_table\[1, 1\]"),
    ("table-too-big", "not a page index"), ("shared-write", "same page row"), ("overflow", "overflow"),
    ("pages-differ", "agree"), ("heads", "multiple"),
])
def test_paged_bad_input_raises_value_error(bad, match):
    q, kp, vp, sl, kn, vn, table = _paged_small()
    if bad == "page-not-pow2":
        kp, vp = torch.zeros(6, 24, 2, 16), torch.zeros(6, 24, 2, 16)
    elif bad == "page-small":
        kp, vp = torch.zeros(6, 8, 2, 16), torch.zeros(6, 8, 2, 16)
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

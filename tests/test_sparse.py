"""Block-sparse attention: layouts and patterns, the kernels and the blockwise torch fallback
against the float64 dense-masked reference (the docs/design.md rule), forward and backward.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py); kernel
calls go through ``use_backend("triton")`` so a silent fallback cannot pass.
"""
import pytest
import torch

import fastattn
from fastattn import sparse
from fastattn.ops.flash.reference import attention_reference
from fastattn.ops.sparse.reference import element_mask, sparse_attention_blocked, sparse_attention_reference
import helpers
from helpers import DTYPE_IDS, DTYPES, as64, assert_close_rule, check_op, pairwise, same_dtype_copy


def check(q, k, v, layout, *, causal, backend="triton", grad=True, return_lse=True):
    """check_op for sparse_attention on ``backend``: output, lse and dq/dk/dv vs the float64
    dense-masked reference. Returns (out, lse). ``return_lse=False`` checks the call without
    lse (the torch fallback then takes torch's fused SDPA per chunk) and returns (out, None)."""
    block_mask = layout.to_dense()

    def reference(q, k, v):
        out, lse = sparse_attention_reference(q, k, v, block_mask, layout.block_size, causal=causal, return_lse=True)
        return (out, lse) if return_lse else out

    got = check_op(lambda q, k, v: fastattn.sparse_attention(q, k, v, layout, causal=causal, return_lse=return_lse),
                   reference, dict(q=q, k=k, v=v), names=("out", "lse") if return_lse else ("out",),
                   backend=backend, grad=grad)
    if not return_lse:
        return got, None
    oracle_lse = reference(*(as64(t) for t in (q, k, v)))[1]
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(oracle_lse))
    return got


def qkv(dtype, device, *, hq=2, hkv=1, lq=150, lk=150, **kw):
    """helpers.qkv at these tests' defaults: GQA 2:1, seq 150, non-contiguous q and k."""
    return helpers.qkv(dtype, device, hq=hq, hkv=hkv, lq=lq, lk=lk, transposed=True, **kw)


# Every builder at seq 150 (a partial last block), with its head dim. bigbird is per head.
PATTERNS = {
    "local": (lambda c: sparse.local(150, 32, block_size=32, causal=c), 32),
    "strided": (lambda c: sparse.strided(150, 64, block_size=32, causal=c), 16),
    "fixed": (lambda c: sparse.fixed(150, 64, block_size=32, causal=c), 40),
    "longformer": (lambda c: sparse.longformer(150, 32, [100], block_size=32, causal=c), 64),
    "bigbird": (lambda c: sparse.bigbird(150, 32, 32, 1, block_size=32, causal=c, num_heads=2,
                                         seed=int(torch.randint(0, 1000, ()))), 32),
    "dilated": (lambda c: sparse.dilated(150, 96, 2, block_size=32, causal=c), 24),
}


# Every pair of pattern, causal and dtype.
PATTERN_CASES = pairwise(PATTERNS, [False, True], DTYPES)


@pytest.mark.parametrize("pattern,causal,dtype", PATTERN_CASES, ids=[
    f"{p}-{'causal' if c else 'full'}-{DTYPE_IDS[DTYPES.index(dt)]}" for p, c, dt in PATTERN_CASES])
def test_kernels_match_reference_for_every_pattern(pattern, causal, dtype, device):
    build, d = PATTERNS[pattern]
    layout = build(causal)
    q, k, v = qkv(dtype, device, d=d)  # GQA 2:1, non-contiguous q and k
    check(q, k, v, layout, causal=causal)


# Rectangular layouts from random per-head block masks: block sizes 16 (one tile per block)
# and 64 (2x2 interpreter tiles per block), Lq != Lk both ways (causal with Lq > Lk leaves
# query rows that see no key inside kept blocks), GQA 3:1. The torch fallback both ways:
# with lse (explicit softmax) and without (torch's SDPA per chunk).
@pytest.mark.parametrize("backend,return_lse", [("triton", True), ("torch", True), ("torch", False)],
                         ids=["triton", "torch-lse", "torch-sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block_size,lq,lk", [(16, 45, 97), (64, 130, 70)], ids=["bs16-q45-k97", "bs64-q130-k70"])
def test_random_per_head_layouts_and_rectangular_shapes(block_size, lq, lk, causal, backend, return_lse, device):
    nq, nk = -(-lq // block_size), -(-lk // block_size)
    mask = torch.rand(3, nq, nk) < 0.5
    layout = sparse.from_dense(mask, block_size, (lq, lk))
    q, k, v = qkv(torch.float16, device, hq=3, hkv=1, lq=lq, lk=lk, d=48, dv=24)
    check(q, k, v, layout, causal=causal, backend=backend, return_lse=return_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_blocks_layout_equals_flash_attention(causal, dtype, device):
    lq, lk = 70, 90
    layout = sparse.from_dense(torch.ones(3, 3, dtype=torch.bool), 32, (lq, lk))
    q, k, v = qkv(dtype, device, hq=4, hkv=2, lq=lq, lk=lk, d=64)
    out, lse = check(q, k, v, layout, causal=causal, grad=False)
    with fastattn.use_backend("triton"):
        flash, flash_lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    oracle, oracle_lse = attention_reference(*map(as64, (q, k, v)), causal=causal, return_lse=True)
    base = attention_reference(*map(same_dtype_copy, (q, k, v)), causal=causal)
    # Both are within the rule of the same dense oracle, and of each other.
    assert_close_rule("flash", flash, oracle, base)
    assert_close_rule("sparse-vs-flash", out, flash.double(), base - oracle.to(base.dtype) + flash)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(flash_lse))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_blocks_fallback_without_lse(causal, device):
    """The torch fallback sends a layout of all blocks (square when causal) to dense SDPA."""
    layout = sparse.from_dense(torch.ones(3, 3, dtype=torch.bool), 32, 80)
    q, k, v = qkv(torch.float32, device, hq=4, hkv=2, lq=80, lk=80, d=32)
    check(q, k, v, layout, causal=causal, backend="torch", return_lse=False)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_row_gives_zero_and_neg_inf_lse(dtype, backend, device):
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])  # row 1 empty
    layout = sparse.from_dense(mask, 32, (80, 70))
    q, k, v = qkv(dtype, device, hq=2, hkv=2, lq=80, lk=70)
    out, lse = check(q, k, v, layout, causal=False, backend=backend)
    assert torch.all(out[:, :, 32:64] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 32:64])) and torch.isfinite(lse[:, :, :32]).all()
    with fastattn.use_backend(backend):
        o = fastattn.sparse_attention(q, k, v, layout)
    dq, dk, dv = torch.autograd.grad(o.sum(), [q, k, v])
    assert torch.all(dq[:, :, 32:64] == 0) and torch.isfinite(dq).all()
    # Key block 1 is kept only by query block 2; no query block keeps ... every block is seen,
    # but a key block nobody keeps gets zero gradients:
    layout2 = sparse.from_dense(torch.tensor([[True, False, True]] * 3), 32, (80, 70))
    with fastattn.use_backend(backend):
        o2 = fastattn.sparse_attention(q, k, v, layout2)
    _, dk2, dv2 = torch.autograd.grad(o2.sum(), [q, k, v])
    assert torch.all(dk2[:, :, 32:64] == 0) and torch.all(dv2[:, :, 32:64] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", ["bigbird", "longformer"])
def test_torch_fallback_matches_reference(pattern, dtype, device):
    """The blockwise fallback (gathered kept blocks) against the dense float64 reference,
    with lse (explicit softmax) and without (torch's SDPA per chunk)."""
    for causal in (False, True):
        for return_lse in (True, False):
            layout = PATTERNS[pattern][0](causal)
            q, k, v = qkv(dtype, device, hq=2, hkv=1, d=32)
            check(q, k, v, layout, causal=causal, backend="torch", return_lse=return_lse)


def test_fallback_bucketing_many_widths_matches_reference(device):
    """Rows of many different widths take the power-of-two bucketing path of the fallback."""
    n, bs = 24, 16
    counts = torch.arange(n) % 13  # 13 distinct widths, including 0
    mask = torch.arange(n)[None, :] < counts[:, None]
    mask = mask[:, torch.randperm(n)]
    q, k, v = (as64(t) for t in qkv(torch.float32, device, hq=2, hkv=2, lq=n * bs - 5, lk=n * bs - 5, d=16))
    out, lse = sparse_attention_blocked(q, k, v, mask[None], bs, causal=False)
    ref, ref_lse = sparse_attention_reference(q, k, v, mask[None], bs, return_lse=True)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_torch_compile_fullgraph(device):
    layout = sparse.local(40, 16, block_size=16)

    def f(q, k, v):
        return fastattn.sparse_attention(q, k, v, layout, causal=True) * 2

    q, k, v = qkv(torch.float32, device, hq=2, hkv=1, lq=40, lk=40, d=16)
    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        want = f(q, k, v)
    assert torch.equal(got, want)
    got.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_opcheck(device):
    pytest.importorskip("triton")
    from fastattn.ops.sparse import op

    layout = sparse.from_dense(torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]]), 16, 20)
    q, k, v = qkv(torch.float16, device, hq=2, hkv=1, lq=20, lk=20, d=16)
    crow, col, ccol, row, _ = layout.device_tensors(q.device)
    args = (q, k, v, crow, col, ccol, row, 16, 0.25, True)
    torch.library.opcheck(op.sparse_fwd, args)
    with torch.no_grad():
        out, lse = op.sparse_fwd(*args)
    torch.library.opcheck(op.sparse_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                          crow, col, ccol, row, 16, 0.25, True))


# ---------------------------------------------------------------- layouts

def test_compressed_rows_and_transpose():
    mask = torch.tensor([[[True, False, True], [False, False, False]],
                         [[False, True, True], [True, False, False]]])
    layout = sparse.from_dense(mask, 16, (20, 40))
    assert layout.num_heads == 2 and (layout.num_q_blocks, layout.num_k_blocks) == (2, 3)
    assert layout.crow_indices.tolist() == [0, 2, 2, 4, 5]
    assert layout.col_indices.tolist() == [0, 2, 1, 2, 0]
    ccol, row = layout.transposed()
    assert ccol.tolist() == [0, 1, 1, 2, 3, 4, 5] and row.tolist() == [0, 0, 1, 0, 0]
    assert torch.equal(layout.to_dense(), mask)
    assert layout.density == 5 / 12 and layout.nnz == 5
    em = layout.to_element_mask()
    assert em.shape == (2, 20, 40) and torch.equal(em, element_mask(mask, 16, 20, 40))
    assert em[0, 15, 39] and not em[0, 15, 16] and not em[0, 19].any()


PATTERN_BUILDERS = {
    "local": lambda c: sparse.local(1000, 100, block_size=64, causal=c),
    "strided": lambda c: sparse.strided(1000, 256, block_size=64, causal=c),
    "fixed": lambda c: sparse.fixed(1000, 256, summary=128, block_size=64, causal=c),
    "longformer": lambda c: sparse.longformer(1000, 64, [5, 700], block_size=64, causal=c),
    "bigbird": lambda c: sparse.bigbird(1000, 64, 64, 2, block_size=64, causal=c, num_heads=3, seed=7),
    "dilated": lambda c: sparse.dilated(1000, 512, 3, block_size=64, causal=c),
}


@pytest.mark.parametrize("pattern", list(PATTERN_BUILDERS))
def test_patterns_keep_the_diagonal_and_causal_drops_the_future(pattern):
    full, causal = PATTERN_BUILDERS[pattern](False), PATTERN_BUILDERS[pattern](True)
    n = 16  # ceil(1000 / 64)
    assert full.seq_len == (1000, 1000) and full.num_q_blocks == n
    eye = torch.eye(n, dtype=torch.bool)
    assert torch.all(full.to_dense()[:, eye]) and torch.all(causal.to_dense()[:, eye])
    assert not causal.to_dense().triu(1).any()
    assert torch.equal(causal.to_dense(), full.to_dense().tril()) or pattern == "bigbird"
    assert 0 < causal.density < full.density < 1


def test_pattern_contents():
    lf = sparse.longformer(512, 64, [0, 300], block_size=64).to_dense()[0]
    assert lf[0].all() and lf[:, 0].all() and lf[4].all() and lf[:, 4].all()  # global both ways
    assert not lf[1, 3] and lf[1, 2]
    st = sparse.strided(512, 192, block_size=64).to_dense()[0]
    assert st[7].tolist() == [False, True, False, False, True, True, True, True]
    fx = sparse.fixed(512, 192, block_size=64).to_dense()[0]
    assert fx[0].tolist() == [True, True, True, False, False, True, False, True]
    dl = sparse.dilated(512, 256, 2, block_size=64).to_dense()[0]
    assert dl[3].tolist() == [False, True, False, True, False, True, False, True]
    lo = sparse.local(512, 65, block_size=64).to_dense()[0]  # 65 tokens -> 2 blocks each side
    assert lo[3].tolist() == [False, True, True, True, True, True, False, False]


def test_bigbird_is_seeded_and_differs_per_head():
    a = sparse.bigbird(2048, 64, 64, 3, block_size=64, num_heads=4, seed=1)
    b = sparse.bigbird(2048, 64, 64, 3, block_size=64, num_heads=4, seed=1)
    c = sparse.bigbird(2048, 64, 64, 3, block_size=64, num_heads=4, seed=2)
    assert a == b and a != c
    dense = a.to_dense()
    assert not all(torch.equal(dense[0], dense[h]) for h in range(1, 4))
    window_global = sparse.longformer(2048, 64, [0], block_size=64).to_dense()[0]
    extra = (dense & ~window_global).sum(-1)  # random blocks per query block
    assert torch.all(extra[:, 1:] == 3)  # row 0 is global (already full)


def test_union_stack_and_expand():
    a = sparse.local(256, 0, block_size=32)
    b = sparse.longformer(256, 0, [0], block_size=32)
    u = a | b
    assert torch.equal(u.to_dense(), a.to_dense() | b.to_dense())
    s = sparse.stack([a, b, u])
    assert s.num_heads == 3 and torch.equal(s.to_dense()[1], b.to_dense()[0])
    mixed = sparse.union(s, sparse.dilated(256, 128, 2, block_size=32))
    assert mixed.num_heads == 3
    assert torch.equal(a.expand_heads(3).to_dense(), a.to_dense().expand(3, -1, -1))
    assert torch.equal(sparse.local(256, 64, block_size=32).causal().to_dense(),
                       sparse.local(256, 64, block_size=32, causal=True).to_dense())


def test_flex_attention_block_mask_round_trip():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    layout = sparse.bigbird(300, 64, 64, 1, block_size=64, num_heads=2, seed=3)
    bm = layout.to_block_mask()
    assert isinstance(bm, flex.BlockMask) and bm.seq_lengths == (300, 300)
    assert torch.equal(bm.to_dense()[0].bool()[:, :5, :5], layout.to_dense())
    assert sparse.BlockSparseLayout.from_block_mask(bm) == layout
    # Block-aligned causal: every kept block is full, so the mask_mod is never needed inside one.
    causal = flex.create_block_mask(lambda b, h, q, k: q // 64 >= k // 64, None, None, 256, 256, device="cpu",
                                    BLOCK_SIZE=64)
    got = sparse.BlockSparseLayout.from_block_mask(causal)
    assert torch.equal(got.to_dense()[0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_from_block_mask_refuses_a_mask_mod_in_partial_blocks():
    """A layout keeps whole blocks: token-level causality inside the diagonal blocks would be lost."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def causal(b, h, q, k):
        return q >= k

    block_mask = flex.create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    with pytest.raises(ValueError, match="4 partial blocks whose mask_mod causal .*fastattn.flex_attention"):
        sparse.BlockSparseLayout.from_block_mask(block_mask)


BAD_LAYOUTS = {
    "block-not-pow2": (lambda: sparse.local(256, 32, block_size=24), "power of two"),
    "block-too-small": (lambda: sparse.from_dense(torch.ones(4, 4, dtype=torch.bool), 8), "power of two"),
    "mask-vs-seq-len": (lambda: sparse.from_dense(torch.ones(4, 4, dtype=torch.bool), 32, 200),
                        "200 tokens need 7 blocks, the mask has 4"),
    "mask-not-bool": (lambda: sparse.from_dense(torch.ones(4, 4), 32), "must be bool"),
    "mask-rank": (lambda: sparse.from_dense(torch.ones(4, dtype=torch.bool), 32), "num_q_blocks"),
    "crow-length": (lambda: sparse.BlockSparseLayout(torch.tensor([0, 1]), torch.tensor([0]), block_size=16,
                                                     seq_len=32), "crow_indices must have"),
    "crow-decreasing": (lambda: sparse.BlockSparseLayout(torch.tensor([0, 2, 1]), torch.tensor([0]),
                                                         block_size=16, seq_len=32), "never decrease"),
    "col-range": (lambda: sparse.BlockSparseLayout(torch.tensor([0, 1, 1]), torch.tensor([2]), block_size=16,
                                                   seq_len=32), "must lie in [0, 2)"),
    "col-unsorted": (lambda: sparse.BlockSparseLayout(torch.tensor([0, 2, 2]), torch.tensor([1, 0]),
                                                      block_size=16, seq_len=32), "strictly increasing"),
    "stride-multiple": (lambda: sparse.strided(256, 40, block_size=32), "multiple of block_size"),
    "window-negative": (lambda: sparse.local(256, -1, block_size=32), "window"),
    "global-range": (lambda: sparse.longformer(256, 32, [300], block_size=32), "global_tokens"),
    "union-mismatch": (lambda: sparse.local(256, 32, block_size=32) | sparse.local(128, 32, block_size=32),
                       "cannot combine"),
    "flex-batch": (lambda: sparse.BlockSparseLayout.from_block_mask(
        sparse.local(64, 16, block_size=16).to_block_mask().__class__.from_kv_blocks(
            torch.ones(2, 1, 4, dtype=torch.int32), torch.zeros(2, 1, 4, 4, dtype=torch.int32), BLOCK_SIZE=16)),
                   "batch size 2"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layouts_raise(case):
    make, message = BAD_LAYOUTS[case]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layout_must_fit_the_inputs(backend, device):
    q, k, v = qkv(torch.float32, device, hq=4, hkv=2, lq=64, lk=64, d=16)
    with fastattn.use_backend(backend):
        with pytest.raises(ValueError, match="layout has 2 heads but q has 4"):
            fastattn.sparse_attention(q, k, v, sparse.stack([sparse.local(64, 16, block_size=16)] * 2))
        with pytest.raises(ValueError, match=r"seq_len \(q_len, k_len\) = \(128, 128\) but q has Lq=64"):
            fastattn.sparse_attention(q, k, v, sparse.local(128, 16, block_size=16))
        with pytest.raises(ValueError, match="BlockSparseLayout"):
            fastattn.sparse_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="k.dtype"):
            fastattn.sparse_attention(q, k.half(), v, sparse.local(64, 16, block_size=16))


def test_triton_backend_refuses_float64(device):
    q, k, v = (as64(t) for t in qkv(torch.float32, device, lq=32, lk=32, d=16))
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="dtype torch.float64"):
        fastattn.sparse_attention(q, k, v, sparse.local(32, 16, block_size=16))
    with fastattn.use_backend("auto"):  # auto falls back to the torch path, float64 included
        out = fastattn.sparse_attention(q, k, v, sparse.local(32, 16, block_size=16))
    assert out.dtype == torch.float64

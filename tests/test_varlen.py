"""Packed variable-length sequences (``fastattn.flash_attention_varlen``) against the
per-sequence reference in float64, by the error rule; documents never see each other."""
import pytest
import torch

import fastattn
from fastattn.ops.flash.reference import attention_reference, band_from, varlen_attention_reference
from helpers import DTYPES, assert_close_rule, check_op, cu_seqlens, packed, pairwise

# lengths per sequence: (queries, keys); awkward mixes, a sequence with no keys, Lq != Lk
MIXES = {
    "equal": ([17, 63, 1, 113], [17, 63, 1, 113]),
    "lq<lk": ([1, 17, 5], [9, 40, 63]),
    "lq>lk-and-empty-keys": ([20, 3, 7], [5, 0, 7]),
}

# One long document: 1023 tokens on a GPU; in the interpreter 255, the same loop over key
# blocks with a partial last one, at about a tenth of the interpreter time (6 s of CPU, not 50).
LONG = 1023 if torch.cuda.is_available() else 255
LONG_MIX = ([LONG, 17, 1], [LONG, 63, 2])


FEATURES = {"plain": {}, "causal": dict(causal=True), "window": dict(window=(4, 2)), "softcap": dict(softcap=5.0),
            "alibi": dict(alibi_slopes="per-seq")}


def check_varlen(lq, lk, feature, dtype, device, max_seqlens=(None, None), backend="triton"):
    """The kernels (an explicit backend: no silent fallback) or the torch fallback against
    the per-sequence float64 reference by the error rule: output, lse and gradients."""
    q, k, v, cq, ck = packed(lq, lk, dtype, device)
    kw = dict(FEATURES[feature])
    if kw.get("alibi_slopes") == "per-seq":
        kw["alibi_slopes"] = torch.rand(len(lq), q.shape[1], device=device)
    ref_kw = {n: x for n, x in kw.items() if n not in ("causal", "window")}
    ref_kw["window"] = band_from(kw.get("causal", False), kw.get("window"))
    out, lse = check_op(lambda q, k, v: fastattn.flash_attention_varlen(q, k, v, cq, ck, *max_seqlens, **kw,
                                                                         return_lse=True),
                        lambda q, k, v: varlen_attention_reference(q, k, v, cq, ck, **ref_kw, return_lse=True),
                        dict(q=q, k=k, v=v), names=("out", "lse"), backend=backend)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and lse.shape == (q.shape[1], q.shape[0])


# Every pair of mix, feature and dtype.
KERNEL_CASES = pairwise(MIXES, FEATURES, DTYPES)


@pytest.mark.parametrize("mix,feature,dtype", KERNEL_CASES,
                         ids=[f"{m}-{f}-{str(d)[6:]}" for m, f, d in KERNEL_CASES])
def test_varlen_kernels_match_the_reference(mix, feature, dtype, device):
    check_varlen(*MIXES[mix], feature, dtype, device)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_varlen_torch_fallback_matches_the_reference(feature, device):
    check_varlen(*MIXES["lq>lk-and-empty-keys"], feature, torch.float32, device, backend="torch")


def test_varlen_kernels_on_a_long_sequence_with_given_max_seqlens(device):
    check_varlen(*LONG_MIX, "causal", torch.float16, device, max_seqlens=(LONG, LONG))


def test_max_seqlen_changes_nothing(device):
    """None and the true maxima give the same bits (the grid comes from shapes alone)."""
    lq, lk = MIXES["lq<lk"]
    q, k, v, cq, ck = packed(lq, lk, torch.float16, device)
    with fastattn.use_backend("triton"):
        a = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
        b = fastattn.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True)
    assert torch.equal(a, b) and a.is_contiguous()


def test_varlen_dropout_matches_the_reference_with_the_kernels_mask(device):
    """Sequence b draws, for its query rows of the packed (H, total_q) rows, the mask a padded
    (1, H, total_q, total_k) call draws there over its first Lk_b keys (its keys count from 0)
    (before: the padded (B, H, Lq_b, Lk_b) call's row b, whose counters overlapped between
    sequences of different lengths)."""
    from fastattn.ops.flash import op

    lq, lk, p = [9, 30, 4], [12, 30, 0], 0.3
    q, k, v, cq, ck = packed(lq, lk, torch.float32, device)
    torch.manual_seed(5)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True, dropout_p=p)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), device=device)  # the seed the call drew
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # One counter space for the packed query rows (H, total_q): no two sequences share a draw
    # (per-sequence spaces overlapped, and documents repeated each other's patterns).
    packed_keep = op.dropout_keep_mask(seed, 1, q.shape[1], q.shape[0], k.shape[0], p)
    for b in range(len(lq)):
        qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        keep = packed_keep[:, :, qs, :lk[b]]
        per_seq = [t.detach()[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks))]
        args64 = [t.double().requires_grad_() for t in per_seq]
        args32 = [t.clone().requires_grad_() for t in per_seq]
        ref = attention_reference(*args64, causal=True, dropout_p=p, dropout_mask=keep)
        base = attention_reference(*args32, causal=True, dropout_p=p, dropout_mask=keep)
        assert_close_rule(f"out[{b}]", out[qs], ref[0].transpose(0, 1), base[0].transpose(0, 1))
        do_b = do[qs].transpose(0, 1)[None]
        g64 = torch.autograd.grad(ref, args64, do_b.double())
        g32 = torch.autograd.grad(base, args32, do_b)
        for name, g, s, want, yard in zip("qkv", grads, (qs, ks, ks), g64, g32):
            assert_close_rule(f"d{name}[{b}]", g[s], want[0].transpose(0, 1), yard[0].transpose(0, 1), factor=3.0)


def test_varlen_dropout_place_draws_the_rows_of_the_whole_calls_mask(device):
    """A causal packed call on rows 5..34 of a whole causal packed call of documents [9, 30,
    4] (the first document's last 4 rows over its 9 keys, the second's first 26 rows over
    its first 26 keys), placed at row 5 of the whole (H, 43, 43) scores, draws those rows of
    the whole call's mask: the masks (the plain-PyTorch Philox per sequence against the
    kernels' whole-call mask), and the kernels' forward and backward against the reference
    with them (before: packed calls took no place)."""
    from fastattn.ops.flash import op
    from fastattn.ops.flash.reference import varlen_dropout_keep_reference

    hq, total, p, scale = 4, 43, 0.3, 0.2
    seed = torch.randint(0, 2**62, (1,), device=device)
    whole = op.dropout_keep_mask(seed, 1, hq, total, total, p)  # the whole packed call's (test above)
    cu = cu_seqlens([9, 30, 4], device)
    assert all(torch.equal(m.to(device), whole[:, :, a:b, :b - a])
               for m, a, b in zip(varlen_dropout_keep_reference(int(seed), cu, cu, hq, p), [0, 9, 39], [9, 39, 43]))
    q, k, v, cq, ck = packed([4, 26], [9, 26], torch.float32, device, hq=hq)
    place = (0, hq, 5, total, 0, total)
    keep = [m.to(device) for m in varlen_dropout_keep_reference(int(seed), cq, ck, hq, p, place)]
    assert torch.equal(keep[0], whole[:, :, 5:9, :9]) and torch.equal(keep[1], whole[:, :, 9:35, :26])

    def kernels(q, k, v):
        out, _ = op.flash_attn(*(t.transpose(0, 1)[None] for t in (q, k, v)), seed=seed, scale=scale, dropout_p=p,
                               window_right=0, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_place=place)
        return out[0].transpose(0, 1)

    check_op(kernels, lambda q, k, v: varlen_attention_reference(q, k, v, cq, ck, window=(None, 0), scale=scale,
                                                                 dropout_p=p, dropout_masks=keep),
             dict(q=q, k=k, v=v))


def test_reference_is_per_sequence_dense_attention():
    lq, lk = MIXES["lq<lk"]
    q, k, v, cq, ck = packed(lq, lk, torch.float64, "cpu")
    out = varlen_attention_reference(q, k, v, cq, ck, window=(None, 0))
    for b in range(len(lq)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        want = attention_reference(*(t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks))), causal=True)
        assert torch.equal(out[qs], want[0].transpose(0, 1))


def test_changing_one_document_never_changes_another(device):
    """Bit for bit: outputs and gradients of sequences 0 and 2 do not move when sequence 1's
    tokens change."""
    lq = lk = [17, 30, 9]
    q, k, v, cq, ck = packed(lq, lk, torch.float32, device)
    do = torch.randn(q.shape[0], q.shape[1], v.shape[-1], device=device)

    def run(q, k, v):
        out = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
        return out, torch.autograd.grad(out, (q, k, v), do)

    out1, g1 = run(q, k, v)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[17:47] = torch.randn_like(t[17:47])  # sequence 1 only
    out2, g2 = run(*(t.requires_grad_() for t in (q2, k2, v2)))
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[17:47] = False
    assert torch.equal(out1[keep], out2[keep])
    for a, b in zip(g1, g2):
        assert torch.equal(a[keep], b[keep])


BAD = {
    "offsets-int64": (lambda cq: cq.long(), "int32"),
    "first-not-0": (lambda cq: cq + 1, "start at 0"),
    "decreasing": (lambda cq: cq.flip(0), "start at 0"),
    "total-mismatch": (lambda cq: torch.cat([cq[:-1], cq[-1:] - 1]), "end at the packed total"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_offsets_raise_naming_them(case):
    q, k, v, cq, ck = packed([3, 4], [3, 4], torch.float32, "cpu")
    change, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        fastattn.flash_attention_varlen(q, k, v, change(cq), ck)


def test_max_seqlen_below_the_longest_raises():
    q, k, v, cq, ck = packed([3, 9], [3, 9], torch.float32, "cpu")
    with pytest.raises(ValueError, match="max_seqlen_q=4 is below the longest sequence, 9"):
        fastattn.flash_attention_varlen(q, k, v, cq, ck, 4, 9)


def test_grid_walks_the_sequences_blocks_not_a_total_per_sequence(monkeypatch, device):
    """Before: without max_seqlen the grid was sequences x blocks of the whole packed total
    (16 documents of 16 tokens: 16 x the total's blocks). Now cdiv(total, block) + B programs
    at most, whatever the lengths, sized without reading them."""
    from fastattn.ops.flash import op

    grids = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for name in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
        monkeypatch.setattr(op.kernels, name, Spy(getattr(op.kernels, name)))
    docs, length = 16, 16
    q, k, v, cq, ck = packed([length] * docs, [length] * docs, torch.float32, device, hq=2, hkv=2, d=16)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
    out.sum().backward()
    assert len(grids) == 3
    for grid in grids:  # every kernel's blocks are at least 16 rows: at most 16 + 16 programs per head
        assert grid[0] * grid[2] <= docs * length // 16 + docs, grid


def test_offsets_are_not_read_off_the_cpu():
    """On a GPU a packed call must not sync with the host (nor fail CUDA-graph capture): the
    offsets' values are checked only on CPU tensors, where reading them is free. A meta tensor
    stands in for a CUDA one (reading its values raises)."""
    from fastattn.validation import check_varlen

    q, k, v = (torch.empty(12, 2, 16, device="meta") for _ in range(3))
    cu_meta = torch.empty(4, dtype=torch.int32, device="meta")
    check_varlen("flash_attention_varlen", q, k, v, cu_meta, cu_meta, None, None)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        bad = torch.tensor([1, 4, 8, 12], dtype=torch.int32)
        check_varlen("flash_attention_varlen", *(torch.empty(t.shape) for t in (q, k, v)), bad, bad, None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs and CUDA graphs need a GPU")
def test_packed_call_never_syncs_and_captures_in_a_cuda_graph():
    """Before: the offsets were read on the host 6-8 times per call, so a packed call synced
    and CUDA-graph capture failed. Forward and backward under sync-debug "error", then the
    forward captured and replayed."""
    q, k, v, cq, ck = packed(*MIXES["lq<lk"], torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with fastattn.use_backend("triton"):
            out = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)
    q, k, v = (t.detach() for t in (q, k, v))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), fastattn.use_backend("triton"):  # warm-up: compile outside capture
        fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), fastattn.use_backend("triton"):
        captured = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out.detach())


def test_more_sequences_than_a_grid_axis_holds(device):
    """Before: the grid's third axis walked the sequences, and more than 65,535 of them (CUDA's
    limit there) were not refused. Now they share the first axis with the row blocks."""
    from fastattn.ops.flash import op

    n = 70_000
    q = torch.empty(1, 2, n, 16, device=device)
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)  # n sequences of one row
    grid, blocks = op._grid(q, 2, n, 16, cu)
    assert grid[1] <= 65535 and grid[2] <= 65535 and grid[0] < 2**31
    assert torch.equal(blocks[:n, 0].long(), torch.arange(n, device=device)) and (blocks[n:, 0] == -1).all()

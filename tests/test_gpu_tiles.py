"""The kernels with the tile sizes they use on a GPU, checked in the interpreter.

Under TRITON_INTERPRET=1 the launchers pick small tiles (fast in NumPy), so the other test
files never run the GPU's: 128 x 64 flash tiles, BLOCK_M != BLOCK_N, 64-token linear chunks,
64-key decode blocks. FASTATTN_GPU_TILES=1 (``fastattn._env.gpu_tiles``) makes the
interpreter take the GPU's choices (the H100's; FASTATTN_GPU_ARCH=89 another GPU's,
``fastattn._env.capability``); here every family runs with them at shapes that leave
partial tiles, against float64 by the docs/design.md rule. On CUDA these are the GPU's tiles
anyway, so the file adds nothing there but runs as a plain kernel test.
"""
import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn import sparse  # noqa: E402
from fastattn.ops.decode.reference import decode_reference  # noqa: E402
from fastattn.ops.flash import op as flash_op  # noqa: E402
from fastattn.ops.linear import op as linear_op  # noqa: E402
from fastattn.ops.flash.reference import attention_reference  # noqa: E402
from helpers import assert_close_rule, pairwise, randn  # noqa: E402
from test_decode import make_cache, paged_copy, run_and_check  # noqa: E402
from test_flash import check_against_reference as check_flash  # noqa: E402
from test_linear import check_against_reference as check_linear  # noqa: E402
from test_sparse import check as check_sparse  # noqa: E402

# fp16 takes the same tiles as bf16, and bf16 has the extra paths (rounding, fp32 dots).
DTYPES = [torch.bfloat16, torch.float32]  # bf16 first: the pairs below give it every feature at d256
DTYPE_IDS = ["bf16", "fp32"]
HEAD_DIMS = [64, 128, 256]


def _cases(first, first_ids):
    """Every pair of (first axis, head dim, dtype), not every triple: each head dim has its
    own tiles, and each dtype its own casts, with and without the first axis' paths."""
    rows = pairwise(first, HEAD_DIMS, DTYPES)
    ids = [f"{first_ids[first.index(a)]}-d{d}-{DTYPE_IDS[DTYPES.index(dt)]}" for a, d, dt in rows]
    return pytest.mark.parametrize("first,d,dtype", rows, ids=ids)


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    monkeypatch.setenv("FASTATTN_GPU_TILES", "1")


def test_the_switch_changes_the_tiles(monkeypatch):
    """Guards this file's premise: with the switch the interpreter gets the GPU's tiles."""
    gpu = flash_op.block_config(128, torch.float16, "fwd")
    monkeypatch.setenv("FASTATTN_GPU_TILES", "0")
    assert flash_op.block_config(128, torch.float16, "fwd") != gpu or torch.cuda.is_available()


@_cases(["causal-everything", "full-q>k"], ["causal-everything", "full-q>k"])
def test_flash(first, d, dtype, device):
    """Lengths that leave partial 128- and 64-row tiles; GQA 2:1; every feature on (causal,
    window, softcap, ALiBi, a bias with its gradient) or none with Lq > Lk."""
    case = first
    b, hq, hkv = 1, 4, 2
    lq, lk = (200, 330) if case == "causal-everything" else (330, 200)
    q = randn((b, hq, lq, d), dtype, device, requires_grad=True, transposed=True)
    k = randn((b, hkv, lk, d), dtype, device, requires_grad=True)
    v = randn((b, hkv, lk, d), dtype, device, requires_grad=True)
    kw = {}
    if case == "causal-everything":
        kw = dict(causal=True, window=(150, None), softcap=5.0, scale=0.3,
                  alibi_slopes=torch.rand(hq, device=device),
                  attn_bias=randn((1, hq, lq, lk), dtype, device, requires_grad=True))
    check_flash(q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sparse(causal, d, dtype, device):
    """Layout blocks of 128, so the flash tiles are not clipped; a partial last block."""
    length = 330
    layout = sparse.longformer(length, 128, [0], block_size=128, causal=causal)
    q = randn((1, 2, length, d), dtype, device, requires_grad=True, transposed=True)
    k, v = (randn((1, 1, length, d), dtype, device, requires_grad=True) for _ in range(2))
    check_sparse(q, k, v, layout, causal=causal)


def test_sparse_d256_runs_dk_and_dv_as_two_launches(device):
    """At d256 the dK/dV kernel runs once per gradient (``_launch.key_grads``)."""
    from fastattn.ops import _launch

    assert len(_launch.key_grads(256)) == 2
    length = 200
    layout = sparse.longformer(length, 128, [0], block_size=64, causal=True)
    q = randn((1, 2, length, 256), torch.bfloat16, device, requires_grad=True)
    k, v = (randn((1, 1, length, 256), torch.bfloat16, device, requires_grad=True) for _ in range(2))
    check_sparse(q, k, v, layout, causal=True)


@_cases([False, True], ["full", "causal"])
def test_linear(first, d, dtype, device):
    """elu+1 features: 64- (or 32-/16-) token chunks, state split in 64-wide blocks; GQA 2:1."""
    causal = first
    cfg = linear_op.block_config(d, d, dtype)
    length = 3 * cfg["chunk"] + 5
    q = randn((1, 4, length, d), dtype, device, requires_grad=True, transposed=True)
    k, v = (randn((1, 2, length, d), dtype, device, requires_grad=True) for _ in range(2))
    check_linear("elu", q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_decode(d, dtype, device):
    """64-key blocks (32 at d256, 16 for fp32 above d64) over ragged caches, split four ways,
    two new tokens appended in 32-token blocks; GQA 4:1."""
    lengths = [5, 300]
    q = torch.randn(2, 8, 2, d, device=device).to(dtype)
    k_cache = make_cache(2, 2, 320, d, lengths, dtype, device)
    v_cache = make_cache(2, 2, 320, d, lengths, dtype, device)
    k_new, v_new = (torch.randn(2, 2, 2, d, device=device).to(dtype) for _ in range(2))
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=4)


# One headline-like shape per tile table below sm_90 with that GPU's tiles (FASTATTN_GPU_ARCH
# fakes its capability; tests/test_arch_compile.py checks that they fit it): fp16 on sm_75,
# which has no bf16 (the router refuses it there); d256 on sm_80, where its tiles differ from
# the 99 KB GPUs' (sm_86, sm_89 and sm_120 share theirs).
ARCH_CASES = [(75, torch.float16, 128), (80, torch.bfloat16, 256), (89, torch.bfloat16, 128)]


@pytest.mark.parametrize("arch,dtype,d", ARCH_CASES, ids=[f"sm{a}-d{d}" for a, _, d in ARCH_CASES])
def test_flash_with_another_gpus_tiles(arch, dtype, d, device, monkeypatch):
    """Causal, GQA 2:1, lengths that leave partial tiles: forward and backward."""
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", str(arch))
    from fastattn.ops import _launch

    assert _launch.arch(torch.device(device)).capability == arch
    q = randn((1, 4, 150, d), dtype, device, requires_grad=True, transposed=True)
    k, v = (randn((1, 2, 170, d), dtype, device, requires_grad=True) for _ in range(2))
    check_flash(q, k, v, causal=True)


def test_linear_with_a_99kb_gpus_tiles(device, monkeypatch):
    """sm_89's linear-attention tiles (32-row chunks, 2 stages), causal, forward and backward."""
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", "89")
    cfg = linear_op.block_config(64, 64, torch.bfloat16, causal=True)
    assert (cfg["chunk"], cfg["num_stages"]) == (32, 2)
    q = randn((1, 4, 2 * cfg["chunk"] + 5, 64), torch.bfloat16, device, requires_grad=True, transposed=True)
    k, v = (randn((1, 2, q.shape[2], 64), torch.bfloat16, device, requires_grad=True) for _ in range(2))
    check_linear("elu", q, k, v, True)


@pytest.mark.parametrize("arch,expected", [(89, (64, 16)), (75, (16, 16)), (80, (64, 32)), (90, (64, 32))],
                         ids=lambda x: f"sm{x}" if isinstance(x, int) else str(x))
def test_decode_tiles_fit_smaller_shared_memory(arch, expected, device, monkeypatch):
    """decode at d256, 64 query rows: 32-key blocks ask for 100 KB, over the 99 KB GPUs' limit,
    and sm_75's 64 KB needs fewer rows too (``_launch.decode_tiles``)."""
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    from fastattn.ops import _launch

    monkeypatch.setenv("FASTATTN_GPU_ARCH", str(arch))
    assert _launch.decode_tiles(64, 32, 256) == expected


@pytest.mark.parametrize("arch,expected", [(75, False), (80, False), (89, False), (90, True), (100, True),
                                           (120, False)], ids=lambda x: f"sm{x}" if isinstance(x, int) and x > 1 else str(x))
def test_tma_only_on_sm90_and_sm100(arch, expected, device, monkeypatch):
    """TMA where the GPU has the copy engine and the shared memory for the TMA tiles: capability
    9.x and 10.x, not 12.x (the RTX 50 series has neither)."""
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    from fastattn.ops import _launch

    monkeypatch.setenv("FASTATTN_GPU_ARCH", str(arch))
    x = randn((1, 2, 64, 64), torch.bfloat16, device)
    assert _launch.tma(x, x) == expected


def test_bf16_refused_below_sm80(device, monkeypatch):
    """bf16 needs sm_80: on sm_75 the triton backend refuses it naming the dtype and the
    capability, and "auto" runs the fallback."""
    import fastattn

    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", "75")
    q, k, v = (randn((1, 2, 16, 32), torch.bfloat16, device) for _ in range(3))
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match=r"bfloat16 needs compute capability 8\.0.*7\.5"):
        fastattn.flash_attention(q, k, v)
    out = fastattn.flash_attention(q, k, v)
    assert_close_rule("out", out, attention_reference(*(t.double() for t in (q, k, v))),
                      attention_reference(q, k, v))


def test_out_of_resources_falls_back_to_smaller_tiles(device, monkeypatch):
    """A launch that raises Triton's OutOfResources (the GPU lacks the shared memory its tiles
    ask for) is retried with the next smaller tiles, which are remembered: the user gets the
    result, and the next call goes straight to the tiles that fit."""
    from triton.runtime.errors import OutOfResources

    from fastattn.ops import _launch
    from fastattn.ops.flash import kernels

    real = kernels.attn_fwd_kernel
    tried = []

    class SmallSharedMemory:
        """attn_fwd_kernel on a GPU that fits only half the first tiles' rows by keys."""

        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, **kwargs):
                tried.append((BLOCK_M, BLOCK_N))
                if BLOCK_M * BLOCK_N > first.block_m * first.block_n // 2:
                    raise OutOfResources(BLOCK_M * BLOCK_N * 4, first.block_m * first.block_n * 2, "shared memory")
                return real[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **kwargs)
            return launch

    first = _launch.candidates(64, torch.float16, "fwd", torch.device(device))[0]
    monkeypatch.setattr(kernels, "attn_fwd_kernel", SmallSharedMemory())
    monkeypatch.setattr(_launch, "_FIRST_FIT", {})
    q, k, v = (randn((1, 2, 150, 64), torch.float16, device) for _ in range(3))
    check_flash(q, k, v, causal=True, grad=False)
    fitted = tried[-1]
    assert len(tried) > 1 and fitted[0] * fitted[1] <= first.block_m * first.block_n // 2
    tried.clear()
    check_flash(q, k, v, causal=True, grad=False)
    assert tried == [fitted]


def test_the_headline_flash_launch_reads_through_tma(device):
    """Guards the next tests' premise: with the GPU's tiles (and on a Hopper GPU) contiguous
    bf16 tensors take the TMA path, and a tensor TMA cannot read (a base not 16-byte aligned)
    or fp32 does not."""
    from fastattn.ops import _launch

    x = randn((1, 2, 64, 64), torch.bfloat16, device)
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0")
    assert _launch.tma(x, x)
    assert not _launch.tma(x, torch.empty(64 * 64 * 2 + 1, dtype=torch.bfloat16, device=device)[1:].view(1, 2, 64, 64))
    assert not _launch.tma(x.float())


@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
def test_flash_pointer_path_for_unaligned_inputs(d, device):
    """K and V at an odd element offset (not 16-byte aligned) go through the pointer path,
    with the same tiles otherwise; every feature off, causal."""
    lq = lk = 200
    q = randn((1, 2, lq, d), torch.bfloat16, device, requires_grad=True)
    k, v = (torch.randn(2 * lk * d + 1, device=device).to(torch.bfloat16)[1:].view(1, 2, lk, d).requires_grad_()
            for _ in range(2))
    check_flash(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("feature", ["causal", "alibi"])
def test_varlen(feature, dtype, device):
    """Packed sequences with the GPU's tiles (TMA on sm_90): lengths that leave partial
    128-row tiles and one shorter than a tile."""
    from test_varlen import check_varlen

    lengths = [130, 7, 300]
    check_varlen(lengths, lengths, feature, dtype, device)


def test_nan_in_one_packed_sequence_never_reaches_another(device):
    """A packed sequence's last partial tile reaches into the next sequence's rows (TMA reads
    whole tiles): NaN in sequence 1's q, k, v must not reach sequences 0 and 2, whose outputs
    and gradients stay finite and bit-identical."""
    import fastattn
    from test_varlen import packed

    lengths = [70, 150, 45]
    q, k, v, cq, ck = packed(lengths, lengths, torch.bfloat16, device, d=64)
    do = torch.randn(q.shape[0], q.shape[1], v.shape[-1], device=device).to(q.dtype)

    def run(q, k, v):
        with fastattn.use_backend("triton"):
            out = fastattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
        return out, torch.autograd.grad(out, (q, k, v), do)

    out1, g1 = run(q, k, v)
    poisoned = [t.detach().clone() for t in (q, k, v)]
    for t in poisoned:
        t[70:220] = float("nan")  # sequence 1 only
    out2, g2 = run(*(t.requires_grad_() for t in poisoned))
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[70:220] = False
    assert out1[keep].isfinite().all()
    assert torch.equal(out1[keep], out2[keep])
    for a, b in zip(g1, g2):
        assert a[keep].isfinite().all() and torch.equal(a[keep], b[keep])


def test_broadcast_batch_takes_the_pointer_path(device, monkeypatch):
    """The SDPA drop-in with batch-1 K/V against a batch of 4 queries reads K/V through a
    stride-0 batch dim, which no TMA descriptor is built for (``_launch.tma``): the kernels
    read them through pointers, and the result is right."""
    import fastattn
    from fastattn.ops import _launch

    described = []
    descriptor = _launch.descriptor
    monkeypatch.setattr(_launch, "descriptor", lambda t, block: described.append(t.stride()) or descriptor(t, block))
    q = randn((4, 2, 64, 64), torch.bfloat16, device)
    k, v = (randn((1, 2, 64, 64), torch.bfloat16, device) for _ in range(2))
    with fastattn.use_backend("triton"):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert not [s for s in described if 0 in s], f"TMA descriptors with a stride-0 dim: {described}"
    assert_close_rule("out", out, sdpa(q.double(), k.double(), v.double(), is_causal=True),
                      sdpa(q, k, v, is_causal=True))


# Head dims past 256 with the GPU's tiles: d512 (Gemma's global layers) and MLA's q/k 576 with
# v 512 (padded to 1024 / 512), dK and dV in separate launches; the H100's tiles (bf16 on TMA).
WIDE_CASES = [(90, torch.bfloat16, 512, 512, "everything"), (90, torch.float32, 576, 512, "causal")]


@pytest.mark.parametrize("arch,dtype,d,dv,feature", WIDE_CASES,
                         ids=[f"sm{a}-d{d}-dv{dv}-{DTYPE_IDS[DTYPES.index(dt)]}-{f}" for a, dt, d, dv, f in WIDE_CASES])
def test_flash_wide_head_dims(arch, dtype, d, dv, feature, device, monkeypatch):
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", str(arch))
    from fastattn.ops import _launch

    assert len(_launch.key_grads(d)) == 2
    lq, lk, hq = 33, 50, 4
    q = randn((1, hq, lq, d), dtype, device, requires_grad=True, transposed=True)
    k = randn((1, 2, lk, d), dtype, device, requires_grad=True)
    v = randn((1, 2, lk, dv), dtype, device, requires_grad=True)
    kw = dict(causal=True)
    if feature == "everything":
        kw.update(window=(20, None), softcap=5.0, scale=0.05, alibi_slopes=torch.rand(hq, device=device),
                  attn_bias=randn((1, hq, lq, lk), dtype, device, requires_grad=True))
    check_flash(q, k, v, **kw)


def test_decode_wide_head_dims(device):
    """The H100's bf16 decode tiles at head dim 512 (32 query rows, 32 keys) and MLA's 576/512
    (32 x 64, pages of 64, V the first 512 channels of the cached latent): 40 query rows per kv
    head leave a partial row block, ragged lengths partial key blocks, two splits."""
    from fastattn.ops.decode import op as decode_op

    assert decode_op.block_config(512, 40, torch.bfloat16)[:2] == (32, 32)
    assert decode_op.block_config(576, 40, torch.bfloat16, 64)[:2] == (32, 64)
    lengths = [5, 40]
    q = torch.randn(2, 20, 2, 512, device=device).to(torch.bfloat16)
    k_cache, v_cache = (make_cache(2, 1, 48, 512, lengths, torch.bfloat16, device) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 512, device=device).to(torch.bfloat16) for _ in range(2))
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=2)
    # MLA: 40 query heads on one latent head, one new token appended with v_new None.
    kv = make_cache(2, 1, 128, 576, lengths, torch.bfloat16, device)
    q, k_new = (torch.randn(2, h, 1, 576, device=device).to(torch.bfloat16) for h in (40, 1))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    oracle, base = (decode_reference(q.to(t), kv.to(t), kv[..., :512].to(t), seqlens, k_new.to(t),
                                     k_new[..., :512].to(t)) for t in (torch.float64, torch.bfloat16))
    table = torch.randperm(4, device=device).to(torch.int32).view(2, 2)
    pages = paged_copy(kv, table, 64)
    with fastattn.use_backend("triton"):
        out = fastattn.attention_with_kvcache(q, pages, pages[..., :512], seqlens, k_new=k_new, block_table=table,
                                              num_splits=2)
    assert_close_rule("mla out", out, oracle, base)
    for i, n in enumerate(lengths):
        assert torch.equal(pages[table[i, n // 64], n % 64], k_new[i, :, 0])


@pytest.mark.parametrize("arch,dtype,d", [(75, torch.float32, 576), (75, torch.float16, 576)],
                         ids=["sm75-fp32-d576", "sm75-fp16-d576"])
def test_decode_without_tiles_is_refused_or_falls_back(arch, dtype, d, device, monkeypatch):
    """MLA's 576/512 where no decode tile fits the shared memory (fp32 and fp16 on sm_75's
    64 KB): the router refuses it (use_backend("triton") names why) and "auto" runs it
    off the kernels."""
    if device == "cuda":
        pytest.skip("the capability is faked under the interpreter only")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", str(arch))
    kv = make_cache(1, 1, 16, d, [9], dtype, device)
    q = torch.randn(1, 4, 1, d, device=device).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match=f"{name} at head dim {d} needs more shared"):
        fastattn.attention_with_kvcache(q, kv, kv[..., :512], 9)
    out = fastattn.attention_with_kvcache(q, kv, kv[..., :512], 9)
    want = attention_reference(q.double(), kv[:, :, :9].double(), kv[:, :, :9, :512].double())
    assert_close_rule("out", out, want, attention_reference(q, kv[:, :, :9], kv[:, :, :9, :512]))


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_mla_decode_fills_the_h100(batch, heads):
    """One latent kv head, ``heads`` query heads, one new token, 32k keys: the query heads fill
    row blocks of 32 (the H100's bf16 tile at 576), and the split count brings the programs to
    80% of the 132 SMs or more (``choose_num_splits``'s bar; batch 1 with 16 heads: one
    program, 128 splits at most), so a small batch still fills the GPU."""
    from fastattn.ops.decode import op as decode_op

    q = torch.empty(batch, heads, 1, 576, dtype=torch.bfloat16, device="meta")
    pages = torch.empty(batch * 512, 64, 1, 576, dtype=torch.bfloat16, device="meta")
    table = torch.empty(batch, 512, dtype=torch.int32, device="meta")
    splits = decode_op._auto_splits(q, pages, pages[..., :512], table, 1, None, None, None)
    row_blocks = -(-heads // decode_op.block_config(576, heads, torch.bfloat16, 64).block_m)
    assert batch * row_blocks * splits >= 0.8 * decode_op.H100_SMS

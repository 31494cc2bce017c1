"""attention_with_kvcache: split-KV kernels vs the float64 reference (docs/design.md rule), the cache
after the call, the split heuristic, validation, KVCache, and token-by-token decoding of a small
attention stack against running the whole sequence again.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py); every
kernel call goes through ``use_backend("triton")`` so a silent fallback cannot pass.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.nn import KVCache  # noqa: E402
from fastattn.ops.decode import op as decode_op  # noqa: E402
from fastattn.ops.decode.reference import (  # noqa: E402
    append_reference, apply_rotary, decode_reference, gather_pages, rotary_positions)
from fastattn.ops.flash.reference import attention_reference  # noqa: E402
from helpers import assert_close_rule, max_err  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def make_cache(b, hkv, lmax, d, lengths, dtype, device, *, transposed=False):
    """(B, Hkv, Lmax, D) cache: random in each sequence's valid prefix, NaN beyond it, so a
    kernel that reads (or mixes in) a slot it should not gives NaN. ``transposed`` makes it a
    view of a (B, Lmax, Hkv, D) buffer."""
    shape = (b, lmax, hkv, d) if transposed else (b, hkv, lmax, d)
    cache = torch.full(shape, float("nan"), device=device, dtype=dtype)
    if transposed:
        cache = cache.transpose(1, 2)
    for i, n in enumerate(lengths):
        cache[i, :, :n] = torch.randn(hkv, n, d, device=device).to(dtype)
    return cache


def bits(t):
    """Bit pattern of a tensor, so NaN sentinels compare equal to themselves."""
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else
                               {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, **kw):
    """Kernel (out, lse) vs the float64 oracle, with plain torch in the same dtype as the
    yardstick; then the caches hold exactly their old contents plus k_new/v_new at each
    sequence's offset, bit for bit, and cache_seqlens is unchanged."""
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    as64 = (lambda t: None if t is None else t.double())
    ref_kw = {n: a for n, a in kw.items() if n != "num_splits"}
    oracle, oracle_lse = decode_reference(q.double(), k_cache.double(), v_cache.double(), seqlens,
                                          as64(k_new), as64(v_new), return_lse=True, **ref_kw)
    base, base_lse = decode_reference(q, k_cache, v_cache, seqlens, k_new, v_new, return_lse=True, **ref_kw)
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new,
                                                   v_new=v_new, return_lse=True, **kw)
    assert out.shape == oracle.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)
    assert seqlens.tolist() == list(lengths), "cache_seqlens must not be updated by the call"
    expect_k, expect_v = k_before.clone(), v_before.clone()
    rotary = kw.get("rotary_cos") is not None
    if k_new is not None:
        lnew = k_new.shape[2]
        k_store = k_new
        if rotary:  # the cache holds rotated keys: checked by the rule, the rest bit for bit
            pos = rotary_positions(seqlens, lnew, lnew, lnew)
            rot = (lambda x: apply_rotary(x, kw["rotary_cos"], kw["rotary_sin"], pos, kw.get("rotary_interleaved", False)))
            k64, k_t = rot(k_new.double()), rot(k_new)
            written = torch.stack([k_cache[i, :, n:n + lnew] for i, n in enumerate(lengths)])
            assert_close_rule("rotated k in the cache", written, k64, k_t)
            k_store = written
        for i, n in enumerate(lengths):
            expect_k[i, :, n:n + lnew] = k_store[i]
            expect_v[i, :, n:n + lnew] = v_new[i]
    assert torch.equal(bits(k_cache), bits(expect_k)), "k_cache differs from old contents + k_new"
    assert torch.equal(bits(v_cache), bits(expect_v)), "v_cache differs from old contents + v_new"
    return out, lse


# name -> (B, Hq, Hkv, Lq, Lnew, D, lengths, num_splits, transposed): ragged batches, GQA
# ratios 1/4/8, one and several new tokens, splits from 1 to more than there are key blocks,
# lengths that do not divide the split size (the interpreter's key block is 16), an empty
# cache, no new tokens, and queries fewer than the new keys.
CASES = {
    "mha-1tok-auto": (3, 2, 2, 1, 1, 64, [0, 37, 150], None, False),
    "gqa4-1tok-split4": (2, 8, 2, 1, 1, 40, [63, 200], 4, True),
    "gqa8-4tok-split3": (2, 8, 1, 4, 4, 32, [17, 113], 3, False),
    "gqa4-3tok-split1": (2, 4, 1, 3, 3, 128, [5, 97], 1, True),
    "mha-2tok-split16": (2, 2, 2, 2, 2, 16, [33, 190], 16, False),
    "gqa2-q2-new5-split2": (2, 4, 2, 2, 5, 96, [0, 71], 2, False),
    "gqa2-nonew-split2": (2, 4, 2, 1, 0, 80, [1, 129], 2, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, device):
    b, hq, hkv, lq, lnew, d, lengths, splits, transposed = CASES[case]
    lmax = max(lengths) + lnew + 7  # slack beyond the longest sequence, NaN-filled
    q = torch.randn(b, lq, hq, d, device=device).to(dtype).transpose(1, 2)
    k_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device, transposed=transposed)
    v_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device, transposed=transposed)
    k_new = v_new = None
    if lnew:
        k_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
        v_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="long caches need a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_long_ragged_caches_on_gpu(dtype, device):
    """Many splits over long caches (the heuristic's real regime), GQA 8, a ragged batch."""
    b, hq, hkv, d, lengths = 3, 32, 4, 128, [1000, 17000, 32767]
    q = torch.randn(b, hq, 1, d, device=device).to(dtype)
    k_cache = make_cache(b, hkv, 32768, d, lengths, dtype, device)
    v_cache = make_cache(b, hkv, 32768, d, lengths, dtype, device)
    k_new = torch.randn(b, hkv, 1, d, device=device).to(dtype)
    v_new = torch.randn(b, hkv, 1, d, device=device).to(dtype)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new)


def _features(b, hq, device):
    return {
        "window-left": dict(window=(20, None)),
        "window-both-noncausal": dict(window=(30, 1), causal=False),
        "noncausal": dict(causal=False),
        "alibi": dict(alibi_slopes=torch.rand(hq, device=device)),
        "alibi-per-batch": dict(alibi_slopes=torch.rand(b, hq, device=device)),
        "softcap": dict(softcap=2.0, scale=2.0),
        "everything": dict(window=(40, None), softcap=5.0, alibi_slopes=torch.rand(hq, device=device), scale=0.3),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("feature", list(_features(1, 1, "cpu")))
def test_features(feature, dtype, device):
    b, hq, hkv, lnew, d, lengths = 2, 4, 1, 3, 48, [45, 130]
    lmax = max(lengths) + lnew + 5
    q = torch.randn(b, hq, lnew, d, device=device).to(dtype)
    k_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device)
    v_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device)
    k_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    v_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=3, **_features(b, hq, device)[feature])


def rope_tables(positions, rot_dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim))
    angles = torch.arange(positions, device=device).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("style", ["neox-partial", "gptj", "neox-q-fewer"])
def test_rotary_in_kernel(style, dtype, device):
    """q and k_new rotated inside the kernels = rotated first in plain torch; the cache ends
    up holding the rotated keys at each sequence's own positions."""
    b, hq, hkv, d, lengths = 2, 4, 2, 64, [10, 90]
    lq = lnew = 3
    if style == "neox-q-fewer":
        lq = 2
    rot_dim = 48 if style == "neox-partial" else d
    lmax = max(lengths) + lnew + 4
    cos, sin = rope_tables(lmax + 3, rot_dim, device)
    q = torch.randn(b, hq, lq, d, device=device).to(dtype)
    k_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device)
    v_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device)
    k_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    v_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=2, rotary_cos=cos, rotary_sin=sin,
                  rotary_interleaved=style == "gptj")


def test_rotary_validation(device):
    q, kc, vc, sl, kn, vn = _small(device)
    cos, sin = rope_tables(8, 16, device)
    with pytest.raises(ValueError, match="rotary"):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn, rotary_cos=cos)
    with pytest.raises(ValueError, match="positions"):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn, rotary_cos=cos[:5], rotary_sin=sin[:5])
    with pytest.raises(ValueError, match="rotary"):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn, rotary_cos=cos[:, :1].repeat(1, 9),
                                        rotary_sin=sin[:, :1].repeat(1, 9))


def test_window_leaves_a_sequence_with_no_keys(device):
    """Non-causal window with right < 0 is not expressible, but an empty cache with no new
    tokens is: that sequence gives out 0 and lse -inf, the other one a normal result."""
    b, hq, hkv, d, lengths = 2, 2, 1, 32, [0, 50]
    q = torch.randn(b, hq, 1, d, device=device)
    k_cache = make_cache(b, hkv, 60, d, lengths, torch.float32, device)
    v_cache = make_cache(b, hkv, 60, d, lengths, torch.float32, device)
    out, lse = run_and_check(q, k_cache, v_cache, lengths, None, None, num_splits=2)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1]).all()


def test_value_head_dim_may_differ(device):
    b, hq, hkv, d, dv, lengths = 2, 4, 2, 64, 24, [10, 70]
    q = torch.randn(b, hq, 2, d, device=device)
    k_cache = make_cache(b, hkv, 80, d, lengths, torch.float32, device)
    v_cache = make_cache(b, hkv, 80, dv, lengths, torch.float32, device)
    k_new, v_new = torch.randn(b, hkv, 2, d, device=device), torch.randn(b, hkv, 2, dv, device=device)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=2)


def test_torch_backend_appends_and_matches(device):
    """The reference path (CPU fallback) has the same side effect on the caches."""
    b, hq, hkv, lnew, d, lengths = 2, 4, 2, 2, 32, [3, 20]
    q = torch.randn(b, hq, lnew, d, device=device)
    k_cache = make_cache(b, hkv, 30, d, lengths, torch.float32, device)
    v_cache = make_cache(b, hkv, 30, d, lengths, torch.float32, device)
    k_new, v_new = torch.randn(b, hkv, lnew, d, device=device), torch.randn(b, hkv, lnew, d, device=device)
    k2, v2 = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with fastattn.use_backend("torch"):
        ref = fastattn.attention_with_kvcache(q, k2, v2, seqlens, k_new=k_new, v_new=v_new)
    out, _ = run_and_check(q, k_cache, v_cache, lengths, k_new, v_new)
    assert torch.equal(bits(k2), bits(k_cache)) and torch.equal(bits(v2), bits(v_cache))
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("feature", ["plain", "one-token", "no-new", "rotary"] + list(_features(1, 1, "cpu")))
def test_auto_fallback_of_a_generation_step(feature, monkeypatch):
    """Without kernels (CPU, no interpreter), a call with no gradients and no lse appends first,
    then attends over each sequence's valid prefix, through torch's fused SDPA where it can
    express the call: same output as the float64 reference (docs/design.md rule), same caches,
    bit for bit, as the reference's append; an empty sequence gives 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    b, hq, hkv, d, lengths = 3, 4, 2, 32, [0, 17, 60]
    lq = lnew = {"one-token": 1, "no-new": 0}.get(feature, 3)
    lq = max(lq, 1)
    kw = {"plain": {}, "one-token": {}, "no-new": {}}.get(feature)
    if feature == "rotary":
        cos, sin = rope_tables(80, d, "cpu")
        kw = dict(rotary_cos=cos, rotary_sin=sin)
    elif kw is None:
        kw = _features(b, hq, "cpu")[feature]
    lmax = max(lengths) + lnew + 5
    q = torch.randn(b, hq, lq, d)
    k_cache, v_cache = (make_cache(b, hkv, lmax, d, lengths, torch.float32, "cpu") for _ in range(2))
    k_new = v_new = None
    if lnew:
        k_new, v_new = torch.randn(b, hkv, lnew, d), torch.randn(b, hkv, lnew, d)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if feature == "no-new":
        seqlens[0] = 0  # nothing at all to attend to
    oracle = decode_reference(q.double(), k_cache.double(), v_cache.double(), seqlens,
                              None if k_new is None else k_new.double(), None if v_new is None else v_new.double(),
                              **kw)
    base = decode_reference(q, k_cache, v_cache, seqlens, k_new, v_new, **kw)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    if k_new is not None:
        rot = {n: a for n, a in kw.items() if n.startswith("rotary")}
        append_reference(k_want, v_want, seqlens, k_new, v_new, **rot)
    with torch.no_grad():
        out = fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, **kw)
    assert_close_rule("out", out, oracle, base)
    assert torch.equal(bits(k_cache), bits(k_want)) and torch.equal(bits(v_cache), bits(v_want))
    if feature == "no-new":
        assert torch.all(out[0] == 0)


@pytest.mark.parametrize("lq", [1, 3])
def test_cpu_generation_step_is_one_fused_sdpa_call(lq, monkeypatch):
    """Without kernels, a step torch's SDPA can express runs as one fused SDPA call for the
    whole ragged batch (torch-flash's speed), not one per sequence or the reference's math."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lengths = [0, 17, 60]
    q = torch.randn(3, 4, lq, 32)
    k_cache, v_cache = (make_cache(3, 2, 70, 32, lengths, torch.float32, "cpu") for _ in range(2))
    k_new, v_new = torch.randn(3, 2, lq, 32), torch.randn(3, 2, lq, 32)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    calls = [e.name for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert len(calls) == 1, calls


def test_num_splits_heuristic_fills_the_gpu():
    choose = decode_op.choose_num_splits
    # Batch 1, 8 kv heads, 32k keys in blocks of 64: two programs per SM of an H100.
    assert choose(8, 32768, 64, 132) == 33
    # Enough (batch, head) programs already: no split.
    assert choose(64 * 8, 32768, 64, 132) == 1
    # A short cache: every split keeps at least two key blocks.
    assert choose(8, 256, 64, 132) == 2
    assert choose(1, 100, 64, 132) == 1
    # Never more than 128.
    assert choose(1, 1 << 20, 64, 132) == 128


def test_auto_splits_agree_with_one_split(device):
    """The default (heuristic) split count and a single split give the same answer."""
    b, hq, hkv, d, lengths = 1, 8, 1, 64, [190]
    q = torch.randn(b, hq, 1, d, device=device)
    k_cache = make_cache(b, hkv, 200, d, lengths, torch.float32, device)
    v_cache = make_cache(b, hkv, 200, d, lengths, torch.float32, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with fastattn.use_backend("triton"):
        auto = fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens)
        one = fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, num_splits=1)
    block_n = decode_op.block_config(d, hq, torch.float32)[1]
    assert decode_op.choose_num_splits(1, 190, block_n, decode_op._num_sms(str(q.device))) > 1
    assert max_err(auto, one) < 1e-5


# --- validation --------------------------------------------------------------------------

def _small(device, lengths=(3, 5), lmax=8, lnew=1):
    b, hq, hkv, d = len(lengths), 4, 2, 16
    q = torch.randn(b, hq, lnew, d, device=device)
    kc, vc = torch.zeros(b, hkv, lmax, d, device=device), torch.zeros(b, hkv, lmax, d, device=device)
    kn, vn = torch.randn(b, hkv, lnew, d, device=device), torch.randn(b, hkv, lnew, d, device=device)
    return q, kc, vc, torch.tensor(lengths, dtype=torch.int32, device=device), kn, vn


def test_overflow_raises_and_leaves_cache_alone():
    """The lengths are checked where reading them costs no device sync (CPU tensors; on CUDA
    a decode step never waits for the host and the kernels clamp to the buffer instead)."""
    q, kc, vc, sl, kn, vn = _small("cpu", lengths=(3, 6), lmax=8, lnew=3)
    with pytest.raises(ValueError, match="overflow"):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn)
    assert torch.all(kc == 0) and torch.all(vc == 0)
    sl[1] = 5  # exactly fills the cache: fine
    fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn)
    assert torch.equal(kc[1, :, 5:8], kn[1])


@pytest.mark.parametrize("bad", ["q-rank", "heads", "head-dim", "dtype", "kv-lmax", "knew-only",
                                 "knew-shape", "seqlens-shape", "seqlens-dtype", "seqlens-negative",
                                 "seqlens-above-lmax", "num-splits", "alibi-shape", "window"])
def test_bad_input_raises_value_error(bad, device):
    if bad in ("seqlens-negative", "seqlens-above-lmax"):
        device = "cpu"  # values are read only where that costs no device sync
    q, kc, vc, sl, kn, vn = _small(device)
    kw = dict(k_new=kn, v_new=vn)
    if bad == "q-rank":
        q = q[0]
    elif bad == "heads":
        q = torch.randn(2, 3, 1, 16, device=device)
    elif bad == "head-dim":
        q = torch.randn(2, 4, 1, 32, device=device)
    elif bad == "dtype":
        kc = kc.half()
    elif bad == "kv-lmax":
        vc = vc[:, :, :6]
    elif bad == "knew-only":
        kw = dict(k_new=kn)
    elif bad == "knew-shape":
        kw = dict(k_new=kn[:, :1], v_new=vn[:, :1])
    elif bad == "seqlens-shape":
        sl = sl[:1]
    elif bad == "seqlens-dtype":
        sl = sl.float()
    elif bad == "seqlens-negative":
        sl[0] = -1
    elif bad == "seqlens-above-lmax":
        kw, sl[0] = {}, 9
    elif bad == "num-splits":
        kw["num_splits"] = 0
    elif bad == "alibi-shape":
        kw["alibi_slopes"] = torch.rand(3, device=device)
    elif bad == "window":
        kw["window"] = (-1, None)
    with pytest.raises(ValueError):
        fastattn.attention_with_kvcache(q, kc, vc, sl, **kw)


@pytest.mark.parametrize("value", [2**40, 2**70], ids=["over-int32", "over-int64"])
def test_int_seqlens_out_of_range_raises_value_error(value, device):
    """An int cache_seqlens is on the host: checked against Lmax on every device, as a
    ValueError naming it (not torch's RuntimeError from converting it to a tensor)."""
    q, kc, vc, _, _, _ = _small(device)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 8\]"):
        fastattn.attention_with_kvcache(q, kc, vc, value)


class _GridRecorder:
    """Stands in for a kernel: records the grids it is launched on, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_grids_stay_within_cuda_limits(monkeypatch):
    """CUDA caps a grid's axes 1 and 2 at 65535: 64 query heads x 65536 new tokens are 65536
    row blocks, 2^21 appended tokens as many token blocks; neither may land on those axes
    (the router lets any shape through to decode). Nothing runs: the launches are recorded."""
    split, append = _GridRecorder(), _GridRecorder()
    monkeypatch.setattr(decode_op.kernels, "decode_split_kernel", split)
    monkeypatch.setattr(decode_op.kernels, "kv_append_kernel", append)
    q = torch.zeros((), dtype=torch.float16).expand(1, 64, 65536, 16)  # no memory
    new = torch.zeros((), dtype=torch.float16).expand(1, 1, 2**21, 16)
    cache = torch.zeros((), dtype=torch.float16).expand(1, 1, 2**21, 16)
    decode_op.decode_attn(q, cache, cache, torch.zeros(1, dtype=torch.int32), k_new=new, v_new=new, scale=0.25,
                          num_splits=1)
    grids = split.grids + append.grids
    assert len(grids) == 2 and all(max(grid[1:], default=1) <= 65535 for grid in grids), grids


def test_unchecked_rotary_positions_stay_in_the_table(device):
    """On CUDA nothing checks that the rotary table covers the positions; the kernels clamp to
    its last row instead of reading what lies after it (NaN here)."""
    q, kc, vc, sl, kn, vn = _small(device, lengths=(3, 5), lmax=8, lnew=2)
    table = torch.full((8, 4), float("nan"), device=device)
    cos, sin = rope_tables(4, 8, device)  # positions 0..3 only; the sequences reach 6
    table[:4] = cos
    sin_table = torch.full_like(table, float("nan"))
    sin_table[:4] = sin
    out, lse = decode_op.decode_attn(q, kc, vc, sl, k_new=kn, v_new=vn, scale=0.25, window_right=0,
                                     rotary_cos=table[:4], rotary_sin=sin_table[:4])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.isfinite(kc).all(), "a rotated key read the table past its end"


def test_unchecked_negative_seqlens_write_inside_the_cache(device):
    """On CUDA nothing checks cache_seqlens: a negative length counts as 0, and the append
    writes inside the sequence's own slots, never before the cache (a canary row here)."""
    q, _, _, _, kn, vn = _small(device, lengths=(0, 5), lmax=8, lnew=2)
    k_buf, v_buf = torch.full((3, 2, 8, 16), 7.0, device=device), torch.full((3, 2, 8, 16), 7.0, device=device)
    kc, vc = k_buf[1:], v_buf[1:]  # row 0 of the buffers lies just before the caches
    sl = torch.tensor([-3, 5], dtype=torch.int32, device=device)
    out, _ = decode_op.decode_attn(q, kc, vc, sl, k_new=kn, v_new=vn, scale=0.25, window_right=0)
    assert torch.all(k_buf[0] == 7.0) and torch.all(v_buf[0] == 7.0), "the append wrote before the cache"
    assert torch.equal(kc[0, :, :2], kn[0]) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="values go unchecked only on CUDA")
def test_cuda_rotary_past_the_table_and_negative_lengths_stay_in_bounds(device):
    """The public function on CUDA reads no value, so these reach the kernels unchecked: rotary
    positions past the table's end read its last row, a negative length counts as 0."""
    q, _, _, _, kn, vn = _small(device, lengths=(0, 5), lmax=8, lnew=2)
    k_buf, v_buf = torch.full((3, 2, 8, 16), 7.0, device=device), torch.full((3, 2, 8, 16), 7.0, device=device)
    cos, sin = (torch.full((8, 4), float("nan"), device=device) for _ in range(2))
    cos[:4], sin[:4] = rope_tables(4, 8, device)
    sl = torch.tensor([-3, 5], dtype=torch.int32, device=device)
    with fastattn.use_backend("triton"):
        out = fastattn.attention_with_kvcache(q, k_buf[1:], v_buf[1:], sl, k_new=kn, v_new=vn,
                                              rotary_cos=cos[:4], rotary_sin=sin[:4])
    assert torch.all(k_buf[0] == 7.0) and torch.all(v_buf[0] == 7.0), "the append wrote before the cache"
    assert torch.isfinite(out).all() and torch.isfinite(k_buf).all()


def test_gradients_fall_back_to_the_reference(device):
    """The kernels are forward-only: under "triton" a call needing gradients raises; under
    "auto" it runs the (differentiable) reference, whose gradients match flash_attention's."""
    q, kc, vc, sl, kn, vn = _small(device, lengths=(4, 4), lmax=8, lnew=2)
    q.requires_grad_(True)
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="gradients"):
        fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn)
    out = fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn)
    (g,) = torch.autograd.grad(out.sum(), q)
    q2 = q.detach().clone().requires_grad_(True)
    full = attention_reference(q2, kc[:, :, :6], vc[:, :, :6], causal=True)
    (g2,) = torch.autograd.grad(full.sum(), q2)
    assert max_err(g, g2) < 1e-5
    with torch.no_grad(), fastattn.use_backend("triton"):  # no grad needed: kernels take it
        fastattn.attention_with_kvcache(q, kc, vc, sl + 2)


def test_torch_compile_fullgraph(device):
    """Both custom ops (the mutating append and the attention) compile without graph breaks."""
    b, hq, hkv, d = 2, 4, 2, 32
    kc, vc = torch.zeros(b, hkv, 40, d, device=device), torch.zeros(b, hkv, 40, d, device=device)
    sl = torch.tensor([3, 17], dtype=torch.int32, device=device)

    def step(q, k_new, v_new, kc, vc, sl):
        return fastattn.attention_with_kvcache(q, kc, vc, sl, k_new=k_new, v_new=v_new, num_splits=2) * 2

    q = torch.randn(b, hq, 1, d, device=device)
    kn, vn = torch.randn(b, hkv, 1, d, device=device), torch.randn(b, hkv, 1, d, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    with fastattn.use_backend("triton"):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kn, vn, kc, vc, sl)
        want = step(q, kn, vn, kc2, vc2, sl)
    assert max_err(got, want) < 1e-6 and torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_opcheck(device):
    """The custom ops' schemas, fake implementations and declared mutation are consistent."""
    b, hq, hkv, d = 2, 4, 2, 32
    q = torch.randn(b, hq, 2, d, device=device, dtype=torch.float16)
    kc = torch.randn(b, hkv, 30, d, device=device, dtype=torch.float16)
    vc = torch.randn(b, hkv, 30, d, device=device, dtype=torch.float16)
    kn, vn = torch.randn_like(kc[:, :, :2]), torch.randn_like(vc[:, :, :2])
    sl = torch.tensor([4, 20], dtype=torch.int32, device=device)
    torch.library.opcheck(decode_op.kvcache_append, (kc, vc, sl, kn, vn))
    torch.library.opcheck(decode_op.decode_fwd, (q, kc, vc, sl + 2, torch.rand(hq, device=device)),
                          dict(scale=0.2, softcap=3.0, window_left=9, window_right=0, seqlen_new=2, num_splits=3))
    cos, sin = rope_tables(30, 32, device)
    torch.library.opcheck(decode_op.kvcache_append, (kc, vc, sl, kn, vn, cos, sin), dict(interleaved=True))
    torch.library.opcheck(decode_op.decode_fwd, (q, kc, vc, sl + 2, None, cos, sin),
                          dict(scale=0.2, window_right=0, seqlen_new=2, num_splits=1))


# --- KVCache -----------------------------------------------------------------------------

def test_kvcache_grows_by_chunks_and_keeps_contents(device):
    cache = KVCache(2, 2, 2, 16, chunk_size=8, device=device)
    assert cache.capacity(0) == 8
    ks, vs = [], []
    for step in range(3):  # 5 + 5 + 5 tokens: grows to 16, then to 16 -> 24
        k, v = torch.randn(2, 2, 5, 16, device=device), torch.randn(2, 2, 5, 16, device=device)
        cache.append(0, k, v)
        ks.append(k)
        vs.append(v)
    assert cache.capacity(0) == 16 and cache.capacity(1) == 8
    assert cache.seqlens(0).tolist() == [15, 15] and cache.seqlens(1).tolist() == [0, 0]
    assert torch.equal(cache.keys(0)[:, :, :15], torch.cat(ks, 2))
    assert torch.equal(cache.values(0)[:, :, :15], torch.cat(vs, 2))
    cache.append(0, ks[0][:, :, :2], vs[0][:, :, :2])
    assert cache.capacity(0) == 24 and torch.equal(cache.keys(0)[:, :, :15], torch.cat(ks, 2))


def test_kvcache_max_length(device):
    cache = KVCache(1, 1, 1, 16, chunk_size=8, max_length=10, device=device)
    cache.append(0, torch.randn(1, 1, 9, 16, device=device), torch.randn(1, 1, 9, 16, device=device))
    assert cache.capacity(0) == 10
    with pytest.raises(ValueError, match="max_length"):
        cache.append(0, torch.randn(1, 1, 2, 16, device=device), torch.randn(1, 1, 2, 16, device=device))


def test_kvcache_reorder_for_beam_search(device):
    cache = KVCache(2, 2, 1, 16, chunk_size=8, device=device)
    k, v = torch.randn(2, 1, 3, 16, device=device), torch.randn(2, 1, 3, 16, device=device)
    for layer in range(2):
        cache.append(layer, k, v)
    cache.set_seqlens(torch.tensor([3, 2]))
    cache.reorder(torch.tensor([1, 1, 0]))  # 3 beams: two continue sequence 1, one sequence 0
    assert cache.batch_size == 3 and cache.seqlens(1).tolist() == [2, 2, 3]
    for layer in range(2):
        assert torch.equal(cache.keys(layer)[:, :, :2], k[[1, 1, 0], :, :2])
        assert torch.equal(cache.values(layer)[2, :, :3], v[0])
    # Attending after the reorder uses each beam's own history.
    q = torch.randn(3, 2, 1, 16, device=device)
    kn, vn = torch.randn(3, 1, 1, 16, device=device), torch.randn(3, 1, 1, 16, device=device)
    with fastattn.use_backend("triton"):
        out = cache.attend(0, q, kn, vn)
    want = torch.cat([attention_reference(q[i:i + 1], torch.cat([k[j:j + 1, :, :n], kn[i:i + 1]], 2),
                                          torch.cat([v[j:j + 1, :, :n], vn[i:i + 1]], 2))
                      for i, (j, n) in enumerate([(1, 2), (1, 2), (0, 3)])])
    assert max_err(out, want) < 1e-5 and cache.seqlens(0).tolist() == [3, 3, 4]


# --- decoding a small attention stack token by token ---------------------------------------

class TinyStack:
    """A few pre-norm attention layers with random projections (GQA 2:1, head_dim 16) and an
    output head: enough to check that decoding with the cache reproduces the full pass."""

    def __init__(self, layers=2, d_model=64, hq=4, hkv=2, vocab=50, device="cpu"):
        g = torch.Generator().manual_seed(0)
        w = (lambda *s: (torch.randn(*s, generator=g) / math.sqrt(s[0])).to(device))
        self.hq, self.hkv, self.hd = hq, hkv, d_model // hq
        self.layers = [(w(d_model, hq * self.hd), w(d_model, hkv * self.hd), w(d_model, hkv * self.hd),
                        w(hq * self.hd, d_model)) for _ in range(layers)]
        self.head = w(d_model, vocab)

    def _heads(self, x, wt, h):
        b, l, _ = x.shape
        return (x @ wt.to(x.dtype)).view(b, l, h, self.hd).transpose(1, 2)

    def forward(self, x, attend):
        """x (B, L, d_model); attend(layer, q, k, v) -> (B, Hq, L, hd)."""
        for i, (wq, wk, wv, wo) in enumerate(self.layers):
            h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
            q, k, v = self._heads(h, wq, self.hq), self._heads(h, wk, self.hkv), self._heads(h, wv, self.hkv)
            a = attend(i, q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
            x = x + a @ wo.to(x.dtype)
        return x @ self.head.to(x.dtype)


# Every dtype once, rope on bf16's (its rounding of the rotated q): the decode kernels' dtype
# paths and rotary are each covered by test_matches_reference and the rotary tests; this one
# is the end-to-end cache walk (17 steps a case).
@pytest.mark.parametrize("dtype,rope", [(torch.float32, False), (torch.float16, False), (torch.bfloat16, True)],
                         ids=["fp32", "fp16", "bf16-rope"])
def test_decoding_token_by_token_equals_full_sequence(dtype, rope, device):
    """Prefill then one token at a time through KVCache (kernels) gives the logits of the
    whole sequence run at once (reference). With rope, the full pass rotates q and k at
    positions 0..L-1 in torch; the cached pass lets the kernels rotate at the cache offsets."""
    b, length, prompt = 2, 23, 6
    model = TinyStack(device=device)
    x = torch.randn(b, length, 64, device=device)
    cos, sin = rope_tables(32, model.hd, device)
    rot = dict(rotary_cos=cos, rotary_sin=sin) if rope else {}

    def full_attend(i, q, k, v):
        if rope:
            pos = torch.arange(length, device=device).expand(b, length)
            q, k = apply_rotary(q, cos, sin, pos), apply_rotary(k, cos, sin, pos)
        return attention_reference(q, k, v, causal=True)

    oracle, base = (model.forward(x.to(dt), full_attend) for dt in (torch.float64, dtype))
    cache = KVCache(len(model.layers), b, model.hkv, model.hd, dtype=dtype, device=device, chunk_size=8)
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, length)]  # prefill, then 1 token at a time
    with fastattn.use_backend("triton"):
        got = torch.cat([model.forward(x[:, s:e].to(dtype), lambda i, q, k, v: cache.attend(i, q, k, v, **rot))
                         for s, e in steps], dim=1)
    assert cache.seqlens(0).tolist() == [length] * b and cache.capacity(0) == 24
    assert_close_rule("logits", got, oracle, base)


def test_int_seqlens_and_zero_new_tokens(device):
    """cache_seqlens may be a plain int; k_new with Lnew = 0 appends nothing."""
    b, hq, hkv, d = 2, 2, 1, 16
    q = torch.randn(b, hq, 1, d, device=device)
    kc = make_cache(b, hkv, 20, d, [12, 12], torch.float32, device)
    vc = make_cache(b, hkv, 20, d, [12, 12], torch.float32, device)
    empty = torch.zeros(b, hkv, 0, d, device=device)
    with fastattn.use_backend("triton"):
        a = fastattn.attention_with_kvcache(q, kc, vc, 12, k_new=empty, v_new=empty)
    b_ = decode_reference(q, kc, vc, torch.tensor([12, 12]))
    assert max_err(a, b_) < 1e-5


def test_batch_invariant_decode(device, monkeypatch):
    """Under fastattn.batch_invariant(), a sequence's decode output is bitwise the same alone,
    in a batch of four and in a batch of two in another order (same cache capacity). On the
    4-SM GPU simulated here the default split count follows the batch size (8 splits alone,
    2 in four), so outside the mode it would not be."""
    from fastattn.ops.decode import op as decode_op

    monkeypatch.setattr(decode_op, "_num_sms", lambda device: 4)
    hq, hkv, d, lmax = 2, 1, 32, 320
    lengths = [300, 90, 17, 200]
    q = torch.randn(4, hq, 1, d, device=device, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(4, hkv, lmax, d, device=device, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)

    def step(rows):  # sequence rows[i] of the batch above, as batch row i
        idx = torch.tensor(rows, device=device)
        return fastattn.attention_with_kvcache(q[idx], k_cache[idx], v_cache[idx], seqlens[idx])

    with fastattn.use_backend("triton"), fastattn.batch_invariant(64):
        together, alone, shuffled = step([0, 1, 2, 3]), step([0]), step([3, 0])
    assert torch.equal(bits(together[0]), bits(alone[0])) and torch.equal(bits(shuffled[1]), bits(alone[0]))
    assert torch.equal(bits(together[3]), bits(shuffled[0]))


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("lnew", [1, 3], ids=["one-token", "three-tokens"])
def test_batch_invariant_decode_equals_training_forward(lnew, layout, device):
    """Under fastattn.batch_invariant(), the decode output of new tokens at positions t equals
    rows t of flash_attention(causal=True) over the whole sequence, bit for bit (kernels),
    for a ragged batch whose rows fall at different places of the forward's tiles (one
    sequence also in a batch of two, shuffled, and alone). Outside the mode they differ."""
    from test_paged import make_paged

    hq, hkv, d, dtype = 4, 2, 32, torch.float16
    lengths = [70, 45]  # whole sequences; the last lnew tokens are the step
    seqs = [[torch.randn(1, h, n, d, device=device, dtype=dtype) for h in (hq, hkv, hkv)] for n in lengths]
    with fastattn.use_backend("triton"):
        want = [fastattn.flash_attention(q, k, v, causal=True)[:, :, -lnew:] for q, k, v in seqs]

    def step(rows):  # the sequences rows, as one decode batch
        lmax = max(lengths) + 8
        held = [lengths[r] - lnew for r in rows]
        if layout == "paged":
            kc, vc, table = make_paged(hkv, d, held, lnew, 16, dtype, device)
            table = table.clamp(min=0)
        else:
            kc, vc = (torch.zeros(len(rows), hkv, lmax, d, device=device, dtype=dtype) for _ in range(2))
            table = None
        for i, r in enumerate(rows):  # the held keys, written where the call reads them
            _, k, v = seqs[r]
            for j in range(held[i]):
                if table is None:
                    kc[i, :, j], vc[i, :, j] = k[0, :, j], v[0, :, j]
                else:
                    page, slot = table[i, j // 16], j % 16
                    kc[page, slot], vc[page, slot] = k[0, :, j], v[0, :, j]
        q = torch.cat([seqs[r][0][:, :, -lnew:] for r in rows])
        k_new, v_new = (torch.cat([seqs[r][x][:, :, -lnew:] for r in rows]) for x in (1, 2))
        seqlens = torch.tensor(held, dtype=torch.int32, device=device)
        return fastattn.attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, causal=True,
                                               block_table=table)

    with fastattn.use_backend("triton"):
        outside = step([0, 1])
        with fastattn.batch_invariant():
            both, shuffled, alone = step([0, 1]), step([1, 0]), step([1])
    for r in range(2):
        assert torch.equal(bits(both[r:r + 1]), bits(want[r])), f"sequence {r}"
    assert torch.equal(bits(shuffled[0:1]), bits(want[1])) and torch.equal(bits(alone), bits(want[1]))
    assert not all(torch.equal(bits(outside[r:r + 1]), bits(want[r])) for r in range(2))


def test_batch_invariant_gpt_generation_equals_training_logits(device):
    """A whole model: under fastattn.batch_invariant(), the logits of a bf16 GPT's generation
    steps (a 33-token prefill, then one token per step through its KV cache, the calls
    GPT.generate makes) equal the training forward's logits over the whole sequence bit for
    bit. The attention is equal by the mode (paged caches too: the test above); the matmuls and
    norms of one row and of many rows happen to agree in bf16 here (in fp32 torch's CPU matmul
    of one row rounds differently from a many-row one, so fp32 logits differ in the last bits)."""
    from fastattn.models import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, max_seq_len=64,
                      positional="rope", init_std=0.3)).to(device=device, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, 64, (1, 36), device=device)
    with torch.no_grad(), fastattn.use_backend("triton"), fastattn.batch_invariant():
        full, _ = m(idx)
        cache = m.new_cache(1, 36)
        steps = [m(idx[:, :33], cache=cache)[0]] + [m(idx[:, t:t + 1], cache=cache, offset=t)[0] for t in range(33, 36)]
    assert torch.equal(bits(torch.cat(steps, 1)), bits(full))


@pytest.mark.parametrize("b", [2, 65], ids=["few-lengths", "many-lengths"])
def test_cache_lengths_checked_at_any_batch_size(b):
    """The host check of cache_seqlens reads a few lengths as they are and many by one
    reduction: both raise for a length past Lmax and for an append that would overflow."""
    q, k, v = torch.randn(b, 2, 1, 16), torch.randn(b, 1, 8, 16), torch.randn(b, 1, 8, 16)
    lengths = torch.full((b,), 3, dtype=torch.int32)
    lengths[b // 2] = 9
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 8\].*\[3, 9\]"):
        fastattn.attention_with_kvcache(q, k, v, lengths)
    lengths[b // 2] = 8
    with pytest.raises(ValueError, match="overflow the cache"):
        fastattn.attention_with_kvcache(q, k, v, lengths, k_new=torch.randn(b, 1, 1, 16),
                                        v_new=torch.randn(b, 1, 1, 16))


def test_batch_invariant_ragged_step_equals_training_forward(device):
    """Ragged new tokens (cu_seqlens_q: 3 for one sequence, 1 for the other, packed) under
    fastattn.batch_invariant() equal flash_attention(causal=True)'s rows bit for bit."""
    hq, hkv, d, dtype = 4, 2, 32, torch.float16
    lengths, new = [70, 45], [3, 1]
    seqs = [[torch.randn(1, h, n, d, device=device, dtype=dtype) for h in (hq, hkv, hkv)] for n in lengths]
    kc, vc = (torch.zeros(2, hkv, 80, d, device=device, dtype=dtype) for _ in range(2))
    for i, (n, m) in enumerate(zip(lengths, new)):
        kc[i, :, :n - m], vc[i, :, :n - m] = seqs[i][1][0, :, :n - m], seqs[i][2][0, :, :n - m]
    # (1, H, m, D) -> (m, H, D), packed
    q, k_new, v_new = (torch.cat([s[x][0, :, -m:].transpose(0, 1) for s, m in zip(seqs, new)]) for x in range(3))
    cu = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    held = torch.tensor([n - m for n, m in zip(lengths, new)], dtype=torch.int32, device=device)
    with fastattn.use_backend("triton"):
        want = [fastattn.flash_attention(*s, causal=True)[0, :, -m:].transpose(0, 1) for s, m in zip(seqs, new)]
        with fastattn.batch_invariant():
            out = fastattn.attention_with_kvcache(q, kc, vc, held, k_new=k_new, v_new=v_new, cu_seqlens_q=cu,
                                                  max_seqlen_q=3)
    assert torch.equal(bits(out), bits(torch.cat(want)))


# ------------------------------------------------------------------ head dims 512 and MLA's 576/512

def paged_copy(cache, table, page_size):
    """Pages (num_pages, page_size, Hkv, D) holding the contiguous (B, Hkv, Lmax, D) ``cache``
    through the int32 block table (B, Lmax / page_size) of distinct pages."""
    b, hkv, lmax, d = cache.shape
    pages = torch.empty(table.numel(), page_size, hkv, d, dtype=cache.dtype, device=cache.device)
    pages[table.long().flatten()] = cache.view(b, hkv, -1, page_size, d).permute(0, 2, 3, 1, 4).flatten(0, 1)
    return pages


# name -> (dtype, B, Hq, Hkv, Lq = Lnew, D, Dv, lengths, num_splits, layout, options): q/k head
# dims 512 and 576 with v 512 (and 128 with v 512), contiguous (a transposed view) and paged
# (pages of 16), one and several new tokens, splits 1 to 3, rotary, window, ALiBi, softcap, sinks.
WIDE = {
    "d512-fp16-gqa2-2tok-split3-rotary-window": (
        torch.float16, 2, 4, 2, 2, 512, 512, [9, 37], 3, "contiguous", dict(rotary=64, window=(20, None))),
    "d576v512-bf16-mqa8-1tok-split2-alibi-softcap-sinks": (
        torch.bfloat16, 2, 8, 1, 1, 576, 512, [0, 40], 2, "contiguous", dict(alibi=True, softcap=5.0, sinks=True)),
    "d576v512-fp32-mqa4-3tok-split1-noncausal": (
        torch.float32, 1, 4, 1, 3, 576, 512, [21], 1, "contiguous", dict(causal=False)),
    "d512-fp32-paged16-gqa2-3tok-split2-gptj": (
        torch.float32, 2, 4, 2, 3, 512, 512, [14, 30], 2, "paged", dict(rotary=32, interleaved=True)),
    "d576v512-fp16-paged16-mqa8-1tok-split3": (
        torch.float16, 2, 8, 1, 1, 576, 512, [16, 33], 3, "paged", {}),
    "d128v512-bf16-paged16-mha-1tok-split2-window": (
        torch.bfloat16, 2, 2, 2, 1, 128, 512, [5, 40], 2, "paged", dict(window=(12, None))),
}


def _wide_options(opts, hq, lmax, device):
    kw = {}
    if "rotary" in opts:
        kw.update(zip(("rotary_cos", "rotary_sin"), rope_tables(lmax, opts["rotary"], device)),
                  rotary_interleaved=opts.get("interleaved", False))
    if opts.get("alibi"):
        kw["alibi_slopes"] = torch.rand(hq, device=device)
    if opts.get("sinks"):
        kw["sinks"] = torch.randn(hq, device=device)
    kw.update({n: opts[n] for n in ("window", "softcap", "causal") if n in opts})
    return kw


@pytest.mark.parametrize("case", list(WIDE))
def test_head_dims_512_and_mla(case, device):
    """attention_with_kvcache on the kernels at q/k head dims 512 / 576 and v 512: out and lse
    against the float64 oracle (error rule), the cache after the append bit for bit (paged: the
    pages hold what the contiguous kernel call writes)."""
    dtype, b, hq, hkv, lnew, d, dv, lengths, splits, layout, opts = WIDE[case]
    lmax = 48
    kw = _wide_options(opts, hq, lmax, device)
    q = torch.randn(b, lnew, hq, d, device=device).to(dtype).transpose(1, 2)
    k_cache = make_cache(b, hkv, lmax, d, lengths, dtype, device, transposed=layout == "contiguous")
    v_cache = make_cache(b, hkv, lmax, dv, lengths, dtype, device)
    k_new = torch.randn(b, hkv, lnew, d, device=device).to(dtype)
    v_new = torch.randn(b, hkv, lnew, dv, device=device).to(dtype)
    if layout == "contiguous":
        run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=splits, **kw)
        return
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    table = torch.randperm(b * lmax // 16, device=device).to(torch.int32).view(b, lmax // 16)
    k_pages, v_pages = paged_copy(k_cache, table, 16), paged_copy(v_cache, table, 16)
    oracle, oracle_lse = decode_reference(q.double(), k_cache.double(), v_cache.double(), seqlens, k_new.double(),
                                          v_new.double(), return_lse=True, **kw)
    base, base_lse = decode_reference(q, k_cache, v_cache, seqlens, k_new, v_new, return_lse=True, **kw)
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_with_kvcache(q, k_pages, v_pages, seqlens, k_new=k_new, v_new=v_new,
                                                   block_table=table, num_splits=splits, return_lse=True, **kw)
    assert_close_rule("out", out, oracle, base)
    assert_close_rule("lse", lse, oracle_lse, base_lse)
    run_and_check(q, k_cache, v_cache, lengths, k_new, v_new, num_splits=1, **kw)  # the contiguous call's writes
    got_k, got_v = gather_pages(k_pages, table), gather_pages(v_pages, table)
    assert torch.equal(bits(got_k), bits(k_cache)) and torch.equal(bits(got_v), bits(v_cache))


class _Recorder:
    """Stands in for a kernel: records each launch's positional arguments under ``name`` in
    ``seen`` (its keyword arguments under ``name + "-kw"``), then launches."""

    def __init__(self, kernel, seen, name):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen[self.name], self.seen[self.name + "-kw"] = args, kwargs
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("layout", ["contiguous", "paged", "ragged-paged"])
def test_mla_values_read_in_place_from_the_latent(layout, device, monkeypatch):
    """Absorbed MLA decode: one latent KV head of 576 channels (512 latent + 64 rotary), 16
    query heads, V the cache's first 512 channels (``v_cache = kv_cache[..., :512]``), new
    tokens appended with v_new None (their first 512 channels are the values, written once with
    the keys). The kernels get the cache's own memory and strides as K and V (no copy); the
    split kernel reads q/k as 512 + 64 channels (no 1024-wide tile) and takes its K tile's 512
    latent channels as the V tile (the latent loaded once); out and lse match the float64 oracle
    (error rule); the cache is its old contents plus k_new."""
    from fastattn.ops.decode import kernels, op

    dtype, b, hq, d, dv, lmax = torch.bfloat16, 2, 16, 576, 512, 48
    lengths, counts = [7, 30], ([3, 1] if layout == "ragged-paged" else [1, 1])
    kv = make_cache(b, 1, lmax, d, lengths, dtype, device)
    new = [torch.randn(1, c, d, device=device).to(dtype) for c in counts]  # (1, c, D) per sequence
    qs = [torch.randn(hq, c, d, device=device).to(dtype) for c in counts]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    oracle, base = [], []
    for i, c in enumerate(counts):  # per sequence, V the first dv channels of K's cache
        for want, cast in ((oracle, torch.Tensor.double), (base, lambda t: t)):
            kc = cast(kv[i:i + 1])
            want.append(decode_reference(cast(qs[i])[None], kc, kc[..., :dv], seqlens[i:i + 1], cast(new[i])[None],
                                         cast(new[i])[None, ..., :dv], return_lse=True))
    expect = kv.clone()
    for i, (n, c) in enumerate(zip(lengths, counts)):
        expect[i, :, n:n + c] = new[i]
    kw = dict(num_splits=2, return_lse=True)
    cache = kv
    if layout != "contiguous":
        table = torch.randperm(b * lmax // 16, device=device).to(torch.int32).view(b, lmax // 16)
        cache, kw["block_table"] = paged_copy(kv, table, 16), table
    if layout == "ragged-paged":  # packed (total, H, D)
        q, k_new = torch.cat([x.transpose(0, 1) for x in qs]), torch.cat([x.transpose(0, 1) for x in new])
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
        kw.update(cu_seqlens_q=cu, max_seqlen_q=max(counts))
    else:
        q, k_new = torch.stack(qs), torch.stack(new)
    seen = {}
    for name in ("decode_split_kernel", "kv_append_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(getattr(kernels, name), seen, name))
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_with_kvcache(q, cache, cache[..., :dv], seqlens, k_new=k_new, **kw)
    for name, at in (("decode_split_kernel", 1), ("kv_append_kernel", 2)):  # their K and V arguments
        for t in seen[name][at:at + 2]:
            assert t.data_ptr() == cache.data_ptr() and t.stride() == cache.stride(), f"{name} reads a copy"
    assert seen["decode_split_kernel-kw"]["WIDTHS"] == op.Widths(D=512, TAIL=64, V_IN_K=True)
    outs, lses = out.split(1), lse.split(1)
    if layout == "ragged-paged":  # packed (total, Hq, Dv) / (Hq, total) back to per sequence
        outs, lses = [o.transpose(0, 1)[None] for o in out.split(counts)], [x[None] for x in lse.split(counts, 1)]
    for i in range(b):
        assert_close_rule("out", outs[i], oracle[i][0], base[i][0])
        assert_close_rule("lse", lses[i], oracle[i][1], base[i][1])
    got = kv if layout == "contiguous" else gather_pages(cache, table)
    assert torch.equal(bits(got), bits(expect)), "the cache is not its old contents plus k_new"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_as_later_key_channels_with_rotary_on_the_first(backend, device):
    """V as K's channels 16..47 (the rotary channels 0..15 first): RoPE of the first 16
    channels (in the kernels, or the reference under "torch") leaves the values alone; v_new
    None appends k_new's channels 16..47 as the values. Against the float64 oracle (error
    rule), the rotated channels by the rule, the rest of the cache bit for bit."""
    b, hq, d, dv, lengths, lmax = 2, 4, 48, 32, [5, 20], 32
    cos, sin = rope_tables(lmax, 16, device)
    kv = make_cache(b, 1, lmax, d, lengths, torch.float16, device)
    q = torch.randn(b, hq, 1, d, device=device).to(torch.float16)
    k_new = torch.randn(b, 1, 1, d, device=device).to(torch.float16)
    before = kv.clone()
    rot = dict(rotary_cos=cos, rotary_sin=sin)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kvcache(q, kv, kv[..., 16:], seqlens, k_new=k_new, num_splits=2, **rot)
    want = [decode_reference(q.to(t), before.to(t), before[..., 16:].to(t), seqlens, k_new.to(t),
                             k_new[..., 16:].to(t), **rot) for t in (torch.float64, torch.float16)]
    assert_close_rule("out", out, *want)
    pos = rotary_positions(seqlens, 1, 1, 1)
    written = torch.stack([kv[i, :, n] for i, n in enumerate(lengths)])[:, :, None]  # (B, 1, 1, D)
    assert_close_rule("rotated channels", written[..., :16], apply_rotary(k_new.double(), cos, sin, pos)[..., :16],
                      apply_rotary(k_new, cos, sin, pos)[..., :16])
    assert torch.equal(bits(written[..., 16:]), bits(k_new[..., 16:])), "the values are k_new's channels 16.."
    for i, n in enumerate(lengths):
        before[i, :, n] = kv[i, :, n]
    assert torch.equal(bits(kv), bits(before)), "a slot besides the new token's changed"


@pytest.mark.parametrize("bad", ["v_new-given", "rotary-over-the-values"])
def test_inconsistent_values_in_keys_raise(bad, device):
    """With v_cache a view of k_cache's channels the append writes K only: a v_new or a rotary
    embedding over the value channels is refused naming the argument, and nothing is written.
    (One buffer as both caches that is not a channel view still raises: test_hard_inputs.)"""
    kv = torch.randn(1, 1, 16, 48, device=device)
    q, k_new = torch.randn(1, 2, 1, 48, device=device), torch.randn(1, 1, 1, 48, device=device)
    kw, match = dict(v_new=k_new[..., :32]), "v_new must be None"
    if bad == "rotary-over-the-values":
        kw = dict(zip(("rotary_cos", "rotary_sin"), rope_tables(16, 16, device)))
        match = "rotary_cos .* would rotate the values"
    before = kv.clone()
    with pytest.raises(ValueError, match=match):
        fastattn.attention_with_kvcache(q, kv, kv[..., :32], 3, k_new=k_new, **kw)
    assert torch.equal(kv, before)


def test_flash_attn_with_kvcache_mla(device):
    """FlashAttention's interface with MLA's shapes: q (B, 1, 16, 576), the latent cache
    (B, Lmax, 1, 576) and its first 512 channels as v_cache, k appended with v None: equals
    attention_with_kvcache on the same (transposed) inputs, bit for bit, caches included."""
    from fastattn.flash_attn_interface import flash_attn_with_kvcache

    b, lmax, d, dv = 2, 32, 576, 512
    kv = torch.randn(b, lmax, 1, d, device=device).to(torch.bfloat16)
    q, k = (torch.randn(b, 1, h, d, device=device).to(torch.bfloat16) for h in (16, 1))
    seqlens = torch.tensor([9, 30], dtype=torch.int32, device=device)
    kv2 = kv.clone()
    with fastattn.use_backend("triton"):
        out, lse = flash_attn_with_kvcache(q, kv, kv[..., :dv], k=k, cache_seqlens=seqlens, causal=True,
                                           num_splits=2, return_softmax_lse=True)
        want, want_lse = fastattn.attention_with_kvcache(
            q.transpose(1, 2), kv2.transpose(1, 2), kv2.transpose(1, 2)[..., :dv], seqlens,
            k_new=k.transpose(1, 2), num_splits=2, return_lse=True)
    assert out.shape == (b, 1, 16, dv)
    assert torch.equal(bits(out), bits(want.transpose(1, 2))) and torch.equal(lse, want_lse)
    assert torch.equal(bits(kv), bits(kv2))


def test_batch_invariant_decode_at_head_dim_512(device):
    """fastattn.batch_invariant() at head dim 512 (v 256): two new tokens of a ragged batch
    equal rows of flash_attention(causal=True) over the whole sequences, bit for bit. (At MLA's
    576 the interpreter cannot say: NumPy's fp32 matmul over 1024 columns sums in an order that
    depends on the row count, and the decode tile has fewer rows than the forward's.)"""
    hq, hkv, d, dv, dtype, lnew, lengths = 4, 1, 512, 256, torch.bfloat16, 2, [70, 45]
    seqs = [[torch.randn(1, h, n, w, device=device, dtype=dtype) for h, w in ((hq, d), (hkv, d), (hkv, dv))]
            for n in lengths]
    held = [n - lnew for n in lengths]
    kc, vc = (torch.zeros(2, hkv, 80, w, device=device, dtype=dtype) for w in (d, dv))
    for i, n in enumerate(held):
        kc[i, :, :n], vc[i, :, :n] = seqs[i][1][0, :, :n], seqs[i][2][0, :, :n]
    q, k_new, v_new = (torch.cat([s[x][:, :, -lnew:] for s in seqs]) for x in range(3))
    with fastattn.use_backend("triton"):
        want = [fastattn.flash_attention(*s, causal=True)[:, :, -lnew:] for s in seqs]
        with fastattn.batch_invariant():
            out = fastattn.attention_with_kvcache(q, kc, vc, torch.tensor(held, dtype=torch.int32, device=device),
                                                  k_new=k_new, v_new=v_new)
    for r in range(2):
        assert torch.equal(bits(out[r:r + 1]), bits(want[r])), f"sequence {r}"

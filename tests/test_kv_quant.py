"""8-bit KV caches (``attention_with_kvcache(..., k_scale=, v_scale=)``): float8_e4m3fn and int8
caches, per-tensor and per-token scales, contiguous and paged, with new tokens appended.

Each call is checked twice: (a) against the float64 reference over the dequantized caches it
leaves (the error rule, plain PyTorch in q's dtype as the yardstick), and (b) against the float64
attention of the unquantized inputs, with plain PyTorch's own quantization
(``reference.quantize_kv``) followed by attention in q's dtype as the yardstick, so the bound
comes from the quantization itself, not a hand-set tolerance. Keys are realistic: a few channels
20x larger than the rest, plus a per-channel offset. Slots past each sequence (and their
per-token scales) hold NaN / garbage bytes: the kernels must not read them.

Kernels run on CUDA when present, otherwise under TRITON_INTERPRET=1 (see conftest.py).
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.ops.decode.reference import decode_reference, dequantize_kv, gather_pages, quantize_kv  # noqa: E402
from helpers import DTYPES, assert_close_rule, max_err  # noqa: E402

DTYPES8 = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
B, HQ, HKV, D, PAGE, LNEW = 2, 4, 2, 32, 16, 2
LENGTHS = (13, 29)  # tokens cached before the append; Lmax = 48 (3 pages of 16)
LMAX = 48


def realistic_keys(*shape):
    """Keys (..., D) as LLMs produce them: a few outlier channels 20x the rest, and offsets."""
    k = torch.randn(*shape)
    k[..., [3, 17]] *= 20.0
    return k + torch.randn(shape[-1]) * 0.5


def _garbage(t, valid):
    """t with every slot past the valid prefix (``valid`` bool (B, Lmax)) set to NaN bytes
    (0x7F: NaN in e4m3, 127 in int8; NaN for the float32 scales)."""
    bad = ~valid
    if t.dtype == torch.float32:
        return t.masked_fill(bad[:, None, :], float("nan"))
    u = t.view(torch.uint8).masked_fill(bad[:, None, :, None], 0x7F)
    return u.view(t.dtype)


def _to_pages(t, table):
    """Logical (B, Hkv, Lmax, ...) -> pages (num_pages, PAGE, Hkv, ...), sequence b's page j at
    table[b, j]; pages no sequence uses hold garbage bytes."""
    b, h, lmax = t.shape[:3]
    rest = t.shape[3:]
    src = t.view(torch.uint8) if t.dtype != torch.float32 else t
    pages = torch.full((int(table.max()) + 2, PAGE, h, *rest), 0x7F if src.dtype == torch.uint8 else float("nan"),
                       dtype=src.dtype)
    pages[table.flatten().long()] = src.reshape(b, h, lmax // PAGE, PAGE, *rest).movedim(1, 3) \
        .reshape(-1, PAGE, h, *rest)
    return pages.view(t.dtype) if t.dtype != torch.float32 else pages


def _logical(pages, table):
    """Pages back to the logical (B, Hkv, Lmax, ...) layout (gather_pages on the bytes)."""
    if pages.dim() == 3:  # scales (num_pages, PAGE, Hkv)
        return gather_pages(pages[..., None], table)[..., 0]
    return gather_pages(pages.view(torch.uint8), table).view(pages.dtype)


def make_case(dtype8, per_token, qdtype, device):
    """Unquantized inputs, and the 8-bit caches holding the quantized cached tokens.

    Returns (q, k (B, Hkv, Lmax, D) float, v, k_new, v_new, seqlens, k8, v8, k_scale, v_scale):
    k / v the float32 cached tokens (valid prefix), k8 / v8 / scales the caches with garbage past
    each prefix; per-tensor scales are calibrated to the absmax of everything cached or new."""
    q = torch.randn(B, HQ, LNEW, D).to(qdtype)
    k, v = realistic_keys(B, HKV, LMAX, D), torch.randn(B, HKV, LMAX, D)
    k_new, v_new = realistic_keys(B, HKV, LNEW, D).to(qdtype), torch.randn(B, HKV, LNEW, D).to(qdtype)
    k, v = k.to(qdtype).float(), v.to(qdtype).float()  # the model's values are in q's dtype
    valid = torch.arange(LMAX)[None, :] < torch.tensor(LENGTHS)[:, None]
    scales = [None, None]
    if not per_token:
        qmax = 448.0 if dtype8 == torch.float8_e4m3fn else 127.0
        scales = [torch.tensor([max(x.abs().max(), xn.float().abs().max()) / qmax]) for x, xn in
                  ((k, k_new), (v, v_new))]
    (k8, ks), (v8, vs) = quantize_kv(k, dtype8, scales[0]), quantize_kv(v, dtype8, scales[1])
    k8, v8 = _garbage(k8, valid), _garbage(v8, valid)
    if per_token:
        ks, vs = _garbage(ks, valid), _garbage(vs, valid)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    to = (lambda *ts: [t.to(device) for t in ts])  # noqa: E731
    return to(q, k, v, k_new, v_new, seqlens, k8, v8, ks, vs)


def assert_appended(name, got_deq, want_deq, new):
    """The append's dequantized entries against plain PyTorch's quantization of the same tokens:
    the same values where both sides compute in IEEE arithmetic (the interpreter, the fallback);
    on a GPU, whose fp32 division may round a quotient differently, within 2x plain PyTorch's
    quantization error."""
    if got_deq.device.type == "cpu":
        assert torch.equal(got_deq, want_deq), (name, max_err(got_deq, want_deq))
    else:
        assert max_err(got_deq, new) <= 2 * max_err(want_deq, new), name


CASES = [(layout, name8, scales, DTYPES[i % 3])
         for i, (layout, name8, scales) in enumerate(itertools.product(
             ("contiguous", "paged"), DTYPES8, ("per-tensor", "per-token")))]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout,name8,scales,qdtype", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}" for c in CASES])
def test_8bit_cache_matches_references(layout, name8, scales, qdtype, backend, device):
    """The kernels (triton) and the CPU fallback (torch): the append's 8-bit entries and scales
    equal plain PyTorch's quantization of the new tokens (exactly where the arithmetic is
    IEEE: the interpreter and the fallback), and the output meets the error rule against
    (a) the float64 attention over the dequantized caches and (b) the float64 attention of the
    unquantized inputs, the bound of (b) set by plain PyTorch's quantization."""
    dtype8, per_token = DTYPES8[name8], scales == "per-token"
    q, k, v, k_new, v_new, seqlens, k8, v8, ks, vs = make_case(dtype8, per_token, qdtype, device)
    table = None
    caches = [k8.clone(), v8.clone(), ks.clone(), vs.clone()]
    if layout == "paged":  # each sequence's pages in random order
        table = torch.randperm(B * LMAX // PAGE, dtype=torch.int32, device=device).view(B, LMAX // PAGE)
        caches = [_to_pages(t, table) for t in caches[:2]] + \
            [_to_pages(t, table) if per_token else t for t in caches[2:]]
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kvcache(q, caches[0], caches[1], seqlens, k_new=k_new, v_new=v_new,
                                              k_scale=caches[2], v_scale=caches[3], block_table=table)
    if layout == "paged":
        caches = [_logical(t, table) for t in caches[:2]] + [_logical(t, table) if per_token else t for t in caches[2:]]
    k8_got, v8_got, ks_got, vs_got = caches

    # The append: plain PyTorch's quantization of the new tokens, in their slots.
    slots = torch.tensor(LENGTHS, device=device)[:, None] + torch.arange(LNEW, device=device)  # (B, LNEW)
    at = (lambda t: t[torch.arange(B, device=device)[:, None], :, slots].transpose(1, 2))  # noqa: E731
    for name, got8, got_s, new, given in (("k", k8_got, ks_got, k_new, ks), ("v", v8_got, vs_got, v_new, vs)):
        want_deq = dequantize_kv(*quantize_kv(new, dtype8, None if per_token else given), torch.float64)
        assert_appended(name, at(dequantize_kv(got8, got_s, torch.float64)), want_deq, new)

    # (a) the float64 attention over the dequantized caches the call left.
    total = seqlens + LNEW
    deq = [dequantize_kv(c, s, torch.float64) for c, s in ((k8_got, ks_got), (v8_got, vs_got))]
    deq_t = [dequantize_kv(c, s, qdtype) for c, s in ((k8_got, ks_got), (v8_got, vs_got))]
    assert_close_rule("out (dequantized)", out, decode_reference(q.double(), *deq, total),
                      decode_reference(q, *deq_t, total))
    # (b) the float64 attention of the unquantized inputs; yardstick: plain PyTorch quantizing the
    # cached and the new tokens the same way, then attending in q's dtype.
    oracle = decode_reference(q.double(), k.double(), v.double(), seqlens, k_new.double(), v_new.double())
    plain = [dequantize_kv(*quantize_kv(x, dtype8, None if per_token else s), qdtype)
             for x, s in ((k, ks), (v, vs), (k_new, ks), (v_new, vs))]
    assert_close_rule("out (unquantized)", out, oracle, decode_reference(q, plain[0], plain[1], seqlens, *plain[2:]))


def _small_8bit(dtype8=torch.int8, per_token=True):
    q, _, _, k_new, v_new, seqlens, k8, v8, ks, vs = make_case(dtype8, per_token, torch.float16, "cpu")
    return q, k8, v8, seqlens, dict(k_new=k_new, v_new=v_new, k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("bad", ["no-scales", "one-scale", "scale-dtype", "scale-shape", "mixed-kinds", "nan",
                                 "inf", "zero", "fp8-q", "fp8-q-bf16-cache", "scale-with-16bit", "mixed-caches",
                                 "broadcast-scale", "values-in-keys"])
def test_bad_8bit_input_raises_value_error_naming_it(bad):
    q, k8, v8, seqlens, kw = _small_8bit()
    names = {"no-scales": "k_scale", "one-scale": "v_scale", "scale-dtype": "k_scale", "scale-shape": "v_scale",
             "mixed-kinds": "v_scale", "nan": "k_scale", "inf": "v_scale", "zero": "k_scale", "fp8-q": "q",
             "fp8-q-bf16-cache": "k_cache", "scale-with-16bit": "k_scale", "mixed-caches": "v_cache",
             "broadcast-scale": "k_scale", "values-in-keys": "v_cache"}
    if bad == "no-scales":
        kw.update(k_scale=None, v_scale=None)
    elif bad == "one-scale":
        kw.update(v_scale=None)
    elif bad == "scale-dtype":
        kw["k_scale"] = kw["k_scale"].half()
    elif bad == "scale-shape":
        kw["v_scale"] = kw["v_scale"][:, :, :-1]
    elif bad == "mixed-kinds":
        kw["v_scale"] = torch.tensor([0.1])
    elif bad in ("nan", "inf", "zero"):
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[bad]
        kw.update(k_scale=torch.tensor([0.1 if bad == "inf" else value]),
                  v_scale=torch.tensor([value if bad == "inf" else 0.1]))
    elif bad == "fp8-q":
        q = q.to(torch.float8_e4m3fn)
        k8, v8 = k8.to(torch.float8_e4m3fn), v8.to(torch.float8_e4m3fn)
        kw.update(k_new=kw["k_new"].to(torch.float8_e4m3fn), v_new=kw["v_new"].to(torch.float8_e4m3fn))
    elif bad == "fp8-q-bf16-cache":
        q, k8, v8 = q.to(torch.float8_e4m3fn), k8.to(torch.bfloat16), v8.to(torch.bfloat16)
        kw.update(k_new=None, v_new=None, k_scale=None, v_scale=None)
    elif bad == "scale-with-16bit":
        k8, v8 = k8.to(torch.float16), v8.to(torch.float16)
    elif bad == "mixed-caches":
        v8 = v8.to(torch.float8_e4m3fn)
    elif bad == "broadcast-scale":
        kw["k_scale"] = kw["k_scale"][:, :, :1].expand(-1, -1, LMAX)
    elif bad == "values-in-keys":  # MLA's layout: V a view of K's first channels
        v8 = k8[..., :k8.shape[-1] // 2]
        kw.update(v_new=None)
    with pytest.raises(ValueError, match=names[bad]):
        fastattn.attention_with_kvcache(q, k8, v8, seqlens, **kw)


@pytest.mark.parametrize("name8,paged", [("fp8", False), ("int8", True)], ids=["fp8-contiguous", "int8-paged"])
def test_gpt_generates_with_an_8bit_cache_in_half_the_bytes(name8, paged, device, monkeypatch):
    """A tiny bf16 GPT (head dim 32, RoPE, GQA 2) generates greedily with a bf16 cache and with an
    8-bit one: the 8-bit cache holds (D + 4) / (2 D) of the bf16 cache's bytes (8-bit keys and
    values, a float32 scale per token, head and tensor: 56% at D = 32, 52% at D = 128), and the
    tokens agree with the bf16 cache's for the first ``AGREE`` steps, the whole run on these
    weights (bf16 rounding alone already makes long runs diverge, so this is a record, not a
    bound; the note states the count)."""
    from fastattn.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, positional="rope",
                          max_seq_len=64)).to(device=device, dtype=torch.bfloat16)
    prompt = torch.randint(0, 64, (2, 8), device=device)
    made = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: made.append(new_cache(*a, **kw)) or made[-1])
    steps = 10
    with fastattn.use_backend("triton"):
        ref = model.generate(prompt, steps, paged=paged)
        got = model.generate(prompt, steps, paged=paged, cache_dtype=DTYPES8[name8])
    d = model.config.head_dim
    assert made[1].quantized and made[1].nbytes() * 2 * d == made[0].nbytes() * (d + 4)
    agree = int((got[:, 8:] == ref[:, 8:]).all(0).cumprod(0).sum())  # leading steps where every sequence agrees
    assert agree == steps, f"the 8-bit cache's tokens diverge from the bf16 cache's after {agree} of {steps} steps"


def test_flash_attn_with_kvcache_takes_8bit_caches_in_its_layout(device):
    """FlashAttention's interface: caches (B, Lmax, Hkv, D) and per-token scales (B, Lmax, Hkv)
    give what attention_with_kvcache gives on the (B, Hkv, Lmax, D) views: the same output, the
    same bytes and scales written."""
    from fastattn.flash_attn_interface import flash_attn_with_kvcache

    q, _, _, k_new, v_new, seqlens, k8, v8, ks, vs = make_case(torch.float8_e4m3fn, True, torch.float16, device)
    fa = [t.transpose(1, 2).contiguous() for t in (k8, v8, ks, vs)]  # FlashAttention's layout
    with fastattn.use_backend("triton"):
        want = fastattn.attention_with_kvcache(q, k8, v8, seqlens, k_new=k_new, v_new=v_new, k_scale=ks, v_scale=vs)
        got = flash_attn_with_kvcache(q.transpose(1, 2), fa[0], fa[1], k_new.transpose(1, 2), v_new.transpose(1, 2),
                                      cache_seqlens=seqlens, causal=True, k_scale=fa[2], v_scale=fa[3])
    assert torch.equal(got.transpose(1, 2), want)
    for mine, theirs in zip((k8, v8), fa[:2]):
        assert torch.equal(theirs.transpose(1, 2).view(torch.uint8), mine.view(torch.uint8))
    for mine, theirs in zip((ks, vs), fa[2:]):  # NaN past each sequence, as made
        assert torch.equal(theirs.transpose(1, 2).nan_to_num(), mine.nan_to_num())


def test_decode_bench_8bit_rows_check_and_count_their_bytes():
    """The decode suite's fp8 / int8 rows (CPU fallback here) pass their own accuracy check,
    and count (D + 4) bytes per token, head and tensor against the 16/32-bit rows' D * itemsize."""
    from fastattn.bench import decode

    rows = {c.impl: c for c in decode.cases("cpu", config_list=[(2, 4, 2, 40, 16)])}
    for impl in ("fastattn-fp8", "fastattn-int8"):
        rows[impl].check()
        assert rows[impl].params["cache_bytes_per_token"] == 2 * 2 * (16 + 4)
        assert rows[impl].bytes == 2 * 40 * 2 * 2 * (16 + 4)
    assert rows["fastattn"].params["cache_bytes_per_token"] == 2 * 2 * 16 * 4  # fp32 on a CPU


@pytest.mark.parametrize("scales", ["per-tensor", "per-token"])
def test_fp8_cache_as_bytes_before_sm89(scales, device, monkeypatch):
    """Before sm_89 compiled Triton takes no e4m3 pointer: the kernels get the cache's bytes and
    encode / decode e4m3 themselves. That path gives the same output and the same bytes as the
    e4m3 one."""
    from fastattn.ops.decode import op

    q, _, _, k_new, v_new, seqlens, k8, v8, ks, vs = make_case(torch.float8_e4m3fn, scales == "per-token",
                                                               torch.float16, device)
    runs = []
    for native in (True, False):
        monkeypatch.setattr(op, "_fp8_native", lambda _device, native=native: native)
        caches = [t.clone() for t in (k8, v8, ks, vs)]
        with fastattn.use_backend("triton"):
            out = fastattn.attention_with_kvcache(q, caches[0], caches[1], seqlens, k_new=k_new, v_new=v_new,
                                                  k_scale=caches[2], v_scale=caches[3])
        runs.append((out, *caches))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.nan_to_num(),
                           b.view(torch.uint8) if b.dtype != torch.float32 else b.nan_to_num())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name8,scales", [("fp8", "per-token"), ("int8", "per-tensor")])
def test_ragged_new_tokens_into_an_8bit_cache(name8, scales, backend, device):
    """cu_seqlens_q (1 and 3 new tokens, packed): each sequence appends its own tokens into the
    8-bit cache and attends causally over it; the bytes equal plain PyTorch's quantization and
    the output meets the rule against the float64 attention over the dequantized cache."""
    dtype8, per_token = DTYPES8[name8], scales == "per-token"
    _, _, _, _, _, seqlens, k8, v8, ks, vs = make_case(dtype8, per_token, torch.float16, device)
    counts = (1, 3)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
    q = torch.randn(4, HQ, D, device=device).half()
    k_new, v_new = realistic_keys(4, HKV, D).half().to(device), torch.randn(4, HKV, D, device=device).half()
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kvcache(q, k8, v8, seqlens, k_new=k_new, v_new=v_new, k_scale=ks, v_scale=vs,
                                              cu_seqlens_q=cu, max_seqlen_q=3)
    outs64, outs16 = [], []
    for b, (n, c) in enumerate(zip(LENGTHS, counts)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        for name, cache, scale, new in (("k", k8, ks, k_new), ("v", v8, vs, v_new)):
            got = dequantize_kv(cache[b, :, n:n + c], scale[b, :, n:n + c] if per_token else scale, torch.float64)
            new_b = new[rows].transpose(0, 1)  # (Hkv, c, D)
            assert_appended(name, got, dequantize_kv(*quantize_kv(new_b, dtype8, None if per_token else scale),
                                                     torch.float64), new_b)
        qb, total = q[rows].transpose(0, 1)[None], torch.tensor([n + c], device=device)
        deq = [[dequantize_kv(t[b:b + 1], s[b:b + 1] if per_token else s, dt) for t, s in ((k8, ks), (v8, vs))]
               for dt in (torch.float64, torch.float16)]
        outs64.append(decode_reference(qb.double(), *deq[0], total)[0].transpose(0, 1))
        outs16.append(decode_reference(qb, *deq[1], total)[0].transpose(0, 1))
    assert_close_rule("out", out, torch.cat(outs64), torch.cat(outs16))


def test_kv_cache_8bit_append_grow_and_reorder_keep_entries_and_scales():
    """fastattn.nn.KVCache with an e4m3 dtype: ``append`` stores plain PyTorch's per-token
    quantization, growing past a chunk copies entries and scales, ``reorder`` moves both."""
    from fastattn.nn import KVCache

    cache = KVCache(1, 2, HKV, D, dtype=torch.float8_e4m3fn, chunk_size=4)
    k, v = realistic_keys(2, HKV, 6, D), torch.randn(2, HKV, 6, D)
    cache.append(0, k[:, :, :3], v[:, :, :3])
    cache.append(0, k[:, :, 3:], v[:, :, 3:])  # past the first chunk of 4: grows
    cache.reorder(torch.tensor([1, 0, 1]))
    assert cache.capacity() == 8 and cache.seqlens(0).tolist() == [6, 6, 6]
    for got8, got_s, x in ((cache.keys(0), cache.key_scales(0), k), (cache.values(0), cache.value_scales(0), v)):
        want8, want_s = quantize_kv(x[[1, 0, 1]], torch.float8_e4m3fn)
        assert torch.equal(got8[:, :, :6].view(torch.uint8), want8.view(torch.uint8))
        assert torch.equal(got_s[:, :, :6], want_s)

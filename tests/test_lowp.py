"""Low-precision flash forwards: FP8 q/k/v with FlashAttention 3's descales, and smoothed INT8 q.k
(``qk_quant="int8"``), on the kernels (interpreted here) and on the CPU fallback.

Inputs are activations as real LLMs have them: keys with a few channels that are large and
share an offset (outlier channels), which is what makes per-tensor scales coarse and what K's
smoothing removes. Each mode is held to two bars, both from docs/design.md's rule (error at
most twice a plain-PyTorch yardstick's, against a float64 oracle):

- against float64 attention of the dequantized inputs (the values the kernels were given),
  with plain PyTorch in the same precision as the yardstick (fp8: P rounded to fp8 as the
  kernel does; int8: attention in q's 16-bit dtype);
- against float64 attention of the unquantized inputs, with this file's own plain-torch
  quantization as the yardstick (fp8: the tests quantize, and the yardstick above runs on the
  same fp8 values; int8: the same scheme written independently, then float32 attention): the
  quantization's own error sets the bar, no tolerance is hand-set.
"""
import pytest
import torch

import fastattn
from fastattn._env import capability
from fastattn.ops.flash.reference import (
    attention_reference, dequantize_fp8, dequantize_int8, smooth_quantize_int8, varlen_attention_reference,
)
from helpers import assert_close_rule, cu_seqlens

pytest.importorskip("triton")

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BACKENDS = ["triton", "torch"]  # the kernels, and the CPU fallback (float32 on the dequantized inputs)


def activations(b, hq, hkv, lq, lk, d, device, packed=False, transposed=False):
    """float32 q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) (or packed (total, H, D) with B = 1):
    four key channels are four times wider and offset by 8. ``transposed``: views of
    (B, L, H, D) buffers, as models make them."""
    q = torch.randn(b, lq, hq, d, device=device).transpose(1, 2)
    k = torch.randn(b, lk, hkv, d, device=device).transpose(1, 2)
    channels = torch.randperm(d, device=device)[:4]
    k[..., channels] = k[..., channels] * 4 + 8
    v = torch.randn(b, lk, hkv, d, device=device).transpose(1, 2)
    if packed:
        return tuple(t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    return (q, k, v) if transposed else tuple(t.contiguous() for t in (q, k, v))


def quantize_fp8(x, dtype, hkv, seq_ids=None, batch=None):
    """(fp8 x, float32 descale (B, Hkv)) with one scale per (batch row or packed sequence, kv
    head): the amax of the kv head's group of heads over the sequence, mapped to the fp8 max."""
    fmax = torch.finfo(dtype).max
    if seq_ids is None:
        amax = x.abs().unflatten(1, (hkv, -1)).amax(dim=(2, 3, 4))  # (B, Hkv)
        per_row = amax.repeat_interleave(x.shape[1] // hkv, 1)[:, :, None, None]
    else:
        rows = x.abs().unflatten(1, (hkv, -1)).amax(dim=(2, 3))  # (total, Hkv)
        amax = torch.zeros(batch, hkv, device=x.device).scatter_reduce_(0, seq_ids[:, None].expand_as(rows), rows,
                                                                        "amax")
        per_row = amax.repeat_interleave(x.shape[1] // hkv, 1)[seq_ids][:, :, None]
    descale = (amax / fmax).clamp(min=1e-12)
    return (x / (per_row / fmax).clamp(min=1e-12)).to(dtype), descale


def fp8_yardstick(q, k, v, **opts):
    """Plain PyTorch with fp8 P, on dense (B, H, L, D) float32 inputs: the reference's
    probabilities (P @ I), taken relative to the row max, times 256, rounded to e4m3 and back,
    as the kernel feeds its PV product (whatever the inputs' fp8 format)."""
    lk = k.shape[2]
    probs = attention_reference(q, k, torch.eye(lk, device=q.device).expand(*k.shape[:2], lk, lk), **opts)
    top = probs.amax(-1, keepdim=True).clamp(min=1e-30)
    p8 = (probs / top * 256).to(torch.float8_e4m3fn).float() * top / 256
    return p8 @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)


FP8_CASES = {
    "e4m3-causal-gqa-lse": dict(fmt="e4m3", hq=4, hkv=2, lq=80, lk=80, d=64, causal=True),
    "e4m3-window-sinks-chunk": dict(fmt="e4m3", hq=2, hkv=2, lq=40, lk=96, d=32, window=(24, 8), sinks=True),
    "e4m3-softcap-alibi-fp16out": dict(fmt="e4m3", hq=4, hkv=1, lq=48, lk=48, d=64, softcap=20.0, alibi=True,
                                       out_dtype=torch.float16),
    "e5m2-causal": dict(fmt="e5m2", hq=2, hkv=2, lq=64, lk=64, d=64, causal=True),
}


def _options(case, hq, device):
    opts = dict(causal=case.get("causal", False), window=case.get("window"), softcap=case.get("softcap"))
    if case.get("sinks"):
        opts["sinks"] = torch.randn(hq, device=device)
    if case.get("alibi"):
        opts["alibi_slopes"] = torch.rand(hq, device=device) * 0.2
    return opts


def _fp8_refused(device, backend, call) -> bool:
    """Whether the kernels refuse fp8 here: their products need compute capability 8.9 (a real
    GPU's, or the one FASTATTN_GPU_TILES=1 FASTATTN_GPU_ARCH=N fakes). Where they do, ``call``
    on the triton backend must raise saying why."""
    cap = capability(torch.device(device))
    if backend != "triton" or cap is None or cap >= 89:
        return False
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="compute capability 8.9"):
        call()
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FP8_CASES))
def test_fp8_forward(device, name, backend):
    case = FP8_CASES[name]
    dtype, out_dtype = FP8[case["fmt"]], case.get("out_dtype", torch.bfloat16)
    hq, hkv = case["hq"], case["hkv"]
    q, k, v = activations(2, hq, hkv, case["lq"], case["lk"], case["d"], device)
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t, dtype, hkv) for t in (q, k, v))
    opts = _options(case, hq, device)

    def call():
        return fastattn.flash_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd,
                                        out_dtype=case.get("out_dtype"), return_lse=True, **opts)
    if _fp8_refused(device, backend, call):
        return
    with fastattn.use_backend(backend):
        out, lse = call()
    assert out.dtype == out_dtype
    deq = [dequantize_fp8(t, s) for t, s in ((q8, qd), (k8, kd), (v8, vd))]
    oracle, lse64 = attention_reference(*(t.double() for t in deq), return_lse=True, **opts)
    yard = fp8_yardstick(*deq, **opts).to(out_dtype)
    assert_close_rule(f"{name} out vs dequantized", out, oracle, yard)
    assert_close_rule(f"{name} lse", lse, lse64, attention_reference(*deq, return_lse=True, **opts)[1])
    unquantized = attention_reference(q.double(), k.double(), v.double(), **opts)
    assert_close_rule(f"{name} out vs unquantized", out, unquantized, yard)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_varlen(device, backend):
    """Packed sequences (one without queries, one shorter than its keys), GQA, causal, sinks, lse;
    descales per sequence."""
    lengths_q, lengths_k = [30, 0, 17, 45], [30, 9, 40, 45]
    cq, ck = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    hq, hkv, d, dtype = 4, 2, 32, torch.float8_e4m3fn
    q = activations(1, hq, hkv, sum(lengths_q), 1, d, device, packed=True)[0]
    _, k, v = activations(1, hq, hkv, 1, sum(lengths_k), d, device, packed=True)
    ids_q = torch.repeat_interleave(torch.arange(4, device=device), torch.tensor(lengths_q, device=device))
    ids_k = torch.repeat_interleave(torch.arange(4, device=device), torch.tensor(lengths_k, device=device))
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t, dtype, hkv, ids, 4)
                                    for t, ids in ((q, ids_q), (k, ids_k), (v, ids_k)))
    opts = dict(causal=True, sinks=torch.randn(hq, device=device))

    def call():
        return fastattn.flash_attention_varlen(q8, k8, v8, cq, ck, q_descale=qd, k_descale=kd, v_descale=vd,
                                               return_lse=True, **opts)
    if _fp8_refused(device, backend, call):
        return
    with fastattn.use_backend(backend):
        out, lse = call()
    deq = [dequantize_fp8(t, s, cu) for t, s, cu in ((q8, qd, cq), (k8, kd, ck), (v8, vd, ck))]

    def reference(q_, k_, v_, **kw):
        return varlen_attention_reference(q_, k_, v_, cq, ck, **kw)

    oracle, lse64 = reference(*(t.double() for t in deq), return_lse=True, **opts)
    yard = torch.cat([fp8_yardstick(*seq, **opts)[0].transpose(0, 1)
                      for seq in _sequences(deq, cq, ck)]).to(torch.bfloat16)
    assert_close_rule("out vs dequantized", out, oracle, yard)
    assert_close_rule("lse", lse, lse64, reference(*deq, return_lse=True, **opts)[1])
    unquantized = reference(q.double(), k.double(), v.double(), **opts)
    assert_close_rule("out vs unquantized", out, unquantized, yard)


def _sequences(tensors, cq, ck):
    """Each packed sequence's (q, k, v) as (1, H, L, D) views."""
    q, k, v = tensors
    cq, ck = cq.tolist(), ck.tolist()
    return [(q[a:b].transpose(0, 1)[None], k[c:e].transpose(0, 1)[None], v[c:e].transpose(0, 1)[None])
            for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])]


def fake_int8(q, k):
    """This file's own plain-torch smoothed per-token INT8 (the scheme, written independently)
    of dense (B, H, L, D) q and k: float32 q and k as quantized and dequantized."""
    kf = k.float()
    mean = kf.mean(2, keepdim=True)

    def round_trip(x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
        return torch.round(x / s) * s

    return round_trip(q.float()), round_trip(kf - mean) + mean


INT8_CASES = {
    "bf16-causal-gqa-lse": dict(dtype=torch.bfloat16, hq=4, hkv=2, lq=80, lk=80, d=64, causal=True),
    "fp16-window-sinks-chunk-strided": dict(dtype=torch.float16, hq=2, hkv=2, lq=40, lk=96, d=32, window=(24, 8),
                                            sinks=True, transposed=True),
    "fp16-softcap-alibi": dict(dtype=torch.float16, hq=4, hkv=1, lq=48, lk=48, d=64, softcap=20.0, alibi=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(INT8_CASES))
def test_int8_forward(device, name, backend):
    """With softcap and sinks the row shift q.mean must be added back (they are not invariant to
    it), and the lse is the real logits'."""
    case = INT8_CASES[name]
    dtype, d = case["dtype"], case["d"]
    q, k, v = (t.to(dtype) for t in activations(2, case["hq"], case["hkv"], case["lq"], case["lk"], d, device,
                                                transposed=case.get("transposed", False)))
    opts = dict(_options(case, case["hq"], device), scale=d ** -0.5)
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attention(q, k, v, qk_quant="int8", return_lse=True, **opts)
    assert out.dtype == dtype
    qd, kd = dequantize_int8(*smooth_quantize_int8(q, k))
    oracle, lse64 = attention_reference(qd.double(), kd.double(), v.double(), return_lse=True, **opts)
    yard, yard_lse = attention_reference(qd.to(dtype), kd.to(dtype), v, return_lse=True, **opts)
    assert_close_rule(f"{name} out vs dequantized", out, oracle, yard)
    assert_close_rule(f"{name} lse", lse, lse64, yard_lse)
    unquantized = attention_reference(q.double(), k.double(), v.double(), **opts)
    own = attention_reference(*fake_int8(q, k), v.float(), **opts).to(dtype)
    assert_close_rule(f"{name} out vs unquantized", out, unquantized, own)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_varlen(device, backend):
    """Each packed sequence subtracts its own mean key; causal, GQA, lse."""
    lengths_q, lengths_k = [30, 0, 17, 45], [30, 9, 40, 45]
    cq, ck = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    hq, hkv, d, dtype = 4, 2, 32, torch.bfloat16
    q = activations(1, hq, hkv, sum(lengths_q), 1, d, device, packed=True)[0].to(dtype)
    _, k, v = (t.to(dtype) for t in activations(1, hq, hkv, 1, sum(lengths_k), d, device, packed=True))
    opts = dict(causal=True, scale=d ** -0.5)
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attention_varlen(q, k, v, cq, ck, qk_quant="int8", return_lse=True, **opts)

    def reference(q_, k_, v_, **kw):
        return varlen_attention_reference(q_, k_, v_, cq, ck, **kw)

    qd, kd = dequantize_int8(*smooth_quantize_int8(q, k, cq, ck))
    oracle, lse64 = reference(qd.double(), kd.double(), v.double(), return_lse=True, **opts)
    yard, yard_lse = reference(qd.to(dtype), kd.to(dtype), v, return_lse=True, **opts)
    assert_close_rule("out vs dequantized", out, oracle, yard)
    assert_close_rule("lse", lse, lse64, yard_lse)
    unquantized = reference(q.double(), k.double(), v.double(), **opts)
    own = torch.cat([attention_reference(*fake_int8(qb, kb), vb.float(), **opts)[0].transpose(0, 1)
                     for qb, kb, vb in _sequences((q, k, v), cq, ck)]).to(dtype)
    assert_close_rule("out vs unquantized", out, unquantized, own)


def _fp8_inputs(device, b=2, hq=4, hkv=2, length=16, d=32):
    q, k, v = (t.to(torch.float8_e4m3fn) for t in activations(b, hq, hkv, length, length, d, device))
    return q, k, v, torch.ones(b, hkv, device=device)


def _bad_inputs(device):
    """(id, call, the argument its message must name): each raises ValueError."""
    q8, k8, v8, ones = _fp8_inputs(device)
    q, k, v = (t.to(torch.bfloat16) for t in activations(2, 4, 2, 16, 16, 32, device))
    fa = fastattn.flash_attention
    nan, inf = ones.clone().fill_(float("nan")), ones.clone().fill_(float("inf"))
    return [
        ("descale-shape", lambda: fa(q8, k8, v8, q_descale=ones[:1]), "q_descale"),
        ("descale-dtype", lambda: fa(q8, k8, v8, k_descale=ones.half()), "k_descale"),
        ("descale-nan", lambda: fa(q8, k8, v8, v_descale=nan), "v_descale"),
        ("descale-inf", lambda: fa(q8, k8, v8, q_descale=inf), "q_descale"),
        ("descale-zero", lambda: fa(q8, k8, v8, k_descale=ones * 0), "k_descale"),
        ("descale-16bit", lambda: fa(q, k, v, q_descale=ones), "q_descale"),
        ("fp8-q-bf16-k", lambda: fa(q8, k, v8), "k.dtype"),
        ("fp8-dropout", lambda: fa(q8, k8, v8, dropout_p=0.1), "dropout_p"),
        ("out-dtype-16bit", lambda: fa(q, k, v, out_dtype=torch.float16), "out_dtype"),
        ("out-dtype-int", lambda: fa(q8, k8, v8, out_dtype=torch.int8), "out_dtype"),
        ("qk-quant-fp32", lambda: fa(q.float(), k.float(), v.float(), qk_quant="int8"), "qk_quant"),
        ("qk-quant-name", lambda: fa(q, k, v, qk_quant="int4"), "qk_quant"),
        ("qk-quant-dropout", lambda: fa(q, k, v, qk_quant="int8", dropout_p=0.1), "dropout_p"),
        ("qk-quant-grad", lambda: fa(q.requires_grad_(), k, v, qk_quant="int8"), "require grad"),
        ("varlen-descale-shape", lambda: fastattn.flash_attention_varlen(
            q8[0].transpose(0, 1), k8[0].transpose(0, 1), v8[0].transpose(0, 1), cu_seqlens([16], device),
            cu_seqlens([16], device), v_descale=ones), "v_descale"),
    ]


@pytest.mark.parametrize("index", range(15), ids=lambda i: _BAD_IDS[i])
def test_bad_low_precision_inputs(device, index):
    name, call, argument = _bad_inputs(device)[index]
    with pytest.raises(ValueError, match=argument):
        call()


_BAD_IDS = [case[0] for case in _bad_inputs("cpu")]


def test_fp8_flash_attn_interface(device):
    """FlashAttention 3's spelling: (B, L, H, D) fp8 tensors and keyword descales, bf16 out, as
    fastattn.flash_attention on the transposed views."""
    from fastattn.flash_attn_interface import flash_attn_func

    q8, k8, v8, _ = _fp8_inputs(device)
    kd = torch.rand(2, 2, device=device) + 0.5
    out = flash_attn_func(*(t.transpose(1, 2) for t in (q8, k8, v8)), causal=True, k_descale=kd)
    expected = fastattn.flash_attention(q8, k8, v8, causal=True, k_descale=kd)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.transpose(1, 2))


@pytest.mark.parametrize("test", [test_fp8_varlen, test_int8_varlen], ids=["fp8", "int8"])
def test_gpu_tiles_tma(device, monkeypatch, test):
    """The H100's launch (FASTATTN_GPU_TILES=1: TMA tensor descriptors and 128-row tiles under
    the interpreter): a packed sequence's last key tile is zeroed past its end after the TMA
    load, in the tile's own dtype (int8 too)."""
    monkeypatch.setenv("FASTATTN_GPU_TILES", "1")
    monkeypatch.setenv("FASTATTN_GPU_ARCH", "90")
    test(device, "triton")

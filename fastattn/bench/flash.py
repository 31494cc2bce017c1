"""Flash attention suite: fastattn vs torch SDPA's backends, FlexAttention and (if installed)
flash-attn, forward and forward+backward, causal and not, across head dims and sequence
lengths (and GQA).

On a GPU: bf16, 16k tokens per batch at hidden 2048 (B = 16384 / L, H = 2048 / D), the
setting of the FlashAttention papers. On a CPU: small fp32 sizes, where fastattn runs its
pure-PyTorch fallback (or the interpreted kernels under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, attention_flops
from fastattn.testing import assert_within_rule

SUITE = "flash"


def _sdpa_backends(device):
    """name -> context manager selecting one torch SDPA backend (those this torch has)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": "MATH"}
    if torch.device(device).type == "cuda":
        names.update(flash="FLASH_ATTENTION", efficient="EFFICIENT_ATTENTION", cudnn="CUDNN_ATTENTION")
    else:
        names.update(flash="FLASH_ATTENTION")  # torch's CPU flash kernel
    return {n: (lambda b=getattr(SDPBackend, v): sdpa_kernel(b)) for n, v in names.items() if hasattr(SDPBackend, v)}


def _flex(device, causal, lq, lk):
    """A compiled FlexAttention callable, or None where torch has none or it cannot compile."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, lq, lk, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def configs(device, quick):
    """(b, hq, hkv, l, d, causal) tuples. Head dim 512 (Gemma 4's global layers) at the same
    tokens per batch, 1k..16k tokens on a GPU; one small causal config on a CPU."""
    if torch.device(device).type == "cuda":
        lengths = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        out = []
        for d in (64, 128, 256):
            for l in lengths:
                for causal in (False, True):
                    out.append((16384 // l, 2048 // d, 2048 // d, l, d, causal))
        out += [(16384 // l, 16, 2, l, 128, True) for l in lengths]  # GQA 8:1
        out += [(16384 // l, 4, 4, l, 512, c) for l in D512_LENGTHS for c in (False, True)]
        return out
    lengths = [128, 256] if quick else [128, 256, 512, 1024]
    return ([(1, 4, 4, l, 64, c) for l in lengths for c in (False, True)] + [(1, 8, 2, lengths[-1], 64, True)]
            + [(1, 2, 2, lengths[0], 512, True)])


D512_LENGTHS = (1024, 4096, 16384)  # head dim 512 on a GPU: 16k tokens per batch, 4 heads (hidden 2048)


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own (bench.headline)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    out = []
    for b, hq, hkv, l, d, causal in (config_list if config_list is not None else configs(device, quick)):
        name = f"b{b}-h{hq}:{hkv}-l{l}-d{d}" + ("-causal" if causal else "")
        q = torch.randn(b, hq, l, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, l, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, l, d, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        impls = {"fastattn": lambda q, k, v, c=causal: fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=c, enable_gqa=q.shape[1] != k.shape[1])}
        for bname, ctx in _sdpa_backends(device).items():
            impls[f"torch-{bname}"] = lambda q, k, v, c=causal, ctx=ctx: _in(ctx, F.scaled_dot_product_attention,
                                                                             q, k, v, is_causal=c,
                                                                             enable_gqa=q.shape[1] != k.shape[1])
        flex = _flex(device, causal, l, l)
        if flex is not None:
            impls["flex"] = flex
        flash_attn = _flash_attn(device, causal)
        if flash_attn is not None:
            impls["flash-attn"] = flash_attn
        params = {"seq_len": l, "head_dim": d, "causal": causal, "gqa": hq // hkv}
        for impl, f in impls.items():
            fwd_flops = attention_flops(b, hq, l, l, d, causal=causal)
            out.append(Case(SUITE + "-fwd", name, impl, lambda f=f, q=q, k=k, v=v: f(q, k, v),
                            flops=fwd_flops, params=params,
                            check=_checker(f, causal, hq, hkv, d, dtype, device) if impl == "fastattn" else None))
            out.append(Case(SUITE + "-fwdbwd", name, impl,
                            lambda f=f, q=q, k=k, v=v, do=do: torch.autograd.grad(f(q, k, v), (q, k, v), do),
                            flops=attention_flops(b, hq, l, l, d, causal=causal, backward=True), params=params))
        out += _low_precision_cases(q.detach(), k.detach(), v.detach(), causal, name, params)
    return out


def _low_precision_cases(q, k, v, causal, name, params):
    """Forward rows of the low-precision modes on the config's inputs: "fastattn-fp8", q/k/v
    float8_e4m3fn with per-(batch, kv head) descales (bf16 output), and "fastattn-int8qk", the
    smoothed INT8 q.k (``qk_quant="int8"``; bf16 inputs, its quantization of q and k timed with
    it). On a CPU both run the fallback (float32 on the dequantized inputs): fallback numbers."""
    def fp8(x):
        descale = (x.abs().amax(dim=(2, 3)) / 448).float().clamp(min=1e-12)  # (B, H)
        return (x / descale[:, :, None, None]).to(torch.float8_e4m3fn), descale

    (q8, qd), (k8, kd), (v8, vd) = fp8(q), fp8(k), fp8(v)
    qd = qd.unflatten(1, (k.shape[1], -1)).amax(-1)  # one descale per kv head's group
    q8 = (q / qd.repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, None, None]).to(torch.float8_e4m3fn)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    flops = attention_flops(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], causal=causal)
    return [Case(SUITE + "-fwd", name, "fastattn-fp8", lambda: fastattn.flash_attention(
                q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd), flops=flops, params=params),
            Case(SUITE + "-fwd", name, "fastattn-int8qk", lambda: fastattn.flash_attention(
                q16, k16, v16, causal=causal, qk_quant="int8"), flops=flops, params=params)]


def _flash_attn(device, causal):
    """The flash-attn package's kernel, if it is installed (CUDA only), else None. It takes
    (B, L, H, D) and GQA natively; the transposes are views, not copies. Its causal is
    bottom-right, the same as top-left here (Lq == Lk)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           causal=causal).transpose(1, 2)


def _in(ctx, fn, *args, **kw):
    with ctx():
        return fn(*args, **kw)


def _checker(f, causal, hq, hkv, d, dtype, device):
    """Before timing: on a small instance of the same config, fastattn's error vs torch in
    float64 passes the docs/design.md rule (fastattn.testing) against torch's own error in the
    benchmark dtype; raises AssertionError when it does not."""
    def check():
        l = 256
        q = torch.randn(1, hq, l, d, device=device, dtype=dtype)
        k, v = (torch.randn(1, hkv, l, d, device=device, dtype=dtype) for _ in range(2))
        gqa = hq != hkv
        oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=gqa)
        assert_within_rule("fastattn", f(q, k, v), oracle,
                           F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa))
    return check

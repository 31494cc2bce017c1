"""Checks at scale (issue 10): long sequences, head_dim 256, batch x heads that fill the GPU,
bitwise repeatability, and a tensor past 2^31 elements (int64 addressing).

Each test runs at its real size on CUDA and at a small size in the interpreter on CPU, so the
checking code itself runs in CI; only the > 2^31-element case needs a GPU. Reference values
come from float64 on the query rows checked, so 32k-token cases need no 32k x 32k matrix.
"""
import math

import pytest
import torch

import fastattn
from fastattn.ops.flash.reference import attention_reference
from helpers import as64, assert_close_rule, randn, same_dtype_copy

ON_GPU = torch.cuda.is_available()
# (lengths, head dims) at each scale: the GPU sizes are the issue's, the CPU ones the
# interpreter's budget.
LENGTHS = (8192, 16384, 32768) if ON_GPU else (192,)
HEAD_DIMS = (64, 128, 256) if ON_GPU else (64,)
FILL = dict(b=8, h=16, l=2048, d=128) if ON_GPU else dict(b=2, h=2, l=64, d=32)  # 128 (b, h) pairs x 16 blocks


def _rows_reference(q, k, v, rows, causal):
    """float64 softmax attention of query rows ``rows`` over all keys (Lq == Lk), (B, H, R, D)."""
    scores = q[:, :, rows].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        future = torch.arange(k.shape[2], device=q.device)[None, :] > rows[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
def test_long_sequence_forward_rows(length, d, causal, device):
    """bf16 forward at 8k-32k tokens: 64 query rows (the first, the last, random ones in
    between) against float64, torch's SDPA in bf16 the yardstick."""
    q, k, v = (randn((1, 4, length, d), torch.bfloat16, device) for _ in range(3))
    rows = torch.cat([torch.tensor([0, length - 1]), torch.randint(1, length - 1, (62,))]).to(device)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, causal=causal)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close_rule(f"L{length} d{d} rows", out[:, :, rows], _rows_reference(q, k, v, rows, causal),
                      theirs[:, :, rows])


@pytest.mark.parametrize("length", [8192, 16384] if ON_GPU else [128], ids=lambda n: f"L{n}")
def test_long_sequence_backward(length, device):
    """bf16 causal forward + backward at 8k and 16k tokens, GQA 2:1, against float64 (the
    float64 reference at 16k holds 4 GiB per score-sized tensor: two heads, not more)."""
    q = randn((1, 2, length, 128), torch.bfloat16, device, requires_grad=True)
    k, v = (randn((1, 1, length, 128), torch.bfloat16, device, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (as64(t) for t in (q, k, v))
    out64 = attention_reference(q64, k64, v64, causal=True)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    qt, kt, vt = (same_dtype_copy(t) for t in (q, k, v))
    out_t = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    grads_t = torch.autograd.grad(out_t, (qt, kt, vt), do)
    assert_close_rule("out", out, out64, out_t)
    for name, g, g64, gt in zip("qkv", grads, grads64, grads_t):
        assert_close_rule(f"d{name}", g, g64, gt, factor=3.0)


def _fill_call(op, q, k, v):
    if op == "flash":
        return fastattn.flash_attention(q, k, v, causal=True)
    if op == "sparse":
        layout = fastattn.sparse.longformer(q.shape[2], 64 if ON_GPU else 16, global_tokens=(0,),
                                            block_size=64 if ON_GPU else 16)
        return fastattn.sparse_attention(q, k, v, layout)
    return fastattn.linear_attention(q, k, v, causal=True)


@pytest.mark.parametrize("op", ["flash", "sparse", "linear"])
def test_full_gpu_is_bitwise_repeatable(op, device):
    """Enough (batch, head) programs to fill every SM: the same inputs twice give bitwise
    equal outputs and gradients (no atomics anywhere: a race would show here), and the output
    follows the torch backend under the error rule."""
    b, h, length, d = FILL["b"], FILL["h"], FILL["l"], FILL["d"]
    q, k, v = (randn((b, h, length, d), torch.bfloat16, device, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def run():
        with fastattn.use_backend("triton"):
            out = _fill_call(op, q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    first, second = run(), run()
    for name, x, y in zip(["out", "dq", "dk", "dv"], first, second):
        assert torch.equal(x, y), f"{op} {name} differs between two identical calls"
    with fastattn.use_backend("torch"), torch.no_grad():
        want64 = _fill_call(op, *(as64(t) for t in (q, k, v)))
        want = _fill_call(op, q, k, v)
    assert_close_rule(f"{op} out", first[0], want64, want)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="2^31 elements per tensor (4 GiB in fp16) need a GPU")
def test_past_2_31_elements_sliding_window(device):
    """q, k, v of 2^24 + 64 tokens x 128 channels: offsets past 2^31 elements. A 128-token
    causal window keeps it cheap; the last 256 rows (and the keys only they see) are checked
    against float64 on the slice that determines them."""
    length, d, w, tail = 2 ** 24 + 64, 128, 128, 256
    q, k, v = (randn((1, 1, length, d), torch.float16, device, requires_grad=True) for _ in range(3))
    assert q.numel() > 2 ** 31
    do = torch.randn_like(q)
    with fastattn.use_backend("triton"):
        out = fastattn.flash_attention(q, k, v, causal=True, window=(w, 0))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    # The last `tail` queries see keys from length - tail - w on: bottom-right alignment of a
    # (tail, tail + w) slice puts them at the same positions.
    qs = as64(q[:, :, -tail:])
    ks, vs = (as64(t[:, :, -(tail + w):]) for t in (k, v))
    out64 = attention_reference(qs, ks, vs, causal=True, window=(w, 0))
    dq64, dk64, dv64 = torch.autograd.grad(out64, (qs, ks, vs), do[:, :, -tail:].double())
    qt, kt, vt = (same_dtype_copy(t) for t in (q[:, :, -tail:], k[:, :, -(tail + w):], v[:, :, -(tail + w):]))
    out_t = attention_reference(qt, kt, vt, causal=True, window=(w, 0))
    dqt, dkt, dvt = torch.autograd.grad(out_t, (qt, kt, vt), do[:, :, -tail:])
    assert_close_rule("out tail", out[:, :, -tail:], out64, out_t)
    assert_close_rule("dq tail", dq[:, :, -tail:], dq64, dqt, factor=3.0)
    # keys in the last w positions are seen only by the last tail queries
    assert_close_rule("dk tail", dk[:, :, -w:], dk64[:, :, -w:], dkt[:, :, -w:], factor=3.0)
    assert_close_rule("dv tail", dv[:, :, -w:], dv64[:, :, -w:], dvt[:, :, -w:], factor=3.0)


def test_fp16_causal_linear_attention_at_length(device):
    """fp16 causal linear attention (elu+1) at 8k tokens on a GPU (its fp32 state products run
    in tf32 there, and in the interpreter with operands rounded as tf32 does), forward and
    gradients against float64 by the rule, torch's fp16 reference the yardstick."""
    length = 8192 if ON_GPU else 256
    q, k, v = (randn((1, 4, length, 64), torch.float16, device, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    with fastattn.use_backend("triton"):
        out = fastattn.linear_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    args64, args16 = [as64(t) for t in (q, k, v)], [same_dtype_copy(t) for t in (q, k, v)]
    with fastattn.use_backend("torch"):
        out64, out16 = (fastattn.linear_attention(*a, causal=True) for a in (args64, args16))
    assert_close_rule("out", out, out64, out16)
    for name, g, g64, g16 in zip("qkv", grads, torch.autograd.grad(out64, args64, do.double()),
                                 torch.autograd.grad(out16, args16, do)):
        assert_close_rule(f"d{name}", g, g64, g16, factor=3.0)

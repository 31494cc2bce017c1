"""fastattn as torch's flash-attention implementation, through torch.nn.attention's registry.

The registration is tested under the CPU dispatch key (the GPU script runs it on CUDA): aten's
flash ops have no CPU kernel, so after activation every call here reaches fastattn, and after
``restore_flash_attention_impl`` none does. Outputs and gradients follow the docs/design.md
error rule against the float64 reference, with the kernels (Triton's interpreter) and with the
torch backend.
"""
import pytest
import torch
import torch.nn.attention as attention

import fastattn
from fastattn.ops.flash.reference import attention_reference, varlen_attention_reference
from helpers import as64, assert_close_rule

pytestmark = pytest.mark.skipif(not hasattr(attention, "register_flash_attention_impl"),
                                reason="this torch has no flash-implementation registry")


def _check(name, fn, reference, inputs, do):
    """fn(*inputs) vs reference in float64 (oracle) and in the inputs' dtype (yardstick)."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, do)
    args64 = [as64(t) for t in inputs]
    oracle = reference(*args64)
    grads64 = torch.autograd.grad(oracle, args64, do.double())
    base = reference(*inputs)
    grads_base = torch.autograd.grad(base, inputs, do)
    assert_close_rule(f"out {name}", out, oracle, base)
    for n, g, g64, gb in zip("qkv", grads, grads64, grads_base):
        assert_close_rule(f"d{n} {name}", g, g64, gb, factor=3.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_registered_flash_impl_runs_fastattn(impl, monkeypatch):
    import fastattn.distributed.torch_flash as torch_flash
    from torch.nn.attention.varlen import varlen_attn

    name = "fastattn-test-cpu"
    torch_flash.register(name, dispatch_key="CPU")
    assert name in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() is None  # registering activates nothing
    attention.activate_flash_attention_impl(name)
    try:
        with fastattn.use_backend(impl):
            # SDPA's flash op, (B, H, L, D), GQA, causal.
            q, k, v = (torch.randn(2, h, 19, 32, requires_grad=True) for h in (4, 2, 2))
            _check("sdpa flash", lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True)[0], lambda q, k, v: attention_reference(q, k, v, causal=True),
                [q, k, v], torch.randn(2, 4, 19, 32))
            # The FlashAttention-style op, (B, L, H, D), a sliding window (bottom-right, Lq < Lk).
            q, k, v = (torch.randn(1, n, 3, 16, requires_grad=True) for n in (13, 21, 21))

            def flash(q, k, v):
                return torch.ops.aten._flash_attention_forward(q, k, v, None, None, 13, 21, 0.0, True, False,
                                                               window_size_left=5, window_size_right=-1)[0]

            _check("flash forward", flash, lambda q, k, v: attention_reference(
                *(t.transpose(1, 2) for t in (q, k, v)), causal=True, window=(5, None)).transpose(1, 2),
                [q, k, v], torch.randn(1, 13, 3, 16))
            # torch.nn.attention.varlen.varlen_attn on packed sequences of 5, 9 and 1 tokens, causal;
            # the kernels' backward runs once for every sequence together.
            cu = torch.tensor([0, 5, 14, 15], dtype=torch.int32)
            q, k, v = (torch.randn(15, 2, 16, requires_grad=True) for _ in range(3))
            if impl == "triton":
                from fastattn.ops.flash import op as flash_op

                real_bwd, backwards = flash_op.flash_bwd, []
                monkeypatch.setattr(flash_op, "flash_bwd", lambda *a: backwards.append(a) or real_bwd(*a))
            _check("varlen_attn", lambda q, k, v: varlen_attn(q, k, v, cu, cu, 9, 9, window_size=(-1, 0)),
                   lambda q, k, v: varlen_attention_reference(q, k, v, cu, cu, causal=True),
                   [q, k, v], torch.randn(15, 2, 16))
            if impl == "triton":
                assert len(backwards) == 1
            with pytest.raises(RuntimeError, match="dropout_p must be 0"):
                torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.1)
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
    with pytest.raises(NotImplementedError):  # deregistered: aten has no CPU flash kernel again
        torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU check runs it")
def test_registered_flash_impl_is_sdpas_flash_backend_on_cuda():
    """On CUDA, F.scaled_dot_product_attention's flash backend itself runs fastattn once the
    user activates it (bf16, causal, forward and backward by the error rule)."""
    import fastattn.distributed.torch_flash as torch_flash
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = "fastattn-test-cuda"
    torch_flash.register(name)
    attention.activate_flash_attention_impl(name)
    try:
        inputs = [torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        _check("cuda sdpa", sdpa, lambda q, k, v: attention_reference(q, k, v, causal=True), inputs,
               torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16))
    finally:
        attention.restore_flash_attention_impl()

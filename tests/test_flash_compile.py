"""The flash kernels compile for the H100 (sm_90) and fit its shared memory, checked on a
machine without a GPU: Triton compiles to a cubin ahead of time when given the target.

This catches what the interpreter cannot: compile errors (non-constexpr globals, type
mismatches between branches) and tiles that would not fit on the device. The configs tried
are the launchers' own (op.block_config) with every feature on, the largest footprint.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastattn.ops.flash import kernels, op  # noqa: E402

H100_SHARED_BYTES = 232448  # 227 KB usable per block on sm_90
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FP32_PTRS = {"LSE", "ALIBI", "DELTA", "DS", "BIAS"}
_SCALARS_FP32 = {"scale", "softcap", "dropout_p"}


def compile_sm90(kernel, dtype, constexprs, num_warps):
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "SEED":
            signature[p.name] = "*i64"
        elif p.name in _FP32_PTRS:
            signature[p.name] = "*fp32"
        elif p.name.isupper():  # tensor arguments are upper case, scalars lower case
            signature[p.name] = _PTR[dtype]
        elif p.name in _SCALARS_FP32:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def flash_kernels_sm90(dtype, head_dim):
    """Compile forward, dK/dV and dQ for one dtype and head dim; yields (name, compiled)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    for name, kernel, backward, extra in (
        ("fwd", kernels.attn_fwd_kernel, False, {}),
        ("dkdv", kernels.attn_bwd_dkdv_kernel, True, {}),
        ("dq", kernels.attn_bwd_dq_kernel, True, {"STORE_DS": True}),
    ):
        block_m, block_n, warps = op.block_config(head_dim, dtype, backward)
        constexprs = dict(
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, BLOCK_DV=block_d, HAS_BIAS=True, BIAS_IS_BOOL=False,
            HAS_ALIBI=True, HAS_SOFTCAP=True, HAS_DROPOUT=True, HAS_LEFT=True, HAS_RIGHT=True,
            DOT_FP32=False, PRECISION="ieee", **extra)
        yield name, compile_sm90(kernel, dtype, constexprs, warps)


# A few worst cases keep CI short (each compile takes seconds); the largest tiles are fp32
# at head_dim 256. Run the whole grid with: python tests/test_flash_compile.py
CASES = [(torch.float16, 128), (torch.bfloat16, 80), (torch.float32, 256)]


@pytest.mark.parametrize("dtype,head_dim", CASES, ids=[f"{str(d)[6:]}-d{h}" for d, h in CASES])
def test_flash_kernels_compile_for_h100(dtype, head_dim, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # block_config must give the GPU tiles
    for name, compiled in flash_kernels_sm90(dtype, head_dim):
        assert compiled.metadata.shared <= H100_SHARED_BYTES, (
            f"{name} needs {compiled.metadata.shared} bytes of shared memory")


if __name__ == "__main__":
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    for dtype in _PTR:
        for head_dim in (16, 32, 40, 64, 80, 96, 128, 160, 256):
            sizes = {name: c.metadata.shared for name, c in flash_kernels_sm90(dtype, head_dim)}
            fits = all(v <= H100_SHARED_BYTES for v in sizes.values())
            print(f"{dtype} d={head_dim}: {sizes} {'ok' if fits else 'TOO LARGE'}", flush=True)

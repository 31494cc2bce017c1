"""Compile kernels for the H100 (sm_90) on a machine without a GPU, and check that they fit
its shared memory. Triton compiles to a cubin ahead of time when given the target.

This catches what the interpreter cannot: compile errors (non-constexpr globals, type
mismatches between branches, dot shapes) and tiles that would not fit on the device.
It must run with TRITON_INTERPRET=0 (an interpreted kernel cannot be compiled), so
tests/test_sm90_compile.py runs it in a subprocess:

    python tests/sm90.py flash-fp16-d128        # one case, prints JSON
    python tests/sm90.py all                    # every case, one line each

Each op registers its cases in CASES: name -> function returning [(kernel_name, compiled)].
Use the launchers' own block configs with every feature on (the largest footprint).
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

H100_SHARED_BYTES = 232448  # 227 KB usable per block on sm_90
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_sm90(kernel, constexprs, num_warps, pointers, floats=(), default_pointer="*fp32", tuples=None):
    """Compile ``kernel`` for sm_90. Arguments in ``pointers`` (name -> "*fp16" etc.) and
    upper-case names (pointers, by the kernels' naming rule, typed ``default_pointer``) are
    pointers; ``floats`` are fp32 scalars; ``tuples`` (name -> length) are tuples of i32 (a
    tensor's strides); other runtime arguments are i32."""
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif tuples and p.name in tuples:
            signature[p.name] = ("i32",) * tuples[p.name]
        elif p.name in pointers:
            signature[p.name] = pointers[p.name]
        elif p.name.isupper():
            signature[p.name] = default_pointer
        elif p.name in floats:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def flash_case(dtype, head_dim):
    from fastattn.ops.flash import kernels, op

    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = {n: "*fp32" for n in ("LSE", "ALIBI", "DELTA", "DS", "BIAS")}
    out = []
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
            DOT_FP32=False, PRECISION="ieee", BF16_RTNE=False, **extra)
        out.append((name, compile_sm90(kernel, constexprs, warps, {**fp32, "SEED": "*i64"},
                                       floats=("scale", "softcap", "dropout_p"),
                                       default_pointer=PTR[dtype])))
    return out


CASES = {
    f"flash-{str(dtype)[6:]}-d{d}": (lambda dtype=dtype, d=d: flash_case(dtype, d))
    for dtype in PTR for d in (16, 32, 40, 64, 80, 96, 128, 160, 256)
}


def decode_case(dtype, head_dim):
    """Append, split (partial and single-split) and merge kernels, largest row block."""
    from fastattn.ops.decode import kernels, op

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, warps = op.block_config(head_dim, op._MAX_BLOCK_M, dtype)
    ptr = PTR[dtype]
    split = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=block_d, BLOCK_DV=block_d, HAS_ALIBI=True, HAS_SOFTCAP=True,
                 HAS_LEFT=True, HAS_RIGHT=True, DOT_FP32=False, PRECISION="ieee",
                 HAS_ROTARY=True, ROT_DIM=head_dim,
                 ROT_INTERLEAVED=False, BF16_RTNE=False)
    rot_ptrs = {"COS": "*fp32", "SIN": "*fp32"}
    out = []
    for single in (False, True):
        pointers = {"SEQLENS": "*i32", "ALIBI": "*fp32", "LSE": "*fp32", "O": ptr if single else "*fp32",
                    **rot_ptrs}
        out.append((f"split{'-single' if single else ''}",
                    compile_sm90(kernels.decode_split_kernel, {**split, "SINGLE_SPLIT": single}, warps,
                                 pointers, floats=("scale", "softcap"), default_pointer=ptr)))
    out.append(("merge", compile_sm90(
        kernels.decode_merge_kernel, dict(HEAD_DIM_V=head_dim, BLOCK_S=128, CHUNK_S=8, BLOCK_DV=block_d,
                                          BF16_RTNE=False),
        4, {"O_PART": "*fp32", "LSE_PART": "*fp32", "LSE": "*fp32"}, default_pointer=ptr)))
    out.append(("append", compile_sm90(
        kernels.kv_append_kernel, dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_L=32,
                                       BLOCK_D=block_d, BLOCK_DV=block_d, HAS_ROTARY=True,
                                       ROT_DIM=split["ROT_DIM"], ROT_INTERLEAVED=True, BF16_RTNE=False),
        4, {"SEQLENS": "*i32", **rot_ptrs}, default_pointer=ptr)))
    return out


CASES.update({
    f"decode-{str(dtype)[6:]}-d{d}": (lambda dtype=dtype, d=d: decode_case(dtype, d))
    for dtype in PTR for d in (16, 40, 64, 80, 128, 256)
})


def linear_case(dtype, feat_dim, head_dim_v):
    """Linear attention: forward and the dQ, dK, dV backward, causal on packed sequences (elu+1
    fused) and non-causal on a batch (identity)."""
    from fastattn.ops.linear import kernels, op

    cfg = op.block_config(feat_dim, head_dim_v, dtype)
    ptr = PTR[dtype]
    fp32 = {"DEN": "*fp32", "G": "*fp32", "EPS": "*fp32", "CU": "*i32"}
    strides = {name: 4 for name in ("q_strides", "k_strides", "v_strides", "o_strides", "do_strides", "dx_strides")}
    strides.update(den_strides=3, eps_strides=3)
    out = []
    for causal in (True, False):
        common = dict(FEAT_DIM=feat_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg["chunk"],
                      FEATURE=1 if causal else 0, CAUSAL=causal, NORMALIZE=True, VARLEN=causal, DOT_FP32=False,
                      PRECISION="ieee", BF16_RTNE=False,
                      STATE_PRECISION="ieee" if dtype == torch.float32 else "tf32", INTRA_FP32=dtype == torch.float16)
        tag = "causal-varlen" if causal else "full"
        for name, kernel, blocks, extra in (
            ("fwd", kernels.linear_fwd_kernel, (cfg["full_f"], cfg["split_dv"]), {}),
            ("dq", kernels.linear_bwd_kernel, (cfg["split_f"], cfg["full_dv"]), {"GRAD": 0}),
            ("dk", kernels.linear_bwd_kernel, (cfg["split_f"], cfg["full_dv"]), {"GRAD": 1, "DX": "*fp32"}),
            ("dv", kernels.linear_bwd_kernel, (cfg["full_f"], cfg["split_dv"]), {"GRAD": 2, "DX": "*fp32"}),
        ):
            pointers = {**fp32, **{n: t for n, t in extra.items() if n == "DX"}}
            constexprs = dict(common, BLOCK_F=blocks[0], BLOCK_DV=blocks[1],
                              **{n: c for n, c in extra.items() if n == "GRAD"})
            out.append((f"{name}-{tag}", compile_sm90(kernel, constexprs, cfg["num_warps"], pointers,
                                                     default_pointer=ptr, tuples=strides)))
    return out


CASES.update({
    f"linear-{str(dtype)[6:]}-m{m}-dv{dv}": (lambda dtype=dtype, m=m, dv=dv: linear_case(dtype, m, dv))
    for dtype in PTR for m, dv in ((16, 16), (64, 64), (96, 80), (128, 128), (256, 64), (256, 256))
})


def sparse_case(dtype, head_dim, layout_block):
    """Block-sparse forward, dK/dV and dQ, causal, with the launcher's tiles for a layout block."""
    from fastattn.ops._launch import block_config
    from fastattn.ops.sparse import kernels

    block_d = max(16, triton.next_power_of_2(head_dim))
    index = {n: "*i32" for n in ("CROW", "COL", "CCOL", "ROW")}
    out = []
    for name, kernel, backward in (("fwd", kernels.sparse_fwd_kernel, False),
                                   ("dkdv", kernels.sparse_bwd_dkdv_kernel, True),
                                   ("dq", kernels.sparse_bwd_dq_kernel, True)):
        block_m, block_n, warps = block_config(head_dim, dtype, backward)
        constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=min(block_m, layout_block),
                          BLOCK_N=min(block_n, layout_block), BLOCK_D=block_d, BLOCK_DV=block_d,
                          LAYOUT_BLOCK=layout_block, CAUSAL=True, DOT_FP32=False, PRECISION="ieee", BF16_RTNE=False)
        out.append((name, compile_sm90(kernel, constexprs, warps, {**index, "LSE": "*fp32", "DELTA": "*fp32"},
                                       floats=("scale",), default_pointer=PTR[dtype])))
    return out


CASES.update({
    f"sparse-{str(dtype)[6:]}-d{d}-bs{bs}": (lambda dtype=dtype, d=d, bs=bs: sparse_case(dtype, d, bs))
    for dtype in PTR for d in (16, 64, 80, 128, 256) for bs in (16, 64, 128)
})

def run(name):
    sizes = {kernel: compiled.metadata.shared for kernel, compiled in CASES[name]()}
    return {"case": name, "shared": sizes, "fits": all(v <= H100_SHARED_BYTES for v in sizes.values())}


if __name__ == "__main__":
    names = list(CASES) if sys.argv[1:] == ["all"] else sys.argv[1:]
    for name in names:
        print(json.dumps(run(name)), flush=True)

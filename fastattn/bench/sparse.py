"""Block-sparse suite: time and peak memory against density, dense vs sparse.

At a long sequence, a sliding-window layout (``fastattn.sparse.local``) is swept from 100%
of the blocks down to 5%, plus a BigBird layout near 10%. Against each:

* ``sparse``: ``fastattn.sparse_attention`` (the Triton kernels on CUDA; on a CPU its torch
  fallback, which gathers only the kept key blocks of each query block),
* ``sdpa-masked``: torch SDPA with the layout expanded to a bool token mask (what a user
  without block sparsity would run; its cost does not fall with density),
* ``dense``: unmasked attention (fastattn.flash_attention on CUDA, torch SDPA on CPU), the
  100% line,
* on CUDA, ``flex``: torch FlexAttention with the same layout as a BlockMask.

CPU: fp32, B=1, H=4, D=64, 8192 tokens, forward only. CUDA: bf16, 16384 tokens, B=1, H=16,
D=128, forward and forward+backward. FLOPs count only the kept blocks for every impl (the
useful work), so TFLOP/s of a dense-masked impl shows how much it wastes.

    python -m fastattn.bench.sparse            # table on the terminal
    fastattn bench --suite sparse          # the same cases through the CLI
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, attention_flops
from fastattn.testing import assert_within_rule

SUITE = "sparse"
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


def layouts(seq_len: int, block_size: int, densities=DENSITIES):
    """name -> layout: local windows near each density, plus BigBird near 10%."""
    n = -(-seq_len // block_size)
    out = {}
    for density in densities:
        if density >= 1.0:
            out["all"] = fastattn.sparse.from_dense(torch.ones(n, n, dtype=torch.bool), block_size, seq_len)
            continue
        w = max(0, round((density * n - 1) / 2))  # 2w + 1 blocks per row
        out[f"local-{density:g}"] = fastattn.sparse.local(seq_len, w * block_size, block_size=block_size)
    if 0.1 in densities:
        # window 2 blocks each side + 2 global blocks + enough random blocks for ~10%.
        r = max(1, round(0.1 * n) - 5 - 2)
        out["bigbird-0.1"] = fastattn.sparse.bigbird(seq_len, 2 * block_size, 2 * block_size, r,
                                                     block_size=block_size, seed=0)
    return out


def configs(device, quick):
    """(b, h, seq_len, head_dim, block_size, dtype, densities)."""
    if torch.device(device).type == "cuda":
        return [(1, 16, 16384, 128, 128, torch.bfloat16, DENSITIES),
                (1, 16, 16384, 64, 64, torch.bfloat16, (1.0, 0.1) if quick else DENSITIES)]
    return [(1, 4, 8192, 64, 64, torch.float32, (1.0, 0.25, 0.1, 0.05) if quick else DENSITIES)]


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own (bench.headline)
    cuda = torch.device(device).type == "cuda"
    out = []
    for b, h, seq, d, bs, dtype, densities in (config_list if config_list is not None else configs(device, quick)):
        q, k, v = (torch.randn(b, h, seq, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for lname, layout in layouts(seq, bs, densities).items():
            name = f"b{b}-h{h}-l{seq}-d{d}-bs{bs}-{lname}"
            params = {"seq_len": seq, "head_dim": d, "block_size": bs, "density": layout.density,
                      "layout": lname.split("-")[0].replace("all", "local")}  # every block: the widest window
            mask = layout.to_element_mask().to(device)[None]  # (1, 1, L, L) bool, built once
            impls = {
                "sparse": lambda q, k, v, lay=layout: fastattn.sparse_attention(q, k, v, lay),
                "sdpa-masked": lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                "dense": ((lambda q, k, v: fastattn.flash_attention(q, k, v)) if cuda
                          else (lambda q, k, v: F.scaled_dot_product_attention(q, k, v))),
            }
            flex = _flex(layout, device) if cuda else None
            if flex is not None:
                impls["flex"] = flex
            # Useful work: the kept blocks only (the dense line does the full square).
            kept = attention_flops(b, h, seq, seq, d) * layout.density
            for impl, f in impls.items():
                flops = attention_flops(b, h, seq, seq, d) if impl == "dense" else kept
                check = _checker(layout, d, dtype, device) if impl == "sparse" else None
                out.append(Case(SUITE + "-fwd", name, impl, lambda f=f, q=q, k=k, v=v: _no_grad(f, q, k, v),
                                flops=flops, params=params, check=check))
                if cuda:
                    out.append(Case(SUITE + "-fwdbwd", name, impl,
                                    lambda f=f, q=q, k=k, v=v, do=do: torch.autograd.grad(f(q, k, v), (q, k, v), do),
                                    flops=flops * 3.5, params=params))
    return out


def _no_grad(f, q, k, v):
    with torch.no_grad():
        return f(q, k, v)


def _flex(layout, device):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    block_mask = layout.to_block_mask().to(device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _checker(layout, d, dtype, device):
    """Before timing: on a short instance of the same kind of layout, sparse_attention's error
    vs the float64 reference passes the docs/design.md rule (fastattn.testing) against the
    reference in the benchmark dtype; raises AssertionError when it does not."""
    def check():
        from fastattn.ops.sparse.reference import sparse_attention_reference

        small = fastattn.sparse.bigbird(4 * layout.block_size, layout.block_size, layout.block_size, 1,
                                        block_size=layout.block_size)
        q, k, v = (torch.randn(1, 2, small.q_len, d, device=device, dtype=dtype) for _ in range(3))
        dense = small.to_dense()
        oracle = sparse_attention_reference(q.double(), k.double(), v.double(), dense, small.block_size)
        assert_within_rule("sparse_attention", fastattn.sparse_attention(q, k, v, small), oracle,
                           sparse_attention_reference(q, k, v, dense, small.block_size))
    return check


def main():
    import argparse

    from fastattn.bench.common import run_case

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'suite':14} {'config':40} {'impl':12} {'density':>7} {'median ms':>10} {'peak MB':>9}")
    for case in cases(args.device, args.quick):
        row = run_case(case, args.device, warmup=1, reps=5, max_seconds=20.0)
        print(f"{row['suite']:14} {row['config']:40} {row['impl']:12} {row['density']:7.3f} "
              f"{row['median_ms']:10.1f} {row['peak_mem_mb']:9.1f}", flush=True)


if __name__ == "__main__":
    main()

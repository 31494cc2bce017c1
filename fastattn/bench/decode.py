"""Decoding suite: one new token per sequence attending to a KV cache, against cache length and
batch. Memory-bound, so the figure of merit is GB/s of K/V read (B * Hkv * L * (D + Dv) bytes
per call), next to a plain device copy of the same K/V (the bandwidth ceiling, counted as read
+ write) and torch SDPA over the same cache (after the same in-place append). "fastattn-paged"
is the same step over the same keys in pages of 16 tokens (vLLM's size) in a shuffled order,
through a block table. On CUDA, "fastattn-nosync" times the launcher without the public
function's validation (which reads no value on CUDA, so it costs Python time only).
"fastattn-fp8" / "fastattn-int8": the same step over 8-bit caches (float8_e4m3fn / int8) with
per-token float32 scales, the append quantizing the new token: their GB/s count the bytes they
read (D bytes plus a 4-byte scale per token, head and tensor), and every row's params hold its
cache bytes per token (all layers' worth is that times the layers) and tokens/s (batch / time).
On a CPU these rows time the dequantizing fallback (or the interpreter), not the kernels.

On a GPU: bf16, Llama-3-8B-like heads (Hq 32, Hkv 8, D 128), caches of 1k..128k tokens, batch
1..64 (capped at 16 GB of cache). On a CPU: small fp32 sizes, where fastattn runs its
pure-PyTorch fallback (or the interpreted kernels under TRITON_INTERPRET=1).

    python -m fastattn.bench.decode [--quick]       # a table on the terminal
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, run_case
from fastattn.testing import assert_within_rule

SUITE = "decode"
EIGHT_BIT = ("fastattn-fp8", "fastattn-int8")  # the rows over 8-bit caches
MAX_CACHE_BYTES = 16 * 2**30  # per copy: the paged row holds a second one


def configs(device, quick):
    """(batch, hq, hkv, cache_len, head_dim) tuples."""
    if torch.device(device).type == "cuda":
        lengths = [1024, 16384, 131072] if quick else [1024, 4096, 16384, 32768, 65536, 131072]
        batches = [1, 16] if quick else [1, 4, 16, 64]
        hq, hkv, d = 32, 8, 128
    else:
        lengths = [256, 2048] if quick else [256, 1024, 4096]
        batches = [1, 4]
        hq, hkv, d = 8, 2, 64
    out = []
    for b in batches:
        for l in lengths:
            if b * hkv * l * d * 2 * 2 <= MAX_CACHE_BYTES:
                out.append((b, hq, hkv, l, d))
    return out


def _sdpa_backends(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": "MATH"}
    if torch.device(device).type == "cuda":
        names.update(flash="FLASH_ATTENTION", efficient="EFFICIENT_ATTENTION", cudnn="CUDNN_ATTENTION")
    else:
        names.update(flash="FLASH_ATTENTION")
    return {n: getattr(SDPBackend, v) for n, v in names.items() if hasattr(SDPBackend, v)}


def build(b, hq, hkv, l, d, dtype, device):
    """Inputs for one step of decoding at cache length ``l`` (l - 1 cached + 1 new token), and
    name -> callable for every implementation that runs on this machine."""
    lmax = l + 64  # a preallocated cache is longer than what it holds
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k_cache = torch.randn(b, hkv, lmax, d, device=device, dtype=dtype)
    v_cache = torch.randn(b, hkv, lmax, d, device=device, dtype=dtype)
    k_new = torch.randn(b, hkv, 1, d, device=device, dtype=dtype)
    v_new = torch.randn(b, hkv, 1, d, device=device, dtype=dtype)
    seqlens = torch.full((b,), l - 1, dtype=torch.int32, device=device)

    def ours():
        return fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)

    def sdpa(backend):
        from torch.nn.attention import sdpa_kernel

        def run():
            k_cache[:, :, l - 1:l] = k_new  # the same in-place append
            v_cache[:, :, l - 1:l] = v_new
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_cache[:, :, :l], v_cache[:, :, :l],
                                                      enable_gqa=hq != hkv)
        return run

    k_dst, v_dst = torch.empty_like(k_cache[:, :, :l]), torch.empty_like(v_cache[:, :, :l])

    def copy():  # into buffers allocated once: the ceiling is the copy, not page faults
        return k_dst.copy_(k_cache[:, :, :l]), v_dst.copy_(v_cache[:, :, :l])

    page = 16
    n_pages = b * -(-lmax // page)
    order = torch.randperm(n_pages, device=device)  # pages of a sequence scattered over the pool
    table = order.view(b, -1).to(torch.int32)  # (B, P): sequence i's j-th page is order[i * P + j]

    def paged(cache):  # (B, Hkv, Lmax, D) -> pages (num_pages, page, Hkv, D) holding the same keys
        padded = torch.zeros(b, hkv, table.shape[1] * page, d, device=device, dtype=dtype)
        padded[:, :, :lmax] = cache
        pages = torch.empty(n_pages, page, hkv, d, device=device, dtype=dtype)
        # (B, Hkv, P * page, D) -> (B, P, page, Hkv, D) -> (B * P, page, Hkv, D), into pool order
        pages[order] = padded.view(b, hkv, -1, page, d).permute(0, 2, 3, 1, 4).reshape(n_pages, page, hkv, d)
        return pages

    k_pages, v_pages = paged(k_cache), paged(v_cache)

    def ours_paged():
        return fastattn.attention_with_kvcache(q, k_pages, v_pages, seqlens, k_new=k_new, v_new=v_new,
                                               block_table=table)

    from fastattn.ops.decode.reference import quantize_kv

    quantized = {}
    for name8, dtype8 in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
        caches8 = [*quantize_kv(k_cache, dtype8), *quantize_kv(v_cache, dtype8)]  # k8, k_scale, v8, v_scale
        quantized[name8] = caches8

        def ours8(k8=caches8[0], ks=caches8[1], v8=caches8[2], vs=caches8[3]):
            return fastattn.attention_with_kvcache(q, k8, v8, seqlens, k_new=k_new, v_new=v_new, k_scale=ks,
                                                   v_scale=vs)
        quantized[name8].append(ours8)

    impls = {"fastattn": ours, "fastattn-paged": ours_paged, "copy-ceiling": copy,
             **{f"fastattn-{name8}": quantized[name8][4] for name8 in quantized}}
    if torch.device(device).type == "cuda":
        from fastattn.ops.decode import op as decode_op

        def kernels_only():
            # The launcher without the public function's validation: what that Python costs.
            return decode_op.decode_attn(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                         scale=d ** -0.5, window_right=0, max_seqlen_k=l)
        impls["fastattn-nosync"] = kernels_only
    for name, backend in _sdpa_backends(device).items():
        fn = sdpa(backend)
        try:  # a backend that cannot take this input (GQA, dtype, device) is left out
            fn()
        except RuntimeError:
            continue
        impls[f"torch-{name}"] = fn
    return impls, (q, k_cache, v_cache, seqlens, k_new, v_new, k_pages, v_pages, table,
                   {name8: c[:4] for name8, c in quantized.items()})


def _checker(inputs, l, paged=False):
    """Before timing: the output passes the docs/design.md rule (fastattn.testing) against the
    float64 reference, with plain torch in the same dtype as the yardstick; ``paged`` checks
    the paged call. Raises AssertionError when it does not."""
    from fastattn.ops.decode.reference import decode_reference, gather_pages

    def check():
        q, k_cache, v_cache, seqlens, k_new, v_new, k_pages, v_pages, table, _ = inputs
        sl = seqlens[:1]
        if paged:  # the first sequence's logical cache, read back from its pages
            kc, vc = gather_pages(k_pages, table[:1])[:, :, :l + 1], gather_pages(v_pages, table[:1])[:, :, :l + 1]
        else:
            kc, vc = k_cache[:1, :, :l + 1].clone(), v_cache[:1, :, :l + 1].clone()
        oracle = decode_reference(q[:1].double(), kc.double(), vc.double(), sl, k_new[:1].double(), v_new[:1].double())
        base = decode_reference(q[:1], kc, vc, sl, k_new[:1], v_new[:1])
        if paged:
            ours = fastattn.attention_with_kvcache(q[:1], k_pages.clone(), v_pages.clone(), sl, k_new=k_new[:1],
                                                   v_new=v_new[:1], block_table=table[:1])
        else:
            ours = fastattn.attention_with_kvcache(q[:1], kc, vc, sl, k_new=k_new[:1], v_new=v_new[:1])
        assert_within_rule("decode", ours, oracle, base)
    return check


def _checker8(inputs, l, name8):
    """Before timing an 8-bit row: its output passes the rule against the float64 reference
    over the dequantized cache it leaves (plain torch over the same cache in q's dtype as the
    yardstick)."""
    from fastattn.ops.decode.reference import decode_reference, dequantize_kv

    def check():
        q, _, _, seqlens, k_new, v_new, _, _, _, quantized = inputs
        k8, ks, v8, vs = (t[:1, :, :l + 1].clone() for t in quantized[name8])
        ours = fastattn.attention_with_kvcache(q[:1], k8, v8, seqlens[:1], k_new=k_new[:1], v_new=v_new[:1],
                                               k_scale=ks, v_scale=vs)
        total = seqlens[:1] + 1
        oracle = decode_reference(q[:1].double(), dequantize_kv(k8, ks, torch.float64),
                                  dequantize_kv(v8, vs, torch.float64), total)
        base = decode_reference(q[:1], dequantize_kv(k8, ks, q.dtype), dequantize_kv(v8, vs, q.dtype), total)
        assert_within_rule("decode 8-bit", ours, oracle, base)
    return check


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own (bench.headline)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    out = []
    for b, hq, hkv, l, d in (config_list if config_list is not None else configs(device, quick)):
        impls, inputs = build(b, hq, hkv, l, d, dtype, device)
        kv_bytes = b * hkv * l * 2 * d * dtype.itemsize  # K and V, each read once
        params = {"seq_len": l, "batch": b, "head_dim": d, "gqa": hq // hkv}
        name = f"b{b}-h{hq}:{hkv}-cache{l}-d{d}"
        per_token = hkv * 2 * d * dtype.itemsize  # cache bytes per token (one layer), K and V
        per_token8 = hkv * 2 * (d + 4)  # 8-bit entries and a float32 scale per token and head, K and V
        for impl, fn in impls.items():
            eight = impl in EIGHT_BIT
            row_bytes = b * l * per_token8 if eight else 2 * kv_bytes if impl == "copy-ceiling" else kv_bytes
            check = _checker8(inputs, l, impl.split("-")[1]) if eight else \
                _checker(inputs, l, impl == "fastattn-paged") if impl in ("fastattn", "fastattn-paged") else None
            out.append(Case(SUITE, name, impl, fn, bytes=row_bytes, check=check,
                            params={**params, "cache_bytes_per_token": per_token8 if eight else per_token}))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"{'config':32} {'impl':14} {'median ms':>10} {'GB/s':>8} {'tokens/s':>10} {'cache B/token':>13}")
    for case in cases(args.device, args.quick):
        row = run_case(case, args.device, reps=20, max_seconds=2.0)
        tokens = case.params["batch"] / (row["median_ms"] / 1e3)  # one new token per sequence per call
        print(f"{row['config']:32} {row['impl']:14} {row['median_ms']:10.4f} {row['gbps']:8.1f} {tokens:10.0f} "
              f"{case.params['cache_bytes_per_token']:13d}", flush=True)


if __name__ == "__main__":
    main()

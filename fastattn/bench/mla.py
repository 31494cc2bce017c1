"""MLA decode suite: one step of absorbed multi-head latent attention (DeepSeek-V2/V3) per
sequence. Hq query heads share one latent KV head; q/k head dim 576 (512 latent + 64 rotary);
the value is the first 512 channels of the same cache, read in place
(``v_cache = kv_cache[..., :512]``), so the cache holds 576 values per token and nothing else.
Memory-bound: the figure of merit is GB/s of cache read (B * L * 576 elements per call; the
values are the same bytes), next to a device copy of the cache (the ceiling, counted as read +
write) and torch SDPA over the same cache. "fastattn-paged" reads the same tokens in pages of
64 (FlashMLA's page size) in a shuffled order through a block table.

On a GPU: bf16, Hq 16 (DeepSeek-V3's 128 heads over 8 GPUs) and 128, batch 1..64, caches of
4k..32k tokens. On a CPU: small fp32 sizes. Wherever the decode kernels do not take head dim
576 (the CPU, and any build whose decode kernels stop at 256) fastattn runs its pure-PyTorch
fallback: those numbers time the fallback, not a kernel.

    python -m fastattn.bench.mla [--quick]       # a table on the terminal
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, table_main
from fastattn.testing import assert_within_rule

SUITE = "mla-decode"
LATENT, ROPE = 512, 64  # DeepSeek-V2/V3's kv_lora_rank and qk_rope_head_dim
SCALE = 1.0 / math.sqrt(128 + ROPE)  # the softmax scale of their 128 + 64 query/key head dims
PAGE = 64


def configs(device, quick):
    """(batch, hq, cache_len) tuples."""
    if torch.device(device).type == "cuda":
        batches = [1, 64] if quick else [1, 4, 16, 64]
        lengths = [4096, 32768] if quick else [4096, 8192, 16384, 32768]
        heads = [16] if quick else [16, 128]
    else:
        batches, lengths, heads = [1, 4], [256] if quick else [256, 1024], [16]
    return [(b, h, l) for h in heads for b in batches for l in lengths]


def build(b, hq, l, dtype, device):
    """One decode step at cache length ``l`` (the new token's [latent | rotary key] already
    written, as ``fastattn.nn.LatentCache`` does): name -> callable for every implementation
    that runs on this machine, and the inputs."""
    lmax = l + PAGE  # a preallocated cache is longer than what it holds
    d = LATENT + ROPE
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    kv = torch.randn(b, 1, lmax, d, device=device, dtype=dtype)
    seqlens = torch.full((b,), l, dtype=torch.int32, device=device)

    def ours():
        return fastattn.attention_with_kvcache(q, kv, kv[..., :LATENT], seqlens, scale=SCALE)

    n_pages = b * -(-lmax // PAGE)
    order = torch.randperm(n_pages, device=device)  # pages of a sequence scattered over the pool
    table = order.view(b, -1).to(torch.int32)  # (B, P): sequence i's j-th page is order[i * P + j]
    padded = torch.zeros(b, table.shape[1] * PAGE, d, device=device, dtype=dtype)
    padded[:, :lmax] = kv[:, 0]
    pages = torch.empty(n_pages, PAGE, 1, d, device=device, dtype=dtype)
    # (B, P * PAGE, D) -> (B * P, PAGE, 1, D), into pool order
    pages[order] = padded.view(n_pages, PAGE, 1, d)

    def ours_paged():
        return fastattn.attention_with_kvcache(q, pages, pages[..., :LATENT], seqlens, block_table=table,
                                               scale=SCALE)

    dst = torch.empty_like(kv[:, :, :l])

    def copy():  # into a buffer allocated once: the ceiling is the copy, not page faults
        return dst.copy_(kv[:, :, :l])

    impls = {"fastattn": ours, "fastattn-paged": ours_paged, "copy-ceiling": copy}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": "MATH", "flash": "FLASH_ATTENTION"}
    if torch.device(device).type == "cuda":
        names.update(efficient="EFFICIENT_ATTENTION", cudnn="CUDNN_ATTENTION")
    for name, attr in names.items():
        if not hasattr(SDPBackend, attr):
            continue

        def sdpa(backend=getattr(SDPBackend, attr)):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kv[:, :, :l], kv[:, :, :l, :LATENT], scale=SCALE,
                                                      enable_gqa=True)
        try:  # a backend that cannot take this input (head dims, GQA, dtype) is left out
            sdpa()
        except RuntimeError:
            continue
        impls[f"torch-{name}"] = sdpa
    return impls, (q, kv, seqlens, pages, table)


def _checker(impl, inputs, l):
    """Before timing: ``impl``'s output for the first sequence passes the docs/design.md rule
    (fastattn.testing) against float64 attention over the same cache, with plain
    torch in the same dtype as the yardstick. Raises AssertionError when it does not."""
    def check():
        q, kv, _, _, _ = inputs
        k, v = kv[:1, :, :l], kv[:1, :, :l, :LATENT]

        def attend(q, k, v):  # (1, Hq, 1, 576) over (1, 1, l, 576) / (1, 1, l, 512)
            return torch.softmax((q @ k.transpose(-1, -2)) * SCALE, dim=-1) @ v
        oracle = attend(q[:1].double(), k.double(), v.double())
        assert_within_rule("mla decode", impl()[:1], oracle, attend(q[:1], k, v))
    return check


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own (bench.headline)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    out = []
    for b, hq, l in (config_list if config_list is not None else configs(device, quick)):
        impls, inputs = build(b, hq, l, dtype, device)
        cache_bytes = b * l * (LATENT + ROPE) * dtype.itemsize  # read once: K and V are the same bytes
        params = {"seq_len": l, "batch": b, "heads": hq}
        name = f"b{b}-h{hq}:1-cache{l}-d{LATENT + ROPE}v{LATENT}"
        for impl, fn in impls.items():
            out.append(Case(SUITE, name, impl, fn, bytes=2 * cache_bytes if impl == "copy-ceiling" else cache_bytes,
                            params=params, check=_checker(fn, inputs, l) if impl.startswith("fastattn") else None))
    return out


if __name__ == "__main__":
    table_main(__doc__, cases)

"""The headline benchmarks: the set that ``scripts/gpu_check.sh`` times in one run
(``fastattn bench --suite headline``), built from the other suites' cases at chosen configs.

On a GPU (bf16), the quick flag ignored:

* flash forward and forward+backward: head dims 64/128/256, causal and not, 512..16k tokens
  at 16k tokens per batch, plus GQA 8:1 (16 query heads on 2 kv heads, d128, causal): the
  flash suite's full configs;
* decode: GB/s of K/V read at 4k-32k cache, batch 1 and 16, Hq 32 / Hkv 8, D 128, next to the
  device copy of the same bytes; the 8-bit caches (fp8, int8, per-token scales) at 8k and 32k;
* head dim 512 (Gemma 4's global layers): flash forward and forward+backward at 4k tokens, 4
  batches of 4 heads, causal and not (suite ``flash-*``, configs ``...-d512``);
* MLA decode (DeepSeek's absorbed attention, q/k 576, v the first 512 channels of the same
  cache): GB/s of cache read at 4k and 32k, batch 1 and 16, 16 query heads (suite
  ``mla-decode``);
* sparse at 10% of the blocks (a local window and BigBird) vs dense, at 16k tokens, d128,
  128-blocks, forward and forward+backward;
* causal linear (elu+1) vs flash vs torch SDPA, 1k..32k tokens: where linear overtakes;
* peak memory (the allocator's peak, ``common.peak_memory_mb``) of causal flash forward and
  forward+backward at 64k tokens (B1, H16, D128), suite ``peakmem-*``.

Peers in the same process: torch SDPA's flash, efficient and cuDNN backends (its math backend
is left out: it is not a fast path, and at 16k+ tokens it would take the run's time and
memory), FlexAttention (compiled; its cases come last, since each shape compiles, so that a
time budget cuts them first) and flash-attn where installed.

On a CPU: the same groups at tiny sizes (for the CPU dry-run of the GPU check, under
TRITON_INTERPRET=1 the interpreted kernels).
"""
from __future__ import annotations

import dataclasses

import torch

from fastattn.bench import decode, flash, linear, mla, sparse

SUITE = "headline"
LEFT_OUT = ("torch-math",)
EIGHT_BIT_LENGTHS = (8192, 32768, 64)  # the decode lengths that also time the 8-bit caches (64: the CPU's)


def configs(device):
    """group -> the config tuples handed to that suite's ``cases`` (its own tuple format)."""
    if torch.device(device).type == "cuda":
        return {
            # d64/128/256 x 512..16k x causal, and GQA 16:2 (put first: a time budget cuts the end)
            "flash": sorted((c for c in flash.configs(device, quick=False) if c[4] <= 256),
                            key=lambda c: c[1] == c[2]),
            "flash-d512": [(4, 4, 4, 4096, 512, c) for c in (False, True)],
            "decode": [(b, 32, 8, l, 128) for b in (1, 16) for l in (4096, 8192, 16384, 32768)],
            "mla": [(b, 16, l) for b in (1, 16) for l in (4096, 32768)],
            "sparse": [(1, 16, 16384, 128, 128, torch.bfloat16, (1.0, 0.1))],
            "peakmem": [(1, 16, 16, 65536, 128, True)],
            "linear": [c for c in linear.configs(device, quick=False) if c[-1]],  # causal, 1k..32k
        }
    return {  # tiny: each interpreted kernel call takes 0.05-0.5 s
        "flash": [(1, 2, 2, 32, 16, c) for c in (False, True)] + [(1, 4, 1, 32, 16, True)],
        "flash-d512": [(1, 2, 2, 32, 512, True)],
        "decode": [(1, 4, 1, l, 16) for l in (32, 64)],
        "mla": [(1, 4, 32)],
        "sparse": [(1, 1, 128, 16, 16, torch.float32, (0.1,))],  # local and BigBird vs dense
        "peakmem": [(1, 1, 1, 64, 16, True)],
        "linear": [(1, 1, l, 16, 16, True) for l in (32, 64)],
    }


LINEAR_IMPLS = ("fastattn-linear", "fastattn-flash", "torch-sdpa")


def allow_flex_recompiles(at_least=256):
    """FlexAttention compiles once per shape (and block mask), all through one code object:
    past dynamo's recompile limit (8 by default) it would run eagerly and be timed as such."""
    from torch._dynamo import config

    for name, value in (("recompile_limit", at_least), ("cache_size_limit", at_least),
                        ("accumulated_recompile_limit", 8 * at_least), ("accumulated_cache_size_limit", 8 * at_least)):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, max(getattr(config, name), value))


def cases(device, quick=False):
    groups = configs(device)
    if torch.device(device).type == "cuda":
        allow_flex_recompiles()
    # The small groups first, then the flash sweep (about 3/4 of the cases), then every
    # FlexAttention case (a compile each): what a time budget cuts is the end of this list.
    out = [c for c in decode.cases(device, config_list=groups["decode"]) if c.impl not in LEFT_OUT
           and (c.impl not in decode.EIGHT_BIT or c.params["seq_len"] in EIGHT_BIT_LENGTHS)]
    out += [c for c in mla.cases(device, config_list=groups["mla"]) if c.impl not in LEFT_OUT]
    out += [c for c in flash.cases(device, config_list=groups["flash-d512"]) if c.impl not in LEFT_OUT]
    out += sparse.cases(device, config_list=groups["sparse"])
    out += [dataclasses.replace(c, suite=c.suite.replace("flash", "peakmem"))
            for c in flash.cases(device, config_list=groups["peakmem"]) if c.impl not in LEFT_OUT]
    out += [c for c in linear.cases(device, config_list=groups["linear"]) if c.impl in LINEAR_IMPLS]
    out += [c for c in flash.cases(device, config_list=groups["flash"]) if c.impl not in LEFT_OUT]
    return sorted(out, key=lambda c: c.impl == "flex")  # stable

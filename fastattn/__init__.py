"""fastattn: fused Triton attention kernels behind a drop-in PyTorch API.

Importing needs only torch; Triton is imported the first time a kernel runs, and
torch.distributed machinery (fastattn.distributed) on first use.
"""
from fastattn.backend import use_backend
from fastattn.functional import (attention_with_kvcache, flash_attention, flash_attention_varlen, linear_attention,
                                 linear_attention_varlen, linformer_attention, performer_attention,
                                 performer_projection, scaled_dot_product_attention, sparse_attention)
from fastattn.flex import flex_attention, flex_attention_varlen
from fastattn import flex  # noqa: E402  (torch's flex_attention interface: BlockMask helpers)
from fastattn.invariance import batch_invariant
from fastattn.merge import cascade_attention_with_kvcache, merge_attention_states
from fastattn import sparse  # noqa: E402  (layouts; needs the functions above)
from fastattn.integrations import convert, patch_sdpa, register_huggingface, unpatch_sdpa
from fastattn import models, nn  # noqa: E402  (built on the public functions above)

__all__ = [
    "attention_with_kvcache", "batch_invariant", "cascade_attention_with_kvcache", "convert",
    "flash_attention", "flash_attention_varlen", "flex", "flex_attention", "flex_attention_varlen",
    "linear_attention", "linear_attention_varlen", "linformer_attention", "merge_attention_states",
    "models", "nn", "patch_sdpa", "performer_attention", "performer_projection",
    "register_huggingface", "scaled_dot_product_attention", "sparse", "sparse_attention",
    "unpatch_sdpa", "use_backend",
]
__version__ = "0.1.0"


def __getattr__(name):
    # fastattn.distributed (context parallelism) loads on first use, not with fastattn.
    if name == "distributed":
        import importlib

        return importlib.import_module("fastattn.distributed")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")

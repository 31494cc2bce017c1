"""fastattn: fused Triton attention kernels behind a drop-in PyTorch API.

Importing needs only torch; Triton is imported the first time a kernel runs.
"""
from fastattn.backend import use_backend
from fastattn.integrations import convert, patch_sdpa, register_huggingface, unpatch_sdpa
from fastattn.functional import flash_attention, scaled_dot_product_attention
from fastattn.functional import linear_attention, linformer_attention, performer_attention, performer_projection
from fastattn.functional import attention_with_kvcache
from fastattn.functional import sparse_attention
from fastattn import sparse

__all__ = ["attention_with_kvcache", "flash_attention", "scaled_dot_product_attention", "use_backend"]
__all__ += ["linear_attention", "linformer_attention", "performer_attention", "performer_projection"]
__all__ += ["sparse", "sparse_attention"]
__all__ += ["convert", "patch_sdpa", "register_huggingface", "unpatch_sdpa"]
__version__ = "0.1.0"


def __getattr__(name):
    # fastattn.distributed (context parallelism) loads on first use, not with fastattn.
    if name == "distributed":
        import importlib

        return importlib.import_module("fastattn.distributed")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")

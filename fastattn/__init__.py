"""fastattn: fused Triton attention kernels behind a drop-in PyTorch API.

Importing needs only torch; Triton is imported the first time a kernel runs.
"""
from fastattn.backend import use_backend
from fastattn.functional import flash_attention, scaled_dot_product_attention
from fastattn.functional import attention_with_kvcache

__all__ = ["attention_with_kvcache", "flash_attention", "scaled_dot_product_attention", "use_backend"]
__version__ = "0.1.0"

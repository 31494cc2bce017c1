"""Ways to give existing models fastattn without rewriting them: patch torch's SDPA, convert
nn.MultiheadAttention modules, or register with Hugging Face transformers."""
from fastattn.integrations.convert import FastMultiheadAttention, convert
from fastattn.integrations.huggingface import register_huggingface
from fastattn.integrations.sdpa_patch import is_patched, patch_sdpa, unpatch_sdpa

__all__ = ["FastMultiheadAttention", "convert", "is_patched", "patch_sdpa", "register_huggingface", "unpatch_sdpa"]

"""Hugging Face transformers: ``attn_implementation="fastattn"``.

    import fastattn
    fastattn.register_huggingface()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")

transformers is optional: nothing here is imported until ``register_huggingface()`` is called.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastattn.functional import flash_attention


def fastattn_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    with KV heads unrepeated (GQA runs by index in the kernel), attention_mask from the sdpa
    mask function (bool, True = attend, or None when plain causal suffices). Returns
    ((B, Lq, Hq, D), None): no attention weights, as with "sdpa"."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    if causal and key.shape[2] > query.shape[2]:
        # Prefill into a preallocated cache: transformers' convention (as in its sdpa path) is
        # that the first Lq keys are the real ones.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style: an additive bias combined with the mask
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype.is_floating_point:
            attention_mask = position_bias + attention_mask
        else:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
    out = flash_attention(query, key, value, causal=causal, scale=scaling, attn_bias=attention_mask,
                          softcap=kwargs.get("softcap"), dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, H, L, D) -> (B, L, H, D)


def register_huggingface(name: str = "fastattn") -> str:
    """Register fastattn with transformers' attention and mask interfaces; returns the name to
    pass as ``attn_implementation``. Raises ImportError if transformers is not installed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

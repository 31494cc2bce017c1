"""fastattn.convert(model): every torch.nn.MultiheadAttention in a model runs fastattn.

The module is not rebuilt: its class becomes ``FastMultiheadAttention``, a subclass that only
replaces ``forward``, so weights, state_dict keys, device, dtype, hooks and every attribute
stay exactly as they were and a converted model loads the old checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastattn.functional import scaled_dot_product_attention


class FastMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose attention runs fastattn.scaled_dot_product_attention.

    Same arguments, masks and outputs as torch's module. Calls that need what the fused path
    cannot give are passed to torch's own forward: ``need_weights=True`` (the weights need the
    full score matrix), ``add_bias_kv`` / ``add_zero_attn``, unbatched (L, E) inputs, and
    masks of shapes torch's forward would refuse, or ``is_causal`` without ``attn_mask``
    (torch's forward then raises its own error, exactly as the unconverted module).
    With ``need_weights=False`` the returned weights are None, as in torch.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if (need_weights or self.bias_k is not None or self.add_zero_attn or query.dim() != 3
                or not _masks_fit(self, query, key, attn_mask, key_padding_mask, is_causal)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, lq, e = query.shape
        lk, h = key.shape[1], self.num_heads
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        # (B, L, E) -> (B, L, H, E/H) -> (B, H, L, E/H)
        q = nn.functional.linear(query, w_q, b_q).view(b, lq, h, -1).transpose(1, 2)
        k = nn.functional.linear(key, w_k, b_k).view(b, lk, h, -1).transpose(1, 2)
        v = nn.functional.linear(value, w_v, b_v).view(b, lk, h, -1).transpose(1, 2)
        mask = _sdpa_mask(attn_mask, key_padding_mask, b, h, lq, lk, q.dtype)
        out = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(b, lq, e)  # (B, H, L, E/H) -> (B, L, E)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _masks_fit(mha, query, key, attn_mask, key_padding_mask, is_causal) -> bool:
    """Whether the masks have the shapes torch's forward takes (attn_mask (L, S) or
    (B*H, L, S), key_padding_mask (B, S)), and is_causal comes with an attn_mask."""
    b, lq, lk = (query.shape[0], query.shape[1], key.shape[1]) if mha.batch_first else \
        (query.shape[1], query.shape[0], key.shape[0])
    if is_causal and attn_mask is None:
        return False
    if attn_mask is not None and tuple(attn_mask.shape) not in ((lq, lk), (b * mha.num_heads, lq, lk)):
        return False
    return key_padding_mask is None or tuple(key_padding_mask.shape) == (b, lk)


def _sdpa_mask(attn_mask, key_padding_mask, b, h, lq, lk, dtype) -> Optional[Tensor]:
    """torch MHA masks (bool True = do NOT attend, or additive float; attn_mask (L, S) or
    (B*H, L, S), key_padding_mask (B, S)) -> one SDPA mask broadcastable to (B, H, L, S)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(b, h, lq, lk) if attn_mask.dim() == 3 else attn_mask.view(1, 1, lq, lk))
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(b, 1, 1, lk))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~blocked  # SDPA's bool masks say where to attend
    total = 0
    for m in masks:
        total = total + (torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool
                         else m.to(dtype))
    return total


def convert(model: nn.Module) -> nn.Module:
    """Make every torch.nn.MultiheadAttention in ``model`` (``model`` itself included) run
    fastattn, in place, keeping its weights; returns the model.

    Note: torch's TransformerEncoderLayer has a fused inference fast path (eval mode, no
    grad) that does not call its attention module at all; there torch's kernel runs.
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = FastMultiheadAttention
    return model

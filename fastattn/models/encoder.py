"""Encoder: a BERT-style bidirectional encoder with a masked-language-model head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models.common import Positional, StackConfig, encoder_layer, final_norm, init_weights, padding_mask
from fastattn.nn.layers import TransformerEncoder, aux_loss, make_norm


@dataclass
class EncoderConfig(StackConfig):
    """StackConfig plus ``vocab_size``, ``pad_token_id`` and ``mask_token_id`` (for the
    caller's masking; the model does not mask by itself)."""
    vocab_size: int = 1024
    pad_token_id: int = 0
    mask_token_id: int = 1


class Encoder(nn.Module):
    """Token embedding (+ absolute positions) -> bidirectional encoder stack -> MLM head
    (dense, activation, norm, decoder tied to the token embedding, output bias).

    forward(input_ids (B, L), key_padding_mask (B, L) True at padding (default: tokens equal to
    pad_token_id), labels (B, L) with -100 where there is nothing to predict)
    -> (logits (B, L, V), loss or None). ``encode`` returns the hidden states (B, L, E).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = Positional(cfg, bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = TransformerEncoder(encoder_layer(cfg, self.pos, causal=False), cfg.n_layers, final_norm(cfg))
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_norm = make_norm(cfg.norm, cfg.d_model)
        self.mlm_decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        init_weights(self, cfg)
        self.mlm_decoder.weight = self.tok.weight

    def encode(self, input_ids: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if key_padding_mask is None:  # padding tokens, or None (see fastattn.models.common.padding_mask)
            key_padding_mask = padding_mask(input_ids == self.config.pad_token_id, self.blocks)
        x = self.drop(self.pos.add(self.tok(input_ids)))  # (B, L, E)
        bias = self.pos.bias(input_ids.shape[1], input_ids.shape[1], x.dtype)
        return self.blocks(x, key_padding_mask=key_padding_mask, attn_bias=bias)

    def forward(self, input_ids: Tensor, key_padding_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None):
        h = self.encode(input_ids, key_padding_mask)
        act = F.relu if self.config.activation == "relu" else F.gelu
        logits = self.mlm_decoder(self.mlm_norm(act(self.mlm_dense(h))))  # (B, L, V)
        loss = None
        if labels is not None:
            # (B, L, V) -> (B L, V) against (B L,), -100 ignored
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100) + aux_loss(self).to(logits.device)
        return logits, loss

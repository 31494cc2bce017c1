"""EncoderDecoder: the original transformer / T5 shape, with greedy and beam-search generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models.common import (Positional, StackConfig, can_cache, decoder_layer, encoder_layer, final_norm,
                                    init_weights, padding_mask)
from fastattn.nn.kv_cache import KVCache
from fastattn.nn.layers import TransformerDecoder, TransformerEncoder, aux_loss


def _upcast(t: Tensor) -> Tensor:
    """Log-probs and beam scores in float32 at least (float64 for a float64 model)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class EncoderDecoderConfig(StackConfig):
    """StackConfig (``n_layers`` encoder layers) plus ``n_decoder_layers`` (None = n_layers),
    a shared ``vocab_size`` and the special tokens."""
    vocab_size: int = 1024
    n_decoder_layers: Optional[int] = None
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2


class EncoderDecoder(nn.Module):
    """Encoder over the source, causal decoder with cross-attention over the encoder output,
    LM head tied to the shared token embedding.

    forward(src (B, Ls), tgt (B, Lt), labels (B, Lt) or None, src_key_padding_mask (B, Ls) True
    at padding (default: src == pad_token_id)) -> (logits (B, Lt, V), loss or None). ``tgt`` is
    the decoder input (starting with bos), ``labels`` the tokens to predict (-100 ignored).
    """

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = cfg = config
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.enc_pos = Positional(cfg, bidirectional=True)
        self.dec_pos = Positional(cfg, bidirectional=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = TransformerEncoder(encoder_layer(cfg, self.enc_pos, causal=False), cfg.n_layers,
                                          final_norm(cfg))
        self.decoder = TransformerDecoder(decoder_layer(cfg, self.dec_pos), cfg.n_decoder_layers or cfg.n_layers,
                                          final_norm(cfg))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        self.head.weight = self.tok.weight

    def _src_mask(self, src: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        """(B, Ls) True at padding (default: src == pad_token_id), or None (see ``padding_mask``)."""
        return padding_mask(src == self.config.pad_token_id if mask is None else mask, self.encoder)

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src (B, Ls) -> memory (B, Ls, E)."""
        x = self.drop(self.enc_pos.add(self.tok(src)))
        bias = self.enc_pos.bias(src.shape[1], src.shape[1], x.dtype)
        return self.encoder(x, key_padding_mask=src_key_padding_mask, attn_bias=bias)

    def decode(self, tgt: Tensor, memory: Optional[Tensor] = None, *, memory_key_padding_mask=None,
               memory_kv=None, cache: Optional[KVCache] = None, offset: int = 0) -> Tensor:
        """tgt (B, Lt) at positions offset.. -> logits (B, Lt, V)."""
        x = self.drop(self.dec_pos.add(self.tok(tgt), offset))
        bias = self.dec_pos.bias(tgt.shape[1], tgt.shape[1], x.dtype)
        x = self.decoder(x, memory, memory_key_padding_mask=memory_key_padding_mask, attn_bias=bias,
                         memory_kv=memory_kv, cache=cache, offset=offset)
        return self.head(x)

    def forward(self, src: Tensor, tgt: Tensor, labels: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None):
        mask = self._src_mask(src, src_key_padding_mask)
        logits = self.decode(tgt, self.encode(src, mask), memory_key_padding_mask=mask)
        loss = None
        if labels is not None:
            # (B, Lt, V) -> (B Lt, V) against (B Lt,)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100) + aux_loss(self).to(logits.device)
        return logits, loss

    # --- generation ----------------------------------------------------------------------
    def can_cache(self) -> bool:
        """As ``GPT.can_cache``: the decoder's self-attention kind decodes with a cache, no T5 bias."""
        return can_cache(self.decoder, self.config)

    def _stepper(self, memory, mask, batch: int, max_len: int, use_cache: bool):
        """A function (tokens so far (N, t), new tokens (N, n)) -> next-token log-probs (N, V),
        with a KV cache (and cross-attention keys projected once) or recomputing everything;
        and the cache (None without one) for beam reordering."""
        cfg = self.config
        if use_cache and self.can_cache():
            p = self.tok.weight
            cache = KVCache(len(self.decoder.layers), batch, cfg.kv_heads, cfg.head_dim, dtype=p.dtype,
                            device=p.device, chunk_size=64, max_length=max_len)
            memory_kv = self.decoder.project_memory(memory)

            def step(seqs, new):
                offset = seqs.shape[1] - new.shape[1]
                logits = self.decode(new, memory_key_padding_mask=mask, memory_kv=memory_kv, cache=cache,
                                     offset=offset)
                return torch.log_softmax(_upcast(logits[:, -1]), -1)
            return step, cache

        def step(seqs, new):
            logits = self.decode(seqs, memory, memory_key_padding_mask=mask)
            return torch.log_softmax(_upcast(logits[:, -1]), -1)
        return step, None

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, *, num_beams: int = 1, length_penalty: float = 1.0,
                 src_key_padding_mask: Optional[Tensor] = None, use_cache: bool = True,
                 return_scores: bool = False):
        """Greedy (num_beams=1) or beam-search decoding.

        Returns tokens (B, 1 + n) starting with bos; a sequence that produced eos is padded
        with pad_token_id after it; with ``return_scores`` also the (B,) sum of token log-probs
        of each returned sequence (up to and including eos). Beam search keeps ``num_beams``
        hypotheses per source, finished ones (eos) carried with their score, and returns the
        best by ``score / length ** length_penalty``. ``use_cache`` as ``GPT.generate``.
        """
        was_training = self.training
        self.eval()
        cfg = self.config
        b, k = src.shape[0], num_beams
        mask = self._src_mask(src, src_key_padding_mask)
        memory = self.encode(src, mask)
        if k > 1:  # every source repeated for its beams: (B, ...) -> (B K, ...)
            memory = memory.repeat_interleave(k, dim=0)
            mask = None if mask is None else mask.repeat_interleave(k, dim=0)
        step, cache = self._stepper(memory, mask, b * k, max_new_tokens + 1, use_cache)
        seqs = torch.full((b * k, 1), cfg.bos_token_id, dtype=torch.long, device=src.device)
        scores = torch.zeros(b, k, device=src.device, dtype=_upcast(memory).dtype)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep only the first alive
        done = torch.zeros(b * k, dtype=torch.bool, device=src.device)
        lengths = torch.zeros(b * k, device=src.device, dtype=scores.dtype)
        new = seqs
        for _ in range(max_new_tokens):
            logp = step(seqs, new)  # (B K, V)
            # a finished hypothesis only continues with pad, at no cost
            finished_row = torch.full_like(logp, float("-inf"))
            finished_row[:, cfg.pad_token_id] = 0.0
            logp = torch.where(done[:, None], finished_row, logp)
            vocab = logp.shape[-1]
            total = scores.reshape(-1, 1) + logp  # (B K, V)
            # best K of the K * V continuations of each source: (B, K V) -> (B, K)
            top, flat = total.view(b, k * vocab).topk(k, dim=-1)
            beam = flat // vocab + torch.arange(b, device=src.device)[:, None] * k  # (B, K) rows
            token = (flat % vocab).reshape(-1, 1)
            beam = beam.reshape(-1)
            seqs = torch.cat([seqs[beam], token], dim=1)
            lengths = lengths[beam] + (~done[beam]).float()
            done = done[beam] | (token[:, 0] == cfg.eos_token_id)
            scores = top
            if cache is not None and k > 1:
                cache.reorder(beam)
            new = token
            if bool(done.all()):
                break
        norm = scores.reshape(-1) / lengths.clamp(min=1) ** length_penalty  # (B K,)
        best = norm.view(b, k).argmax(-1) + torch.arange(b, device=src.device) * k  # (B,)
        self.train(was_training)
        out = seqs[best]
        return (out, scores.reshape(-1)[best]) if return_scores else out

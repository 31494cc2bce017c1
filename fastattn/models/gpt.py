"""GPT: a decoder-only language model with KV-cache generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models.common import Positional, StackConfig, can_cache, encoder_layer, final_norm, init_weights
from fastattn.nn.kinds import Flash
from fastattn.nn.kv_cache import KVCache, PagedKVCache
from fastattn.nn.layers import TransformerEncoder, aux_loss
from fastattn.nn.positional import Positions, packed_positions


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class GPTConfig(StackConfig):
    """StackConfig plus ``vocab_size`` and ``tie_embeddings`` (the LM head shares the token
    embedding matrix), and layers that differ (Gemma's sliding and global layers):

    sliding_window: W, or None (every layer global). Sliding layers attend causally to their
        last W keys, themselves included (``Flash(window=(W - 1, 0))``; the KV cache's decode
        takes the same window). Needs the Flash attention kind.
    global_every: None (with a window: every layer slides, as Mistral) or k: layer i is global
        (full causal attention) iff ``(i + 1) % k == 0``, the others slide (Gemma's 5:1 is
        k = 6). Needs ``sliding_window``.
    sliding_head_dim, global_head_dim: head dims of the sliding / global layers (None:
        d_model // n_heads); q/k/v project to n_heads * that, the output back to d_model.
        ``rope_dim`` must fit the smallest.
    global_rope_base: RoPE base of the global layers (None: ``rope_base``; Gemma: 1e6 on global
        and 1e4 on sliding layers).

    ``gemma4_like_config`` fills these in. Raises ValueError for values out of range, or a
    window with an attention kind other than Flash.
    """
    vocab_size: int = 1024
    tie_embeddings: bool = True
    sliding_window: Optional[int] = None
    global_every: Optional[int] = None
    sliding_head_dim: Optional[int] = None
    global_head_dim: Optional[int] = None
    global_rope_base: Optional[float] = None

    def __post_init__(self):
        for name in ("sliding_window", "global_every", "sliding_head_dim", "global_head_dim"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ValueError(f"GPTConfig: {name} must be an int >= 1 or None, got {value!r}")
        if self.global_every is not None and self.sliding_window is None:
            raise ValueError("GPTConfig: global_every needs a sliding_window (the layers between the global "
                             "ones slide)")
        if self.sliding_window is not None and type(self.attention) is not Flash:
            raise ValueError(f"GPTConfig: sliding_window needs the Flash attention kind, got {self.attention!r}")
        super().__post_init__()

    def per_layer(self) -> bool:
        """Whether layers differ from the uniform stack (a window or a head dim of their own)."""
        return any(v is not None for v in (self.sliding_window, self.sliding_head_dim, self.global_head_dim))

    def layer_is_global(self, i: int) -> bool:
        """Layer i attends to every earlier key (no sliding window)."""
        if self.sliding_window is None:
            return True
        return self.global_every is not None and (i + 1) % self.global_every == 0

    def layer_head_dim(self, i: int) -> int:
        dim = self.global_head_dim if self.layer_is_global(i) else self.sliding_head_dim
        return self.head_dim if dim is None else dim


def gemma4_like_config(**overrides) -> GPTConfig:
    """A Gemma-4-like ``GPTConfig``: 5 sliding-window layers (head dim 256, window 512, RoPE
    base 1e4) to 1 global layer (head dim 512, RoPE base 1e6), RMS pre-norm, SwiGLU, no
    biases, GQA, RoPE. ``overrides`` replace any field (shrink d_model, n_layers, the head
    dims and the window for tests). The real models also rotate only a quarter of the global
    layers' channels, share K and V on them and norm q and k: not reproduced here."""
    settings = dict(d_model=1536, n_layers=6, n_heads=8, n_kv_heads=1, d_ff=6144, positional="rope", norm="rms",
                    norm_first=True, activation="swiglu", bias=False, max_seq_len=131072, rope_base=10000.0,
                    sliding_window=512, global_every=6, sliding_head_dim=256, global_head_dim=512,
                    global_rope_base=1e6)
    settings.update(overrides)
    return GPTConfig(**settings)


class GPT(nn.Module):
    """Decoder-only transformer: token embedding (+ absolute positions), ``n_layers`` causal
    self-attention blocks, final norm (pre-norm), LM head.

    forward(idx (B, L) int64, targets (B, L) or None) -> (logits (B, L, V), loss or None);
    the loss is next-token cross entropy (targets already shifted by the caller; -100 ignored)
    plus the MoE load-balancing loss when there are experts.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = Positional(cfg, bidirectional=False)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.per_layer():
            layers = [self._layer(i) for i in range(cfg.n_layers)]
        else:
            layers = encoder_layer(cfg, self.pos, causal=True)
        self.blocks = TransformerEncoder(layers, cfg.n_layers, final_norm(cfg))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight

    def _layer(self, i: int):
        """Block i of a config whose layers differ: its head dim, window and RoPE base."""
        cfg = self.config
        if cfg.layer_is_global(i):
            attention, base = cfg.attention, cfg.global_rope_base
        else:
            attention, base = Flash(window=(cfg.sliding_window - 1, 0)), None
        return encoder_layer(cfg, self.pos, causal=True, head_dim=cfg.layer_head_dim(i), attention=attention,
                             rope_base=base)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *, cache: Optional[KVCache] = None,
                offset: Positions = 0, cu_seqlens: Optional[Tensor] = None):
        """``cache``/``offset``: run only the new tokens ``idx`` at positions offset.. against
        the keys cached so far (generation); a (B, L) tensor gives every token's position (a
        context-parallel shard's). ``cu_seqlens``: int32 (docs + 1,) offsets of
        packed documents in one row (idx (1, total)): no padding, each document attends only
        inside itself and its positions restart at 0 unless ``offset`` gives them (a
        context-parallel share of the packed tokens: its share of ``packed_positions``;
        the targets should not cross a document boundary: set those to -100). Both with a
        cache: a ``PagedKVCache``'s ragged step (``cache.set_batch(ids, new_tokens)``,
        ``cu_seqlens=cache.cu_seqlens()``): idx (1, total) holds each batch sequence's new
        tokens (a prefill chunk or one decode token), run in one call. Exact attention, no
        T5 bias."""
        lq = idx.shape[1]
        if cu_seqlens is not None:
            if self.pos.relative is not None:
                raise ValueError("GPT: packed documents (cu_seqlens) take no T5 relative bias")
            if cache is not None:  # (1, total): after each sequence's cached tokens
                offset = cache.positions()
            elif isinstance(offset, int) and offset == 0:  # (1, total): per document from 0
                offset = packed_positions(cu_seqlens, lq)
        x = self.drop(self.pos.add(self.tok(idx), offset))  # (B, L, E)
        bias = self.pos.bias(lq, lq, x.dtype)
        x = self.blocks(x, attn_bias=bias, cache=cache, offset=offset, cu_seqlens=cu_seqlens)
        logits = self.head(x)  # (B, L, V)
        loss = None
        if targets is not None:
            # (B, L, V) -> (B L, V) against (B L,)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100) + aux_loss(self).to(logits.device)
        return logits, loss

    def can_cache(self) -> bool:
        """The KV cache needs exact attention and no T5 bias (which it cannot pass to the
        cache kernels); other models regenerate from the full sequence each step."""
        return can_cache(self.blocks, self.config)

    def new_cache(self, batch_size: int, max_length: Optional[int] = None, *, paged: bool = False,
                  page_size: int = 16, cache_dtype: Optional[torch.dtype] = None):
        """A ``KVCache`` for ``batch_size`` sequences; with ``paged`` a ``PagedKVCache`` whose pool
        holds ``batch_size`` sequences of ``max_length`` tokens (required then), with that
        batch already added and set. Layers of different head dims get a ``KVCache`` with one
        head dim per layer; a paged cache holds one head dim for all (ValueError).
        ``cache_dtype``: the storage's dtype (default the weights'); ``torch.float8_e4m3fn`` /
        ``torch.int8`` store 8-bit keys and values with per-token scales."""
        cfg = self.config
        p = self.tok.weight
        dtype = p.dtype if cache_dtype is None else cache_dtype
        dims = [cfg.layer_head_dim(i) for i in range(cfg.n_layers)]
        if not paged:
            return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, dims, dtype=dtype, device=p.device,
                           chunk_size=64, max_length=max_length)
        if max_length is None:
            raise ValueError("GPT.new_cache: a paged cache needs max_length (it sizes the page pool)")
        if len(set(dims)) > 1:
            raise ValueError(f"GPT.new_cache: a paged cache holds one head dim for every layer, these layers have "
                             f"{sorted(set(dims))}")
        pages = max(1, batch_size * -(-max_length // page_size))
        cache = PagedKVCache(cfg.n_layers, cfg.kv_heads, cfg.head_dim, num_pages=pages, page_size=page_size,
                             dtype=dtype, device=p.device)
        cache.set_batch([cache.add() for _ in range(batch_size)])
        return cache

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, *, use_cache: bool = True, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 paged: bool = False, cache_dtype: Optional[torch.dtype] = None) -> Tensor:
        """Continue every prompt of ``idx`` (B, L) by ``max_new_tokens`` tokens -> (B, L + new).

        ``temperature`` 0 is greedy; > 0 samples from softmax(logits / temperature), optionally
        among the ``top_k`` most likely. ``use_cache`` keeps keys/values in a
        ``fastattn.nn.KVCache`` (prefill once, then one token per step through
        ``fastattn.attention_with_kvcache``); without it (or when ``can_cache()`` is False) the
        whole sequence is recomputed every step. Both give the same tokens. ``paged``: the
        cache is a ``fastattn.nn.PagedKVCache`` (pages of 16 tokens) instead. ``cache_dtype``: the
        cache's storage dtype (``new_cache``); an 8-bit one (``torch.float8_e4m3fn`` /
        ``torch.int8``) holds about half the bytes and may change the tokens (quantized keys).
        """
        was_training = self.training
        self.eval()
        cfg = self.config
        total = idx.shape[1] + max_new_tokens
        if cfg.positional == "learned" and total > cfg.max_seq_len:
            raise ValueError(f"GPT.generate: {total} tokens exceed max_seq_len={cfg.max_seq_len}")
        cache = (self.new_cache(idx.shape[0], total, paged=paged, cache_dtype=cache_dtype)
                 if use_cache and self.can_cache() else None)
        out, step_in, offset = idx, idx, 0
        for _ in range(max_new_tokens):
            if cache is not None:
                logits, _ = self(step_in, cache=cache, offset=offset)
                offset += step_in.shape[1]
            else:
                logits, _ = self(out)
            nxt = self._pick(logits[:, -1].float(), temperature, top_k, generator)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            step_in = nxt
        self.train(was_training)
        return out

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)

"""A preallocated key/value cache for autoregressive generation, one slot per layer.

Built only on public functions (``fastattn.attention_with_kvcache``) and plain torch ops, so
``fastattn.use_backend`` switches it like everything else in ``fastattn.nn``.

Usage in a decoder (every layer owns a slot; lengths are kept per layer, so layers can be
run one after the other within a step without any extra bookkeeping)::

    cache = fastattn.nn.KVCache(num_layers=12, batch_size=B, num_kv_heads=4, head_dim=64,
                                dtype=torch.float16, device="cuda")
    # prefill (Lnew = prompt length) and decode steps (Lnew = 1) look the same:
    for i, layer in enumerate(layers):
        q, k, v = ...                       # (B, Hq, Lnew, D), (B, Hkv, Lnew, D), ...
        out = cache.attend(i, q, k, v)      # appends k, v at each sequence's own length, attends
    cache.reorder(beam_indices)             # beam search: sequence b continues beam_indices[b]
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastattn.functional import attention_with_kvcache


class KVCache:
    """Per-layer K/V storage of shape (batch, kv_heads, capacity, head_dim), grown by chunks.

    Args:
        num_layers: how many attention layers share this cache (one slot each).
        batch_size, num_kv_heads, head_dim: the cached tensors' sizes; ``head_dim_v`` defaults
            to ``head_dim``.
        dtype, device: of the storage (the queries and new keys must match).
        chunk_size: capacity is always a multiple of it; when an append would not fit, every
            buffer of that layer is reallocated with enough whole chunks and copied.
        capacity: initial slots (rounded up to a chunk); default one chunk.
        max_length: hard limit on the tokens a sequence may hold; appending past it raises
            ``ValueError``. None for no limit.

    State: ``seqlens(layer)`` is an int32 (batch,) tensor of the tokens each sequence holds in
    that layer (a ragged batch is allowed). The storage tensors are ``keys(layer)`` /
    ``values(layer)``; slots at or beyond a sequence's length hold garbage and are never read.
    Only ``attend``, ``append``, ``reorder``, ``set_seqlens`` and ``reset`` change the state.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, *,
                 head_dim_v: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device, None] = None, chunk_size: int = 256,
                 capacity: Optional[int] = None, max_length: Optional[int] = None):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {value!r}")
        for name, value in (("head_dim_v", head_dim_v), ("max_length", max_length), ("capacity", capacity)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KVCache: {name} must be an int >= 1 or None, got {value!r}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.dtype = dtype
        self.device = torch.device("cpu" if device is None else device)
        self.chunk_size = chunk_size
        self.max_length = max_length
        start = self._round_up(capacity or chunk_size)
        self._k = [self._alloc(batch_size, start, self.head_dim) for _ in range(num_layers)]
        self._v = [self._alloc(batch_size, start, self.head_dim_v) for _ in range(num_layers)]
        self._len = [torch.zeros(batch_size, dtype=torch.int32, device=self.device) for _ in range(num_layers)]
        # Host-side upper bound on each layer's longest sequence (exact unless reorder dropped
        # the longest), so growing never syncs with the device.
        self._max = [0] * num_layers

    # --- sizes ---------------------------------------------------------------------------
    def _layer(self, layer) -> int:
        """``layer`` checked: an int in [0, num_layers) (no negative indexing: -1 is a bug)."""
        if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < self.num_layers):
            raise ValueError(f"KVCache: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _round_up(self, n: int) -> int:
        n = -(-max(n, 1) // self.chunk_size) * self.chunk_size
        if self.max_length is not None:
            n = min(n, max(self.max_length, 1))
        return n

    def _alloc(self, batch: int, capacity: int, dim: int) -> Tensor:
        return torch.zeros(batch, self.num_kv_heads, capacity, dim, dtype=self.dtype, device=self.device)

    def capacity(self, layer: int = 0) -> int:
        """Slots per sequence currently allocated for ``layer``."""
        return self._k[self._layer(layer)].shape[2]

    def max_seqlen(self, layer: int = 0) -> int:
        """Upper bound on the longest sequence in ``layer`` (known on the host, no sync)."""
        return self._max[self._layer(layer)]

    def seqlens(self, layer: int = 0) -> Tensor:
        """int32 (batch,): tokens held per sequence in ``layer`` (a copy is not made)."""
        return self._len[self._layer(layer)]

    def keys(self, layer: int) -> Tensor:
        """(batch, kv_heads, capacity, head_dim) storage of ``layer``."""
        return self._k[self._layer(layer)]

    def values(self, layer: int) -> Tensor:
        """(batch, kv_heads, capacity, head_dim_v) storage of ``layer``."""
        return self._v[self._layer(layer)]

    def reserve(self, layer: int, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more per sequence in ``layer``, growing by whole chunks."""
        need = self._max[self._layer(layer)] + new_tokens
        if self.max_length is not None and need > self.max_length:
            raise ValueError(f"KVCache: layer {layer} would hold {need} tokens, more than "
                             f"max_length={self.max_length}")
        cap = self.capacity(layer)
        if need <= cap:
            return
        new_cap = self._round_up(need)
        for store, dim in ((self._k, self.head_dim), (self._v, self.head_dim_v)):
            grown = self._alloc(self.batch_size, new_cap, dim)
            grown[:, :, :cap] = store[layer]
            store[layer] = grown

    # --- use -----------------------------------------------------------------------------
    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, **kwargs):
        """Append ``k_new``/``v_new`` (batch, kv_heads, Lnew, D) to ``layer`` at each sequence's
        length, then return ``fastattn.attention_with_kvcache(q, ...)`` over what it holds.

        kwargs go to ``attention_with_kvcache`` (causal, scale, window, alibi_slopes, softcap,
        num_splits, rotary_cos / rotary_sin / rotary_interleaved, return_lse). With rotary the
        cache stores rotated keys. Lengths of ``layer`` grow by Lnew.
        """
        lnew = k_new.shape[2]
        self.reserve(layer, lnew)
        out = attention_with_kvcache(q, self._k[layer], self._v[layer], self._len[layer],
                                     k_new=k_new, v_new=v_new, **kwargs)
        self._advance(layer, lnew)
        return out

    def append(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Append without attending (e.g. a prompt whose attention was computed elsewhere)."""
        b, h, lnew, _ = k_new.shape
        if ((b, h) != (self.batch_size, self.num_kv_heads) or v_new.shape[:3] != k_new.shape[:3]
                or (k_new.shape[-1], v_new.shape[-1]) != (self.head_dim, self.head_dim_v)):
            raise ValueError(f"KVCache.append: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} "
                             f"must be ({self.batch_size}, {self.num_kv_heads}, Lnew, "
                             f"{self.head_dim} / {self.head_dim_v})")
        self.reserve(layer, lnew)
        # Slot of token t of sequence b: seqlens[b] + t (ragged), as a scatter index.
        pos = self._len[layer].long()[:, None] + torch.arange(lnew, device=self.device)
        for store, new in ((self._k, k_new), (self._v, v_new)):
            idx = pos[:, None, :, None].expand(b, h, lnew, new.shape[-1])
            store[layer].scatter_(2, idx, new.to(self.dtype))
        self._advance(layer, lnew)

    def _advance(self, layer: int, n: int) -> None:
        self._len[layer] += n
        self._max[layer] += n

    def set_seqlens(self, lengths: Tensor, layer: Optional[int] = None) -> None:
        """Declare how many tokens each sequence holds (e.g. after a padded ragged prefill:
        set the real lengths so later tokens overwrite the padding). All layers by default.
        Lengths must be integers within the capacity; reads ``lengths`` on the host."""
        lengths = torch.as_tensor(lengths, device=self.device)
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"KVCache.set_seqlens: lengths must be integers, got {lengths.dtype}")
        lengths = lengths.to(torch.int32)
        if tuple(lengths.shape) != (self.batch_size,):
            raise ValueError(f"KVCache.set_seqlens: lengths must have shape ({self.batch_size},)")
        longest = int(lengths.max()) if lengths.numel() else 0
        for i in range(self.num_layers) if layer is None else (self._layer(layer),):
            if int(lengths.min()) < 0 or longest > self.capacity(i):
                raise ValueError(f"KVCache.set_seqlens: lengths must lie in [0, {self.capacity(i)}]")
            self._len[i] = lengths.clone()
            self._max[i] = longest

    def reorder(self, beam_indices: Tensor) -> None:
        """Beam search: new sequence b continues old sequence ``beam_indices[b]`` (its keys,
        values and length, in every layer). The batch size becomes ``len(beam_indices)``, so
        this also expands a prompt to several beams."""
        idx = torch.as_tensor(beam_indices, device=self.device)
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"KVCache.reorder: beam_indices must be a 1-D integer tensor, got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"KVCache.reorder: beam_indices must lie in [0, {self.batch_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        for i in range(self.num_layers):
            self._k[i] = self._k[i].index_select(0, idx)
            self._v[i] = self._v[i].index_select(0, idx)
            self._len[i] = self._len[i].index_select(0, idx)
        self.batch_size = idx.numel()

    def reset(self) -> None:
        """Forget every token (the storage is kept)."""
        for i in range(self.num_layers):
            self._len[i].zero_()
            self._max[i] = 0

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, batch={self.batch_size}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, capacity={self.capacity()}, max_seqlen={self.max_seqlen()}, "
                f"dtype={self.dtype}, device={self.device})")

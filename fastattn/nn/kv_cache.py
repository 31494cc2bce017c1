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

With an 8-bit ``dtype`` (``torch.float8_e4m3fn`` or ``torch.int8``) both caches store keys and
values quantized per token and kv head, with float32 scales beside them (``key_scales`` /
``value_scales``): about half the bytes of a 16-bit cache (D + 4 bytes per token, head and
tensor instead of 2D), the queries and new keys staying 16/32-bit.
"""
from __future__ import annotations

import itertools
from typing import Optional, Union

import torch
from torch import Tensor

from fastattn.functional import KV_CACHE_DTYPES, attention_with_kvcache


def _per_layer(name: str, value, num_layers: int) -> tuple:
    """``value`` (an int, or a list / tuple of one int per layer) as a tuple of ``num_layers``
    ints >= 1. Raises ValueError naming ``name`` otherwise."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * num_layers
    if len(values) != num_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                            for v in values):
        raise ValueError(f"KVCache: {name} must be an int >= 1 or {num_layers} of them (one per layer), "
                         f"got {value!r}")
    return values


class KVCache:
    """Per-layer K/V storage of shape (batch, kv_heads, capacity, head_dim), grown by chunks.

    Args:
        num_layers: how many attention layers share this cache (one slot each).
        batch_size, num_kv_heads, head_dim: the cached tensors' sizes; ``head_dim_v`` defaults
            to ``head_dim``. Either may be a list of ints, one per layer (layers of different
            head dims: Gemma's 256 on sliding and 512 on global layers); ``head_dims`` /
            ``head_dims_v`` are then the per-layer tuples (always set).
        dtype, device: of the storage (the queries and new keys must match, unless dtype is
            ``torch.float8_e4m3fn`` or ``torch.int8``: then keys and values are stored quantized
            per token and kv head, with float32 scales (batch, kv_heads, capacity)).
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
                            ("num_kv_heads", num_kv_heads), ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {value!r}")
        for name, value in (("max_length", max_length), ("capacity", capacity)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KVCache: {name} must be an int >= 1 or None, got {value!r}")
        self.head_dims = _per_layer("head_dim", head_dim, num_layers)
        self.head_dims_v = self.head_dims if head_dim_v is None else _per_layer("head_dim_v", head_dim_v, num_layers)
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
        self._k = [self._alloc(batch_size, start, d) for d in self.head_dims]
        self._v = [self._alloc(batch_size, start, d) for d in self.head_dims_v]
        self._len = [torch.zeros(batch_size, dtype=torch.int32, device=self.device) for _ in range(num_layers)]
        self.quantized = dtype in KV_CACHE_DTYPES
        # 8-bit storage: per-token scales of keys and values, (batch, kv_heads, capacity) float32
        self._ks = [self._alloc_scales(batch_size, start) for _ in range(num_layers)]
        self._vs = [self._alloc_scales(batch_size, start) for _ in range(num_layers)]
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

    def _alloc_scales(self, batch: int, capacity: int) -> Optional[Tensor]:
        if not self.quantized:
            return None
        return torch.zeros(batch, self.num_kv_heads, capacity, dtype=torch.float32, device=self.device)

    def _scales(self, layer: int) -> dict:
        """attention_with_kvcache's k_scale / v_scale for ``layer`` (none for 16/32-bit storage)."""
        return dict(k_scale=self._ks[layer], v_scale=self._vs[layer]) if self.quantized else {}

    def key_scales(self, layer: int) -> Optional[Tensor]:
        """8-bit storage: the float32 (batch, kv_heads, capacity) scales of ``layer``'s keys
        (a key is ``keys(layer).float() * key_scales(layer)[..., None]``); else None."""
        return self._ks[self._layer(layer)]

    def value_scales(self, layer: int) -> Optional[Tensor]:
        """As ``key_scales``, for the values."""
        return self._vs[self._layer(layer)]

    def nbytes(self) -> int:
        """Bytes of the storage of every layer: keys, values and, 8-bit, their scales."""
        tensors = [t for ts in (self._k, self._v, self._ks, self._vs) for t in ts if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

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
        for store, dims in ((self._k, self.head_dims), (self._v, self.head_dims_v)):
            grown = self._alloc(self.batch_size, new_cap, dims[layer])
            grown[:, :, :cap] = store[layer]
            store[layer] = grown
        if self.quantized:
            for store in (self._ks, self._vs):
                grown = self._alloc_scales(self.batch_size, new_cap)
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
                                     k_new=k_new, v_new=v_new, **self._scales(layer), **kwargs)
        self._advance(layer, lnew)
        return out

    def append(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Append without attending (e.g. a prompt whose attention was computed elsewhere)."""
        b, h, lnew, _ = k_new.shape
        if ((b, h) != (self.batch_size, self.num_kv_heads) or v_new.shape[:3] != k_new.shape[:3]
                or (k_new.shape[-1], v_new.shape[-1]) != (self.head_dims[layer], self.head_dims_v[layer])):
            raise ValueError(f"KVCache.append: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} "
                             f"must be ({self.batch_size}, {self.num_kv_heads}, Lnew, "
                             f"{self.head_dims[layer]} / {self.head_dims_v[layer]})")
        self.reserve(layer, lnew)
        if self.quantized:  # attention_with_kvcache's own quantizing append, for no query
            attention_with_kvcache(k_new[:, :, :0], self._k[layer], self._v[layer], self._len[layer], k_new=k_new,
                                   v_new=v_new.to(k_new.dtype), **self._scales(layer))
            self._advance(layer, lnew)
            return
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
            # by the bytes: index_select takes no float8
            self._k[i] = self._k[i].view(torch.uint8).index_select(0, idx).view(self.dtype) if self.quantized \
                else self._k[i].index_select(0, idx)
            self._v[i] = self._v[i].view(torch.uint8).index_select(0, idx).view(self.dtype) if self.quantized \
                else self._v[i].index_select(0, idx)
            self._len[i] = self._len[i].index_select(0, idx)
            if self.quantized:
                self._ks[i], self._vs[i] = self._ks[i].index_select(0, idx), self._vs[i].index_select(0, idx)
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


class PagedKVCache:
    """A pool of fixed-size K/V pages shared by many sequences (vLLM-style paged attention).

    Storage per layer: pages ``(num_pages, page_size, kv_heads, head_dim)`` for keys and values
    (``keys(layer)`` / ``values(layer)``). A sequence owns a list of pages, in order; its slot j
    is row ``j % page_size`` of its ``j // page_size``-th page. Pages come from a free list
    when a sequence grows and go back when it is freed, so memory follows the tokens really
    held, not batch x longest. Pages are reference counted: ``fork`` gives a new sequence the
    same pages (a shared prompt, a beam), and the first write into a shared, partly filled page
    copies it first (copy on write), so forks never see each other's tokens.

    Every page index is the same in every layer (one allocation serves all layers); lengths are
    kept per layer, as in ``KVCache``, so a model can run its layers one after the other.

    Use: ``add()`` makes sequences; ``set_batch(ids)`` picks the ones the next calls attend for
    (batch row b is ``ids[b]``); ``attend(layer, q, k_new, v_new, **kw)`` appends and attends
    (``fastattn.attention_with_kvcache`` with ``block_table``); ``free(id)`` returns pages.
    The same ``attend`` / ``max_seqlen`` / ``reorder`` methods as ``KVCache``, so the model
    presets' ``generate(..., paged=True)`` and ``MultiHeadAttention(cache=...)`` take it.

    Args:
        num_layers, num_kv_heads, head_dim (``head_dim_v``): sizes of the cached tensors.
        num_pages: pages in the pool (its memory is allocated up front).
        page_size: tokens per page, any int >= 1 (e.g. 1, 16, 48, 528).
        dtype, device: of the storage; ``torch.float8_e4m3fn`` or ``torch.int8`` store keys and
            values quantized per token and kv head, with float32 scale pages (num_pages,
            page_size, kv_heads) beside them (``key_scales`` / ``value_scales``).

    Raises:
        ValueError: bad sizes, an unknown or freed sequence id, or a pool with too few free
        pages for an append (``can_fit`` tells beforehand).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_pages: int,
                 page_size: int = 16, head_dim_v: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device, None] = None):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_pages", num_pages)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"PagedKVCache: {name} must be an int >= 1, got {value!r}")
        if not (isinstance(page_size, int) and page_size >= 1):
            raise ValueError(f"PagedKVCache: page_size must be an int >= 1, got {page_size!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.num_pages, self.page_size, self.dtype = num_pages, page_size, dtype
        self.device = torch.device("cpu" if device is None else device)
        self._k = [torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=self.device)
                   for _ in range(num_layers)]
        self._v = [torch.zeros(num_pages, page_size, num_kv_heads, self.head_dim_v, dtype=dtype, device=self.device)
                   for _ in range(num_layers)]
        self.quantized = dtype in KV_CACHE_DTYPES
        # 8-bit storage: per-token scales of keys and values, (num_pages, page_size, kv_heads) float32
        self._ks, self._vs = ([torch.zeros(num_pages, page_size, num_kv_heads, device=self.device)
                               for _ in range(num_layers if self.quantized else 0)] for _ in range(2))
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest free page
        self._refs = [0] * num_pages
        self._pages: dict[int, list[int]] = {}  # sequence id -> its pages, in order
        self._lens: dict[int, list[int]] = {}  # sequence id -> tokens held, per layer
        self._next_id = 0
        self._batch: list[int] = []
        self._table: Optional[Tensor] = None  # int32 (B, P) of the batch, rebuilt when pages change
        self._dev_lens: list[Tensor] = []  # per layer, int32 (B,) of the batch, advanced on the device
        self._step: Optional[list] = None  # new tokens per batch sequence of a ragged step
        self._cu: Optional[Tensor] = None  # int32 (B+1,) offsets of the ragged step's tokens
        self.peak_pages = 0

    # --- the pool ------------------------------------------------------------------------
    def free_pages(self) -> int:
        """Pages not held by any sequence."""
        return len(self._free)

    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def page_bytes(self) -> int:
        """Bytes of one page over all layers, keys and values (and, 8-bit, their scales)."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        scales = 2 * 4 if self.quantized else 0  # one float32 per token and head, keys and values
        return self.num_layers * self.page_size * self.num_kv_heads * ((self.head_dim + self.head_dim_v) * elt + scales)

    def nbytes(self) -> int:
        """Bytes of the whole pool: ``num_pages * page_bytes()``."""
        return self.num_pages * self.page_bytes()

    def _scales(self, layer: int) -> dict:
        """attention_with_kvcache's k_scale / v_scale for ``layer`` (none for 16/32-bit storage)."""
        return dict(k_scale=self._ks[layer], v_scale=self._vs[layer]) if self.quantized else {}

    def key_scales(self, layer: int) -> Optional[Tensor]:
        """8-bit storage: the float32 (num_pages, page_size, kv_heads) scales of ``layer``'s keys;
        else None."""
        return self._ks[self._layer(layer)] if self.quantized else None

    def value_scales(self, layer: int) -> Optional[Tensor]:
        """As ``key_scales``, for the values."""
        return self._vs[self._layer(layer)] if self.quantized else None

    def pages_for(self, tokens: int) -> int:
        """Pages that ``tokens`` tokens occupy."""
        return -(-tokens // self.page_size)

    def can_fit(self, seq_id: int, new_tokens: int) -> bool:
        """Whether ``new_tokens`` more tokens of ``seq_id`` fit the free pages (counting the copy
        of a shared last page)."""
        return self._pages_needed(self._check(seq_id), new_tokens) <= len(self._free)

    def _pages_needed(self, seq_id: int, new_tokens: int) -> int:
        n = max(self._lens[seq_id])
        pages = self._pages[seq_id]
        need = self.pages_for(n + new_tokens) - len(pages)
        if new_tokens and n % self.page_size and self._refs[pages[n // self.page_size]] > 1:
            need += 1  # the shared, partly filled last page is copied before it is written
        return max(need, 0) if new_tokens else 0

    def _take(self) -> int:
        if not self._free:
            raise ValueError(f"PagedKVCache: the pool of {self.num_pages} pages is exhausted")
        page = self._free.pop()
        self._refs[page] = 1
        self.peak_pages = max(self.peak_pages, self.used_pages())
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    # --- sequences -----------------------------------------------------------------------
    def _check(self, seq_id) -> int:
        if seq_id not in self._pages:
            raise ValueError(f"PagedKVCache: no sequence {seq_id!r} (never added, or freed)")
        return seq_id

    def add(self) -> int:
        """A new empty sequence; returns its id (ids are never reused)."""
        seq_id = self._next_id
        self._next_id += 1
        self._pages[seq_id], self._lens[seq_id] = [], [0] * self.num_layers
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence holding the same tokens as ``seq_id``, sharing its pages (reference
        counted, copied on the first write into a shared page). Returns the new id."""
        pages = self._pages[self._check(seq_id)]
        new = self._next_id
        self._next_id += 1
        for p in pages:
            self._refs[p] += 1
        self._pages[new], self._lens[new] = list(pages), list(self._lens[seq_id])
        return new

    def free(self, seq_id: int) -> None:
        """Forget ``seq_id``: its pages go back to the pool unless another sequence shares them.
        It must not be in the current batch (call ``set_batch`` first)."""
        if self._check(seq_id) in self._batch:
            raise ValueError(f"PagedKVCache: sequence {seq_id} is in the current batch; set_batch without it first")
        for p in self._pages.pop(seq_id):
            self._release(p)
        del self._lens[seq_id]

    def length(self, seq_id: int, layer: int = 0) -> int:
        """Tokens ``seq_id`` holds in ``layer``."""
        return self._lens[self._check(seq_id)][self._layer(layer)]

    def pages(self, seq_id: int) -> list:
        """The pages of ``seq_id``, in order (a copy)."""
        return list(self._pages[self._check(seq_id)])

    # --- the batch -----------------------------------------------------------------------
    def set_batch(self, seq_ids, new_tokens=None) -> None:
        """The sequences the next ``attend`` calls are for: batch row b is ``seq_ids[b]``.

        ``new_tokens``: a list of ints >= 0, one per sequence, for a ragged step (chunked
        prefill mixed with decoding): the next ``attend_packed`` calls append
        ``new_tokens[b]`` tokens to sequence b (``cu_seqlens()`` and ``positions()`` describe
        them). Raises ValueError for a repeated or unknown id, or new_tokens not matching."""
        ids = [self._check(i) for i in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache: set_batch got a sequence twice: {ids}")
        if new_tokens is not None and not (len(new_tokens) == len(ids) and all(
                isinstance(n, int) and n >= 0 for n in new_tokens)):
            raise ValueError(f"PagedKVCache: new_tokens must be {len(ids)} ints >= 0, got {new_tokens!r}")
        self._batch = ids
        self._table = None
        self._dev_lens = [torch.tensor([self._lens[i][layer] for i in ids], dtype=torch.int32, device=self.device)
                          for layer in range(self.num_layers)]
        self._step = None if new_tokens is None else list(new_tokens)
        self._cu = None if new_tokens is None else torch.tensor(
            [0] + list(itertools.accumulate(new_tokens)), dtype=torch.int32, device=self.device)

    def cu_seqlens(self) -> Tensor:
        """int32 (B+1,) offsets of the ragged step's tokens (``set_batch(..., new_tokens)``)."""
        return self._ragged("cu_seqlens")

    def positions(self, layer: int = 0) -> Tensor:
        """int64 (1, total): the position of each of the ragged step's tokens in its sequence
        (the tokens ``layer`` holds so far, then counting up), for RoPE and absolute positions."""
        self._ragged("positions")
        pos = [self._lens[i][self._layer(layer)] + j for i, n in zip(self._batch, self._step) for j in range(n)]
        return torch.tensor(pos, dtype=torch.long, device=self.device)[None]

    def _ragged(self, what: str) -> Tensor:
        if self._cu is None:
            raise ValueError(f"PagedKVCache.{what}: no ragged step; call set_batch(ids, new_tokens=[...]) first")
        return self._cu

    @property
    def batch(self) -> list:
        return list(self._batch)

    @property
    def batch_size(self) -> int:
        return len(self._batch)

    def block_table(self) -> Tensor:
        """int32 (B, P) of the batch: row b lists ``batch[b]``'s pages, padded with 0 (never
        read) to the longest."""
        if self._table is None:
            width = max([len(self._pages[i]) for i in self._batch] + [1])
            rows = [self._pages[i] + [0] * (width - len(self._pages[i])) for i in self._batch]
            self._table = torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(rows), width)
        return self._table

    def seqlens(self, layer: int = 0) -> Tensor:
        """int32 (B,): tokens each batch sequence holds in ``layer``."""
        return self._dev_lens[self._layer(layer)]

    def max_seqlen(self, layer: int = 0) -> int:
        """Longest batch sequence in ``layer`` (known on the host)."""
        return max([self._lens[i][self._layer(layer)] for i in self._batch] + [0])

    def keys(self, layer: int) -> Tensor:
        """(num_pages, page_size, kv_heads, head_dim) pages of ``layer``."""
        return self._k[self._layer(layer)]

    def values(self, layer: int) -> Tensor:
        return self._v[self._layer(layer)]

    def _layer(self, layer) -> int:
        if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < self.num_layers):
            raise ValueError(f"PagedKVCache: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _make_room(self, layer: int, counts: list) -> None:
        """Pages for ``counts[b]`` more tokens of batch sequence b in ``layer``: a private
        copy of a shared page about to be written, fresh pages past the end."""
        need = sum(self._pages_needed(i, c) for i, c in zip(self._batch, counts)
                   if self._lens[i][layer] == max(self._lens[i]))
        if need > len(self._free):
            raise ValueError(f"PagedKVCache: appending {max(counts, default=0)} tokens (at most) to "
                             f"{len(self._batch)} sequences needs {need} pages, {len(self._free)} are free")
        changed = False
        for i, new_tokens in zip(self._batch, counts):
            n, pages = self._lens[i][layer], self._pages[i]
            first = n // self.page_size  # the page the first new token goes to
            if new_tokens and n % self.page_size and self._refs[pages[first]] > 1:
                copy = self._take()
                for store in (self._k, self._v, self._ks, self._vs):  # every layer: the copy serves them all
                    for t in store:
                        t[copy] = t[pages[first]]
                self._release(pages[first])
                pages[first] = copy
                changed = True
            while len(pages) < self.pages_for(n + new_tokens):
                pages.append(self._take())
                changed = True
        if changed:
            self._table = None

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, **kwargs):
        """Append ``k_new``/``v_new`` (B, kv_heads, Lnew, D) of the batch sequences to ``layer``
        at their lengths, then ``fastattn.attention_with_kvcache(q, ..., block_table=...)``.
        kwargs as ``KVCache.attend``. Lengths of ``layer`` grow by Lnew."""
        if k_new.shape[0] != len(self._batch):
            raise ValueError(f"PagedKVCache.attend: k_new {tuple(k_new.shape)} has batch {k_new.shape[0]}, the "
                             f"current batch has {len(self._batch)} sequences (set_batch)")
        lnew = k_new.shape[2]
        self._make_room(self._layer(layer), [lnew] * len(self._batch))
        out = attention_with_kvcache(q, self._k[layer], self._v[layer], self._dev_lens[layer], k_new=k_new,
                                     v_new=v_new, block_table=self.block_table(), **self._scales(layer), **kwargs)
        self._dev_lens[layer] = self._dev_lens[layer] + lnew
        for i in self._batch:
            self._lens[i][layer] += lnew
        return out

    def attend_packed(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, **kwargs):
        """The ragged step declared by ``set_batch(ids, new_tokens)``: q (1, Hq, total, D),
        k_new / v_new (1, kv_heads, total, D) hold sequence b's new tokens at
        ``cu_seqlens()[b]:cu_seqlens()[b+1]``; each is appended to its sequence in ``layer``,
        then attends over that sequence's cache (causal within its own new tokens when
        ``causal=True``) -> (1, Hq, total, Dv). One ``attention_with_kvcache(cu_seqlens_q=...)``
        call. kwargs as ``attend``. Raises ValueError without a ragged step or for a total that
        is not ``sum(new_tokens)``."""
        cu = self._ragged("attend_packed")
        total = sum(self._step)
        if q.shape[0] != 1 or k_new.shape[:3] != (1, self.num_kv_heads, total) or q.shape[2] != total:
            raise ValueError(f"PagedKVCache.attend_packed: q {tuple(q.shape)} / k_new {tuple(k_new.shape)} must be "
                             f"(1, H, {total}, D) for the step's new_tokens {self._step}")
        self._make_room(self._layer(layer), self._step)
        # (1, H, total, D) -> (total, H, D): the packed layout of cu_seqlens_q
        q, k_new, v_new = (t[0].transpose(0, 1) for t in (q, k_new, v_new))
        out = attention_with_kvcache(q, self._k[layer], self._v[layer], self._dev_lens[layer], k_new=k_new,
                                     v_new=v_new, block_table=self.block_table(), cu_seqlens_q=cu,
                                     max_seqlen_q=max(self._step, default=0), **self._scales(layer), **kwargs)
        self._dev_lens[layer] = self._dev_lens[layer] + cu.diff()
        for i, n in zip(self._batch, self._step):
            self._lens[i][layer] += n
        return out.transpose(0, 1)[None]  # (total, Hq, Dv) -> (1, Hq, total, Dv)

    def reorder(self, beam_indices) -> None:
        """Beam search: batch row b continues row ``beam_indices[b]``; rows are forked (pages
        shared, not copied) and the old ones freed. Reads ``beam_indices`` on the host."""
        idx = torch.as_tensor(beam_indices).tolist()
        if any(not isinstance(i, int) or not 0 <= i < len(self._batch) for i in idx):
            raise ValueError(f"PagedKVCache.reorder: beam_indices must be ints in [0, {len(self._batch)}), got {idx}")
        old = self._batch
        new = [self.fork(old[i]) for i in idx]
        self._batch = []
        for i in old:
            self.free(i)
        self.set_batch(new)

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
                f"used={self.used_pages()}, sequences={len(self._pages)}, batch={len(self._batch)}, "
                f"dtype={self.dtype}, device={self.device})")

"""Attention kinds: what ``fastattn.nn.MultiHeadAttention`` computes from its projected q, k, v.

A kind is a small ``nn.Module`` that says what it supports (``supports``, a ``Supports``) and,
called as ``kind(q, k, v, causal=..., ...)``, runs one of fastattn's public functions:

    Flash()                                  exact softmax attention, ``flash_attention``
    Sparse(layout)                           ``sparse_attention`` over a block layout
    Performer(num_features=64)               FAVOR+ random features, ``performer_attention``
    Linformer(max_len, proj_dim=64, share_kv=False)   learned sequence projections, ``linformer_attention``
    Linear(feature_map="elu")                kernelized linear attention, ``linear_attention``
    ContextParallelAttention(cp, window=None, softcap=None, sinks=False)
                                             exact attention across ranks, ``cp`` from
                                             ``fastattn.distributed.context_parallel(...)``

``MultiHeadAttention`` checks a layer's settings and each call's arguments against
``kind.supports`` once, then calls the kind with only what it supports. The kind a user passes
is a specification: every layer ``bind``s its own copy (with its own parameters, e.g.
Linformer's projections), so one object can configure a whole stack.

The backend (kernels or plain PyTorch) is not part of a kind: ``fastattn.use_backend`` picks it
for every kind at once. Built only on ``fastattn.functional`` (no Triton, no ``fastattn.distributed``
import: a context-parallel kind calls the ``cp`` object it is given).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from fastattn import functional
from fastattn.sparse import BlockSparseLayout

__all__ = ["Supports", "AttentionKind", "Flash", "Sparse", "Performer", "Linformer", "Linear",
           "ContextParallelAttention", "check_kind", "check_window", "merge_padding"]


@dataclass(frozen=True)
class Supports:
    """What an attention kind takes. ``MultiHeadAttention`` refuses (ValueError) a layer or a
    call that asks for something its kind lacks, instead of silently dropping it.

    causal: a causal mask (bottom-right aligned). attn_bias: an additive or bool bias
    (B, H, Lq, Lk). key_padding_mask: (B, Lk) padding. alibi: ALiBi slopes. dropout: dropout on
    the attention probabilities. kv_cache: ``fastattn.nn.KVCache`` decoding. need_weights:
    returning the attention probabilities. varlen: packed documents (``cu_seqlens``).
    """
    causal: bool = False
    attn_bias: bool = False
    key_padding_mask: bool = False
    alibi: bool = False
    dropout: bool = False
    kv_cache: bool = False
    need_weights: bool = False
    varlen: bool = False


def merge_padding(attn_bias: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """One bias from ``attn_bias`` (bool, True = attend, or additive float; broadcastable to
    (B, H, Lq, Lk)) and ``key_padding_mask`` ((B, Lk) bool, True = padding): padded keys get
    False (bool) or -inf (float). None when both are None."""
    if key_padding_mask is None:
        return attn_bias
    keep = ~key_padding_mask[:, None, None, :]  # (B, Lk) -> (B, 1, 1, Lk), True = attend
    if attn_bias is None:
        return keep
    if attn_bias.dtype == torch.bool:
        return attn_bias & keep
    return attn_bias.masked_fill(~keep, float("-inf"))


class AttentionKind(nn.Module):
    """Base class of the attention kinds.

    Subclasses set ``supports`` and ``label`` (a short name for error messages), implement
    ``forward(q, k, v, *, causal, attn_bias, key_padding_mask, alibi_slopes, dropout_p)``
    with q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, Dv), store their constructor
    arguments in ``self.settings`` (a dict: ``bind`` rebuilds the kind from it) and, when they
    own parameters or buffers, create them in ``_build``. Kinds with ``supports.kv_cache`` /
    ``supports.need_weights`` / ``supports.varlen`` also implement ``attend_cache`` /
    ``attend_with_weights`` / ``attend_packed``.
    """
    supports: ClassVar[Supports] = Supports()
    label: ClassVar[str] = "attention"

    def __init__(self, **settings):
        super().__init__()
        self.settings = settings

    def bind(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> "AttentionKind":
        """A fresh kind with the same settings and its own state for a layer of ``num_heads``
        query heads, ``num_kv_heads`` key/value heads and ``head_dim`` channels per head."""
        kind = type(self)(**self.settings)
        kind._build(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        return kind

    def _build(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Create this kind's parameters/buffers (none by default)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_bias: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                dropout_p: float = 0.0) -> Tensor:
        raise NotImplementedError

    def attend_cache(self, cache, layer: int, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                     alibi_slopes: Optional[Tensor]) -> Tensor:
        raise NotImplementedError(f"{self.label} has no KV-cache path")

    def attend_with_weights(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.label} cannot return attention weights")

    def attend_packed(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = False,
                      alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
        """Packed documents: q (1, Hq, total, D), k/v (1, Hkv, total, D), ``cu_seqlens`` int32
        (S+1,) offsets shared by queries and keys -> (1, Hq, total, Dv); each document attends
        only inside itself."""
        raise NotImplementedError(f"{self.label} has no packed-sequence path")

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings.items())

    def __repr__(self) -> str:  # one line, the way it is written: Performer(num_features=64)
        return f"{type(self).__name__}({self.extra_repr()})"


def check_window(owner: str, window) -> Optional[tuple]:
    """``window`` itself: None or ``(left, right)`` of ints >= 0 or None (unbounded).

    Raises:
        ValueError: anything else, naming ``owner``."""
    if window is not None and not (isinstance(window, tuple) and len(window) == 2 and all(
            w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0) for w in window)):
        raise ValueError(f"{owner}: window must be None or (left, right) of ints >= 0 or None, got {window!r}")
    return window


class Flash(AttentionKind):
    """Exact softmax attention: ``fastattn.flash_attention`` (bottom-right causal, GQA, bool or
    additive bias, ALiBi slopes, dropout), ``fastattn.attention_with_kvcache`` through a
    ``KVCache``, and the materialised probabilities for ``need_weights``. Supports everything.

    Args:
        window: ``(left, right)`` sliding window, as ``flash_attention``'s: query i (at key
            position ``i + Lk - Lq``) sees keys ``i + Lk - Lq - left .. i + Lk - Lq + right``;
            None (the default) for none. A sliding-window causal layer that sees its last W
            keys, itself included (Mistral's, Gemma's ``sliding_window=W``), is
            ``Flash(window=(W - 1, 0))`` with ``causal=True``. Every path applies it: the
            kernels skip the tiles outside the band, the KV cache's decode and packed
            documents take it, ``need_weights`` masks by it.

    Raises:
        ValueError: a window that is not None or a pair of ints >= 0 or None.
    """
    supports = Supports(causal=True, attn_bias=True, key_padding_mask=True, alibi=True, dropout=True,
                        kv_cache=True, need_weights=True, varlen=True)
    label = "flash"

    def __init__(self, window: Optional[tuple] = None):
        if window is None:  # no settings: repr and state stay those of the plain kind
            super().__init__()
        else:
            super().__init__(window=check_window("Flash", window))
        self.window = window

    def forward(self, q, k, v, *, causal=False, attn_bias=None, key_padding_mask=None, alibi_slopes=None,
                dropout_p=0.0):
        return functional.flash_attention(q, k, v, causal=causal, attn_bias=merge_padding(attn_bias, key_padding_mask),
                                          alibi_slopes=alibi_slopes, dropout_p=dropout_p, window=self.window)

    def attend_cache(self, cache, layer, q, k, v, *, causal, alibi_slopes, cu_seqlens=None):
        """Through ``cache.attend``; with ``cu_seqlens`` (the cache's ragged step, q/k/v
        (1, H, total, D)) through ``cache.attend_packed``."""
        attend = cache.attend if cu_seqlens is None else cache.attend_packed
        return attend(layer, q, k, v, causal=causal, alibi_slopes=alibi_slopes, window=self.window)

    def attend_packed(self, q, k, v, cu_seqlens, *, causal=False, alibi_slopes=None, dropout_p=0.0):
        """Packed documents in one row: q (1, Hq, total, D), k/v (1, Hkv, total, D) ->
        (1, Hq, total, Dv), each document attending only inside itself
        (``fastattn.flash_attention_varlen``)."""
        out = functional.flash_attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu_seqlens, cu_seqlens,
                                                causal=causal, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                                window=self.window)
        return out.transpose(0, 1)[None]  # (total, Hq, Dv) -> (1, Hq, total, Dv)

    def attend_with_weights(self, q, k, v, *, causal=False, attn_bias=None, key_padding_mask=None,
                            alibi_slopes=None, dropout_p=0.0):
        """(out (B, Hq, Lq, Dv), weights (B, Hq, Lq, Lk)) by the plain-torch materialised path."""
        weights = attention_weights(q, k, causal=causal, attn_bias=merge_padding(attn_bias, key_padding_mask),
                                    alibi=alibi_slopes, window=self.window)
        probs = torch.nn.functional.dropout(weights, dropout_p, training=dropout_p > 0)
        # (B, Hq, Lq, Lk) @ (B, Hq, Lk, Dv): the kv heads repeated for GQA
        out = probs.to(v.dtype) @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return out, weights


class Sparse(AttentionKind):
    """Block-sparse attention, ``fastattn.sparse_attention``: only the blocks a layout keeps.

    Args:
        layout: a ``fastattn.sparse.BlockSparseLayout`` for the sequence length, or a callable
            (Lq, Lk) -> layout for varying lengths (e.g.
            ``lambda lq, lk: fastattn.sparse.local(lk, 128)``).

    Supports causal (token by token inside the kept blocks); no mask, bias, ALiBi, dropout,
    KV cache or weights.
    """
    supports = Supports(causal=True)
    label = "sparse"

    def __init__(self, layout: Union[BlockSparseLayout, Callable[[int, int], BlockSparseLayout]]):
        if not (isinstance(layout, BlockSparseLayout) or callable(layout)):
            raise ValueError(f"Sparse: layout must be a fastattn.sparse.BlockSparseLayout or a callable "
                             f"(Lq, Lk) -> layout, got {type(layout).__name__}")
        super().__init__(layout=layout)
        self.layout = layout

    def forward(self, q, k, v, *, causal=False, **unused):
        layout = self.layout
        if not isinstance(layout, BlockSparseLayout):  # a builder: (Lq, Lk) -> layout
            layout = layout(q.shape[2], k.shape[2])
        return functional.sparse_attention(q, k, v, layout, causal=causal)


class Performer(AttentionKind):
    """FAVOR+ (Choromanski et al. 2021), ``fastattn.performer_attention``, with a fixed random
    projection buffer ``projection`` (num_features, head_dim) from
    ``fastattn.performer_projection`` (saved in the state dict; ``redraw`` draws a new one).

    Supports causal only.
    """
    supports = Supports(causal=True)
    label = "performer"

    def __init__(self, num_features: int = 64):
        if not (isinstance(num_features, int) and num_features >= 1):
            raise ValueError(f"Performer: num_features must be an int >= 1, got {num_features!r}")
        super().__init__(num_features=num_features)

    def _build(self, *, head_dim, **unused):
        self.register_buffer("projection", functional.performer_projection(self.settings["num_features"], head_dim))

    def redraw(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new random features in place."""
        new = functional.performer_projection(self.projection.shape[0], self.projection.shape[1], generator=generator)
        self.projection.copy_(new)

    def forward(self, q, k, v, *, causal=False, **unused):
        return functional.performer_attention(q, k, v, self.projection.to(q.dtype), causal=causal)


class Linformer(AttentionKind):
    """Linformer (Wang et al. 2020), ``fastattn.linformer_attention``: keys and values projected
    along the sequence to ``proj_dim`` rows by learned (proj_dim, max_len) parameters ``e_proj``
    and ``f_proj`` (one shared matrix with ``share_kv``); sequences shorter than ``max_len`` use
    the first Lk columns, longer ones raise ValueError.

    Non-causal by design (every projected key mixes all positions). Takes a key_padding_mask
    (padded keys are zeroed before the projection); no bias, ALiBi, dropout, KV cache or weights.
    """
    supports = Supports(key_padding_mask=True)
    label = "linformer"

    def __init__(self, max_len: int, proj_dim: int = 64, share_kv: bool = False):
        for name, value in (("max_len", max_len), ("proj_dim", proj_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Linformer: {name} must be an int >= 1, got {value!r}")
        super().__init__(max_len=max_len, proj_dim=proj_dim, share_kv=bool(share_kv))

    def _build(self, **unused):
        p, n = self.settings["proj_dim"], self.settings["max_len"]
        self.e_proj = nn.Parameter(torch.randn(p, n) / math.sqrt(p))
        self.f_proj = self.e_proj if self.settings["share_kv"] else nn.Parameter(torch.randn(p, n) / math.sqrt(p))

    def forward(self, q, k, v, *, key_padding_mask=None, **unused):
        lk = k.shape[2]
        if lk > self.e_proj.shape[1]:
            raise ValueError(f"Linformer: sequence length {lk} > max_len {self.e_proj.shape[1]}")
        if key_padding_mask is not None:
            keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)  # (B, Lk) -> (B, 1, Lk, 1)
            k, v = k * keep, v * keep  # padded keys contribute nothing to the projections
        e, f = self.e_proj[:, :lk].to(q.dtype), self.f_proj[:, :lk].to(q.dtype)  # (P, Lk)
        return functional.linformer_attention(q, k, v, e, f)


class Linear(AttentionKind):
    """Kernelized linear attention (Katharopoulos et al. 2020), ``fastattn.linear_attention``
    with ``feature_map`` ("elu" = elu + 1, or any map ``linear_attention`` takes). Supports
    causal only."""
    supports = Supports(causal=True)
    label = "linear"

    def __init__(self, feature_map="elu"):
        super().__init__(feature_map=feature_map)

    def forward(self, q, k, v, *, causal=False, **unused):
        return functional.linear_attention(q, k, v, causal=causal, feature_map=self.settings["feature_map"])


class ContextParallelAttention(AttentionKind):
    """Exact attention over a sequence sharded across ranks: every rank holds its shard
    ``cp.shard(x, dim=1)`` of the tokens, and attention runs ``cp(q, k, v, causal=..., ...)``
    (ring or Ulysses, see ``fastattn.distributed.context_parallel``), giving this rank's shard
    of the single-process output.

    Args:
        cp: a ``fastattn.distributed.ContextParallel`` (from ``context_parallel(group, method=...)``),
            or any callable ``cp(q, k, v, *, causal, alibi_slopes, dropout_p, window, softcap, sinks)``
            with that contract (and its ``varlen(q, k, v, cu_seqlens, ...)`` for packed documents).
        window: ``(left, right)`` sliding window over global positions (ints >= 0 or None for
            unbounded), as ``flash_attention``'s; None for none.
        softcap: logits become ``softcap * tanh(logits / softcap)``; None for none.
        sinks: learn one attention-sink logit per query head (a parameter ``sinks`` (H,),
            initialised to 0, as ``flash_attention``'s ``sinks``); its gradient on each rank is
            that rank's share, summed over the ranks like the weights'.

    Supports causal, ALiBi and dropout (each rank draws its own pieces' masks: the same
    distribution as one process, not the same mask), and packed documents (``attend_packed``:
    this rank's contiguous share ``cp.shard_packed(x, dim=1)`` of the packed tokens and the
    whole batch's ``cu_seqlens``, through ``cp.varlen``; the layer's RoPE ``offset`` must then
    be this rank's share of the positions). No mask, bias, KV cache or weights.

    Raises:
        ValueError: cp not callable, a window that is not a pair of ints >= 0 or None, or a
            softcap that is not a positive number.
    """
    supports = Supports(causal=True, alibi=True, dropout=True, varlen=True)
    label = "context-parallel"

    def __init__(self, cp, *, window: Optional[tuple] = None, softcap: Optional[float] = None, sinks: bool = False):
        if not callable(cp):
            raise ValueError(f"ContextParallelAttention: cp must be fastattn.distributed.context_parallel(...), "
                             f"got {type(cp).__name__}")
        check_window("ContextParallelAttention", window)
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"ContextParallelAttention: softcap must be None or a positive number, got {softcap!r}")
        super().__init__(cp=cp, window=window, softcap=softcap, sinks=bool(sinks))
        self.cp = cp

    def _build(self, *, num_heads, **unused):
        if self.settings["sinks"]:
            self.sinks = nn.Parameter(torch.zeros(num_heads))

    def __deepcopy__(self, memo):  # stacks deep-copy their layers: share the process group, never copy it
        kind = type(self)(**self.settings)
        for name, p in self.named_parameters(recurse=False):
            kind.register_parameter(name, copy.deepcopy(p, memo))
        return kind

    def options(self) -> dict:
        """The fixed keywords this kind adds to every ``cp`` call: window, softcap, sinks."""
        return dict(window=self.settings["window"], softcap=self.settings["softcap"],
                    sinks=self.sinks if self.settings["sinks"] else None)

    def forward(self, q, k, v, *, causal=False, alibi_slopes=None, dropout_p=0.0, **unused):
        return self.cp(q, k, v, causal=causal, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                       **self.options())

    def attend_packed(self, q, k, v, cu_seqlens, *, causal=False, alibi_slopes=None, dropout_p=0.0):
        """This rank's share of packed documents: q (1, Hq, T_local, D), k/v (1, Hkv, T_local, D),
        the whole batch's ``cu_seqlens`` -> (1, Hq, T_local, Dv) (``cp.varlen``)."""
        out = self.cp.varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu_seqlens, causal=causal,
                             alibi_slopes=alibi_slopes, dropout_p=dropout_p, **self.options())
        return out.transpose(0, 1)[None]  # (T_local, Hq, Dv) -> (1, Hq, T_local, Dv)


def check_kind(owner: str, attention) -> AttentionKind:
    """``attention`` itself, an attention kind (``Flash()``, ``Sparse(layout)``, ...), or Flash()
    for None.

    Raises:
        ValueError: anything else (a kind's name as a string included), naming ``owner``."""
    if attention is None:
        return Flash()
    if not isinstance(attention, AttentionKind):
        raise ValueError(f"{owner}: attention must be a fastattn.nn attention kind (Flash(), Sparse(layout), "
                         f"Performer(num_features), Linformer(max_len), Linear(), ...), got {attention!r}")
    return attention


def attention_weights(q: Tensor, k: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                      attn_bias: Optional[Tensor] = None, alibi: Optional[Tensor] = None,
                      window: Optional[tuple] = None) -> Tensor:
    """Materialised softmax attention probabilities (B, Hq, Lq, Lk), plain torch, with the
    semantics of ``fastattn.flash_attention`` (bottom-right causal, GQA, bool or additive bias,
    ALiBi, sliding window, fully masked rows 0). For inspection only: it is O(Lq * Lk) memory.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D); attn_bias broadcastable to (B, Hq, Lq, Lk); alibi
    (Hq,) or (B, Hq) slopes; window (left, right) as ``flash_attention``'s."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = functional.default_scale(d, scale)
    k = k.repeat_interleave(hq // hkv, dim=1)  # (B, Hkv, Lk, D) -> (B, Hq, Lk, D)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # query i's diagonal (bottom-right)
    j = torch.arange(lk, device=q.device)[None, :]
    if alibi is not None:
        # (Hq,) or (B, Hq) -> (., Hq, 1, 1) times |i - j| (Lq, Lk)
        s = s - alibi.to(s.dtype).reshape(*alibi.shape, 1, 1) * (i - j).abs().to(s.dtype)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = j <= i
    left, right = window or (None, None)
    if left is not None:
        keep = keep & (j >= i - left)
    if right is not None:
        keep = keep & (j <= i + right)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            s = s + attn_bias.to(s.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: 0, as the kernels

"""Multi-head attention built on fastattn's public functions.

``MultiHeadAttention`` projects q, k, v and hands them to its attention kind
(``fastattn.nn.kinds``: ``Flash()``, ``Sparse(layout)``, ``Performer(...)``, ``Linformer(...)``,
``Linear(...)``, ``ContextParallelAttention(cp)``), which calls one of fastattn's public
functions; ``fastattn.use_backend`` switches every module between kernels and plain PyTorch.
Never touches Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.nn.kinds import AttentionKind, attention_weights, check_kind
from fastattn.nn.positional import Positions, RotaryEmbedding, alibi_slopes, packed_positions

__all__ = ["MultiHeadAttention", "attention_weights"]


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention, batch first, on fastattn's kernels.

    Args:
        embed_dim: model width E (input and output features).
        num_heads: query heads H.
        head_dim: channels per head D; default E // H. Given, it need not divide E (Gemma's
            layers: D 256 on sliding and 512 on global layers at the same E); q/k/v are
            projected to H * D channels and the output back to E.
        num_kv_heads: key/value heads (GQA); 1 is multi-query; default H. H must be a multiple.
        causal: mask future keys in self-attention (bottom-right aligned, so it stays right with
            a KV cache or when queries are the last Lq of Lk positions).
        dropout: on the attention probabilities, in training only (kinds whose
            ``supports.dropout`` is True: ``Flash``, ``ContextParallelAttention``).
        bias: biases in the projections.
        attention: the attention kind, e.g. ``Flash()`` (the default), ``Sparse(layout)``,
            ``Performer(num_features=64)``, ``Linformer(max_len, proj_dim=64, share_kv=False)``,
            ``Linear(feature_map="elu")``, ``ContextParallelAttention(cp)``; each layer binds
            its own copy (own parameters). None is ``Flash()``.
        rotary: a ``RotaryEmbedding`` applied to q and k of self-attention (RoPE), or None.
        alibi: ALiBi in self-attention (slopes from ``alibi_slopes(H)``, given to the kernel,
            never materialised); kinds whose ``supports.alibi`` is True.

    Raises:
        ValueError: embed_dim not a multiple of num_heads (without head_dim), head_dim not an
            int >= 1, num_heads not a multiple of
            num_kv_heads, an attention that is not a kind, or causal / alibi / dropout that the kind does
            not support (``kind.supports``).

    Projections: one fused ``in_proj`` ((H + 2 Hkv) * head_dim, E) whose rows are
    [q | k | v], the layout of ``torch.nn.MultiheadAttention.in_proj_weight``: self-attention
    does one matmul; cross-attention applies the q rows to ``x`` and the k/v rows to
    ``context``. ``load_torch`` copies a ``torch.nn.MultiheadAttention``. The bound kind is
    ``self.kind`` (its parameters, if any, are under ``kind.`` in the state dict).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 causal: bool = False, dropout: float = 0.0, bias: bool = True,
                 attention: Optional[AttentionKind] = None,
                 rotary: Optional[RotaryEmbedding] = None, alibi: bool = False, head_dim: Optional[int] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, n in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
                raise ValueError(f"MultiHeadAttention: {name} must be an int >= 1, got {n!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout!r}")
        if head_dim is not None and not (isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim >= 1):
            raise ValueError(f"MultiHeadAttention: head_dim must be an int >= 1, got {head_dim!r}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_heads {num_heads} must be a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        kind = check_kind("MultiHeadAttention", attention)
        can = kind.supports
        for asked, ok, what in ((causal, can.causal, "cannot be causal"), (alibi, can.alibi, "takes no ALiBi"),
                                (dropout > 0, can.dropout, f"has no attention dropout (dropout={dropout})")):
            if asked and not ok:
                raise ValueError(f"MultiHeadAttention: {kind.label} attention {kind!r} {what}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.causal, self.dropout = causal, dropout
        self.rotary = rotary
        rows = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.in_proj = nn.Linear(embed_dim, rows, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.kind = kind.bind(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=self.head_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def redraw_projection(self, generator: Optional[torch.Generator] = None) -> None:
        """Random-feature kinds (``Performer``): draw new features in place; others: nothing."""
        redraw = getattr(self.kind, "redraw", None)
        if redraw is not None:
            redraw(generator)

    # --- projections -------------------------------------------------------------------
    def _split_heads(self, t: Tensor, heads: int) -> Tensor:
        b, l, _ = t.shape
        # (B, L, heads * D) -> (B, L, heads, D) -> (B, heads, L, D), a view: the kernels take strides
        return t.view(b, l, heads, self.head_dim).transpose(1, 2)

    def project_qkv(self, x: Tensor, context: Optional[Tensor] = None):
        """x (B, Lq, E) [, context (B, Lk, E)] -> q (B, H, Lq, D), k, v (B, Hkv, Lk, D)."""
        nq = self.num_heads * self.head_dim
        if context is None:
            qkv = self.in_proj(x)  # (B, L, (H + 2 Hkv) D), one fused matmul
            q, kv = qkv[..., :nq], qkv[..., nq:]
        else:
            w, b = self.in_proj.weight, self.in_proj.bias
            q = F.linear(x, w[:nq], None if b is None else b[:nq])  # (B, Lq, H D)
            kv = F.linear(context, w[nq:], None if b is None else b[nq:])  # (B, Lk, 2 Hkv D)
        nkv = self.num_kv_heads * self.head_dim
        return (self._split_heads(q, self.num_heads), self._split_heads(kv[..., :nkv], self.num_kv_heads),
                self._split_heads(kv[..., nkv:], self.num_kv_heads))

    def project_kv(self, context: Tensor):
        """context (B, Lk, E) -> k, v (B, Hkv, Lk, D): cross-attention keys to compute once."""
        nq = self.num_heads * self.head_dim
        w, b = self.in_proj.weight, self.in_proj.bias
        kv = F.linear(context, w[nq:], None if b is None else b[nq:])  # (B, Lk, 2 Hkv D)
        nkv = self.num_kv_heads * self.head_dim
        return self._split_heads(kv[..., :nkv], self.num_kv_heads), self._split_heads(kv[..., nkv:], self.num_kv_heads)

    # --- forward -----------------------------------------------------------------------
    def _check_call(self, self_attn: bool, cache, attn_bias, key_padding_mask, need_weights, b: int, lk: int):
        """Refuse, once and by name, what this layer's kind does not support."""
        kind, can = self.kind, self.kind.supports
        asked = (("attn_bias", attn_bias is not None, can.attn_bias),
                 ("key_padding_mask", key_padding_mask is not None, can.key_padding_mask),
                 ("a KV cache", cache is not None, can.kv_cache),
                 ("need_weights", need_weights, can.need_weights))
        for what, on, ok in asked:
            if on and not ok:
                raise ValueError(f"MultiHeadAttention: {kind.label} attention {kind!r} takes no {what}")
        if cache is not None and (not self_attn or key_padding_mask is not None or attn_bias is not None
                                  or need_weights):
            raise ValueError("MultiHeadAttention: a KV cache works with self-attention only, without "
                             "key_padding_mask, attn_bias or need_weights")
        if key_padding_mask is not None and (key_padding_mask.shape != (b, lk)
                                             or key_padding_mask.dtype != torch.bool):
            raise ValueError(f"MultiHeadAttention: key_padding_mask must be bool ({b}, {lk}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")

    def forward(self, x: Tensor, context: Optional[Tensor] = None, *, key_padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[tuple] = None, cache=None, layer: int = 0,
                offset: Positions = 0, need_weights: bool = False, cu_seqlens: Optional[Tensor] = None):
        """Attend.

        Args:
            x: (B, Lq, E) queries (and keys/values for self-attention).
            context: (B, Lk, E) keys/values source for cross-attention; None for self-attention.
            key_padding_mask: (B, Lk) bool, True at PADDED keys (torch.nn.MultiheadAttention's
                convention), which are ignored.
            attn_bias: broadcastable to (B, H, Lq, Lk): bool (True = attend) or additive float
                (e.g. ``RelativePositionBias``).
            kv: precomputed (k, v) from ``project_kv`` (cross-attention during generation).
            cache: a ``fastattn.nn.KVCache``; self-attention appends this call's k/v into slot
                ``layer`` and attends over everything cached (``attention_with_kvcache``).
                No key_padding_mask, attn_bias or need_weights with it.
            offset: position of x's first token for RoPE (an int, or (B,) per sequence);
                with a cache it defaults to the cached length.
            need_weights: also return the attention probabilities (B, H, Lq, Lk). This
                necessarily runs the materialised plain-torch path (O(Lq Lk) memory, no kernel).
            cu_seqlens: int32 (docs + 1,) offsets of packed documents in a batch of one row
                (x (1, total, E)): each attends only inside itself (self-attention, kinds with
                ``supports.varlen``); RoPE positions restart per document unless ``offset``
                gives them. With a ``PagedKVCache`` it is the cache's ragged step
                (``cache.cu_seqlens()``): document b is new tokens of batch sequence b, which
                attend over its cache (``attend_packed``) at positions ``cache.positions()``.

        Returns:
            (B, Lq, E), or (out, weights) when need_weights.

        Raises:
            ValueError: an argument this layer's kind does not support (``self.kind.supports``:
                attn_bias, key_padding_mask, cache, need_weights), a cache with cross-attention,
                a key_padding_mask that is not bool (B, Lk), or an ``x`` / ``context`` that is
                not a floating (B, L, embed_dim) tensor.
        """
        for name, t in (("x", x), ("context", context)):
            if t is not None and not (isinstance(t, Tensor) and t.dim() == 3 and t.shape[-1] == self.embed_dim
                                      and t.is_floating_point()):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"MultiHeadAttention: {name} must be a floating (batch, seq, "
                                 f"embed_dim={self.embed_dim}) tensor, got {got}")
        b, lq, _ = x.shape
        if kv is not None:
            nq = self.num_heads * self.head_dim
            q = self._split_heads(F.linear(x, self.in_proj.weight[:nq],
                                           None if self.in_proj.bias is None else self.in_proj.bias[:nq]),
                                  self.num_heads)
            k, v = kv
        else:
            q, k, v = self.project_qkv(x, context)
        self_attn = context is None and kv is None
        self._check_call(self_attn, cache, attn_bias, key_padding_mask, need_weights, b, k.shape[2])
        if cu_seqlens is not None:
            ragged_cache = cache is None or hasattr(cache, "attend_packed")
            if not (self_attn and b == 1 and ragged_cache and attn_bias is None and key_padding_mask is None
                    and not need_weights and self.kind.supports.varlen):
                raise ValueError(f"MultiHeadAttention: cu_seqlens (packed documents) needs self-attention on one "
                                 f"row (x (1, total, E), got batch {b}), no mask, bias or need_weights, a cache "
                                 f"that takes ragged steps (PagedKVCache) if any, and a kind that takes packed "
                                 f"documents ({self.kind.label} does {'' if self.kind.supports.varlen else 'not'})")
            if isinstance(offset, int) and offset == 0:  # (1, total): after each cached sequence, or from 0
                offset = cache.positions(layer) if cache is not None else packed_positions(cu_seqlens, lq)
        if cache is not None and isinstance(offset, int) and offset == 0:
            offset = cache.max_seqlen(layer)
        if self.rotary is not None and self_attn:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        causal = self.causal and self_attn
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if cu_seqlens is not None and cache is not None:
            out = self.kind.attend_cache(cache, layer, q, k, v, causal=causal, alibi_slopes=self.alibi_slopes,
                                         cu_seqlens=cu_seqlens)
        elif cu_seqlens is not None:
            out = self.kind.attend_packed(q, k, v, cu_seqlens, causal=causal, alibi_slopes=self.alibi_slopes,
                                          dropout_p=dropout_p)
        elif cache is not None:
            out = self.kind.attend_cache(cache, layer, q, k, v, causal=causal, alibi_slopes=self.alibi_slopes)
        elif need_weights:
            out, weights = self.kind.attend_with_weights(q, k, v, causal=causal, attn_bias=attn_bias,
                                                         key_padding_mask=key_padding_mask,
                                                         alibi_slopes=self.alibi_slopes, dropout_p=dropout_p)
        else:
            out = self.kind(q, k, v, causal=causal, attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                            alibi_slopes=self.alibi_slopes, dropout_p=dropout_p)
        # (B, H, Lq, D) -> (B, Lq, H, D) -> (B, Lq, H * D) -> (B, Lq, E)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim))
        return (out, weights) if need_weights else out

    # --- interop -----------------------------------------------------------------------
    @torch.no_grad()
    def load_torch(self, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (same embed_dim and heads,
        kdim == vdim == embed_dim, no bias_k/bias_v). ``batch_first`` does not matter: this
        module is always batch first. Returns self."""
        if ((mha.embed_dim, mha.num_heads, mha.head_dim) != (self.embed_dim, self.num_heads, self.head_dim)
                or self.num_kv_heads != self.num_heads):
            raise ValueError("MultiHeadAttention.load_torch: embed_dim/num_heads/head_dim differ or GQA is on")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ValueError("MultiHeadAttention.load_torch: kdim/vdim != embed_dim or add_bias_kv are not supported")
        self.in_proj.weight.copy_(mha.in_proj_weight)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if self.in_proj.bias is not None:
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, alibi={self.alibi_slopes is not None}")


"""Multi-head attention built on fastattn's public functions.

``MultiHeadAttention`` never touches Triton: it calls ``fastattn.flash_attention``,
``fastattn.sparse_attention``, ``fastattn.performer_attention``, ``fastattn.linformer_attention``,
``fastattn.linear_attention`` or ``fastattn.attention_with_kvcache`` (through
``fastattn.nn.KVCache``), so ``fastattn.use_backend`` switches every module at once.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn.nn.positional import Positions, RotaryEmbedding, alibi_slopes

__all__ = ["MultiHeadAttention", "ATTENTIONS", "attention_weights"]

ATTENTIONS = ("flash", "reference", "sparse", "performer", "linformer", "linear")
_EXACT = ("flash", "reference")


def attention_weights(q: Tensor, k: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                      attn_bias: Optional[Tensor] = None, alibi: Optional[Tensor] = None) -> Tensor:
    """Materialised softmax attention probabilities (B, Hq, Lq, Lk), plain torch, with the
    semantics of ``fastattn.flash_attention`` (bottom-right causal, GQA, bool or additive bias,
    ALiBi, fully masked rows 0). For inspection only: it is O(Lq * Lk) memory."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
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
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            s = s + attn_bias.to(s.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: 0, as the kernels


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention, batch first, on fastattn's kernels.

    Args:
        embed_dim: model width E (input and output features).
        num_heads: query heads H; head_dim = E // H.
        num_kv_heads: key/value heads (GQA); 1 is multi-query; default H. H must be a multiple.
        causal: mask future keys in self-attention (bottom-right aligned, so it stays right with
            a KV cache or when queries are the last Lq of Lk positions).
        dropout: on the attention probabilities, in training only (flash and reference paths;
            the approximate attentions have no dropout).
        bias: biases in the projections.
        attention: which attention runs:
            "flash" (default): ``fastattn.flash_attention`` (kernels where they apply);
            "reference": the same call under ``fastattn.use_backend("torch")``;
            "sparse": ``fastattn.sparse_attention`` with ``options["layout"]``: a
            ``fastattn.sparse`` layout for the sequence length, or a callable (Lq, Lk) -> layout
            for varying lengths (e.g. ``lambda lq, lk: fastattn.sparse.local(lk, 128)``);
            "performer": ``fastattn.performer_attention`` with a fixed random projection of
            ``options.get("num_features", 64)`` features (``redraw_projection()`` redraws it);
            "linformer": ``fastattn.linformer_attention`` with learned (P, max_len) projections,
            ``options["max_len"]`` and ``options.get("proj_dim", 64)``; sequences shorter than
            max_len use the first Lk columns;
            "linear": ``fastattn.linear_attention`` with ``options.get("feature_map", "elu")``.
        options: per-attention settings, see above.
        rotary: a ``RotaryEmbedding`` applied to q and k of self-attention (RoPE), or None.
        alibi: add ALiBi (slopes from ``alibi_slopes(H)``, given to the kernel, never
            materialised) in flash/reference self-attention.

    Projections: one fused ``in_proj`` ((H + 2 Hkv) * head_dim, E) whose rows are
    [q | k | v], the layout of ``torch.nn.MultiheadAttention.in_proj_weight``: self-attention
    does one matmul; cross-attention applies the q rows to ``x`` and the k/v rows to
    ``context``. ``from_torch`` copies a ``torch.nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 causal: bool = False, dropout: float = 0.0, bias: bool = True, attention: str = "flash",
                 options: Optional[dict] = None, rotary: Optional[RotaryEmbedding] = None,
                 alibi: bool = False):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_heads {num_heads} must be a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"MultiHeadAttention: attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention != "flash" and attention != "reference" and alibi:
            raise ValueError(f"MultiHeadAttention: alibi needs exact attention ('flash' or 'reference'), "
                             f"got {attention!r}")
        if attention == "linformer" and causal:
            raise ValueError("MultiHeadAttention: attention='linformer' cannot be causal (Linformer mixes all "
                             "positions into each projected key)")
        if attention == "sparse" and not hasattr(fastattn, "sparse_attention"):
            raise ValueError("MultiHeadAttention: attention='sparse' needs fastattn.sparse_attention, "
                             "which this build of fastattn does not export")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.dropout, self.attention = causal, dropout, attention
        self.options = dict(options or {})
        self.rotary = rotary
        rows = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.in_proj = nn.Linear(embed_dim, rows, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)
        else:
            self.alibi_slopes = None
        if attention == "performer":
            m = int(self.options.get("num_features", 64))
            self.register_buffer("projection", fastattn.performer_projection(m, self.head_dim))
        elif attention == "linformer":
            if "max_len" not in self.options:
                raise ValueError("MultiHeadAttention: attention='linformer' needs options['max_len']")
            p, n = int(self.options.get("proj_dim", 64)), int(self.options["max_len"])
            self.e_proj = nn.Parameter(torch.randn(p, n) / math.sqrt(p))
            self.f_proj = self.e_proj if self.options.get("share_kv", False) else nn.Parameter(
                torch.randn(p, n) / math.sqrt(p))
        elif attention == "sparse" and "layout" not in self.options:
            raise ValueError("MultiHeadAttention: attention='sparse' needs options['layout']")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def redraw_projection(self, generator: Optional[torch.Generator] = None) -> None:
        """Performer: draw new random features (in place)."""
        if self.attention == "performer":
            new = fastattn.performer_projection(self.projection.shape[0], self.head_dim, generator=generator)
            self.projection.copy_(new)

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
    def forward(self, x: Tensor, context: Optional[Tensor] = None, *, key_padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[tuple] = None, cache=None, layer: int = 0,
                offset: Positions = 0, need_weights: bool = False):
        """Attend.

        Args:
            x: (B, Lq, E) queries (and keys/values for self-attention).
            context: (B, Lk, E) keys/values source for cross-attention; None for self-attention.
            key_padding_mask: (B, Lk) bool, True at PADDED keys (torch.nn.MultiheadAttention's
                convention), which are ignored.
            attn_bias: broadcastable to (B, H, Lq, Lk): bool (True = attend) or additive float
                (e.g. ``RelativePositionBias``). Exact attention only.
            kv: precomputed (k, v) from ``project_kv`` (cross-attention during generation).
            cache: a ``fastattn.nn.KVCache``; self-attention appends this call's k/v into slot
                ``layer`` and attends over everything cached (``attention_with_kvcache``).
                Exact attention only; no key_padding_mask or attn_bias.
            offset: position of x's first token for RoPE (an int, or (B,) per sequence);
                with a cache it defaults to the cached length.
            need_weights: also return the attention probabilities (B, H, Lq, Lk). This
                necessarily runs the materialised plain-torch reference path (O(Lq Lk)
                memory, no kernel), for 'flash' and 'reference' only.

        Returns:
            (B, Lq, E), or (out, weights) when need_weights.
        """
        b, lq, _ = x.shape
        if kv is not None:
            q = self._split_heads(F.linear(x, self.in_proj.weight[:self.embed_dim],
                                           None if self.in_proj.bias is None else self.in_proj.bias[:self.embed_dim]),
                                  self.num_heads)
            k, v = kv
        else:
            q, k, v = self.project_qkv(x, context)
        self_attn = context is None and kv is None
        if cache is not None:
            if not self_attn or key_padding_mask is not None or attn_bias is not None or need_weights:
                raise ValueError("MultiHeadAttention: a KV cache works with self-attention only, without "
                                 "key_padding_mask, attn_bias or need_weights")
            if self.attention not in _EXACT:
                raise ValueError(f"MultiHeadAttention: a KV cache needs exact attention, not {self.attention!r}")
            if isinstance(offset, int) and offset == 0:
                offset = cache.max_seqlen(layer)
        if self.rotary is not None and self_attn:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        causal = self.causal and self_attn
        bias = self._bias(attn_bias, key_padding_mask, b, k.shape[2])
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if cache is not None:
            if self.attention == "reference":
                with fastattn.use_backend("torch"):
                    out = cache.attend(layer, q, k, v, causal=causal, alibi_slopes=self.alibi_slopes)
            else:
                out = cache.attend(layer, q, k, v, causal=causal, alibi_slopes=self.alibi_slopes)
        elif need_weights:
            if self.attention not in _EXACT:
                raise ValueError(f"MultiHeadAttention: need_weights needs exact attention, not {self.attention!r}")
            weights = attention_weights(q, k, causal=causal, attn_bias=bias, alibi=self.alibi_slopes)
            probs = F.dropout(weights, dropout_p, training=dropout_p > 0)
            # (B, Hq, Lq, Lk) @ (B, Hq, Lk, D): the kv heads repeated for GQA
            out = probs.to(v.dtype) @ v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        else:
            out = self._attend(q, k, v, causal, bias, key_padding_mask, dropout_p)
        # (B, H, Lq, D) -> (B, Lq, H, D) -> (B, Lq, E)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        return (out, weights) if need_weights else out

    def _bias(self, attn_bias, key_padding_mask, b, lk):
        if key_padding_mask is None:
            return attn_bias
        if key_padding_mask.shape != (b, lk) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"MultiHeadAttention: key_padding_mask must be bool ({b}, {lk}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        keep = ~key_padding_mask[:, None, None, :]  # (B, Lk) -> (B, 1, 1, Lk), True = attend
        if attn_bias is None:
            return keep
        if attn_bias.dtype == torch.bool:
            return attn_bias & keep
        return attn_bias.masked_fill(~keep, float("-inf"))

    def _attend(self, q, k, v, causal, bias, key_padding_mask, dropout_p):
        kind = self.attention
        if kind in _EXACT:
            kwargs = dict(causal=causal, attn_bias=bias, alibi_slopes=self.alibi_slopes, dropout_p=dropout_p)
            if kind == "reference":
                with fastattn.use_backend("torch"):
                    return fastattn.flash_attention(q, k, v, **kwargs)
            cp = _context_parallel()
            if cp is not None:  # this rank holds a shard of the sequence: attend across ranks
                if bias is not None or self.alibi_slopes is not None or dropout_p:
                    raise ValueError("MultiHeadAttention: context-parallel attention takes no mask, bias, "
                                     "ALiBi or dropout")
                return cp(q, k, v, causal=causal)
            return fastattn.flash_attention(q, k, v, **kwargs)
        if kind == "linformer":
            if bias is not None and key_padding_mask is None:
                raise ValueError("MultiHeadAttention: linformer takes a key_padding_mask but no attn_bias")
            lk = k.shape[2]
            if lk > self.e_proj.shape[1]:
                raise ValueError(f"MultiHeadAttention: linformer sequence {lk} > options['max_len'] "
                                 f"{self.e_proj.shape[1]}")
            if key_padding_mask is not None:
                keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)  # (B, Lk) -> (B, 1, Lk, 1)
                k, v = k * keep, v * keep  # padded keys contribute nothing to the projections
            e, f = self.e_proj[:, :lk].to(q.dtype), self.f_proj[:, :lk].to(q.dtype)
            return fastattn.linformer_attention(q, k, v, e, f)
        if bias is not None:
            raise ValueError(f"MultiHeadAttention: attention={kind!r} takes no key_padding_mask or attn_bias")
        if kind == "sparse":
            layout = self.options["layout"]
            if callable(layout):  # a builder: (Lq, Lk) -> layout
                layout = layout(q.shape[2], k.shape[2])
            return fastattn.sparse_attention(q, k, v, layout, causal=causal)
        if kind == "performer":
            return fastattn.performer_attention(q, k, v, self.projection.to(q.dtype), causal=causal)
        return fastattn.linear_attention(q, k, v, causal=causal, feature_map=self.options.get("feature_map", "elu"))

    # --- interop -----------------------------------------------------------------------
    @torch.no_grad()
    def load_torch(self, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (same embed_dim and heads,
        kdim == vdim == embed_dim, no bias_k/bias_v). ``batch_first`` does not matter: this
        module is always batch first. Returns self."""
        if (mha.embed_dim, mha.num_heads) != (self.embed_dim, self.num_heads) or self.num_kv_heads != self.num_heads:
            raise ValueError("MultiHeadAttention.load_torch: embed_dim/num_heads differ or GQA is on")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ValueError("MultiHeadAttention.load_torch: kdim/vdim != embed_dim or add_bias_kv are not supported")
        self.in_proj.weight.copy_(mha.in_proj_weight)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if self.in_proj.bias is not None:
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, attention={self.attention!r}, alibi={self.alibi_slopes is not None}")


def _context_parallel():
    """The active ``fastattn.distributed.context_parallel`` block, if any. Looked up in
    sys.modules so that a model that never uses it never imports torch.distributed."""
    module = sys.modules.get("fastattn.distributed")
    return None if module is None else module.current()

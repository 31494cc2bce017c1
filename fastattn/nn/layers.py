"""Transformer building blocks: norms, feed-forward (dense and mixture-of-experts), encoder and
decoder layers and stacks. Attention is ``fastattn.nn.MultiHeadAttention``; the argument names
follow ``torch.nn.TransformerEncoderLayer`` (batch first always) so weights copy over.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.nn.attention import MultiHeadAttention
from fastattn.nn.kinds import AttentionKind, Flash, check_kind
from fastattn.nn.positional import Positions, RotaryEmbedding

__all__ = ["RMSNorm", "make_norm", "FeedForward", "MoEFeedForward", "MoEConfig", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "aux_loss"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """"layer" -> nn.LayerNorm, "rms" -> RMSNorm."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``linear2(dropout(act(linear1(x))))``; activation "relu",
    "gelu" or "swiglu" (``silu(x W1) * (x W3)``, Shazeer 2020, with a third matrix ``linear3``)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"FeedForward: activation must be 'relu', 'gelu' or 'swiglu', got {activation!r}")
        self.activation = activation
        self.linear1 = nn.Linear(dim, hidden, bias=bias)
        self.linear3 = nn.Linear(dim, hidden, bias=bias) if activation == "swiglu" else None
        self.linear2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        h = F.silu(h) * self.linear3(x) if self.linear3 is not None else _ACTIVATIONS[self.activation](h)
        return self.linear2(self.dropout(h))


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward settings: ``num_experts`` experts, each token routed to
    its ``top_k``; an expert takes at most ``ceil(capacity_factor * tokens * top_k / num_experts)``
    tokens per batch (the rest of its tokens are dropped: that expert adds nothing for them);
    ``aux_weight`` scales the load-balancing loss added by the models."""
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_weight: float = 0.01


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of ``FeedForward`` experts (Shazeer et al. 2017, Switch/GShard style).

    Router: softmax over a linear layer's logits; each token goes to its top_k experts with
    weights renormalised over those k. Capacity per expert as ``MoEConfig``; tokens are served
    in order of choice rank, then position, so first choices are kept before second ones.
    After each forward, ``self.aux_loss`` holds the load-balancing loss
    ``num_experts * sum_e f_e * P_e`` (f_e: fraction of routing slots sent to expert e, P_e: mean
    router probability of e), which is 1 for perfectly balanced routing.
    """

    def __init__(self, dim: int, hidden: int, config: MoEConfig, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if not 1 <= config.top_k <= config.num_experts:
            raise ValueError(f"MoEFeedForward: top_k must be in [1, num_experts], got {config.top_k}")
        self.config = config
        self.router = nn.Linear(dim, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden, activation, dropout, bias)
                                     for _ in range(config.num_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (..., E) -> (N, E)
        n, e, k = tokens.shape[0], self.config.num_experts, self.config.top_k
        probs = torch.softmax(self.router(tokens).float(), dim=-1)  # (N, experts)
        top_p, top_i = probs.topk(k, dim=-1)  # (N, k)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        capacity = max(1, math.ceil(self.config.capacity_factor * n * k / e))
        # (k, N) choice-major order, so every token's first choice queues before any second one
        onehot = F.one_hot(top_i.t().reshape(-1), e)  # (k N, experts)
        rank = (onehot.cumsum(0) - 1) * onehot  # place of each slot in its expert's queue
        kept = (rank.sum(-1) < capacity).view(k, n).t()  # (N, k): slot within capacity
        out = torch.zeros_like(tokens)
        for ex in range(e):
            sel = (top_i == ex) & kept  # (N, k)
            rows, slot = sel.nonzero(as_tuple=True)
            if rows.numel():
                gate = top_p[rows, slot].to(tokens.dtype)[:, None]
                out.index_add_(0, rows, self.experts[ex](tokens[rows]) * gate)
        frac = F.one_hot(top_i, e).sum(1).float().mean(0) / k  # (experts,) share of routing slots
        self.aux_loss = e * (frac * probs.mean(0)).sum()
        return out.view(shape)


def aux_loss(module: nn.Module) -> Tensor:
    """Sum of the weighted load-balancing losses of every MoEFeedForward inside ``module``
    (from their last forward); 0 when there is none."""
    total = torch.zeros(())
    for m in module.modules():
        if isinstance(m, MoEFeedForward):
            total = total.to(m.aux_loss.device) + m.config.aux_weight * m.aux_loss
    return total


def _ffn(d_model, dim_feedforward, activation, dropout, bias, moe):
    if moe is None:
        return FeedForward(d_model, dim_feedforward, activation, dropout, bias)
    return MoEFeedForward(d_model, dim_feedforward, moe, activation, dropout, bias)


def _self_attention(owner, d_model, nhead, num_kv_heads, causal, dropout, bias, attention, rotary, alibi, head_dim):
    """The layer's self-attention; attention-probability dropout only where the kind has it."""
    kind = check_kind(owner, attention)
    return MultiHeadAttention(d_model, nhead, num_kv_heads=num_kv_heads, causal=causal,
                              dropout=dropout if kind.supports.dropout else 0.0, bias=bias, attention=kind,
                              rotary=rotary, alibi=alibi, head_dim=head_dim)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward with residuals, pre-norm (``norm_first=True``) or post-norm.

    Post-norm (torch's default): ``x = norm1(x + drop(sa(x))); x = norm2(x + drop(ff(x)))``.
    Pre-norm: ``x = x + drop(sa(norm1(x))); x = x + drop(ff(norm2(x)))``.

    Attention options go to ``MultiHeadAttention`` (num_kv_heads, head_dim, attention, rotary,
    alibi, causal); ``moe`` (a ``MoEConfig``) swaps the feed-forward for a mixture of experts.
    ``dropout`` applies to the residual branches and the feed-forward, and to the attention
    probabilities where the attention kind has dropout (``kind.supports.dropout``: ``Flash``).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", *, norm_first: bool = False, norm: str = "layer",
                 layer_norm_eps: float = 1e-5, bias: bool = True, moe: Optional[MoEConfig] = None,
                 num_kv_heads: Optional[int] = None, causal: bool = False,
                 attention: Optional[AttentionKind] = None,
                 rotary: Optional[RotaryEmbedding] = None, alibi: bool = False, head_dim: Optional[int] = None):
        super().__init__()
        self.self_attn = _self_attention("TransformerEncoderLayer", d_model, nhead, num_kv_heads, causal, dropout,
                                         bias, attention, rotary, alibi, head_dim)
        self.ff = _ffn(d_model, dim_feedforward, activation, dropout, bias, moe)
        self.norm1 = make_norm(norm, d_model, layer_norm_eps)
        self.norm2 = make_norm(norm, d_model, layer_norm_eps)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
                cache=None, layer: int = 0, offset: Positions = 0, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x (B, L, E); key_padding_mask (B, L) True at padding; attn_bias broadcastable to
        (B, H, L, L); cache/layer/offset/cu_seqlens as ``MultiHeadAttention.forward``."""
        def sa(h):
            return self.dropout1(self.self_attn(h, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                                                cache=cache, layer=layer, offset=offset, cu_seqlens=cu_seqlens))
        if self.norm_first:
            x = x + sa(self.norm1(x))
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + sa(x))
        return self.norm2(x + self.dropout2(self.ff(x)))


class TransformerDecoderLayer(nn.Module):
    """Masked (causal) self-attention + cross-attention over ``memory`` + feed-forward.

    Post-norm: ``x = norm1(x + sa(x)); x = norm2(x + ca(x, memory)); x = norm3(x + ff(x))``;
    pre-norm puts each norm on the branch input. Options as ``TransformerEncoderLayer``; RoPE
    and ALiBi apply to the self-attention only; ``causal`` (default True) masks the
    self-attention.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", *, norm_first: bool = False, norm: str = "layer",
                 layer_norm_eps: float = 1e-5, bias: bool = True, moe: Optional[MoEConfig] = None,
                 num_kv_heads: Optional[int] = None, causal: bool = True,
                 attention: Optional[AttentionKind] = None,
                 rotary: Optional[RotaryEmbedding] = None, alibi: bool = False, head_dim: Optional[int] = None):
        super().__init__()
        self.self_attn = _self_attention("TransformerDecoderLayer", d_model, nhead, num_kv_heads, causal, dropout,
                                         bias, attention, rotary, alibi, head_dim)
        # cross-attention is exact (Flash): the approximate attentions are for long self-attention
        self.cross_attn = MultiHeadAttention(d_model, nhead, num_kv_heads=num_kv_heads, dropout=dropout, bias=bias,
                                             attention=Flash())
        self.ff = _ffn(d_model, dim_feedforward, activation, dropout, bias, moe)
        self.norm1, self.norm2, self.norm3 = (make_norm(norm, d_model, layer_norm_eps) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.norm_first = norm_first

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, *, key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
                memory_kv: Optional[tuple] = None, cache=None, layer: int = 0, offset: Positions = 0) -> Tensor:
        """x (B, Lt, E); memory (B, Ls, E) (or ``memory_kv`` from ``cross_attn.project_kv``);
        key_padding_mask (B, Lt) and memory_key_padding_mask (B, Ls), True at padding."""
        def sa(h):
            return self.dropout1(self.self_attn(h, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                                                cache=cache, layer=layer, offset=offset))

        def ca(h):
            return self.dropout2(self.cross_attn(h, memory, kv=memory_kv, key_padding_mask=memory_key_padding_mask))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + self.dropout3(self.ff(self.norm3(x)))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + self.dropout3(self.ff(x)))


class TransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer`` and an optional final ``norm`` (as
    torch.nn.TransformerEncoder), or, when ``encoder_layer`` is a list of ``num_layers``
    layers, those layers as given (layers that differ: Gemma's sliding and global ones).
    forward(x, key_padding_mask=None, attn_bias=None, cache=None, offset=0, cu_seqlens=None):
    layer i uses cache slot i.

    Raises:
        ValueError: a list whose length is not ``num_layers``."""

    def __init__(self, encoder_layer, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        if isinstance(encoder_layer, (list, tuple)):
            if len(encoder_layer) != num_layers:
                raise ValueError(f"TransformerEncoder: {len(encoder_layer)} layers given for num_layers={num_layers}")
            self.layers = nn.ModuleList(encoder_layer)
        else:
            self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, x: Tensor, *, key_padding_mask=None, attn_bias=None, cache=None, offset: Positions = 0,
                cu_seqlens: Optional[Tensor] = None):
        for i, layer in enumerate(self.layers):
            x = layer(x, key_padding_mask=key_padding_mask, attn_bias=attn_bias, cache=cache, layer=i, offset=offset,
                      cu_seqlens=cu_seqlens)
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(nn.Module):
    """``num_layers`` deep copies of ``decoder_layer`` and an optional final ``norm`` (as
    torch.nn.TransformerDecoder). ``memory_kv`` (a list, one (k, v) per layer, from
    ``project_memory``) replaces ``memory`` during generation."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.norm = norm

    def project_memory(self, memory: Tensor) -> list:
        """Cross-attention keys/values of ``memory`` for every layer, computed once."""
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, *, key_padding_mask=None,
                memory_key_padding_mask=None, attn_bias=None, memory_kv: Optional[list] = None, cache=None,
                offset: Positions = 0):
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, key_padding_mask=key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                      attn_bias=attn_bias, memory_kv=None if memory_kv is None else memory_kv[i], cache=cache,
                      layer=i, offset=offset)
        return x if self.norm is None else self.norm(x)

"""Pieces every model preset shares: the stack configuration, positional encodings by name, the
layer factory and the initialisation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from fastattn.nn.attention import MultiHeadAttention
from fastattn.nn.kinds import AttentionKind, Flash, check_kind
from fastattn.nn.layers import (FeedForward, MoEConfig, TransformerDecoderLayer, TransformerEncoderLayer, make_norm)
from fastattn.nn.positional import (LearnedPositionalEmbedding, Positions, RelativePositionBias, RotaryEmbedding,
                                    SinusoidalPositionalEmbedding)

POSITIONALS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")


@dataclass
class StackConfig:
    """Settings shared by every preset.

    d_model, n_layers, n_heads, n_kv_heads (GQA; None = n_heads), d_ff (None = 4 d_model),
    dropout; positional: "learned" | "sinusoidal" (added to the embeddings), "rope"
    (``rope_base``, ``rope_scaling``; ``rope_dim`` channels of each head rotated, the rest
    passed through: partial rotary as in GPT-NeoX, None = all), "alibi" (kernel slopes), "t5" (relative bias) or "none";
    norm "layer" | "rms", norm_first (pre-norm), activation "relu" | "gelu" | "swiglu";
    attention: a kind for every self-attention layer (``fastattn.nn.Flash()``,
    ``Sparse(layout)``, ``Performer(num_features)``, ``Linformer(max_len, proj_dim)``,
    ``Linear(feature_map)``, ``ContextParallelAttention(cp)``; each layer binds its own copy;
    default Flash()); cross-attention is always Flash.
    ``moe`` for a mixture-of-experts feed-forward; max_seq_len bounds learned positions and
    generation. Raises ValueError for unknown names or an attention that is not a kind (at construction).
    """
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    dropout: float = 0.0
    positional: str = "learned"
    norm: str = "layer"
    norm_first: bool = True
    activation: str = "gelu"
    attention: AttentionKind = field(default_factory=Flash)
    moe: Optional[MoEConfig] = None
    bias: bool = True
    max_seq_len: int = 512
    rope_base: float = 10000.0
    rope_scaling: float = 1.0
    rope_dim: Optional[int] = None
    init_std: float = 0.02

    def __post_init__(self):
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}, got {self.positional!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        smallest = min(self.layer_head_dim(i) for i in range(self.n_layers))
        if self.rope_dim is not None and not (0 < self.rope_dim <= smallest and self.rope_dim % 2 == 0):
            raise ValueError(f"rope_dim must be even and in (0, head_dim={smallest}], got {self.rope_dim}")
        check_kind(type(self).__name__, self.attention)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_head_dim(self, i: int) -> int:
        """Head dim of layer i (every layer's is ``head_dim`` unless a preset says otherwise)."""
        return self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


class Positional(nn.Module):
    """The positional encoding a config names: ``add(x, offset)`` adds absolute positions,
    ``layer_kwargs`` gives RoPE/ALiBi to the attention layers, ``bias(lq, lk)`` the T5 bias."""

    def __init__(self, cfg: StackConfig, *, bidirectional: bool):
        super().__init__()
        self.kind = cfg.positional
        self.absolute = None
        self.relative = None
        if self.kind == "learned":
            self.absolute = LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model)
        elif self.kind == "sinusoidal":
            self.absolute = SinusoidalPositionalEmbedding(cfg.d_model)
        elif self.kind == "t5":
            self.relative = RelativePositionBias(cfg.n_heads, bidirectional=bidirectional)
        self.rope_dim, self.rope_base, self.rope_scaling = cfg.rope_dim, cfg.rope_base, cfg.rope_scaling
        self.head_dim = cfg.head_dim

    def add(self, x: Tensor, offset: Positions = 0) -> Tensor:
        """x (B, L, E) + absolute positions offset .. offset + L - 1."""
        if self.absolute is None:
            return x
        return x + self.absolute(x.shape[1], offset).to(x.dtype)

    def layer_kwargs(self, head_dim: Optional[int] = None, rope_base: Optional[float] = None) -> dict:
        """RoPE (over ``rope_dim`` or the layer's ``head_dim`` channels, at ``rope_base`` or the
        config's) and ALiBi for one attention layer."""
        rotary = None
        if self.kind == "rope":
            rotary = RotaryEmbedding(self.rope_dim or head_dim or self.head_dim,
                                     self.rope_base if rope_base is None else rope_base, self.rope_scaling)
        return dict(rotary=rotary, alibi=self.kind == "alibi")

    def bias(self, lq: int, lk: int, dtype) -> Optional[Tensor]:
        """(1, H, Lq, Lk) T5 bias (queries are the last Lq of Lk positions), or None."""
        return None if self.relative is None else self.relative(lq, lk).to(dtype)


def encoder_layer(cfg: StackConfig, pos: Positional, *, causal: bool, head_dim: Optional[int] = None,
                  attention: Optional[AttentionKind] = None, rope_base: Optional[float] = None
                  ) -> TransformerEncoderLayer:
    """One self-attention block of ``cfg``; ``head_dim``, ``attention`` and ``rope_base`` (None:
    the config's) set one layer apart (Gemma's sliding and global layers)."""
    return TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff or 4 * cfg.d_model, cfg.dropout, cfg.activation,
        norm_first=cfg.norm_first, norm=cfg.norm, bias=cfg.bias, moe=cfg.moe, num_kv_heads=cfg.n_kv_heads,
        causal=causal, attention=cfg.attention if attention is None else attention, head_dim=head_dim,
        **pos.layer_kwargs(head_dim, rope_base))


def decoder_layer(cfg: StackConfig, pos: Positional) -> TransformerDecoderLayer:
    return TransformerDecoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff or 4 * cfg.d_model, cfg.dropout, cfg.activation,
        norm_first=cfg.norm_first, norm=cfg.norm, bias=cfg.bias, moe=cfg.moe, num_kv_heads=cfg.n_kv_heads,
        causal=True, attention=cfg.attention, **pos.layer_kwargs())


def final_norm(cfg: StackConfig) -> Optional[nn.Module]:
    """Pre-norm stacks end with a norm; post-norm ones are already normalised."""
    return make_norm(cfg.norm, cfg.d_model) if cfg.norm_first else None


def init_weights(model: nn.Module, cfg: StackConfig) -> None:
    """GPT-2 style: linear and embedding weights N(0, init_std), biases 0, norms 1; the
    projections that write into the residual stream (attention out_proj, feed-forward linear2)
    scaled by 1/sqrt(2 n_layers) so the residual's variance does not grow with depth."""
    std = cfg.init_std
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    residual_std = std / math.sqrt(2 * max(cfg.n_layers, 1))
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            nn.init.normal_(m.out_proj.weight, std=residual_std)
        elif isinstance(m, FeedForward):
            nn.init.normal_(m.linear2.weight, std=residual_std)


def can_cache(stack: nn.Module, cfg: StackConfig) -> bool:
    """Whether the decoding ``stack`` can use a KV cache: every attention kind in it supports
    one (``kind.supports.kv_cache``), and there is no T5 bias (the cache kernels take no
    additive bias)."""
    if cfg.positional == "t5":
        return False
    return all(m.kind.supports.kv_cache for m in stack.modules() if isinstance(m, MultiHeadAttention))


def padding_mask(mask: Tensor, model: nn.Module) -> Optional[Tensor]:
    """``mask`` (B, L) bool, True at padding, as the encoder self-attention of ``model`` gets
    it, or None when it is not needed.

    Eager: None when nothing is padded (one host read; the kernels then skip the mask).
    Under ``torch.compile`` there is no host read: the mask is always passed when the
    attention takes one; an attention without key_padding_mask gets None and an on-device
    assert that fails (RuntimeError) if any token is padding, instead of silently attending to
    it.
    """
    takes_mask = all(m.kind.supports.key_padding_mask for m in model.modules() if isinstance(m, MultiHeadAttention))
    if torch.compiler.is_compiling():
        if takes_mask:
            return mask
        torch._assert_async(~mask.any(), "padding tokens, but the attention takes no key_padding_mask")
        return None
    return mask if bool(mask.any()) else None


__all__ = ["StackConfig", "Positional", "POSITIONALS"]

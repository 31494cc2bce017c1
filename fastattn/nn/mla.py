"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values compressed into one
low-rank latent per token, decoded with the up-projections absorbed into the query and output.

Per token, with latent rank r (``kv_lora_rank``, 512 in the real models), rotary dims dr
(``qk_rope_head_dim``, 64), per-head non-rotary dims dn (``qk_nope_head_dim``) and value dims dv:

    c     = RMSNorm(x W_DKV)                 (r,)     the latent, shared by every head
    k_r   = RoPE(x W_KR)                     (dr,)    the rotary key, shared by every head
    k_h   = [c W_UK[h] | k_r]                (dn + dr,)
    v_h   = c W_UV[h]                        (dv,)
    q_h   = [q_nope_h | RoPE(q_rope_h)]      (dn + dr,) from x (or through a low-rank q)
    out   = concat_h softmax(q_h . k_h * scale) v_h  then W_O, scale = 1 / sqrt(dn + dr)

Training and uncached prefill decompress K and V (``flash_attention`` with head dims dn + dr
and dv). Decoding absorbs W_UK into the query, ``q_h . k_h = [q_nope_h W_UK[h]^T | q_rope_h] .
[c | k_r]``, so every head attends over the same cached (r + dr)-wide key with one KV head,
and the value is the latent c itself: the first r channels of that key. ``LatentCache`` holds
only [c | k_r] per token, writes each new token into it, then hands ``attention_with_kvcache`` the
key and a strided view of its first r channels as the value; the latent output goes through W_UV[h], then W_O.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastattn.functional import attention_with_kvcache, flash_attention
from fastattn.nn.layers import RMSNorm
from fastattn.nn.positional import Positions, RotaryEmbedding

__all__ = ["LatentCache", "MultiHeadLatentAttention"]


def _check_positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


class LatentCache:
    """MLA's decode cache: per layer one (batch, 1, max_length, latent_dim + rope_dim) buffer
    holding [latent | rotary key] per token, nothing else (no per-head keys, no values).

    Args:
        num_layers, batch_size: slots and sequences.
        latent_dim, rope_dim: r and dr of ``MultiHeadLatentAttention``.
        max_length: tokens a sequence may hold (the buffers are allocated up front).
        dtype, device: of the storage.

    ``bytes_per_token()`` is ``(latent_dim + rope_dim) * dtype size`` per layer.
    ``seqlens(layer)`` is an int32 (batch,) tensor of the tokens each sequence holds.

    Raises:
        ValueError: sizes that are not ints >= 1, a bad layer, or an append past max_length.
    """

    def __init__(self, num_layers: int, batch_size: int, latent_dim: int, rope_dim: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None):
        _check_positive("LatentCache", num_layers=num_layers, batch_size=batch_size, latent_dim=latent_dim,
                        rope_dim=rope_dim, max_length=max_length)
        self.num_layers, self.batch_size, self.max_length = num_layers, batch_size, max_length
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.dtype, self.device = dtype, torch.device("cpu" if device is None else device)
        self._kv = [torch.zeros(batch_size, 1, max_length, latent_dim + rope_dim, dtype=dtype, device=self.device)
                    for _ in range(num_layers)]
        self._len = [torch.zeros(batch_size, dtype=torch.int32, device=self.device) for _ in range(num_layers)]
        self._max = [0] * num_layers  # host-side longest sequence per layer: overflow checks without a sync

    def _layer(self, layer) -> int:
        if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < self.num_layers):
            raise ValueError(f"LatentCache: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def keys(self, layer: int) -> Tensor:
        """(batch, 1, max_length, latent_dim + rope_dim): [latent | rotary key] of ``layer``."""
        return self._kv[self._layer(layer)]

    def values(self, layer: int) -> Tensor:
        """(batch, 1, max_length, latent_dim): the latent, a view of ``keys(layer)``'s first channels."""
        return self.keys(layer)[..., :self.latent_dim]

    def seqlens(self, layer: int = 0) -> Tensor:
        return self._len[self._layer(layer)]

    def max_seqlen(self, layer: int = 0) -> int:
        return self._max[self._layer(layer)]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer: (latent_dim + rope_dim) * dtype size."""
        return (self.latent_dim + self.rope_dim) * self._kv[0].element_size()

    def attend(self, layer: int, q: Tensor, new: Tensor, *, scale: float) -> Tensor:
        """Append ``new`` (batch, 1, Lnew, latent_dim + rope_dim) to ``layer`` at each sequence's
        length, then attend causally (bottom-right) with the absorbed queries ``q``
        (batch, H, Lq, latent_dim + rope_dim) -> (batch, H, Lq, latent_dim), the value being
        the latent channels of the same buffer, read in place."""
        kv = self.keys(layer)
        lnew = new.shape[2]
        if self._max[layer] + lnew > self.max_length:
            raise ValueError(f"LatentCache: layer {layer} would hold {self._max[layer] + lnew} tokens, more than "
                             f"max_length={self.max_length}")
        # the append writes each new [latent | rotary key] once, at each sequence's length; its
        # first latent_dim channels are the new value (v_new=None: the value cache is a view of kv)
        out = attention_with_kvcache(q, kv, kv[..., :self.latent_dim], self._len[layer], k_new=new.to(self.dtype),
                                     causal=True, scale=scale)
        self._len[layer] += lnew
        self._max[layer] += lnew
        return out

    def __repr__(self) -> str:
        return (f"LatentCache(layers={self.num_layers}, batch={self.batch_size}, latent_dim={self.latent_dim}, "
                f"rope_dim={self.rope_dim}, max_length={self.max_length}, dtype={self.dtype}, device={self.device})")


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2/V3), batch first; see the module docstring.

    Args:
        embed_dim: model width E.
        num_heads: query heads H (they all share one latent KV head).
        kv_lora_rank: r, the latent's width (DeepSeek: 512).
        qk_rope_head_dim: dr, the rotary key's width, shared by every head (DeepSeek: 64).
        qk_nope_head_dim: dn, each head's non-rotary q/k channels (DeepSeek: 128).
        v_head_dim: dv, each head's value channels (DeepSeek: 128).
        q_lora_rank: a low-rank query (E -> q_lora_rank -> RMSNorm -> heads), or None for one
            projection.
        rope_base: RoPE base of the rotary channels.

    Projections have no biases (DeepSeek's have none; a key bias would not change the softmax).

    Raises:
        ValueError: sizes that are not ints >= 1, or an odd qk_rope_head_dim.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kv_lora_rank: int = 512, qk_rope_head_dim: int = 64,
                 qk_nope_head_dim: int = 128, v_head_dim: int = 128, q_lora_rank: Optional[int] = None,
                 rope_base: float = 10000.0):
        super().__init__()
        _check_positive("MultiHeadLatentAttention", embed_dim=embed_dim, num_heads=num_heads,
                        kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                        qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim)
        if q_lora_rank is not None:
            _check_positive("MultiHeadLatentAttention", q_lora_rank=q_lora_rank)
        if qk_rope_head_dim % 2:
            raise ValueError(f"MultiHeadLatentAttention: qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, qk_rope_head_dim
        self.nope_dim, self.v_head_dim = qk_nope_head_dim, v_head_dim
        self.scale = 1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim)
        q_out = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(embed_dim, q_out, bias=False)
        else:
            self.q_proj = nn.Sequential(nn.Linear(embed_dim, q_lora_rank, bias=False), RMSNorm(q_lora_rank),
                                        nn.Linear(q_lora_rank, q_out, bias=False))
        self.kv_a_proj = nn.Linear(embed_dim, kv_lora_rank + qk_rope_head_dim, bias=False)  # [W_DKV | W_KR]
        self.kv_a_norm = RMSNorm(kv_lora_rank)
        # rows of head h: W_UK[h] (dn rows) then W_UV[h] (dv rows), each (., r)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out_proj = nn.Linear(num_heads * v_head_dim, embed_dim, bias=False)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_base)

    def new_cache(self, num_layers: int, batch_size: int, max_length: int) -> LatentCache:
        """A ``LatentCache`` sized for this module, in its parameters' dtype and device."""
        w = self.kv_a_proj.weight
        return LatentCache(num_layers, batch_size, self.kv_lora_rank, self.rope_dim, max_length, dtype=w.dtype,
                           device=w.device)

    def _up_weights(self):
        """W_UK (H, dn, r) and W_UV (H, dv, r), views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def forward(self, x: Tensor, *, cache: Optional[LatentCache] = None, layer: int = 0,
                offset: Positions = 0) -> Tensor:
        """Causal self-attention of x (B, L, E) -> (B, L, E).

        Without a cache: K and V decompressed per head, one ``flash_attention`` (head dims
        dn + dr and dv; differentiable). With a ``LatentCache``: the absorbed path, appending
        this call's [latent | rotary key] to slot ``layer`` and attending over what it holds
        (``attention_with_kvcache`` with q/k head dim r + dr and v the cache's first r
        channels); a prompt and then one token per call. ``offset``: RoPE position of x's
        first token (an int or (B,)); with a cache it defaults to each sequence's length.

        Raises:
            ValueError: x not a floating (B, L, embed_dim) tensor.
        """
        if not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[-1] == self.embed_dim and x.is_floating_point()):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"MultiHeadLatentAttention: x must be a floating (batch, seq, embed_dim="
                             f"{self.embed_dim}) tensor, got {got}")
        b, l, _ = x.shape
        h, dn, dr, r = self.num_heads, self.nope_dim, self.rope_dim, self.kv_lora_rank
        if cache is not None and isinstance(offset, int) and offset == 0:
            offset = cache.seqlens(layer)  # (B,): each sequence continues at its own length
        q = self.q_proj(x).view(b, l, h, dn + dr).transpose(1, 2)  # (B, H, L, dn + dr)
        q_nope, q_rope = q[..., :dn], self.rotary(q[..., dn:], offset)
        kv = self.kv_a_proj(x)  # (B, L, r + dr)
        latent = self.kv_a_norm(kv[..., :r])[:, None]  # (B, 1, L, r)
        k_rope = self.rotary(kv[..., r:][:, None], offset)  # (B, 1, L, dr)
        w_uk, w_uv = self._up_weights()
        if cache is None:
            # decompressed: k_nope, v (B, H, L, dn / dv); the rotary key broadcast to every head
            k_nope = torch.einsum("bxlr,hdr->bhld", latent, w_uk)
            v = torch.einsum("bxlr,hdr->bhld", latent, w_uv)
            k = torch.cat([k_nope, k_rope.expand(b, h, l, dr)], dim=-1)
            out = flash_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, causal=True, scale=self.scale)
        else:
            # absorbed: q_nope_h . (c W_UK[h]^T) = (q_nope_h W_UK[h]) . c, so each head's query
            # becomes [q_nope_h W_UK[h] | q_rope_h] (r + dr) against the shared [c | k_r]
            q_abs = torch.cat([torch.einsum("bhld,hdr->bhlr", q_nope, w_uk), q_rope], dim=-1)
            out_latent = cache.attend(layer, q_abs, torch.cat([latent, k_rope], dim=-1), scale=self.scale)
            out = torch.einsum("bhlr,hvr->bhlv", out_latent, w_uv)  # (B, H, L, r) -> (B, H, L, dv)
        # (B, H, L, dv) -> (B, L, H dv) -> (B, L, E)
        return self.out_proj(out.transpose(1, 2).reshape(b, l, h * self.v_head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_rope_head_dim={self.rope_dim}, qk_nope_head_dim={self.nope_dim}, v_head_dim={self.v_head_dim}")

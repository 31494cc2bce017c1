"""Positional information for fastattn.nn: absolute embeddings added to the tokens, rotary
embeddings applied to q and k, ALiBi slopes handed to the kernels, and T5's bucketed relative
position bias (an additive ``attn_bias``).

Plain torch only; nothing here calls a kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalPositionalEmbedding", "LearnedPositionalEmbedding", "RotaryEmbedding",
           "alibi_slopes", "RelativePositionBias", "positions_like"]

Positions = Union[int, Tensor]


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) positions of packed documents: each restarts at 0 where its document
    begins (document b is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``). No host sync."""
    token = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)  # the document of each token
    return (token - cu_seqlens.long()[doc])[None]


def positions_like(length: int, offset: Positions = 0, device=None) -> Tensor:
    """Absolute positions of ``length`` tokens starting at ``offset``.

    ``offset`` is an int (all sequences) -> (length,) int64, a (B,) tensor (ragged
    sequences) -> (B, length), or a (B, length) tensor: the positions themselves (packed
    documents, see ``packed_positions``).
    """
    ar = torch.arange(length, device=device)
    if isinstance(offset, Tensor) and offset.dim() == 2:
        return offset.to(device=ar.device, dtype=torch.long)
    if isinstance(offset, Tensor):
        # (B,) -> (B, 1) + (length,) -> (B, length)
        return offset.to(device=ar.device, dtype=torch.long)[:, None] + ar
    return ar + int(offset)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos embedding of Vaswani et al. (2017): ``pe[p, 2i] = sin(p / 10000^(2i/d))``,
    ``pe[p, 2i+1] = cos(...)``. forward(length, offset=0) -> (length, dim) (or (B, length, dim)
    for a tensor offset), to be added to the token embeddings. No parameters; any length."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalPositionalEmbedding: dim must be even, got {dim}")
        self.dim = dim
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, length: int, offset: Positions = 0) -> Tensor:
        pos = positions_like(length, offset, self.inv_freq.device).float()
        angles = pos[..., None] * self.inv_freq  # (..., length, dim/2)
        # interleave sin (even channels) and cos (odd channels): (..., length, dim/2, 2) -> (..., length, dim)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class LearnedPositionalEmbedding(nn.Module):
    """A learned (max_len, dim) table; forward(length, offset=0) -> (length, dim)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, length: int, offset: Positions = 0) -> Tensor:
        """Rows ``offset .. offset + length - 1``: (length, dim), or (B, length, dim) for a (B,)
        tensor ``offset``.

        Raises ValueError for a position >= max_len (or < 0). The check of an int offset is
        host arithmetic; a tensor offset is checked by reading it (eager) or, under
        ``torch.compile``, by an on-device assert (RuntimeError), so a compiled graph never
        syncs with the device."""
        if not isinstance(offset, Tensor):
            lo, hi = offset, offset + length - 1  # ints (SymInts under torch.compile): no device read
            if length > 0 and (lo < 0 or hi >= self.max_len):
                raise ValueError(f"LearnedPositionalEmbedding: positions {lo}..{hi} outside [0, max_len={self.max_len})")
            return self.weight[lo:lo + length]
        pos = positions_like(length, offset, self.weight.device)  # (B, length)
        if torch.compiler.is_compiling():
            torch._assert_async(((pos >= 0) & (pos < self.max_len)).all(),
                                "LearnedPositionalEmbedding: position outside [0, max_len)")
        elif pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.max_len):
            raise ValueError(f"LearnedPositionalEmbedding: position {int(pos.max())} >= max_len={self.max_len} "
                             f"(or {int(pos.min())} < 0)")
        return self.weight[pos]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" (GPT-NeoX) layout.

    Channel pairs (i, i + d/2) of q and k at position p are rotated by the angle
    ``p / scaling * base^(-2i/d)``, so ``rope(q, m) . rope(k, n)`` depends on m - n only.
    ``scaling`` > 1 is linear position interpolation (positions divided by it) to stretch a
    model to longer contexts. ``dim`` (<= head_dim, even) channels are rotated, the rest pass
    through (partial rotary). No parameters.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: float = 1.0):
        super().__init__()
        if dim % 2 or dim <= 0:
            raise ValueError(f"RotaryEmbedding: dim must be even and positive, got {dim}")
        if not scaling > 0:
            raise ValueError(f"RotaryEmbedding: scaling must be > 0, got {scaling}")
        self.dim, self.base, self.scaling = dim, base, scaling
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, length: int, offset: Positions = 0, dtype=torch.float32):
        """cos and sin of the angles, (L, dim) or (B, L, dim), computed in ``dtype`` (float32 at
        least) so float64 inputs get float64 angles."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        device = self.inv_freq.device
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=work, device=device) / self.dim)
        pos = positions_like(length, offset, device).to(work) / self.scaling
        angles = pos[..., None] * inv_freq  # (..., L, dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (..., L, dim): same angle for i and i + dim/2
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: Tensor, offset: Positions = 0) -> Tensor:
        """x (B, H, L, D) -> x rotated by its positions ``offset .. offset + L - 1``."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(x.shape[-2], offset, work)
        if cos.dim() == 3:  # ragged offsets: (B, L, dim) -> (B, 1, L, dim) to broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        rot, rest = x[..., :self.dim].to(work), x[..., self.dim:]
        half = self.dim // 2
        # rotate_half(x) = (-x2, x1) for x = (x1, x2): the 2-D rotation of each channel pair
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = (rot * cos + rotated * sin).to(x.dtype)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def alibi_slopes(num_heads: int, dtype=torch.float32, device=None) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): for n a power of two, ``2^(-8 h / n)``, h = 1..n;
    otherwise the slopes of the next lower power of two followed by every other slope of the
    next higher one. (num_heads,) tensor; pass it as ``alibi_slopes`` to the kernels, which add
    ``-slope * |i + Lk - Lq - j|`` without materialising a bias."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(low)
    if low != num_heads:
        slopes += power_of_two(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=dtype, device=device)


class RelativePositionBias(nn.Module):
    """T5's relative position bias: a learned scalar per (bucket, head), the bucket of
    ``j - i`` (key minus query position) taken log-spaced beyond ``num_buckets // 2`` exact
    distances (half of each for the two directions when ``bidirectional``), saturating at
    ``max_distance``. forward(lq, lk, offset) -> (1, H, Lq, Lk) additive bias; query i sits at
    position ``offset + i`` (default ``Lk - Lq``, bottom-right as the causal mask) and key j at j.
    Share one module across layers as T5 does.
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        super().__init__()
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @staticmethod
    def bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
        """Integer bucket of each relative position ``j - i``."""
        out = torch.zeros_like(relative)
        if bidirectional:
            num_buckets //= 2
            out = out + (relative > 0).long() * num_buckets  # keys after the query: upper half
            n = relative.abs()
        else:
            n = (-relative).clamp(min=0)  # only the past is seen; future keys share bucket 0
        exact = num_buckets // 2
        is_small = n < exact
        # log-spaced buckets between exact and max_distance
        large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact)).long()
        large = large.clamp(max=num_buckets - 1)
        return out + torch.where(is_small, n, large)

    def forward(self, lq: int, lk: int, offset: Optional[int] = None) -> Tensor:
        offset = lk - lq if offset is None else offset
        qpos = torch.arange(lq, device=self.embedding.weight.device)[:, None] + offset  # (Lq, 1)
        kpos = torch.arange(lk, device=self.embedding.weight.device)[None, :]  # (1, Lk)
        buckets = self.bucket(kpos - qpos, self.bidirectional, self.num_buckets, self.max_distance)
        # (Lq, Lk, H) -> (H, Lq, Lk) -> (1, H, Lq, Lk)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)

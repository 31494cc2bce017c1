"""The nn-level switch: make a model's attention calls run context-parallel.

    cp = fastattn.distributed.context_parallel(group, method="ring")   # or "ulysses"
    out = cp(q, k, v, causal=True)          # flash_attention's keywords except attn_bias

    # a model's layers attend across ranks when cp is their attention kind:
    mha = fastattn.nn.MultiHeadAttention(E, H, causal=True,
                                         attention=fastattn.nn.ContextParallelAttention(cp))
    mha(cp.shard(x, dim=1))                 # this rank's shard of the output
    # packed documents (x (1, total, E), the whole batch's cu_seqlens), contiguous shares:
    mha(cp.shard_packed(x, dim=1), cu_seqlens=cu_seqlens,
        offset=cp.shard_packed(fastattn.nn.positional.packed_positions(cu_seqlens, total), dim=1))

    with cp:                                # makes it fastattn.distributed.current() for code
        ...                                 # that asks for it (fastattn.nn does not)

A model running under it holds, on every rank, the shard ``cp.shard(x)`` of the sequence,
and uses ``cp.positions(seq_len)`` for position embeddings (RoPE, learned) of its tokens.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from fastattn.distributed import sharding
from fastattn.distributed.ring import process_group, ring_attention
from fastattn.distributed.ulysses import ulysses_attention
from fastattn.distributed.varlen import varlen_attention

METHODS = ("ring", "ulysses")
OPTIONS = ("scale", "window", "alibi_slopes", "softcap", "dropout_p", "sinks", "return_lse")
_active: list["ContextParallel"] = []


class ContextParallel:
    """Context-parallel attention over ``group`` with one sequence layout.

    Calling it runs ``ring_attention`` or ``ulysses_attention`` on this rank's shards with
    the flash_attention keywords ``causal``, ``scale``, ``window``, ``alibi_slopes``,
    ``softcap``, ``dropout_p``, ``sinks`` and ``return_lse`` (anything else raises ValueError).
    Used as a context manager it becomes ``fastattn.distributed.current()`` inside the block;
    ``fastattn.nn`` layers use it only as their kind (``fastattn.nn.ContextParallelAttention(cp)``).
    """

    def __init__(self, group=None, *, method: str = "ring", zigzag: Optional[bool] = None):
        if method not in METHODS:
            raise ValueError(f"context_parallel: method must be one of {METHODS}, got {method!r}")
        self.group = process_group("context_parallel", group)
        self.method = method
        # Zig-zag balances causal ring attention; Ulysses gathers the whole sequence anyway.
        self.zigzag = (method == "ring") if zigzag is None else bool(zigzag)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, **options):
        unsupported = sorted(set(options) - set(OPTIONS))
        if unsupported:
            raise ValueError(f"context-parallel attention takes the keywords causal, {', '.join(OPTIONS)}; "
                             f"got {unsupported}")
        attend = ring_attention if self.method == "ring" else ulysses_attention
        return attend(q, k, v, self.group, causal=causal, zigzag=self.zigzag, **options)

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = False, **options):
        """Packed documents: ``varlen_attention`` over this group (every method), on this rank's
        contiguous share of the packed tokens, q (T_local, Hq, D), k/v (T_local, Hkv, D), with
        the whole batch's ``cu_seqlens`` and the same keywords as calling it."""
        unsupported = sorted(set(options) - set(OPTIONS))
        if unsupported:
            raise ValueError(f"context-parallel attention takes the keywords causal, {', '.join(OPTIONS)}; "
                             f"got {unsupported}")
        return varlen_attention(q, k, v, cu_seqlens, self.group, causal=causal, **options)

    def shard_packed(self, x: Tensor, dim: int = 0) -> Tensor:
        """This rank's contiguous share of a packed token stream ``x`` (along ``dim``), as
        ``varlen`` takes it: ``sharding.packed_bounds``."""
        start, end = sharding.packed_bounds(x.shape[dim], self.rank, self.world_size)
        return x.narrow(dim, start, end - start)

    def shard(self, x: Tensor, dim: int = 2) -> Tensor:
        """This rank's shard of the full sequence ``x`` (along ``dim``) in this layout."""
        return sharding.shard_sequence(x, self.rank, self.world_size, zigzag=self.zigzag, dim=dim)

    def gather(self, x: Tensor, dim: int = 2) -> Tensor:
        """The full sequence from every rank's shard (collective, not differentiable)."""
        return sharding.gather_sequence(x, self.group, zigzag=self.zigzag, dim=dim)

    def positions(self, seq_len: int, device=None) -> Tensor:
        """Global positions of this rank's tokens, for position embeddings."""
        return sharding.shard_positions(seq_len, self.rank, self.world_size, zigzag=self.zigzag,
                                        device=device)

    def __enter__(self) -> "ContextParallel":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def __repr__(self) -> str:
        return f"ContextParallel(method={self.method!r}, zigzag={self.zigzag})"


def context_parallel(group=None, *, method: str = "ring", zigzag: Optional[bool] = None) -> ContextParallel:
    """A callable with ``flash_attention``'s signature (less ``attn_bias``) that
    runs context-parallel over ``group`` (default: the world; a ProcessGroup or a 1-D
    DeviceMesh); also a context manager that
    makes it ``current()``. See ``ContextParallel``."""
    return ContextParallel(group, method=method, zigzag=zigzag)


def current() -> Optional[ContextParallel]:
    """The innermost active ``context_parallel`` (inside its ``with`` block), or None."""
    return _active[-1] if _active else None

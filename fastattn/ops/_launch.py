"""Launch plumbing every op shares: output buffers, dot precision and the interpreter's
flags, the softmax-attention tiles, and the host side of the logit terms (band, ALiBi,
softcap). The kernels' side of the flags is described in ``fastattn/ops/_triton.py``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from fastattn.backend import gpu_tiles, interpreting


def empty(*shape, like: Tensor, dtype=None) -> Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison them all with NaN
    (call it as ``_launch.empty``, so that a patch of this name reaches every op)."""
    return torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)


def pad(dim: int) -> int:
    """A tile's width for ``dim`` elements: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(dim))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. fp32 inputs follow torch's own matmul setting, so results
    match torch's on the same GPU."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def dtype_flags(dtype: torch.dtype) -> dict:
    """The kernels' DOT_FP32, BF16_RTNE and PRECISION for inputs of ``dtype``."""
    bf16_interpreted = interpreting() and dtype == torch.bfloat16
    return dict(
        DOT_FP32=bf16_interpreted,  # the interpreter's bf16 dots are wrong; fp32 ones are exact
        BF16_RTNE=bf16_interpreted,  # ... and its fp32 -> bf16 casts truncate
        PRECISION=precision(dtype),
    )


# (BLOCK_M, BLOCK_N, num_warps) of the softmax-attention kernels (flash, and sparse within a
# layout block) by kernel and padded head dim when compiled for a GPU, picked from the static
# read of the compiled sm_90 code (tests/sm90.py; benchmarks/results/sm90-static.md): every
# kernel fits the H100's 227 KB of shared memory with no register spills, and every product
# runs on wgmma, which needs 64 rows per warpgroup on its tall side: the query block (BLOCK_M)
# in "fwd" and "dq", the key block (BLOCK_N) in "dkdv", whose tiles are (keys, queries).
# Among those, the tiles that issue the fewest instructions per (query, key) pair. d256 runs
# one warpgroup (4 warps): with two, each would recompute the whole 64-row score tile. fp32
# tiles take twice the bytes, so they get half the rows on the short side. The interpreter
# runs one program at a time in NumPy, where fewer, larger blocks are faster.
_BLOCKS = {
    "fwd": {16: (128, 64, 4), 32: (128, 64, 4), 64: (128, 64, 4), 128: (128, 64, 8), 256: (64, 32, 4)},
    "dkdv": {16: (64, 128, 8), 32: (64, 128, 8), 64: (64, 128, 8), 128: (32, 128, 8), 256: (32, 64, 4)},
    "dq": {16: (128, 128, 8), 32: (128, 128, 8), 64: (128, 128, 8), 128: (128, 64, 8), 256: (64, 32, 4)},
}
_INTERPRETER_BLOCKS = (32, 32, 4)


def block_config(head_dim: int, dtype: torch.dtype, kernel: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a softmax-attention kernel ("fwd", "dkdv" or "dq")
    for a head dim (the larger of q's and v's)."""
    if not gpu_tiles():
        return _INTERPRETER_BLOCKS
    block_m, block_n, warps = _BLOCKS[kernel][pad(head_dim)]
    if dtype == torch.float32:
        if kernel == "dkdv":
            block_m = max(16, block_m // 2)  # the query step; the key block stays wgmma's 64+ rows
        else:
            block_m = max(32, block_m // 2)
    return block_m, block_n, warps


class Terms(NamedTuple):
    """The logit terms a softmax-attention kernel compiles in, passed as one constexpr
    ``TERMS`` (read as ``if TERMS.ALIBI:`` in a kernel) instead of one flag per term.
    LEFT/RIGHT are the band's edges (causal is RIGHT with window_right 0)."""

    BIAS: bool = False
    BIAS_IS_BOOL: bool = False
    ALIBI: bool = False
    SOFTCAP: bool = False
    DROPOUT: bool = False
    LEFT: bool = False
    RIGHT: bool = False
    SINKS: bool = False  # a per-head sink logit joins every softmax denominator


def logit_scalars(scale: float, softcap: Optional[float] = None, dropout_p: float = 0.0,
                  window_left: Optional[int] = None, window_right: Optional[int] = None) -> tuple:
    """The kernels' runtime ``scalars`` tuple (scale, softcap, dropout_p, window_left,
    window_right), with placeholders for terms that are off: 1.0 for no cap (the kernels
    divide by softcap only under TERMS.SOFTCAP), 0 for an unbounded band edge."""
    return (float(scale), float(softcap) if softcap else 1.0, float(dropout_p),
            0 if window_left is None else int(window_left), 0 if window_right is None else int(window_right))


# Head dims whose dK/dV kernel runs as two launches, one per gradient: at d256 the two fp32
# 64 x 256 accumulators take every register and spill. The second launch recomputes the
# scores (one more Q.K^T of the five backward products).
_SPLIT_KEY_GRADS = {256}


def key_grads(head_dim: int) -> list[dict]:
    """The dK/dV kernel's launches, as GRAD_K/GRAD_V keyword arguments: one for both, or (on a
    GPU, at a head dim in _SPLIT_KEY_GRADS) one per gradient."""
    if gpu_tiles() and pad(head_dim) in _SPLIT_KEY_GRADS:
        return [dict(GRAD_K=False, GRAD_V=True), dict(GRAD_K=True, GRAD_V=False)]
    return [dict(GRAD_K=True, GRAD_V=True)]


def softcap_args(softcap: Optional[float]) -> dict:
    """None (or 0.0, an older spelling) is no cap: HAS_SOFTCAP off. The kernels divide by
    softcap only under HAS_SOFTCAP, so 1.0 is just a placeholder of the right type."""
    return dict(softcap=float(softcap) if softcap else 1.0, HAS_SOFTCAP=bool(softcap))


def band_args(window_left: Optional[int], window_right: Optional[int]) -> dict:
    """A band edge is None for unbounded; the kernels get a flag and a placeholder 0."""
    return dict(
        window_left=0 if window_left is None else window_left,
        window_right=0 if window_right is None else window_right,
        HAS_LEFT=window_left is not None,
        HAS_RIGHT=window_right is not None,
    )


def alibi_args(q: Tensor, alibi: Optional[Tensor], batch: Optional[int] = None) -> tuple[Tensor, tuple[int, int]]:
    """ALiBi slopes as (B, H) with stride 0 over the batch when given per head only; q
    stands in for the pointer when there are none. ``batch``: B when q's own batch dim is
    not it (packed sequences)."""
    if alibi is None:
        return q, (0, 0)
    if alibi.dim() == 1:
        alibi = alibi[None]
    alibi = alibi.expand(q.shape[0] if batch is None else batch, q.shape[1])
    return alibi, alibi.stride()


def softmax_delta(do: Tensor, out: Tensor) -> Tensor:
    """rowsum(dO * O) per query row, fp32 and contiguous: the softmax backward needs it."""
    return torch.linalg.vecdot(do.float(), out.float()).contiguous()

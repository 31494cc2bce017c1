"""Launch plumbing every op shares: output buffers, dot precision and the interpreter's
flags, the softmax-attention tiles, and the host side of the logit terms (band, ALiBi,
softcap). The kernels' side of the flags is described in ``fastattn/ops/_triton.py``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from fastattn._env import gpu_tiles, interpreting


def empty(*shape, like: Tensor, dtype=None) -> Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison them all with NaN
    (call it as ``_launch.empty``, so that a patch of this name reaches every op)."""
    return torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)


def on_device(launcher):
    """Runs ``launcher`` with its first tensor argument's CUDA device current: Triton launches
    on the current device, not the tensors' (tensors on cuda:1, as Hugging Face's
    ``device_map="auto"`` places them, would otherwise be read by a launch on cuda:0)."""
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return launcher(*args, **kwargs)
    return launch


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
# With logit terms that cost registers in the inner loop (bias, ALiBi, softcap, dropout) the
# tiles above spill; these are the largest that compile without (or, fp32 at d256, with
# the fewest) spills.
_FEATURE_BLOCKS = {
    "fwd": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4), 256: (64, 32, 4)},
    "dkdv": {16: (32, 128, 8), 32: (32, 128, 8), 64: (32, 128, 8), 128: (16, 128, 8), 256: (16, 64, 4)},
    "dq": {16: (128, 32, 8), 32: (128, 32, 8), 64: (128, 32, 8), 128: (128, 32, 8), 256: (64, 16, 4)},
}
# When a kernel's loop reads its tiles through TMA (``tma``), there are no address registers
# and the loads issue no instructions per thread, so larger tiles fit, with 2 stages
# (BLOCK_M, BLOCK_N, num_warps, num_stages): forward d128 128x128 (the pointer path spills
# there) and d256 128x64 (two warpgroups of 64 rows), dQ d128 128x128 and d256 64x64. The
# third stage would not fit the shared memory.
_TMA_BLOCKS = {
    "fwd": {128: (128, 128, 8, 2), 256: (128, 64, 8, 2)},
    "dkdv": {},
    "dq": {128: (128, 128, 8, 2), 256: (64, 64, 4, 2)},
}
_INTERPRETER_BLOCKS = (32, 32, 4)


def block_config(head_dim: int, dtype: torch.dtype, kernel: str, tma: bool = False,
                 features: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a softmax-attention kernel ("fwd", "dkdv" or "dq")
    for a head dim (the larger of q's and v's); ``tma``: its loop reads tiles through TMA;
    ``features``: a bias, ALiBi, softcap or dropout is on."""
    if not gpu_tiles():
        return _INTERPRETER_BLOCKS
    block_m, block_n, warps = (_FEATURE_BLOCKS if features else _BLOCKS)[kernel][pad(head_dim)]
    if tma and not features and pad(head_dim) in _TMA_BLOCKS[kernel]:
        block_m, block_n, warps, _ = _TMA_BLOCKS[kernel][pad(head_dim)]
    if dtype == torch.float32:
        # fp32 tiles take twice the bytes: half the rows on the short side. Their products run
        # on FMA (no wgmma), which spreads a tile over 8 warps' registers without spilling.
        warps = 8
        if kernel == "dkdv":
            block_m = max(16, block_m // 2)  # the query step
        else:
            block_m = max(32, block_m // 2)
            block_n = min(block_n, 8192 // pad(head_dim))  # a K or V tile of at most 32 KB a stage
    return block_m, block_n, warps


def num_stages(head_dim: int, kernel: str, tma: bool = False, features: bool = False) -> dict:
    """``num_stages`` for a softmax-attention launch (block_config's arguments), as keyword
    arguments: {} for Triton's default (3)."""
    if tma and not features and gpu_tiles() and pad(head_dim) in _TMA_BLOCKS[kernel]:
        return dict(num_stages=_TMA_BLOCKS[kernel][pad(head_dim)][3])
    return {}


def tma(*tensors: Tensor) -> bool:
    """Whether kernels read these (B, H, L, D) tensors through TMA tensor descriptors: when
    compiled for a GPU of compute capability 9.0 or more (Hopper's copy engine), or under the
    interpreter with FASTATTN_GPU_TILES=1 (the GPU's launch, tested without a GPU), and every
    tensor's layout is one TMA takes: last stride 1, and a 16-byte aligned base and strides.
    Not fp32: its products run on FMA, where the TMA build only spilled (tests/sm90.py).
    The capability is asked of torch, not read off ``tensor.is_cuda``, so tests/sm90.py (which
    answers 9.0 on CPU tensors) compiles this path."""
    if interpreting():
        if not gpu_tiles():
            return False
    elif torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        if t.dtype == torch.float32:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in _tma_strides(t)[:-1]):
            return False
    return True


def _tma_strides(t: Tensor) -> list[int]:
    """t's strides for a descriptor. A dim of size 1 is never stepped, so its stride (which
    torch leaves arbitrary, 0 in a packed view) is replaced by the span of the dims inside it."""
    return [s if n > 1 else max(m * st for m, st in zip(t.shape[i + 1:], t.stride()[i + 1:]))
            if i + 1 < t.dim() else s for i, (n, s) in enumerate(zip(t.shape, t.stride()))]


def descriptor(t: Tensor, block: list[int]):
    """A TMA descriptor of t reading ``block``-shaped tiles (see ``tma``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), _tma_strides(t), block)


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
    SCALE_FIRST: bool = False  # the scale is not positive: scale the scores before the row max

    def costly(self) -> bool:
        """Whether a term that costs registers in the inner loop is on (the tile choice)."""
        return self.BIAS or self.ALIBI or self.SOFTCAP or self.DROPOUT


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
    """rowsum(dO * O) per query row of (B, H, L, Dv) dO and O, fp32 (B, H, L) contiguous: the
    softmax backward needs it. One kernel reads each once (fp32 copies of both cost 4x O's
    bytes in bf16); rows of up to 2048 elements a program (registers)."""
    from fastattn.ops import _triton  # kernels: imported when a kernel runs, as the ops do

    b, h, length, dim = do.shape
    delta = empty(b, h, length, like=do, dtype=torch.float32)
    block_r = max(1, 2048 // pad(dim))
    _triton.row_dot_kernel[(triton.cdiv(length, block_r), h, b)](
        do, out, delta, do.stride(), out.stride(), delta.stride(), length,
        DIM=dim, BLOCK_R=block_r, BLOCK_D=pad(dim), num_warps=4)
    return delta

"""Launch plumbing every op shares: output buffers, dot precision and the interpreter's
flags, the GPU a launch compiles for and the softmax-attention tiles for it (with the fallback
to smaller ones when a launch does not fit), and the host side of the logit terms (band, ALiBi,
softcap). The kernels' side of the flags is described in ``fastattn/ops/_triton.py``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Hashable, NamedTuple, Optional

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from fastattn._env import ARCH_SHARED_BYTES, capability, gpu_tiles, interpreting


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


class Arch(NamedTuple):
    """The GPU a launch compiles for."""

    capability: int  # major * 10 + minor: 89 for 8.9
    shared: int  # bytes of shared memory one block may use (opt-in)


@functools.lru_cache(maxsize=None)
def _device_arch(device: torch.device) -> Arch:
    """The CUDA device's capability and shared memory, asked of torch once per device."""
    major, minor = torch.cuda.get_device_capability(device)
    return Arch(10 * major + minor, torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def arch(device: Optional[torch.device] = None) -> Optional[Arch]:
    """The GPU the kernels compile for on ``device`` (default: the current CUDA device): the
    device's own, or under the interpreter the one ``_env.capability`` fakes, with that
    GPU's shared memory; None under the interpreter's own tiles."""
    device = torch.device("cuda") if device is None else device
    if not interpreting():
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # one cache entry per GPU
        return _device_arch(device)
    cap = capability(device)
    return None if cap is None else Arch(cap, ARCH_SHARED_BYTES[cap])


def _tier(gpu: Arch) -> str:
    """Which tile tables a GPU takes: "sm90" and "sm100" where there is TMA and 227 KB of
    shared memory (capability 9.x: H100/H200; 10.x: B200; not 12.x, which has neither); "sm120" (RTX
    5090, 99 KB: its ptxas spills some of sm_89's tiles); else by shared memory: "sm80"
    (163 KB: A100), "sm86" (99 KB: RTX 3090/4090, A10, L4, L40S), "sm75" (64 KB: T4, and
    anything smaller)."""
    if gpu.capability // 10 in (9, 10) and gpu.shared >= ARCH_SHARED_BYTES[90]:
        return f"sm{gpu.capability // 10}0"
    if gpu.capability // 10 == 12 and gpu.shared >= ARCH_SHARED_BYTES[120]:
        return "sm120"
    if gpu.shared >= ARCH_SHARED_BYTES[80]:
        return "sm80"
    if gpu.shared >= ARCH_SHARED_BYTES[86]:
        return "sm86"
    return "sm75"


class Tiles(NamedTuple):
    """A softmax-attention launch's tiles: BLOCK_M query rows by BLOCK_N key rows."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 3  # Triton's default


# Tiles (BLOCK_M, BLOCK_N, num_warps[, num_stages]) of the softmax-attention kernels (flash,
# and sparse within a layout block) per tier (``_tier``), kernel and padded head dim when
# compiled for a GPU, picked from the static read of each target's compiled code
# (tests/sm90.py --arch N; benchmarks/results/static-per-arch.md): among the tiles that fit the
# target's shared memory and do not spill, those that issue the fewest warp instructions per
# (query, key) pair. Head dims 16 and 32 take d64's tiles (smaller footprints). In "dkdv" the
# tiles are (keys, queries): BLOCK_N keys held, BLOCK_M queries a step.
# sm90 (H100/H200, B200): every product runs on wgmma, which needs 64 rows per warpgroup on
# its tall side: the query block in "fwd" and "dq", the key block in "dkdv". d256 runs one
# warpgroup (4 warps): with two, each would recompute the whole 64-row score tile.
# Below sm_90 the products run on mma.sync and the loads on cp.async (sm_120 too: no wgmma,
# no TMA). sm86 (99 KB: sm_86, sm_89, sm_120): dQ takes 64 keys at d64 (128 x 128 spills, and
# 128 x 64 issues fewer instructions per pair) and 32 at d128 (64 ask for 128 KB); d256 takes
# 2 stages and 32-row steps (3 stages, or dK/dV's 64 keys, ask for 100-135 KB). sm80 (163 KB):
# the same, but its ptxas spills sm_89's d128 forward (128 x 64) and dK/dV (32 x 128), which
# take 32 keys and 64 keys with 4 warps there, and the shared memory buys d256 a third stage
# and dK/dV 64 keys. sm120: sm_80's d128 tiles, 8 warps at d64 and 32-query forward tiles at
# d256 (sm_120's ptxas spills the 99 KB GPUs' forward at d64, d128 and d256 and their d128
# dK/dV).
# sm75 (T4): Triton lowers the products to FMA (no tensor cores), where a thread holds its
# share of each product's terms: 32 x 32 tiles at d64 and 16-row ones above compile with the
# fewest spills (none at d64; at d128/d256 even 16 x 16 dK/dV and dQ spill), 2 stages.
_BLOCKS = {
    "sm90": {
        "fwd": {16: (128, 64, 4), 32: (128, 64, 4), 64: (128, 64, 4), 128: (128, 64, 8), 256: (64, 32, 4)},
        "dkdv": {16: (64, 128, 8), 32: (64, 128, 8), 64: (64, 128, 8), 128: (32, 128, 8), 256: (32, 64, 4)},
        "dq": {16: (128, 128, 8), 32: (128, 128, 8), 64: (128, 128, 8), 128: (128, 64, 8), 256: (64, 32, 4)},
    },
    "sm80": {
        "fwd": {16: (128, 64, 4), 32: (128, 64, 4), 64: (128, 64, 4), 128: (128, 32, 8), 256: (64, 32, 4)},
        "dkdv": {16: (64, 128, 8), 32: (64, 128, 8), 64: (64, 128, 8), 128: (32, 64, 4), 256: (32, 64, 4)},
        "dq": {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (128, 32, 8), 256: (32, 32, 4)},
    },
    "sm86": {
        "fwd": {16: (128, 64, 4), 32: (128, 64, 4), 64: (128, 64, 4), 128: (128, 64, 8), 256: (64, 32, 4, 2)},
        "dkdv": {16: (64, 128, 8), 32: (64, 128, 8), 64: (64, 128, 8), 128: (32, 128, 8), 256: (32, 32, 4, 2)},
        "dq": {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (128, 32, 8), 256: (32, 32, 4)},
    },
    "sm120": {
        "fwd": {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (128, 32, 8), 256: (32, 32, 4, 2)},
        "dkdv": {16: (64, 128, 8), 32: (64, 128, 8), 64: (64, 128, 8), 128: (32, 64, 4), 256: (32, 32, 4, 2)},
        "dq": {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (128, 32, 8), 256: (32, 32, 4)},
    },
    "sm75": {
        "fwd": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (16, 16, 4, 2)},
        "dkdv": {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
        "dq": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
    },
}
# With logit terms that cost registers in the inner loop (bias, ALiBi, softcap, dropout) the
# tiles above spill; these are the largest that compile without spills (or, where none does,
# with the fewest), and below sm_90 the ones that fit (the bias tile is pipelined too):
# 99 KB GPUs and sm_80 take the same.
_FEATURE_BLOCKS = {
    "sm90": {
        "fwd": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4), 256: (64, 32, 4)},
        "dkdv": {16: (32, 128, 8), 32: (32, 128, 8), 64: (32, 128, 8), 128: (16, 128, 8), 256: (16, 64, 4)},
        "dq": {16: (128, 32, 8), 32: (128, 32, 8), 64: (128, 32, 8), 128: (128, 32, 8), 256: (64, 16, 4)},
    },
    "sm86": {
        "fwd": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 4), 256: (64, 16, 4)},
        # d128 dK/dV: 2 stages (3 took 102,656 B once dropout's draws were transposed in the loop)
        "dkdv": {16: (32, 128, 8), 32: (32, 128, 8), 64: (32, 128, 8), 128: (16, 128, 8, 2), 256: (16, 64, 4, 2)},
        "dq": {16: (128, 32, 8), 32: (128, 32, 8), 64: (128, 32, 8), 128: (64, 32, 4), 256: (32, 16, 4)},
    },
    "sm75": {
        "fwd": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 2), 256: (16, 16, 4, 2)},
        "dkdv": {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
        "dq": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
    },
}
_FEATURE_BLOCKS["sm80"] = _FEATURE_BLOCKS["sm120"] = _FEATURE_BLOCKS["sm86"]
# sm90 (and sm100, below): when a kernel's loop reads its tiles through TMA (``tma``), there
# are no address registers and the loads issue no instructions per thread, so larger tiles
# fit, with 2 stages: forward d128 128x128 (the pointer path spills there) and d256 128x64 (two
# warpgroups of 64 rows), dQ d128 128x128 and d256 64x64. The third stage would not fit.
_TMA_BLOCKS = {"sm90": {
    "fwd": {128: (128, 128, 8, 2), 256: (128, 64, 8, 2)},
    "dkdv": {},
    "dq": {128: (128, 128, 8, 2), 256: (64, 64, 4, 2)},
}}
_TMA_TIERS = ("sm90", "sm100")
# sm100 (B200): the products run on tcgen05 (UTCHMMA), with sm_90's tiles but where its ptxas
# spills them: the d64 forward with 4 warps (8 warps: none), and the TMA forward's 128 x 64
# at d256 (32 keys a step: none; 64 x 64 spills too).
_BLOCKS["sm100"] = {**_BLOCKS["sm90"],
                    "fwd": {**_BLOCKS["sm90"]["fwd"], 16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8)}}
_FEATURE_BLOCKS["sm100"] = _FEATURE_BLOCKS["sm90"]
_TMA_BLOCKS["sm100"] = {**_TMA_BLOCKS["sm90"], "fwd": {**_TMA_BLOCKS["sm90"]["fwd"], 256: (128, 32, 8, 2)}}
_INTERPRETER_BLOCKS = Tiles(32, 32, 4)


def candidates(head_dim: int, dtype: torch.dtype, kernel: str, device: Optional[torch.device] = None,
               tma: bool = False, features: bool = False) -> list[Tiles]:
    """The tiles a softmax-attention kernel ("fwd", "dkdv" or "dq") may launch with on
    ``device`` (``arch``), most preferred first: the tier's choice for the head dim (the
    larger of q's and v's), then smaller ones for ``first_fit`` to fall back on. ``tma``: its
    loop reads tiles through TMA; ``features``: a bias, ALiBi, softcap or dropout is on."""
    gpu = arch(device)
    if gpu is None:
        return [_INTERPRETER_BLOCKS]
    tier, d = _tier(gpu), pad(head_dim)
    if tma and not features and d in _TMA_BLOCKS[tier][kernel]:
        tiles = Tiles(*_TMA_BLOCKS[tier][kernel][d])
    else:
        tiles = Tiles(*(_FEATURE_BLOCKS if features else _BLOCKS)[tier][kernel][d])
    if dtype == torch.float32 and tier not in _TMA_TIERS:
        # fp32 tiles take twice the bytes and their products run on FMA: below sm_90 half the
        # rows on both sides (a quarter of the keys at d256), 2 stages, to fit the smaller
        # shared memory.
        tiles = Tiles(max(16, tiles.block_m // 2), max(16, tiles.block_n // (4 if d == 256 else 2)),
                      tiles.num_warps, 2)
    elif dtype == torch.float32:
        # fp32 tiles take twice the bytes: half the rows on the short side. Their products run
        # on FMA (no wgmma), which spreads a tile over 8 warps' registers without spilling.
        if kernel == "dkdv":
            tiles = tiles._replace(block_m=max(16, tiles.block_m // 2), num_warps=8)  # the query step
        else:
            tiles = tiles._replace(block_m=max(32, tiles.block_m // 2), num_warps=8,
                                   block_n=max(16, min(tiles.block_n, 8192 // d)))  # K/V tiles of at most 32 KB a stage (d1024: 64 KB)
    return _smaller(tiles, kernel)


def _smaller(tiles: Tiles, kernel: str) -> list[Tiles]:
    """``tiles``, then each with less shared memory than the one before: 2 stages, then the
    loop's step halved (the key block of "fwd" and "dq", the query block of "dkdv"), then the
    other block, down to 16 rows."""
    out = [tiles]
    step, other = ("block_m", "block_n") if kernel == "dkdv" else ("block_n", "block_m")
    while True:
        t = out[-1]
        if t.num_stages > 2:
            out.append(t._replace(num_stages=2))
        elif getattr(t, step) > 16:
            out.append(t._replace(**{step: getattr(t, step) // 2}))
        elif getattr(t, other) > 16:
            out.append(t._replace(**{other: getattr(t, other) // 2}))
        else:
            return out


def block_config(head_dim: int, dtype: torch.dtype, kernel: str, tma: bool = False,
                 features: bool = False, device: Optional[torch.device] = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the first of ``candidates`` (same arguments)."""
    return candidates(head_dim, dtype, kernel, device, tma, features)[0][:3]


# (kernel, GPU, its candidates, the caller's key) -> index of the first candidate that launched.
_FIRST_FIT: dict = {}


def first_fit(kernel, device: torch.device, tiles: list[Tiles], launch: Callable[[Tiles], None],
              key: Hashable = ()) -> Tiles:
    """Calls ``launch(t)`` for each of ``tiles`` in turn, from the one that last fitted this
    kernel on this GPU with this ``key`` (whatever else changes the kernel's resources: its
    constexprs), until one does not raise Triton's OutOfResources, which it raises before
    running anything when a compiled kernel asks for more shared memory or threads than the
    GPU has. Returns the tiles that launched, and remembers them.

    Raises:
        OutOfResources: not even the last (smallest) of ``tiles`` fits.
    """
    memo = (kernel, arch(device), tuple(tiles), key)
    for i in range(_FIRST_FIT.get(memo, 0), len(tiles)):
        try:
            launch(tiles[i])
        except OutOfResources:
            if i + 1 == len(tiles):
                raise
            continue
        _FIRST_FIT[memo] = i
        return tiles[i]


def tier(device: Optional[torch.device] = None) -> Optional[str]:
    """Which tile tables the GPU of ``device`` (default: the current CUDA device) takes
    (``_tier``: "sm90", "sm100", "sm120", "sm80", "sm86" or "sm75"); None under the interpreter's own
    tiles."""
    gpu = arch(device)
    return None if gpu is None else _tier(gpu)


def decode_tiles(block_m: int, block_n: int, head_dim: int,
                 device: Optional[torch.device] = None) -> tuple[int, int]:
    """The decode kernels' (query row block, key block), chosen for the H100, capped for the
    GPU of ``device`` (default: the current CUDA device) so that the query tile and the
    pipelined K/V tiles fit its shared memory (tests/sm90.py --arch N): below sm_80's 163 KB at
    most 4096 / padded head dim keys (d256: 32 keys ask for 100 KB, 16 for 66 KB), and on
    sm_75's 64 KB as many query rows (d256: 64 rows and 16 keys ask for 80 KB)."""
    gpu_tier = tier(device)
    if gpu_tier in ("sm86", "sm120", "sm75"):
        block_n = max(16, min(block_n, 4096 // pad(head_dim)))
    if gpu_tier == "sm75":
        block_m = max(16, min(block_m, 4096 // pad(head_dim)))
    return block_m, block_n


def tma(*tensors: Tensor) -> bool:
    """Whether kernels read these (B, H, L, D) tensors through TMA tensor descriptors: when
    compiled for a GPU with a copy engine and the shared memory for the TMA tiles (the "sm90"
    and "sm100" tiers of ``_tier``: capability 9.x or 10.x), or under the interpreter with
    FASTATTN_GPU_TILES=1 faking such a GPU (the GPU's launch, tested without a GPU), and every
    tensor's layout is one TMA takes: last stride 1, a 16-byte aligned base and strides, and
    no broadcast dim (stride 0 over a size above 1, e.g. K/V expanded over the batch by the
    SDPA drop-in): a descriptor's strides must step through memory, and what the copy engine
    does with a 0 is not documented. Not fp32: its products run on FMA, where the TMA build
    only spilled (tests/sm90.py). The GPU is asked of torch (``arch``), not read off
    ``tensor.is_cuda``, so tests/sm90.py (which fakes a target on CPU tensors) compiles this
    path."""
    gpu = arch(tensors[0].device)
    if gpu is None or _tier(gpu) not in _TMA_TIERS:
        return False
    for t in tensors:
        if t.dtype == torch.float32:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in _tma_strides(t)[:-1]):
            return False
        if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
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
    return (float(scale), 1.0 if softcap is None else float(softcap), float(dropout_p),
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


# Head dims past 256 (flash only): 512 (Gemma's global layers) and 1024, the padded q/k width
# of absorbed MLA (576 = 512 latent + 64 rotary; v 512). Per tier and kernel, the tiles that fit
# the target's shared memory with the fewest spills in the static read (tests/sm90.py --arch N;
# benchmarks/results/static-per-arch.md): one fp32 row of a 512-wide accumulator is 2 KB, so
# few rows a program, 2 stages, and dK and dV in separate launches (_SPLIT_KEY_GRADS). sm90:
# wgmma at d512 (64-row side); at 1024 its wgmma tiles spill thousands of bytes or do not
# fit, so 16 x 16 on mma.sync, as the 99 KB GPUs. sm_89 takes sm_80's d512 tiles (the forward's
# 32 x 32 asks for 100,352 of its 101,376 bytes); sm_120 too but a 16 x 16 forward (its ptxas
# spills the 32 x 32 one). With logit terms, below sm_90, 16 x 16.
_WIDE_BLOCKS = {
    "sm90": {"fwd": {512: (64, 16, 8, 2), 1024: (16, 16, 4, 2)},
             "dkdv": {512: (16, 64, 8, 2), 1024: (16, 16, 4, 2)},
             "dq": {512: (64, 16, 8, 2), 1024: (16, 16, 4, 2)}},
    "sm80": {"fwd": {512: (32, 32, 4, 2), 1024: (16, 16, 4, 2)},
             "dkdv": {512: (16, 32, 4, 2), 1024: (16, 16, 4, 2)},
             "dq": {512: (32, 16, 4, 2), 1024: (16, 16, 4, 2)}},
    "sm120": {"fwd": {512: (16, 16, 4, 2), 1024: (16, 16, 4, 2)},
              "dkdv": {512: (16, 32, 4, 2), 1024: (16, 16, 4, 2)},
              "dq": {512: (32, 16, 4, 2), 1024: (16, 16, 4, 2)}},
    "sm75": {kernel: {512: (16, 16, 4, 2), 1024: (16, 16, 4, 2)} for kernel in ("fwd", "dkdv", "dq")},
}
_WIDE_BLOCKS.update(sm100=_WIDE_BLOCKS["sm90"], sm86=_WIDE_BLOCKS["sm80"])
for _tier_name, _kernels in _WIDE_BLOCKS.items():
    _features = _kernels if _tier_name in _TMA_TIERS else _WIDE_BLOCKS["sm75"]
    for _kernel in _kernels:
        _BLOCKS[_tier_name][_kernel].update(_kernels[_kernel])
        _FEATURE_BLOCKS[_tier_name][_kernel].update(_features[_kernel])
_SPLIT_KEY_GRADS.update({512, 1024})


# Decode (split-KV, append) at padded head dims 512 and 1024 (576/512: MLA): per tier, by dtype
# width (2: fp16/bf16, 4: fp32), (query rows, keys, warps, stages) of the split kernel and the
# append's tokens per program, chosen by the static read (tests/sm90.py decode-*-d512-*,
# decode-*-d576v512-mla-* --arch N; benchmarks/results/static-per-arch.md).
_DECODE_WIDE = {
    "sm90": {(2, 512): (32, 32, 8, 3), (2, 1024): (32, 16, 8, 3), (4, 512): (16, 16, 8, 2), (4, 1024): (16, 16, 8, 2)},
    "sm80": {(2, 512): (32, 16, 8, 3), (2, 1024): (32, 16, 8, 2), (4, 512): (16, 16, 8, 2), (4, 1024): (16, 16, 8, 2)},
    "sm86": {(2, 512): (32, 16, 8, 2), (2, 1024): (16, 16, 8, 2), (4, 512): (16, 16, 8, 2), (4, 1024): None},
}
# sm75 (64 KB; products on FMA): fp16 d512 16 x 16 x 8 warps asks for exactly its 65,536 B; at
# 1024, and fp32, no tile fits.
_DECODE_WIDE["sm75"] = {(2, 512): (16, 16, 8, 2), (2, 1024): None, (4, 512): None, (4, 1024): None}
_DECODE_WIDE.update(sm100=_DECODE_WIDE["sm90"], sm120=_DECODE_WIDE["sm86"])
_DECODE_WIDE_APPEND = 8  # new tokens per append program: 8 rows of 1024 + 512 channels


def decode_wide_tiles(head_dim: int, dtype: torch.dtype,
                      device: Optional[torch.device] = None) -> Optional[tuple[int, int, int, int, int]]:
    """The decode kernels' (query rows, keys, warps, stages, append tokens) at padded head dim
    ``head_dim`` 512 or 1024 on the GPU of ``device`` (``_DECODE_WIDE``; the interpreter's own
    tiles aside, sm_90's), or None where no tile fits the GPU's shared memory: fp32 at 1024 on
    the 99 KB GPUs, whose 16 x 16 tiles of q, K and V alone (products on FMA pass every operand
    through shared memory) take 160 KB; on sm_75 (64 KB) anything but fp16 at 512."""
    gpu_tier = tier(device) or "sm90"
    tiles = _DECODE_WIDE[gpu_tier][min(torch.finfo(dtype).bits // 8, 4), head_dim]
    return None if tiles is None else (*tiles, _DECODE_WIDE_APPEND)


def lowp_flags(v_dtype: torch.dtype) -> dict:
    """``dtype_flags`` of a low-precision forward (fp8 q/k/v, or int8 q/k with 16-bit v): the
    PV product's, v's dtype; and under the interpreter, whose casts truncate, BF16_RTNE on:
    every narrowing cast (P to fp8, the output to bf16) rounds to nearest first."""
    return dict(dtype_flags(v_dtype), BF16_RTNE=interpreting())


# The low-precision forward's tiles where the 16-bit ones spill (the static read, tests/sm90.py
# flash-<fp8|int8>-d<D>-causal --arch N --kernel fwd --tiles ...; benchmarks/results/static-per-arch.md):
# int8's per-score rescale (int32 -> fp32, times the key's scale) holds more registers than a
# 16-bit score. sm_90 / sm_100 with TMA: at d64 and d128 (the 16-bit 128x128 spills 112 B);
# sm_80 and the 99 KB GPUs (sm_86, sm_89): at d256, where 64x32 spills 64 B and 32x64 (2 stages
# in 99 KB) does not and issues fewer instructions per pair.
# Elsewhere the 16-bit tables (their shared memory is an upper bound: fp8 and int8 tiles are
# half as big). fp8 at d256 on sm_90 spills 420-524 B with every tile read (its V tile goes
# through registers to be transposed for the PV product's fp8 wgmma): not yet fixed.
_LOWP_TMA_BLOCKS = {("int8", 64): (128, 64, 8, 3), ("int8", 128): (128, 64, 8, 2)}
_LOWP_BLOCKS = {("sm80", "int8", 256): (32, 64, 4, 3), ("sm86", "int8", 256): (32, 64, 4, 2)}


def lowp_candidates(head_dim: int, mode: str, device: Optional[torch.device] = None, tma: bool = False,
                    features: bool = False) -> list[Tiles]:
    """``candidates`` of the low-precision forward (``mode`` "fp8" or "int8"): the 16-bit
    forward's, or without a costly term ``_LOWP_TMA_BLOCKS``' (sm_90/sm_100 with TMA) and
    ``_LOWP_BLOCKS``' (the other tiers)."""
    gpu = arch(device)
    tiles = None
    if gpu is not None and not features:
        tier = _tier(gpu)
        if tier in _TMA_TIERS:
            tiles = _LOWP_TMA_BLOCKS.get((mode, pad(head_dim))) if tma else None
        else:
            tiles = _LOWP_BLOCKS.get((tier, mode, pad(head_dim)))
    if tiles is None:
        return candidates(head_dim, torch.bfloat16, "fwd", device, tma, features)
    return _smaller(Tiles(*tiles), "fwd")


# The decode split kernel's tiles at MLA's q/k head dim 576 read as 512 + 64 channels (two
# products, V the K tile's 512 latent channels; ``decode.op.Widths``), by q's bytes per element:
# (query rows, keys, warps, stages), from the static read (tests/sm90.py
# decode-<dtype>-d576v512-mla-causal --arch N; benchmarks/results/static-per-arch.md): 0 spills
# and, of the 8-warp tiles that fit, the fewest SASS instructions per (query, key) pair (on the
# 99 KB GPUs 32 x 32 spills 4 B on sm_89). sm_90 stays on mma.sync: its 64-row (wgmma) tiles
# spill and issue more per pair. fp32 (products on FMA) now fits the 99 KB GPUs at 16 x 16;
# sm_75 (64 KB) has no tile at 576.
_DECODE_MLA = {
    "sm90": {2: (32, 64, 8, 2), 4: (16, 16, 8, 2)},
    "sm80": {2: (32, 64, 8, 2), 4: (16, 16, 8, 2)},
    "sm86": {2: (32, 16, 8, 2), 4: (16, 16, 8, 2)},
    "sm75": {2: None, 4: None},
}
_DECODE_MLA.update(sm100=_DECODE_MLA["sm90"], sm120=_DECODE_MLA["sm86"])


def decode_mla_tiles(dtype: torch.dtype,
                     device: Optional[torch.device] = None) -> Optional[tuple[int, int, int, int, int]]:
    """``decode_wide_tiles`` for a q/k head dim read as 512 + 64 channels (MLA's 576;
    ``_DECODE_MLA``) on the GPU of ``device`` (the interpreter's own tiles aside, sm_90's), or
    None where no tile fits (sm_75)."""
    tiles = _DECODE_MLA[tier(device) or "sm90"][min(torch.finfo(dtype).bits // 8, 4)]
    return None if tiles is None else (*tiles, _DECODE_WIDE_APPEND)

"""Which implementation runs: the Triton kernels or the pure-PyTorch references.

``use_backend("triton" | "torch" | "auto")`` works like ``torch.nn.attention.sdpa_kernel``.
Every kernel family states what it supports through a ``*_refusals`` function that returns
the reasons it cannot take an input (an empty list means it can). Under "auto" a refused
input goes to the reference; under "triton" it raises ``ValueError`` with the reasons.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third axes of a launch grid

# Plain module state (not a ContextVar) so torch.compile can guard on it without a graph break.
_state = {"backend": "auto"}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastattn calls on one backend.

    "auto" (default): kernels where they apply (CUDA tensors, or CPU tensors when
    TRITON_INTERPRET=1), the pure-PyTorch reference otherwise.
    "triton": kernels only; an input they cannot take raises ValueError saying why.
    "torch": the pure-PyTorch references.
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = _state["backend"]
    _state["backend"] = name
    try:
        yield
    finally:
        _state["backend"] = previous


def current_backend() -> str:
    return _state["backend"]


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_tiles() -> bool:
    """Whether the launchers pick the tile sizes they use on a GPU: always when compiled, and
    under the interpreter only with FASTATTN_GPU_TILES=1. The interpreter's own tiles are
    smaller (faster in NumPy), so without this the GPU's tile sizes would never be checked on a
    machine without a GPU; tests/test_gpu_tiles.py sets it."""
    return not interpreting() or os.environ.get("FASTATTN_GPU_TILES", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    # A constant to torch.compile: torch 2.11's dynamo refuses to trace importlib's find_spec
    # (a graph break, an error under fullgraph=True); 2.13's traces it.
    return importlib.util.find_spec("triton") is not None


def device_refusals(*tensors: torch.Tensor) -> list[str]:
    """Reasons no Triton kernel can run on these tensors at all."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed")
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        reasons.append(f"tensors are on {device}; the kernels need CUDA (or CPU with TRITON_INTERPRET=1)")
    return reasons


def grid_refusals(batch: int, heads: int) -> list[str]:
    """The attention kernels launch (blocks, heads, batch) grids, as FlashAttention does; CUDA
    caps the last two axes."""
    return [f"{name} {n} exceeds {MAX_GRID_YZ}, CUDA's limit on a launch grid's second and third axes"
            for name, n in (("batch", batch), ("heads", heads)) if n > MAX_GRID_YZ]


def flash_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons the flash kernels cannot take these (already validated) inputs."""
    reasons = device_refusals(q)
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of {KERNEL_DTYPES}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"head_dim {q.shape[-1]} / value dim {v.shape[-1]} exceeds {MAX_HEAD_DIM}")
    return reasons + grid_refusals(q.shape[0], q.shape[1])


def decode_refusals(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    needs_grad: bool = False) -> list[str]:
    """Reasons the KV-cache (decode) kernels cannot take these (already validated) inputs."""
    reasons = device_refusals(q)
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of {KERNEL_DTYPES}")
    if max(q.shape[-1], v_cache.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"head_dim {q.shape[-1]} / value dim {v_cache.shape[-1]} exceeds {MAX_HEAD_DIM}")
    if needs_grad:
        reasons.append("the decode kernels compute no gradients (an input requires grad)")
    return reasons


def linear_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons the linear-attention kernels cannot take these (already validated) inputs.
    q/k hold the features (or the inputs of an elementwise feature map): (B, H, L, M)."""
    reasons = device_refusals(q)
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of {KERNEL_DTYPES}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"feature dim {q.shape[-1]} / value dim {v.shape[-1]} exceeds {MAX_HEAD_DIM}")
    return reasons + grid_refusals(q.shape[0], q.shape[1])


def sparse_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> list[str]:
    """Reasons the block-sparse kernels cannot take these (already validated) inputs and
    layout. Any layout block size works: the kernels tile inside it (a power of two >= 16)."""
    reasons = device_refusals(q)
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of {KERNEL_DTYPES}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"head_dim {q.shape[-1]} / value dim {v.shape[-1]} exceeds {MAX_HEAD_DIM}")
    return reasons + grid_refusals(q.shape[0], q.shape[1])


def use_kernels(op: str, reasons: list[str]) -> bool:
    """Decide for one call: True -> kernels, False -> reference. Raises under "triton"."""
    backend = current_backend()
    if backend == "torch":
        return False
    if not reasons:
        return True
    if backend == "triton":
        raise ValueError(f"{op}: the triton backend cannot take this input: " + "; ".join(reasons))
    return False

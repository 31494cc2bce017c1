"""Which implementation runs a call: the Triton kernels, torch's own SDPA, or the reference.

``use_backend("triton" | "torch" | "auto")`` works like ``torch.nn.attention.sdpa_kernel``.
Each kernel family declares what it takes (``FAMILIES``); ``refusals()`` lists every reason
a family cannot take an input, and ``route()`` is the one place that decides, for every
caller (``fastattn.functional``, ``patch_sdpa``, ``fastattn.nn``, ``fastattn.distributed``):

    backend   kernels take it   kernels refuse it                     empty input
    auto      kernel            torch's SDPA if it can express the    reference
                                call, else the reference
    triton    kernel            ValueError with every reason          reference
    torch     reference         reference                             reference

An empty input (a zero batch, heads, sequence or head dim) has nothing for a kernel to
compute, so every backend gives the result torch gives, from the reference.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch

from fastattn._env import capability, interpreting

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The compute capability a dtype's tensor-core products need: bf16 came with sm_80 (Ampere),
# fp8 with sm_89 (Ada) and sm_90 (Hopper).
MIN_CAPABILITY = {torch.bfloat16: 80, torch.float8_e4m3fn: 89, torch.float8_e5m2: 89}
MAX_HEAD_DIM = 256
# The flash kernels' limits: q/k head dim up to 576 (MLA's absorbed 512 latent + 64 rotary
# channels), v head dim up to 512 (Gemma's global layers; MLA's latent).
FLASH_MAX_HEAD_DIM = 576
FLASH_MAX_VALUE_DIM = 512
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third axes of a launch grid

# torch's own SDPA, captured once at import, before fastattn.patch_sdpa() can replace the
# attribute: every fallback calls this, so a patched torch never calls back into fastattn.
TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention

# Plain module state (not a ContextVar) so torch.compile can guard on it without a graph break.
_state = {"backend": "auto"}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastattn calls on one backend.

    "auto" (default): kernels where they apply (CUDA tensors, or CPU tensors when
    TRITON_INTERPRET=1), torch's fused SDPA or the pure-PyTorch reference otherwise.
    "triton": kernels only; an input they cannot take raises ValueError with every reason.
    "torch": the pure-PyTorch implementations.

    Raises:
        ValueError: ``name`` is not one of "auto", "triton", "torch".
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


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    # A constant to torch.compile: torch 2.11's dynamo refuses to trace importlib's find_spec
    # (a graph break, an error under fullgraph=True); 2.13's traces it.
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class KernelFamily:
    """What one family of Triton kernels takes."""

    name: str
    dim_name: str = "head_dim"       # what the last dim of q/k is called in messages
    dtypes: tuple = KERNEL_DTYPES
    max_dim: int = MAX_HEAD_DIM      # largest q/k last dim
    max_dim_v: int = MAX_HEAD_DIM    # largest v last dim
    grid_limited: bool = True        # launches (blocks, heads, batch): CUDA caps the last two axes
    gradients: bool = True           # has backward kernels


FAMILIES = {f.name: f for f in (
    KernelFamily("flash", max_dim=FLASH_MAX_HEAD_DIM, max_dim_v=FLASH_MAX_VALUE_DIM),
    # The flash forward on fp8 q/k/v with descales (no backward).
    KernelFamily("flash-fp8", dtypes=FP8_DTYPES, max_dim=FLASH_MAX_HEAD_DIM, max_dim_v=FLASH_MAX_VALUE_DIM,
                 gradients=False),
    KernelFamily("sparse"),
    KernelFamily("linear", dim_name="feature dim"),
    # Split-KV decoding is forward-only; its grid folds batch and heads into one axis. Head dims
    # as the flash family's (MLA decode: q/k 576, v 512, V read in place from K's channels).
    KernelFamily("decode", max_dim=FLASH_MAX_HEAD_DIM, max_dim_v=FLASH_MAX_VALUE_DIM, grid_limited=False,
                 gradients=False),
)}


def empty_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Names of the zero-size dims of (B, H, L, D) inputs: nothing for a kernel to compute."""
    sizes = {"batch": q.shape[0], "query heads": q.shape[1], "key/value heads": k.shape[1],
             "Lq": q.shape[2], "Lk": k.shape[2], "head_dim": q.shape[-1], "value dim": v.shape[-1]}
    return [name for name, n in sizes.items() if n == 0]


def refusals(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             needs_grad: bool = False) -> list[str]:
    """Every reason the kernels of ``family`` cannot take these (already validated) 4-D
    (B, H, L, D) inputs; an empty list means they can. ``needs_grad``: the call must be
    differentiable. Empty inputs are not a refusal (see ``route``)."""
    spec = FAMILIES[family]
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed")
    device = q.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        reasons.append(f"tensors are on {device}; the kernels need CUDA (or CPU with TRITON_INTERPRET=1)")
    if q.dtype not in spec.dtypes:
        reasons.append(f"dtype {q.dtype} is not one of {spec.dtypes}")
    elif q.dtype in MIN_CAPABILITY and (device.type == "cuda" or interpreting()):
        cap, need = capability(device), MIN_CAPABILITY[q.dtype]
        if cap is not None and cap < need:
            reasons.append(f"dtype {q.dtype} needs compute capability {need // 10}.{need % 10} or more; {device} "
                           f"has {cap // 10}.{cap % 10}")
    if q.shape[-1] > spec.max_dim or v.shape[-1] > spec.max_dim_v:
        reasons.append(f"{spec.dim_name} {q.shape[-1]} / value dim {v.shape[-1]} exceeds "
                       f"{spec.max_dim} / {spec.max_dim_v}")
    if spec.grid_limited:
        reasons += [f"{name} {n} exceeds {MAX_GRID_YZ}, CUDA's limit on a launch grid's second and third axes"
                    for name, n in (("batch", q.shape[0]), ("heads", q.shape[1])) if n > MAX_GRID_YZ]
    if needs_grad and not spec.gradients:
        reasons.append(f"the {family} kernels compute no gradients (an input requires grad)")
    return reasons


def triton_refusal(op: str, reasons: list) -> ValueError:
    """The error of ``use_backend("triton")`` for a call the kernels cannot take, with every reason."""
    return ValueError(f"{op}: the triton backend cannot take this input: " + "; ".join(reasons))


class Route(NamedTuple):
    """Where a call goes: "kernel", "torch_sdpa" or "reference", and why not the kernels."""

    impl: str
    reasons: tuple = ()


def route(op: str, family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
          needs_grad: bool = False, torch_sdpa: bool = False,
          extra_refusals: Optional[list] = None) -> Route:
    """The one decision of which implementation runs a call (see the module docstring).

    Args:
        op: the public function's name, for messages.
        family: a key of ``FAMILIES``.
        q, k, v: the validated (B, H, L, D) inputs (for decode, k/v are the caches).
        needs_grad: the call must be differentiable.
        torch_sdpa: torch's fused SDPA can express this call exactly (the caller knows).
        extra_refusals: reasons of the call's own that the kernels cannot take it.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels refuse a non-empty
            input; the message lists every reason.
    """
    empty = empty_dims(q, k, v)
    if empty:
        return Route("reference", (f"empty input ({', '.join(empty)} = 0): nothing to compute",))
    backend = current_backend()
    if backend == "torch":
        return Route("reference", ("use_backend('torch')",))
    reasons = refusals(family, q, k, v, needs_grad=needs_grad) + list(extra_refusals or ())
    if not reasons:
        return Route("kernel")
    if backend == "triton":
        raise triton_refusal(op, reasons)
    return Route("torch_sdpa" if torch_sdpa else "reference", tuple(reasons))

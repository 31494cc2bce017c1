"""Probes of the environment the kernels run in: whether Triton interprets them on the CPU,
whether the launchers pick the GPU's tiles, and which GPU they compile for. Read at each call
(tests set the variables)."""
from __future__ import annotations

import os
from typing import Optional

import torch


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_tiles() -> bool:
    """Whether the launchers pick the tile sizes (and the TMA reads, ``ops._launch.tma``) they
    use on a GPU: always when compiled, and under the interpreter only with
    FASTATTN_GPU_TILES=1. The interpreter's own tiles are smaller (faster in NumPy), so without
    this the GPU's launches would never be checked on a machine without a GPU;
    tests/test_gpu_tiles.py sets it."""
    return not interpreting() or os.environ.get("FASTATTN_GPU_TILES", "0") not in ("", "0")


# Shared memory one block may use (bytes, opt-in) by compute capability (major * 10 + minor),
# for the GPUs fastattn has tiles for: what a faked capability (FASTATTN_GPU_ARCH) stands for.
ARCH_SHARED_BYTES = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def capability(device: torch.device) -> Optional[int]:
    """The compute capability the kernels compile for on ``device``, as major * 10 + minor (89
    for 8.9): the CUDA device's own when compiled; under the interpreter with
    FASTATTN_GPU_TILES=1, the one FASTATTN_GPU_ARCH names (default 90, the H100), so the tests
    run any GPU's launches without one; None under the interpreter's own tiles.

    Raises:
        ValueError: FASTATTN_GPU_ARCH is not a key of ``ARCH_SHARED_BYTES``.
    """
    if not interpreting():
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    if not gpu_tiles():
        return None
    name = os.environ.get("FASTATTN_GPU_ARCH", "90")
    if not name.isdigit() or int(name) not in ARCH_SHARED_BYTES:
        raise ValueError(f"FASTATTN_GPU_ARCH must be one of {sorted(ARCH_SHARED_BYTES)}, got {name!r}")
    return int(name)

"""Probes of the environment the kernels run in: whether Triton interprets them on the CPU, and
whether the launchers pick the GPU's tiles. Read at each call (tests set the variables)."""
from __future__ import annotations

import os


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

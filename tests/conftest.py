"""Test setup: kernels run on CUDA when there is a GPU, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any module holding @triton.jit kernels is imported,
which is why it is set here, at the top of the conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # pytest-xdist runs one worker per core; more threads per worker only oversubscribe them.
    torch.set_num_threads(1)

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN (or 0xFF bytes), so an unwritten tile fails.
    All launchers allocate them with ``fastattn.ops._launch.empty``."""
    try:
        from fastattn.ops import _launch
    except ImportError:  # no triton here: the kernel tests skip themselves
        yield
        return

    def poisoned(*shape, like, dtype=None):
        t = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(255)

    monkeypatch.setattr(_launch, "empty", poisoned)
    yield

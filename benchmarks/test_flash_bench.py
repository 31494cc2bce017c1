"""pytest-benchmark entry points for the flash suite (same cases as ``fastattn bench``):

    python -m pytest benchmarks/test_flash_bench.py --benchmark-only
"""
import pytest
import torch

from benchmarks import flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = flash.cases(DEVICE, quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.config}-{c.impl}" for c in CASES])
def test_flash(benchmark, case):
    if case.check is not None:
        case.check()
    benchmark.extra_info.update(flops=case.flops, **case.params)
    benchmark(case.fn)

"""pytest-benchmark entry points for the decode suite (same cases as ``fastattn bench``):

    python -m pytest benchmarks/test_decode_bench.py --benchmark-only
"""
import pytest
import torch

from benchmarks import decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = decode.cases(DEVICE, quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.config}-{c.impl}" for c in CASES])
def test_decode(benchmark, case):
    if case.check is not None:
        case.check()
    benchmark.extra_info.update(bytes=case.bytes, **case.params)
    benchmark(case.fn)

"""pytest-benchmark entry points for the block-sparse suite (same cases as ``fastattn bench``):

    python -m pytest benchmarks/test_sparse_bench.py --benchmark-only
"""
import pytest
import torch

from benchmarks import sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = sparse.cases(DEVICE, quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.config}-{c.impl}" for c in CASES])
def test_sparse(benchmark, case):
    if case.check is not None:
        case.check()
    benchmark.extra_info.update(flops=case.flops, **case.params)
    benchmark(case.fn)

"""pytest-benchmark entry points for the linear suite (same cases as ``fastattn bench``,
lengths up to 1024 on a CPU so a run stays short):

    python -m pytest benchmarks/test_linear_bench.py --benchmark-only
"""
import pytest
import torch

from benchmarks import linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [c for c in linear.cases(DEVICE, quick=True) if DEVICE == "cuda" or c.params["seq_len"] <= 1024]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.config}-{c.impl}" for c in CASES])
def test_linear(benchmark, case):
    benchmark.extra_info.update(flops=case.flops, **case.params)
    benchmark(case.fn)

"""pytest-benchmark entry points for the model suite:

    python -m pytest benchmarks/test_models_bench.py --benchmark-only
"""
import pytest
import torch

from benchmarks import models

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = models.cases(DEVICE, quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.suite}-{c.config}-{c.impl}" for c in CASES])
def test_models(benchmark, case):
    benchmark.extra_info.update(**case.params)
    benchmark.pedantic(case.fn, rounds=3, warmup_rounds=1)

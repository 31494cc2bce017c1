"""pytest-benchmark entry points: every case of every ``fastattn bench`` suite (the quick
sizes), the same cases the CLI times, so the numbers agree.

    python -m pytest benchmarks/test_suites.py --benchmark-only            # all suites
    python -m pytest benchmarks/test_suites.py --benchmark-only -k decode  # one suite

On a CPU the linear suite stops at 1024 tokens, so a run stays short.
"""
import pytest
import torch

from fastattn import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_MAX_SEQ_LEN = {"linear": 1024}


def _cases():
    out = []
    for name in bench.SUITES:
        for case in bench.suite(name).cases(DEVICE, quick=True):
            if DEVICE == "cpu" and case.params.get("seq_len", 0) > CPU_MAX_SEQ_LEN.get(name, float("inf")):
                continue
            out.append(pytest.param(case, id=f"{case.suite}-{case.config}-{case.impl}"))
    return out


@pytest.mark.parametrize("case", _cases())
def test_suite(benchmark, case):
    if case.check is not None:
        case.check()
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes, **case.params)
    # Fixed rounds: cases run from a millisecond to seconds, and each call is long enough to time.
    benchmark.pedantic(case.fn, rounds=5, warmup_rounds=1)

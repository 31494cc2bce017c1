"""Timing, FLOP counting and result rows shared by every benchmark suite.

A suite is a module in fastattn/bench/ with ``cases(device, quick) -> list[Case]``.
``fastattn bench`` and the pytest-benchmark entry points (benchmarks/test_suites.py) both run
those cases, so the numbers agree.

FLOPs follow the FlashAttention papers (docs/design.md): 4 * B * H * Lq * Lk * D for the
forward, half that when causal, and the backward counts 2.5x the forward.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Case:
    """One thing to time. ``fn`` runs it once; ``flops``/``bytes`` give TFLOP/s and GB/s."""
    suite: str
    config: str                      # e.g. "b4-h16-l2048-d128-causal"
    impl: str                        # e.g. "fastattn", "torch-flash"
    fn: Callable[[], object]
    flops: float = 0.0
    bytes: float = 0.0
    params: dict = field(default_factory=dict)  # numeric axes for plots (seq_len, density...)
    check: Optional[Callable[[], None]] = None  # raises if the output is wrong


def attention_flops(b, h, lq, lk, d, *, causal=False, backward=False, dv=None) -> float:
    """4*B*H*Lq*Lk*D forward (QK^T and PV, 2 FLOPs per multiply-add); causal halves it;
    forward+backward is 3.5x the forward (the backward counts 2.5x)."""
    dv = d if dv is None else dv
    fwd = 2.0 * b * h * lq * lk * (d + dv)
    if causal:
        fwd /= 2
    return fwd * 3.5 if backward else fwd


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_MALLOC_STEADY = False


def steady_cpu_malloc() -> None:
    """Make the CPU process's resident set track tensors, so peak RSS measures them.

    glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed;
    after that, freed tensors below the threshold stay in the heap and are reused, and the
    resident set no longer moves when a call allocates them: peak RSS reads 0 for everything
    but the largest tensors. Setting the threshold (M_MMAP_THRESHOLD) to 128 KiB turns that
    adjustment off: every buffer of 128 KiB or more gets its own mapping, returned on free.
    Done once per process (``measure`` and ``peak_memory_mb`` call it), before the first
    timing, so that every implementation is timed under the same allocator. No-op where
    glibc is not the allocator."""
    global _MALLOC_STEADY
    if _MALLOC_STEADY:
        return
    _MALLOC_STEADY = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 128 * 1024)


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), so that memory a
    call reuses from the heap is faulted in again and shows in the resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device, *, warmup=3, reps=10, max_seconds=5.0) -> list[float]:
    """Milliseconds per call, one sample per rep after warm-up. CUDA events on a GPU,
    perf_counter on CPU. Stops early once ``max_seconds`` is spent (at least 3 samples)."""
    if torch.device(device).type == "cpu":
        steady_cpu_malloc()
    for _ in range(warmup):
        fn()
    _sync(device)
    samples, start = [], time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    for i in range(reps):
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            samples.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return samples


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(field)


def peak_memory_mb(fn, device) -> float:
    """Peak extra memory of one call in MB. CUDA: the allocator's peak. CPU (Linux): the
    process's resident-set high-water mark, reset just before the call; with
    ``steady_cpu_malloc`` every buffer of 128 KiB or more is mapped on allocation and returned
    on free, and the heap's free pages are handed back before the call (malloc_trim), so
    smaller buffers are faulted in again too: this counts the call's tensors and its kernels'
    scratch, to within a few pages. NaN where /proc is not available."""
    if torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    steady_cpu_malloc()
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        before = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - before) / 1024
    except OSError:
        return float("nan")


def ceilings(device, quick=False) -> dict:
    """The machine's measured limits, taken in the same run as the benchmarks: a matmul's
    TFLOP/s (bf16 8192^3 on a GPU, fp32 1024^3 on a CPU) and a copy's GB/s (bytes read plus
    written)."""
    cuda = torch.device(device).type == "cuda"
    n, dtype = (8192 if not quick else 4096, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    mm = statistics.median(measure(lambda: a @ b, device, warmup=2, reps=10))
    elems = (1 << 28 if cuda else 1 << 24) // 4
    src = torch.randn(elems, device=device)
    dst = torch.empty_like(src)
    cp = statistics.median(measure(lambda: dst.copy_(src), device, warmup=2, reps=10))
    return {"matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_gbps": 2 * src.numel() * 4 / (cp * 1e-3) / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n}


def summarize(case: Case, samples: list[float], memory_mb: float, limits: Optional[dict] = None) -> dict:
    """One result row: median and spread in ms, TFLOP/s, GB/s, % of the measured ceiling
    (matmul for FLOP-bound cases, copy for byte-bound ones), peak memory."""
    median = statistics.median(samples)
    tflops = case.flops / (median * 1e-3) / 1e12 if case.flops else float("nan")
    gbps = case.bytes / (median * 1e-3) / 1e9 if case.bytes else float("nan")
    pct = float("nan")
    if limits and case.flops:
        pct = 100 * tflops / limits["matmul_tflops"]
    elif limits and case.bytes:
        pct = 100 * gbps / limits["copy_gbps"]
    return {
        "suite": case.suite, "config": case.config, "impl": case.impl,
        "median_ms": median, "min_ms": min(samples), "max_ms": max(samples), "reps": len(samples),
        "tflops": tflops, "gbps": gbps, "pct_of_ceiling": pct,
        "peak_mem_mb": memory_mb, **case.params,
    }


def run_case(case: Case, device, *, warmup=3, reps=10, max_seconds=5.0, limits=None) -> dict:
    """Check, then time, then measure memory of one case."""
    if case.check is not None:
        case.check()
    samples = measure(case.fn, device, warmup=warmup, reps=reps, max_seconds=max_seconds)
    return summarize(case, samples, peak_memory_mb(case.fn, device), limits)


def table_main(doc: str, cases: Callable, argv=None) -> None:
    """A suite module's ``python -m`` entry: ``--quick``, ``--device``, ``--reps``; times every
    case of ``cases(device, quick)`` and prints the report's table."""
    import argparse

    from fastattn.bench import report

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [run_case(case, args.device, warmup=1, reps=args.reps, max_seconds=3.0)
            for case in cases(args.device, args.quick)]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(report.table(rows))

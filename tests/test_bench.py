"""The benchmark arithmetic: FLOP formulas, timing statistics, ceilings and speedups."""
import os
import sys

import pytest
import torch

from fastattn.bench import report
from fastattn.bench.common import Case, attention_flops, measure, summarize


def test_attention_flops_follow_the_flashattention_convention():
    # 4 * B * H * Lq * Lk * D for the forward: B=2, H=3, L=1024, D=64.
    assert attention_flops(2, 3, 1024, 1024, 64) == 4 * 2 * 3 * 1024 * 1024 * 64
    assert attention_flops(2, 3, 1024, 1024, 64, causal=True) == 2 * 2 * 3 * 1024 * 1024 * 64
    # forward + backward = forward + 2.5 x forward
    assert attention_flops(1, 1, 8, 8, 16, backward=True) == 3.5 * attention_flops(1, 1, 8, 8, 16)
    # value dim different from the key dim: QK^T uses D, PV uses Dv
    assert attention_flops(1, 1, 4, 4, 16, dv=8) == 2 * 4 * 4 * (16 + 8)


def test_summary_reports_median_spread_throughput_and_ceiling_share():
    case = Case("s", "c", "fastattn", fn=lambda: None, flops=2e9)
    row = summarize(case, [4.0, 1.0, 2.0, 3.0, 100.0], memory_mb=5.0, limits={"matmul_tflops": 2.0, "copy_gbps": 1.0})
    assert row["median_ms"] == 3.0 and row["min_ms"] == 1.0 and row["max_ms"] == 100.0 and row["reps"] == 5
    assert row["tflops"] == pytest.approx(2e9 / 3e-3 / 1e12)
    assert row["pct_of_ceiling"] == pytest.approx(100 * row["tflops"] / 2.0)
    byte_row = summarize(Case("s", "c", "x", fn=lambda: None, bytes=3e6), [1.0], 0.0, {"matmul_tflops": 1, "copy_gbps": 6.0})
    assert byte_row["gbps"] == pytest.approx(3.0) and byte_row["pct_of_ceiling"] == pytest.approx(50.0)


def test_measure_takes_one_sample_per_rep_and_times_real_work():
    calls = []
    samples = measure(lambda: calls.append(torch.randn(256, 256) @ torch.randn(256, 256)), "cpu", warmup=2, reps=7)
    assert len(samples) == 7 and len(calls) == 9 and all(s > 0 for s in samples)


def test_speedups_pair_each_peer_with_fastattn_on_the_same_config():
    rows = [{"suite": "s", "config": "a", "impl": "fastattn", "median_ms": 2.0},
            {"suite": "s", "config": "a", "impl": "torch-math", "median_ms": 6.0},
            {"suite": "s", "config": "a", "impl": "copy-ceiling", "median_ms": 1.0},
            {"suite": "s", "config": "b", "impl": "torch-math", "median_ms": 1.0}]
    assert report.speedups(rows) == [{"suite": "s", "config": "a", "peer": "torch-math", "speedup": 3.0}]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_tensors_that_reuse_heap_memory():
    """glibc raises its mmap threshold when a large block is freed; after that a 4 MB tensor
    comes from the heap, and from the second call on it reuses freed heap memory that peak
    RSS cannot see; small tensors always do. peak_memory_mb must see both on every call. Run
    in a fresh interpreter: the allocator settings are per process."""
    import subprocess

    script = (
        "import torch\n"
        "torch.empty(20 * 2**20, dtype=torch.uint8).fill_(1)  # 20 MB, mapped then freed\n"
        "from fastattn.bench.common import peak_memory_mb\n"
        "f = lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)\n"
        "# 64 pieces of 64 KB (below the mmap threshold: from the heap, reused on later calls)\n"
        "# live together, then their 4 MB concatenation: 8 MB at the peak\n"
        "g = lambda: torch.cat([torch.ones(2**14) for _ in range(64)])\n"
        "g()  # the first call also pays for one-time setup\n"
        "print(([peak_memory_mb(f, 'cpu') for _ in range(3)], [peak_memory_mb(g, 'cpu') for _ in range(3)]))\n")
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    big, pieces = eval(out.stdout.strip().splitlines()[-1])
    # RSS is read in pages around the call, so allow 10% under the tensors' size; nothing else
    # in the call is large.
    assert all(3.6 <= mb < 5.0 for mb in big), big
    assert all(7.2 <= mb < 9.0 for mb in pieces), pieces


def test_plots_draw_each_suite_and_the_grouped_speedups(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for impl, ms in (("fastattn", 1.0), ("torch-math", 3.0)):
        for l in (128, 256):
            for causal in (False, True):
                rows.append({"suite": "flash-fwd", "config": f"l{l}-{causal}", "impl": impl, "median_ms": ms * l,
                             "tflops": 0.1, "gbps": float("nan"), "peak_mem_mb": 1.0, "seq_len": l, "causal": causal})
    for impl, ms in (("sparse", 1.0), ("dense", 2.0), ("sdpa-masked", 4.0)):
        for density in (0.1, 1.0):
            rows.append({"suite": "sparse-fwd", "config": f"local-{density}", "impl": impl, "median_ms": ms,
                         "tflops": 0.1, "gbps": float("nan"), "peak_mem_mb": 0.0, "seq_len": 8192,
                         "density": density, "layout": "local"})
    labels = report._series_labels([r for r in rows if r["suite"] == "flash-fwd"], "seq_len")
    assert set(labels.values()) == {"causal", "non-causal"}
    written = report.plots(rows, tmp_path, {"device": "cpu"})
    assert sorted(p.name for p in written) == ["flash-fwd.png", "sparse-fwd.png", "speedup.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    assert {u["peer"] for u in report.speedups(rows)} == {"torch-math", "dense", "sdpa-masked"}


def test_pytest_benchmark_entry_points_collect_every_suite():
    """benchmarks/test_suites.py lies outside testpaths: collecting it here keeps it working."""
    import subprocess

    from fastattn import bench

    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "benchmarks/test_suites.py"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::test_suite[" in line]
    for name in bench.SUITES:
        assert any(f"test_suite[{name}" in i for i in ids), name


def test_varlen_document_lengths_fill_the_budget_with_a_long_tail():
    from fastattn.bench.varlen import document_lengths

    for sigma in (1.0, 1.75):
        lengths = document_lengths(4096, 1024, sigma, seed=3)
        assert sum(lengths) == 4096 and min(lengths) >= 1 and max(lengths) <= 1024
        assert lengths == document_lengths(4096, 1024, sigma, seed=3)
    # ~2000 documents each (the last one, cut to fit, left out): median max_len / 16 = 64, and
    # the wider log-normal puts far more documents past 4x the median (P(Z > ln 4 / sigma))
    draws = {s: torch.tensor(document_lengths(1 << 18, 1024, s)[:-1], dtype=torch.float64) for s in (1.0, 1.75)}
    assert all(abs(x.median().item() / 64 - 1) < 0.15 for x in draws.values())
    tail = {s: (x > 4 * 64).double().mean().item() for s, x in draws.items()}
    assert tail[1.75] > 2 * tail[1.0] > 0
    with pytest.raises(ValueError, match="budget"):
        document_lengths(0, 16, 1.0)


def test_varlen_suite_impls_agree_and_its_cases_run():
    """The smallest quick CPU config, long-tailed mix: packed, padded-with-mask and the loop give
    the same output on every real token; its cases run (the padded ones under the interpreter
    take seconds), the checked one passes its check."""
    from fastattn.bench import varlen

    config = varlen.configs("cpu", quick=True)[0]
    h, d, budget, max_len, dtype = config
    lengths = varlen.document_lengths(budget, max_len, varlen.SIGMAS[1])
    q, k, v = (torch.randn(budget, h, d) for _ in range(3))
    outs = {name: f() for name, (f, _) in varlen.impls(q, k, v, lengths, "cpu").items()}
    # (B, H, Lmax, D) -> the real rows of each document, packed (total, H, D)
    unpadded = torch.cat([outs["padded-masked"][i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])
    assert outs["fastattn"].shape == (budget, h, d)
    for name, got in (("loop", outs["loop"]), ("padded-masked", unpadded)):
        assert (got - outs["fastattn"]).abs().max() < 1e-5, name
    cases = varlen.cases("cpu", quick=True, config_list=[config])
    assert {(c.suite, c.impl) for c in cases} == {(s, i) for s in ("varlen-fwd", "varlen-fwdbwd")
                                                   for i in ("fastattn", "padded-masked", "loop")}
    assert [c.impl for c in cases if c.check is not None] == ["fastattn"] * len(varlen.SIGMAS)
    tail = f"lognormal{varlen.SIGMAS[1]:g}-docs{len(lengths)}-"
    for case in cases:
        if case.check is not None:
            case.check()
        if case.suite == "varlen-fwdbwd" and tail in case.config:  # the forwards ran above
            grads = case.fn()
            assert len(grads) == 3 and all(torch.isfinite(g).all() for g in grads)


def test_varlen_check_catches_a_wrong_answer(monkeypatch):
    import fastattn
    from fastattn.bench import varlen

    case = next(c for c in varlen.cases("cpu", quick=True, config_list=varlen.configs("cpu", True)[:1])
                if c.check is not None)
    case.check()
    real = fastattn.flash_attention_varlen
    monkeypatch.setattr(fastattn, "flash_attention_varlen", lambda *a, **kw: real(*a, **kw) * 1.01)
    with pytest.raises(AssertionError, match="error"):
        case.check()


def test_mla_decode_suite_reads_the_latent_in_place_and_checks_every_fastattn_row(monkeypatch):
    """The MLA decode rows (quick CPU config) hand attention_with_kvcache q/k head dim 576 and a
    value that is a 512-channel view of the same cache (contiguous and paged), bytes count the
    cache once, and each fastattn row's check passes, then catches a wrong answer."""
    import fastattn
    from fastattn.bench import mla

    rows = mla.cases("cpu", quick=True, config_list=[(2, 4, 64)])
    assert {c.impl for c in rows} >= {"fastattn", "fastattn-paged", "copy-ceiling", "torch-math"}
    ours = [c for c in rows if c.impl.startswith("fastattn")]
    assert all(c.bytes == 2 * 64 * 576 * 4 and c.check is not None for c in ours)
    seen, real = [], fastattn.attention_with_kvcache

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[-1], v.shape[-1], v.data_ptr() == k.data_ptr(), v.stride() == k.stride()))
        return real(q, k, v, *a, **kw)
    monkeypatch.setattr(fastattn, "attention_with_kvcache", spy)
    for case in ours:
        case.check()
    assert seen == [(576, 512, True, True)] * 2
    monkeypatch.setattr(fastattn, "attention_with_kvcache", lambda *a, **kw: real(*a, **kw) * 1.01)
    with pytest.raises(AssertionError, match="error"):
        ours[0].check()


def test_flex_suite_impls_agree_and_its_cases_run():
    """A short quick-form CPU config (256 tokens, 8-16 documents), on the paths a CPU bench
    runs (use_backend("torch"): the kernels are test_flex's): fastattn-flex and fastattn-varlen
    match sdpa-dense-mask by the error rule (float64 SDPA the oracle); every case runs and the
    flex one passes its check."""
    import fastattn
    from fastattn.bench import flex
    from fastattn.testing import assert_within_rule

    lengths = flex.document_lengths(256)
    assert 8 <= len(lengths) <= 16 and sum(lengths) == 256 and min(lengths) >= 1
    mask = flex.dense_mask(lengths, "cpu")
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.float64) for _ in range(3))
    with fastattn.use_backend("torch"):
        oracle = flex.impls(q, k, v, lengths, mask, "cpu")["sdpa-dense-mask"][0]()
        outs = {name: f() for name, (f, _) in flex.impls(q.float(), k.float(), v.float(), lengths, mask,
                                                         "cpu").items()}
        outs["fastattn-varlen"] = outs["fastattn-varlen"].transpose(0, 1)[None]  # (L, H, D) -> (1, H, L, D)
        for name in ("fastattn-flex", "fastattn-varlen"):
            assert_within_rule(name, outs[name], oracle, outs["sdpa-dense-mask"])
        cases = flex.cases("cpu", quick=True, config_list=[(1, 2, 256, 16, torch.float32)])
        assert {(c.suite, c.impl) for c in cases} == {(s, i) for s in ("flex-fwd", "flex-fwdbwd")
                                                       for i in ("fastattn-flex", "fastattn-varlen", "sdpa-dense-mask")}
        assert [c.impl for c in cases if c.check is not None] == ["fastattn-flex"]
        for case in cases:
            if case.check is not None:
                case.check()
            result = case.fn()
            assert all(torch.isfinite(t).all() for t in (result if isinstance(result, tuple) else (result,)))

"""The fastattn command runs end to end: info, check (kernels vs references on this device)
and a tiny bench that writes its table, CSV, JSON and plots."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def fastattn_cmd(*args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_info_names_device_versions_and_backends():
    out = fastattn_cmd("info")
    for word in ("device", "torch", "triton", "kernels", "peer"):
        assert word in out


def test_check_passes_on_this_device():
    out = fastattn_cmd("check")
    assert "all kernels match their references" in out and "FAIL" not in out


def test_bench_quick_writes_results(tmp_path):
    # Without the interpreter fastattn times its CPU fallback here, which keeps this quick.
    out = fastattn_cmd("bench", "--quick", "--suite", "flash", "--reps", "2", "--out", str(tmp_path),
                       env={"TRITON_INTERPRET": "0"})
    assert "median_ms" in out
    results = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in results["results"]}
    assert {"fastattn", "torch-math"} <= impls
    assert results["environment"]["torch"] and (tmp_path / "results.csv").exists()
    assert (tmp_path / "flash-fwd.png").stat().st_size > 10_000

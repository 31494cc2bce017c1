"""scripts/gpu_check.sh, the one-shot GPU check, in its CPU dry run: every stage (install,
environment, ceilings, the test selection, the headline benchmarks, packing) really runs, at
tiny sizes with the kernels in Triton's interpreter, so the script cannot break unnoticed
before a session has the GPU. Also: the headline selection's GPU configs are the issue's, and
``fastattn bench --time-budget`` stops starting cases once the budget is spent."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None,
                    reason="needs coreutils' timeout and tar")
def test_dry_run_packs_env_tests_and_bench_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]  # <= 8 files
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        tar.extractall(tmp_path / "x", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    res = tmp_path / "x" / "gpu-check"

    env = (res / "env.txt").read_text()
    assert "git commit: " in env and "no GPU" in env and "torch 2." in env and "triton " in env
    stages = [line.split("\t") for line in (res / "stages.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in stages] == ["install", "env", "ceilings", "tests", "bench"]
    assert all(s[1] == "0" for s in stages), stages
    assert json.loads((res / "ceilings.json").read_text())["matmul_tflops"] > 0

    junit = ET.parse(res / "tests" / "junit.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    # one per kernel family, picked out of the whole GPU selection (all of which must collect)
    assert int(suite.get("tests")) == 5 and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert "5 passed" in (res / "logs" / "tests.log").read_text()

    results = json.loads((res / "bench" / "results.json").read_text())
    suites = {r["suite"] for r in results["results"]}
    assert {"flash-fwd", "flash-fwdbwd", "decode", "mla-decode", "sparse-fwd", "peakmem-fwd", "peakmem-fwdbwd",
            "linear-fwd", "linear-fwdbwd"} <= suites
    assert any(r["config"].endswith("-d512-causal") for r in results["results"])
    impls = {r["impl"] for r in results["results"]}
    assert {"fastattn", "torch-flash", "sparse", "dense", "fastattn-linear", "copy-ceiling"} <= impls
    assert "torch-math" not in impls
    assert results["environment"]["interpreter"] == "1" and results["environment"]["ceilings"]["copy_gbps"] > 0
    assert (res / "bench" / "results.csv").exists() and (res / "bench" / "flash-fwd.png").stat().st_size > 10_000


def test_headline_gpu_configs_are_the_issues():
    """The CUDA configs, read without a GPU (building them needs none)."""
    from fastattn.bench import headline

    groups = headline.configs("cuda")
    flash = groups["flash"]
    mha = [c for c in flash if c[1] == c[2]]
    assert {c[3] for c in mha} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c[4] for c in mha} == {64, 128, 256} and {c[5] for c in mha} == {False, True}
    assert len(mha) == 6 * 3 * 2 and all(b * l == 16384 for b, _, _, l, _, _ in flash)
    assert {hq // hkv for _, hq, hkv, *_ in flash} == {1, 8}
    assert {c[3] for c in groups["decode"]} == {4096, 8192, 16384, 32768}
    assert groups["flash-d512"] == [(4, 4, 4, 4096, 512, False), (4, 4, 4, 4096, 512, True)]
    assert {c[0] for c in groups["mla"]} == {1, 16} and {c[2] for c in groups["mla"]} == {4096, 32768}
    (sparse,) = groups["sparse"]
    assert sparse[2] == 16384 and 0.1 in sparse[-1] and 1.0 in sparse[-1]
    assert groups["peakmem"] == [(1, 16, 16, 65536, 128, True)]
    assert {c[2] for c in groups["linear"]} == {1024, 2048, 4096, 8192, 16384, 32768}
    assert all(c[-1] for c in groups["linear"])  # causal


def test_bench_time_budget_runs_the_first_case_and_skips_the_rest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastattn", "bench", "--suite", "decode", "--quick",
                           "--impl", "copy-ceiling", "--reps", "1", "--warmup", "0", "--time-budget", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["results"]) == 1
    assert results["skipped"] and all("time budget" in s["error"] for s in results["skipped"])


def test_flex_may_recompile_for_every_headline_shape():
    from torch._dynamo import config

    from fastattn.bench import headline

    saved = config.recompile_limit
    try:
        headline.allow_flex_recompiles()
        assert config.recompile_limit >= 256
    finally:
        config.recompile_limit = saved

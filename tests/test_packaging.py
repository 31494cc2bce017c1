"""What a user installs: a wheel built from this tree carries the benchmark suites, and its
``fastattn bench`` runs from a folder outside any checkout; ``import fastattn`` loads neither
matplotlib nor the suites.

The wheel test builds with pip (build isolation: pip fetches setuptools from the index) and
installs the wheel without dependencies into a fresh venv that sees this interpreter's
site-packages, so torch is never downloaded. About a minute; CI runs it.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.packaging


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_import_loads_neither_matplotlib_nor_the_suites():
    # Triton blocked: fastattn and its error rule (fastattn.testing) import on a box without it.
    out = run([sys.executable, "-c", "import sys; sys.modules['triton'] = None; import fastattn, fastattn.testing; "
               "print([m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m.startswith('fastattn.bench')])"],
              cwd=ROOT)
    assert out.strip() == "[]"


def test_wheel_runs_bench_outside_the_checkout(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fastattn", src / "fastattn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("fastattn-*.whl")
    assert "fastattn/bench/flash.py" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    # torch, triton, matplotlib: this interpreter's, appended after the venv's own site-packages.
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site / "outer.pth").write_text("\n".join(outer) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    location = run([python, "-c", "import fastattn; print(fastattn.__file__)"], cwd=elsewhere)
    assert location.startswith(str(site)), location
    # Without the interpreter fastattn times its CPU fallback, which keeps this quick.
    out = run([venv / "bin" / "fastattn", "bench", "--quick", "--suite", "flash", "--reps", "2", "--out", "out"],
              cwd=elsewhere, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert "median_ms" in out  # the table
    results = json.loads((elsewhere / "out" / "results.json").read_text())
    assert {r["impl"] for r in results["results"]} >= {"fastattn", "torch-math"}
    assert results["environment"]["git_commit"] is None  # not a checkout
    assert (elsewhere / "out" / "results.csv").read_text().startswith("suite,config,impl")

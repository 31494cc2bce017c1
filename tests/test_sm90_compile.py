"""Every kernel compiles for the H100 and fits its shared memory (see tests/sm90.py).

Compiling takes seconds per kernel, so CI checks the largest tiles of each op; run
``python tests/sm90.py all`` for the whole grid after changing a kernel or a block config.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(__file__)
CI_CASES = ["flash-float16-d128", "flash-bfloat16-d80", "flash-float32-d256"]
CI_CASES += ["decode-bfloat16-d256"]
CI_CASES += ["sparse-float16-d128-bs128"]
CI_CASES += ["linear-bfloat16-m256-dv256"]


@pytest.mark.parametrize("case", CI_CASES)
def test_compiles_for_h100_and_fits_shared_memory(case):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90.py"), case],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fits"], f"{case} exceeds the H100's shared memory: {result['shared']}"

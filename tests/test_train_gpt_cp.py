"""examples/train_gpt.py --cp 2: two gloo processes, each holding a zig-zag shard of every
sequence (ring attention, RoPE at global positions, gradients averaged by DDP), or with
--docs --pack an uneven contiguous share of the packed documents, take the steps of one
process: every loss within the docs/design.md error rule of the float64 run, with the float32
run in one process as the yardstick."""
import importlib
import os
import sys

import pytest
import torch

from helpers import assert_close_rule

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("data", [[], ["--docs", "--pack"]], ids=["zigzag", "packed"])
def test_train_gpt_context_parallel_takes_one_process_steps(data):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    gpt = importlib.import_module("train_gpt")
    common = ["--tiny", "--steps", "4", "--backend", "torch", "--sample-tokens", "2", "--val-batches", "1", *data]
    cp = gpt.main(common + ["--cp", "2"])
    ref32 = gpt.main(common)
    ref64 = gpt.main(common + ["--dtype", "float64"])
    for key in ("losses", "val_loss"):
        assert_close_rule(f"train_gpt --cp 2 {data} {key}", torch.tensor(cp[key], dtype=torch.float32),
                          torch.tensor(ref64[key], dtype=torch.float64), torch.tensor(ref32[key], dtype=torch.float32))
    assert cp["sample"] == ref32["sample"]

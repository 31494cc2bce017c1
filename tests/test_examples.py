"""Smoke tests of examples/: each trains a tiny config for a few steps on CPU and its loss falls;
train_gpt on the Triton kernels (interpreter on CPU) follows the plain-PyTorch losses within the
docs/design.md error rule, measured against the same run in float64."""
import importlib
import os
import sys

import pytest
import torch

from tests.helpers import assert_close_rule

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


# The smoke tests run the plain-PyTorch backend: under the conftest's TRITON_INTERPRET=1 "auto"
# would run every kernel in the interpreter, minutes per example. The kernels are exercised by
# test_gpt_triton_matches_torch_losses (and by each op's own tests).
TORCH = ["--backend", "torch"]


def _falls(losses, k=3):
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first, f"loss did not fall: {losses}"


def test_long_context(capsys):
    results = _example("long_context").main(["--tiny", "--steps", "12", "--attention", "sparse"] + TORCH)
    r = results[0]
    assert r["last_loss"] < r["first_loss"] and 0.0 <= r["accuracy"] <= 1.0
    assert "held-out accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("attention", ["flash", "linear"])
def test_long_context_attentions(attention):
    r = _example("long_context").main(["--tiny", "--steps", "10", "--attention", attention] + TORCH)[0]
    assert r["last_loss"] < r["first_loss"]


def test_train_vit():
    pytest.importorskip("sklearn", reason="pip install scikit-learn (the examples extra)")
    r = _example("train_vit").main(["--tiny", "--steps", "30", "--lr", "3e-3"] + TORCH)
    _falls(r["losses"])
    assert 0.0 <= r["test_accuracy"] <= 1.0


def test_train_gpt(tmp_path):
    ck = str(tmp_path / "gpt.pt")
    r = _example("train_gpt").main(["--tiny", "--steps", "10", "--checkpoint", ck] + TORCH)
    _falls(r["losses"])
    assert r["cache_matches"], "greedy decoding with the KV cache differs from recomputing"
    # resuming from the checkpoint continues at step 10: two more steps only
    r2 = _example("train_gpt").main(["--tiny", "--steps", "12", "--checkpoint", ck] + TORCH)
    assert len(r2["losses"]) == 2


def test_train_gpt_packed_documents_train_like_padded_ones():
    """--docs --pack (documents in one row, cu_seqlens) takes the same gradient steps as
    --docs (padded): the same documents and targets, so the same losses up to float32
    rounding of a few steps (1e-4 relative)."""
    gpt = _example("train_gpt")
    packed = gpt.main(["--tiny", "--docs", "--pack", "--steps", "6"] + TORCH)
    padded = gpt.main(["--tiny", "--docs", "--steps", "6"] + TORCH)
    assert packed["losses"][-1] < packed["losses"][0]
    diff = max(abs(a - b) for a, b in zip(packed["losses"], padded["losses"]))
    assert diff <= 1e-4 * max(packed["losses"]), (packed["losses"], padded["losses"])


def test_train_seq2seq():
    r = _example("train_seq2seq").main(["--tiny", "--steps", "12"] + TORCH)
    _falls(r["losses"])
    assert 0.0 <= r["greedy"] <= 1.0 and 0.0 <= r["beam"] <= 1.0


def test_train_mlm():
    r = _example("train_mlm").main(["--tiny", "--steps", "10"] + TORCH)
    _falls(r["losses"])
    assert 0.0 <= r["pretrained"] <= 1.0 and 0.0 <= r["scratch"] <= 1.0


def test_gpt_triton_matches_torch_losses():
    """First losses of train_gpt (tiny, flash attention) on backend "triton" vs "torch", both
    against the float64 run: |triton - fp64| <= 2 |torch fp32 - fp64| + 1e-5 per loss."""
    gpt = _example("train_gpt")
    common = ["--tiny", "--steps", "3", "--warmup", "1", "--sample-tokens", "2"]
    ref64 = gpt.main(common + ["--backend", "torch", "--dtype", "float64"])["losses"]
    ref32 = gpt.main(common + ["--backend", "torch"])["losses"]
    kern = gpt.main(common + ["--backend", "triton"])["losses"]
    assert_close_rule("train_gpt losses", torch.tensor(kern, dtype=torch.float32),
                      torch.tensor(ref64, dtype=torch.float64), torch.tensor(ref32, dtype=torch.float32))


@pytest.mark.parametrize("attention", ["sparse", "linear", "performer"])
def test_long_context_triton_matches_torch_losses(attention):
    """long_context's first losses (tiny, 2 steps at 32 tokens then 1 at 64, batches of 2) with
    the sparse, linear and Performer kernels vs the plain-PyTorch run, both against float64
    (error rule). The interpreter's time is per program, so per batch row: 2 rows take the
    same kernel paths as 8."""
    lc = _example("long_context")
    common = ["--tiny", "--attention", attention, "--warm-len", "32", "--seq-len", "64", "--warm-steps", "2",
              "--steps", "1", "--warmup", "1", "--batch", "2", "--eval-examples", "2"]
    ref64 = lc.main(common + ["--backend", "torch", "--dtype", "float64"])[0]
    ref32 = lc.main(common + ["--backend", "torch"])[0]
    kern = lc.main(common + ["--backend", "triton"])[0]
    losses = [torch.tensor(r["losses"], dtype=dt)
              for r, dt in ((kern, torch.float32), (ref64, torch.float64), (ref32, torch.float32))]
    assert len(losses[0]) == 3
    assert_close_rule(f"long_context {attention} losses", *losses)


def test_serve_gpt(capsys):
    """Chunked prefill mixed with decoding in one ragged model call per step, continuous
    batching over a paged cache and static padded batching serve the same tiny workload to the
    same tokens, which equal each request's greedy tokens generated alone; the paged pool
    peaks below the padded buffers."""
    r = _example("serve_gpt").main(["--tiny"] + TORCH)
    assert r["same_tokens"] == 1.0 and r["same_as_alone"] == 1.0
    m, c, s = r["chunked"], r["continuous"], r["static"]
    assert m["tokens"] == c["tokens"] == s["tokens"] > 0 and min(x["tokens_per_s"] for x in (m, c, s)) > 0
    assert m["peak_cache_mib"] <= s["peak_cache_mib"] and c["peak_cache_mib"] <= s["peak_cache_mib"]
    assert "same tokens for 100%" in capsys.readouterr().out

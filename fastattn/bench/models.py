"""Model suite: GPT text generation with the KV cache (prefill once, then one token per step
through fastattn.attention_with_kvcache; contiguous ``KVCache`` or paged ``PagedKVCache``)
against recomputing the whole sequence every step,
and one GPT training step (forward + backward) per attention choice. Whole-model numbers:
the attention is one part of each.

On a GPU: bf16, a GPT-2-small-like model (12 layers, width 768, 12 heads). On a CPU: fp32, a
4-layer width-256 model, where fastattn runs its PyTorch fallback.

    python -m fastattn.bench.models [--quick]       # a table on the terminal
"""
from __future__ import annotations

import argparse

import torch

from fastattn.bench.common import Case, run_case
from fastattn.models import GPT, GPTConfig
from fastattn.nn import Flash, Linear, Performer

SUITE = "models"


def _model(device, attention):
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    width, layers, heads = (768, 12, 12) if cuda else (256, 4, 4)
    cfg = GPTConfig(vocab_size=8192, d_model=width, n_layers=layers, n_heads=heads, positional="rope",
                    max_seq_len=2048, attention=attention)
    return GPT(cfg).to(device=device, dtype=dtype), cfg


def cases(device, quick=False):
    cuda = torch.device(device).type == "cuda"
    out = []
    model, cfg = _model(device, Flash())
    batch, prompt, new = (8, 512, 128) if cuda else (2, 64, 16 if quick else 32)
    idx = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    params = {"batch": batch, "prompt": prompt, "new_tokens": new}
    for impl, use_cache, paged in (("kv-cache", True, False), ("paged-kv-cache", True, True),
                                   ("recompute", False, False)):
        out.append(Case(SUITE, f"generate-b{batch}-p{prompt}-n{new}", impl,
                        lambda use_cache=use_cache, paged=paged: model.generate(idx, new, use_cache=use_cache,
                                                                                paged=paged), params=params))
    seq = 1024 if cuda else 128
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    choices = {"flash": Flash(), "performer": Performer(num_features=64), "linear": Linear()}
    for name, attention in choices.items():
        m, _ = _model(device, attention)

        def step(m=m):
            _, loss = m(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        out.append(Case(SUITE, f"train-step-b{batch}-l{seq}", name, step, params={"seq_len": seq}))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"{'config':32} {'impl':14} {'median ms':>10}")
    for case in cases(args.device, args.quick):
        row = run_case(case, args.device, warmup=1, reps=3, max_seconds=20.0)
        print(f"{row['config']:32} {row['impl']:14} {row['median_ms']:10.1f}", flush=True)


if __name__ == "__main__":
    main()

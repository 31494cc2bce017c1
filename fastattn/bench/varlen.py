"""Packed variable-length sequences: time and peak memory of causal attention over documents of
long-tailed lengths, three ways.

* ``fastattn``: ``fastattn.flash_attention_varlen`` on the packed (total, H, D) tensors and
  their cu_seqlens (no padding);
* ``padded-masked``: ``fastattn.flash_attention`` on the documents padded to the longest one,
  (B, H, Lmax, D), with a (B, 1, 1, Lmax) key-padding mask (what a batch without packing runs;
  it computes and stores the padding too);
* ``loop``: a Python loop of ``fastattn.flash_attention`` over the documents, one (1, H, L, D)
  view each (no padding, one launch per document).

Document lengths are drawn log-normal (``document_lengths``: median ``max_len / 16``, sigma 1
and 1.75, clipped to [1, max_len]) until they fill a token budget, the way a data loader packs
documents into a row; the budget is the plot's x axis (``seq_len``). Forward and
forward+backward; FLOPs count the useful work only (causal attention inside each document), so
TFLOP/s shows what the padding wastes.

CUDA: bf16, 16 heads of 128, budgets of 16k and 32k tokens, documents up to 8192. CPU: fp32,
4 heads of 64, budgets of 1024 and 4096 tokens, documents up to 1024; ``--quick``: 1 head of
16, 128 and 256 tokens, documents up to 128: without the interpreter under a minute; under
TRITON_INTERPRET=1 minutes (each interpreted program takes tens of ms, and the padded batch
and the loop run one or more per document). On a CPU without the interpreter fastattn runs its
fallbacks.

    python -m fastattn.bench.varlen [--quick]    # the table on the terminal
    fastattn bench --suite varlen [--quick]      # the same cases through the CLI
"""
from __future__ import annotations

import math

import torch

import fastattn
from fastattn.bench.common import Case, attention_flops, table_main
from fastattn.testing import assert_within_rule
from fastattn.ops.flash.reference import varlen_attention_reference

SUITE = "varlen"
SIGMAS = (1.0, 1.75)  # the log-normal's spread: moderate, and a long tail


def document_lengths(budget: int, max_len: int, sigma: float, seed: int = 0) -> list[int]:
    """Log-normal document lengths (median ``max_len / 16``, log-space std ``sigma``), rounded
    and clipped to [1, max_len], drawn until they fill ``budget`` tokens; the last document is
    cut to fit, so the lengths sum to ``budget`` exactly. Deterministic for a seed."""
    if budget < 1 or max_len < 1:
        raise ValueError(f"document_lengths: budget ({budget}) and max_len ({max_len}) must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < budget:
        draw = torch.empty(64, dtype=torch.float64).log_normal_(math.log(max_len / 16), sigma, generator=gen)
        for n in draw.round().clamp(1, max_len).long().tolist():
            n = min(n, budget - total)
            lengths.append(n)
            total += n
            if total == budget:
                break
    return lengths


def configs(device, quick):
    """(heads, head_dim, token budget, max document length, dtype)."""
    if torch.device(device).type == "cuda":
        return [(16, 128, budget, 8192, torch.bfloat16) for budget in ((16384,) if quick else (16384, 32768))]
    if quick:
        return [(1, 16, budget, 128, torch.float32) for budget in (128, 256)]
    return [(4, 64, budget, 1024, torch.float32) for budget in (1024, 4096)]


def _checker(h, d, dtype, device):
    """Before timing flash_attention_varlen: on an awkward small mix (1, 17, 63, 113 tokens and
    an empty document), its error vs the per-sequence float64 reference passes the
    docs/design.md rule (fastattn.testing) against that reference in the benchmark dtype;
    raises AssertionError when it does not."""
    def check():
        cu = torch.tensor([0, 1, 18, 18, 81, 194], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(194, h, d, device=device, dtype=dtype) for _ in range(3))
        oracle = varlen_attention_reference(q.double(), k.double(), v.double(), cu, cu, window=(None, 0))
        assert_within_rule("flash_attention_varlen", fastattn.flash_attention_varlen(q, k, v, cu, cu, causal=True),
                           oracle, varlen_attention_reference(q, k, v, cu, cu, window=(None, 0)))
    return check


def _padded(x: torch.Tensor, lengths: list[int], lmax: int) -> torch.Tensor:
    """Packed (total, H, D) -> (B, H, Lmax, D), zeros after each document."""
    out = x.new_zeros(len(lengths), lmax, *x.shape[1:])  # (B, Lmax, H, D)
    for i, doc in enumerate(torch.split(x, lengths)):
        out[i, :doc.shape[0]] = doc
    return out.transpose(1, 2).contiguous()  # (B, Lmax, H, D) -> (B, H, Lmax, D)


def impls(q, k, v, lengths, device):
    """name -> (f() -> out, the tensors that take gradients), on one packed batch."""
    lmax = max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    padded = [_padded(t.detach(), lengths, lmax).requires_grad_() for t in (q, k, v)]
    keep = torch.arange(lmax, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]  # (B, Lmax)
    mask = keep[:, None, None, :]  # (B, 1, 1, Lmax): key j of document b is real
    starts = cu.tolist()

    def loop():
        # (L, H, D) -> (1, H, L, D) views in, (1, H, L, D) -> (L, H, D) out
        return torch.cat([fastattn.flash_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                                   causal=True)[0].transpose(0, 1)
                          for a, b in zip(starts, starts[1:])])

    return {
        "fastattn": (lambda: fastattn.flash_attention_varlen(q, k, v, cu, cu, lmax, lmax, causal=True), (q, k, v)),
        "padded-masked": (lambda: fastattn.flash_attention(*padded, causal=True, attn_bias=mask), padded),
        "loop": (loop, (q, k, v)),
    }


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own
    out = []
    for h, d, budget, max_len, dtype in (config_list if config_list is not None else configs(device, quick)):
        for sigma in SIGMAS:
            lengths = document_lengths(budget, max_len, sigma)
            lmax = max(lengths)
            padding = 1 - budget / (len(lengths) * lmax)  # of the padded batch
            name = f"h{h}-d{d}-t{budget}-lognormal{sigma:g}-docs{len(lengths)}-lmax{lmax}-pad{round(100 * padding)}"
            # the plot's series: sigma (documents, longest and padding are in the config's name)
            params = {"seq_len": budget, "sigma": sigma}
            flops = sum(attention_flops(1, h, n, n, d, causal=True) for n in lengths)
            q, k, v = (torch.randn(budget, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            for impl, (f, leaves) in impls(q, k, v, lengths, device).items():
                check = _checker(h, d, dtype, device) if impl == "fastattn" else None
                out.append(Case(SUITE + "-fwd", name, impl, lambda f=f: f(), flops=flops, params=params,
                                check=check))
                do = torch.randn_like(leaves[0])  # out has q's shape (Dv = D)

                def step(f=f, leaves=leaves, do=do):
                    return torch.autograd.grad(f(), leaves, do)
                out.append(Case(SUITE + "-fwdbwd", name, impl, step, flops=flops * 3.5, params=params))
    return out


def main(argv=None):
    table_main(__doc__, cases, argv)


if __name__ == "__main__":
    main()

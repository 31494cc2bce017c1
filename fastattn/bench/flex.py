"""Document masking suite: causal attention over packed documents, as FlexAttention runs it,
against a dense mask and the varlen lower bound.

One row of ``seq_len`` tokens holds 8-16 documents of random lengths (``document_lengths``);
query i sees key j iff both lie in the same document and j <= i. Four ways:

* ``fastattn-flex``: ``fastattn.flex_attention`` with ``fastattn.flex.document_block_mask``
  (built at block level: no (L, L) object; blocks outside the documents are never visited);
* ``fastattn-varlen``: ``fastattn.flash_attention_varlen`` on the same documents, causal (the
  lower bound: no mask evaluation at all);
* ``sdpa-dense-mask``: torch SDPA with a dense (L, L) bool mask, built once per length (what a
  user without block masks runs; its cost does not fall with the number of documents). Where
  SDPA's (L, L) bias of the mask would not fit in free device memory, its call raises
  MemoryError saying so, and ``fastattn bench`` lists it as skipped;
* ``torch-flex-compiled``: ``torch.compile(flex_attention)`` with ``create_block_mask``, on CUDA
  only: left out on a CPU, where torch's FlexAttention has no backward (NotImplementedError for
  inputs that require grad) and its compiled forward is not the GPU kernel this row is for.

Forward and forward+backward. FLOPs count the useful work only (causal attention inside each
document), for every impl, so TFLOP/s shows what a dense mask wastes.

CUDA: bf16, B=1, H=16, D=64 and 128, 8k, 16k and 32k tokens (``--quick``: D=128). CPU: fp32,
B=1, H=2, D=64, 1k and 2k tokens (without ``--quick`` also 4k and D=128): there fastattn-flex
runs its chunked reference and fastattn-varlen its fallback (the kernels need a GPU, or
TRITON_INTERPRET=1).

    python -m fastattn.bench.flex [--quick]    # the table on the terminal
    fastattn bench --suite flex [--quick]      # the same cases through the CLI
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.common import Case, attention_flops, table_main
from fastattn.flex import document_block_mask
from fastattn.testing import assert_within_rule

SUITE = "flex"
CHECK_LEN = 2048  # tokens of the instance the check runs on (the longest quick CPU length)


def configs(device, quick):
    """(batch, heads, seq_len, head_dim, dtype)."""
    if torch.device(device).type == "cuda":
        dims = (128,) if quick else (64, 128)
        return [(1, 16, l, d, torch.bfloat16) for d in dims for l in (8192, 16384, 32768)]
    if quick:
        return [(1, 2, l, 64, torch.float32) for l in (1024, 2048)]
    return [(1, 2, l, d, torch.float32) for d in (64, 128) for l in (1024, 2048, 4096)]


def document_lengths(seq_len: int, seed: int = 0) -> list[int]:
    """8 to 16 documents of random lengths (each >= 1) that sum to ``seq_len``: the count drawn
    uniformly, the boundaries at distinct random positions. Deterministic for a seed.

    Raises:
        ValueError: seq_len < 16 (too short for 16 documents)."""
    if seq_len < 16:
        raise ValueError(f"document_lengths: seq_len ({seq_len}) must be >= 16")
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 17, (), generator=gen))
    cuts = (torch.randperm(seq_len - 1, generator=gen)[:n - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, seq_len]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def dense_mask(lengths: list[int], device) -> torch.Tensor:
    """(L, L) bool: query i sees key j iff they share a document and j <= i."""
    document_id = _document_id(lengths, device)
    pos = torch.arange(document_id.numel(), device=device)
    return (document_id[:, None] == document_id[None, :]) & (pos[None, :] <= pos[:, None])


def _document_id(lengths, device) -> torch.Tensor:
    """(L,) int32: the document of each token."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32, device=device),
                                   torch.tensor(lengths, device=device))


def impls(q, k, v, lengths, mask, device):
    """name -> (f() -> out, the tensors that take gradients) on one packed row. q, k, v:
    (1, H, L, D) leaves; ``mask``: ``dense_mask(lengths)``, for sdpa-dense-mask.
    fastattn-varlen takes packed (L, H, D) copies as leaves (its layout) and returns (L, H, D)."""
    cuda = torch.device(device).type == "cuda"
    document_id = _document_id(lengths, device)
    block_mask = document_block_mask(document_id, causal=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]  # (L, H, D)
    lmax = max(lengths)
    out = {
        "fastattn-flex": (lambda: fastattn.flex_attention(q, k, v, block_mask=block_mask), (q, k, v)),
        "fastattn-varlen": (lambda: fastattn.flash_attention_varlen(*packed, cu, cu, lmax, lmax, causal=True),
                            packed),
        "sdpa-dense-mask": (_sdpa_dense(q, k, v, mask), (q, k, v)),
    }
    if cuda:
        out["torch-flex-compiled"] = (_torch_flex(q, k, v, document_id), (q, k, v))
    return out


def _sdpa_dense(q, k, v, mask):
    """f() -> SDPA with ``mask``; on CUDA, where SDPA's additive bias of the mask (L * L elements
    in q's dtype) would not fit in free memory, f raises MemoryError instead."""
    if q.device.type == "cuda":
        need = mask.numel() * q.element_size()
        free, _ = torch.cuda.mem_get_info(q.device)
        if need > free:
            def too_big():
                raise MemoryError(f"sdpa-dense-mask: the bias of the ({mask.shape[0]}, {mask.shape[1]}) mask needs "
                                  f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free: not run")
            return too_big
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _torch_flex(q, k, v, document_id):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal_document(b, h, q_idx, kv_idx):
        return (document_id[q_idx] == document_id[kv_idx]) & (kv_idx <= q_idx)

    n = document_id.numel()
    block_mask = create_block_mask(causal_document, None, None, n, n, device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _checker(h, d, seq_len, dtype, device):
    """Before timing fastattn-flex: on min(seq_len, CHECK_LEN) tokens of 8-16 documents, its
    output passes the docs/design.md rule (fastattn.testing) against sdpa-dense-mask in float64,
    with sdpa-dense-mask in the benchmark dtype as the yardstick; raises AssertionError when it
    does not."""
    def check():
        n = min(seq_len, CHECK_LEN)
        lengths = document_lengths(n, seed=1)
        mask = dense_mask(lengths, device)
        q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))
        block_mask = document_block_mask(_document_id(lengths, device), causal=True)
        with torch.no_grad():
            got = fastattn.flex_attention(q, k, v, block_mask=block_mask)
            oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
            base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert_within_rule("flex_attention (document mask)", got, oracle, base)
    return check


def cases(device, quick=False, config_list=None):
    # config_list: tuples as configs() returns, to run instead of this suite's own
    out = []
    masks = {}  # seq_len -> dense mask: one per length, shared by the head dims
    for b, h, l, d, dtype in (config_list if config_list is not None else configs(device, quick)):
        lengths = document_lengths(l)
        if l not in masks:
            masks[l] = dense_mask(lengths, device)
        name = f"b{b}-h{h}-l{l}-d{d}-docs{len(lengths)}-causal"
        params = {"seq_len": l, "head_dim": d, "documents": len(lengths)}
        flops = sum(attention_flops(b, h, n, n, d, causal=True) for n in lengths)
        q, k, v = (torch.randn(b, h, l, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for impl, (f, leaves) in impls(q, k, v, lengths, masks[l], device).items():
            check = _checker(h, d, l, dtype, device) if impl == "fastattn-flex" else None
            out.append(Case(SUITE + "-fwd", name, impl, lambda f=f: _no_grad(f), flops=flops, params=params,
                            check=check))
            do = torch.randn_like(leaves[0])  # out has the shape of the first leaf (Dv = D)

            def step(f=f, leaves=leaves, do=do):
                return torch.autograd.grad(f(), leaves, do)
            out.append(Case(SUITE + "-fwdbwd", name, impl, step, flops=flops * 3.5, params=params))
    return out


def _no_grad(f):
    with torch.no_grad():
        return f()


def main(argv=None):
    table_main(__doc__, cases, argv)


if __name__ == "__main__":
    main()

"""attention_with_kvcache's one entry below the public function: ``run(call)`` asks the router
where a validated call goes and runs it there, on the kernels, torch's fused SDPA, or the
reference. Nothing else chooses among them.

    route        plain or paged call                          ragged new tokens
    kernel       ops/decode/op.py (append + split-KV)         the same, packed
    reference    reference.decode_reference + the append      fallback.decode_ragged: padded rows,
    torch_sdpa   fallback.decode_sdpa: one batched SDPA call  masked, one batched call either way

An 8-bit cache (``call.k_scale``) off the kernels first goes through ``fallback.dequantized``
(the quantizing append, then 16/32-bit copies of the caches), then any of the routes above.

While torch.compile traces, every call off the kernels runs ``fallback.decode_masked``, which
reads nothing on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import backend
from fastattn.ops.decode import fallback
from fastattn.validation import DecodeCall

OP = "attention_with_kvcache"


def run(call: DecodeCall):
    """out, or (out, lse) with ``call.return_lse``: shapes as attention_with_kvcache documents.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels cannot take the call."""
    route = backend.route(OP, "decode", *_router_shapes(call), needs_grad=call.needs_grad,
                          torch_sdpa=fallback.sdpa_expressible(call), extra_refusals=_no_tiles(call))
    if route.impl != "kernel" and call.k_scale is not None:  # 8-bit cache: append, then 16/32-bit copies
        call = fallback.dequantized(call)
    if route.impl == "kernel":
        out, lse = _kernels(call)
    elif call.cu_seqlens_q is not None:
        out, lse = fallback.decode_ragged(call, sdpa=route.impl == "torch_sdpa")
    elif torch.compiler.is_compiling():  # the other fallbacks read lengths on the host
        out, lse = fallback.decode_masked(call)
    elif route.impl == "torch_sdpa":
        out, lse = fallback.decode_sdpa(call), None
    else:
        out, lse = _reference(call)
    return (out, lse) if call.return_lse else out


def _no_tiles(call: DecodeCall) -> list[str]:
    """Why the kernels have no tiles for this call on its GPU (``op.wide_tiles``): a head dim
    past 256 that no tile fits into the GPU's shared memory per block (on sm_75 all but fp16 at
    512)."""
    head_dim = max(call.q.shape[-1], call.layout.head_dim_v)
    if head_dim <= 256 or not backend.triton_available():
        return []
    from fastattn.ops.decode import op  # imports triton

    if op.wide_tiles(head_dim, call.q.dtype, call.q.device) is not None:
        return []
    return [f"{str(call.q.dtype).removeprefix('torch.')} at head dim {head_dim} needs more shared memory per block "
            f"than the GPU of {call.q.device} has"]


def _router_shapes(call: DecodeCall) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) as the router reads them, (B, H, L, D): packed q as a stride-0 view over the
    sequences, paged caches as shape-only tensors of the logical (B, Hkv, Lmax, D) caches."""
    q, lay = call.q, call.layout
    if call.cu_seqlens_q is not None:
        q = q.transpose(0, 1)[None].expand(lay.batch, -1, -1, -1)  # (total, Hq, D) -> (B, Hq, total, D)
    if not lay.paged:
        return q, call.k_cache, call.v_cache
    meta = torch.empty((), device="meta")  # no memory: the router reads shapes only
    return q, meta.expand(lay.batch, lay.kv_heads, lay.lmax, lay.head_dim), \
        meta.expand(lay.batch, lay.kv_heads, lay.lmax, lay.head_dim_v)


def _kernels(call: DecodeCall):
    from fastattn.ops.decode import op as decode_op  # imports triton, so only when used

    left, right = call.band
    longest = None if call.key_range is None else call.key_range[1]  # steers the split count only
    return decode_op.decode_attn(
        call.q, call.k_cache, call.v_cache, call.seqlens, k_new=call.k_new, v_new=call.v_new,
        alibi=call.alibi_slopes, scale=call.scale, softcap=call.softcap, window_left=left, window_right=right,
        num_splits=call.num_splits, max_seqlen_k=longest, block_table=call.block_table,
        cu_seqlens_q=call.cu_seqlens_q, max_seqlen_q=call.max_seqlen_q,
        sinks=None if call.sinks is None else call.sinks.float().contiguous(), k_scale=call.k_scale,
        v_scale=call.v_scale, **call.rotary())


def _reference(call: DecodeCall):
    """The spec: decode_reference on each sequence's logical cache (gathered from its pages),
    then the append. Differentiable."""
    from fastattn.ops.decode.reference import append_paged_reference, append_reference, decode_reference, gather_pages

    k_cache, v_cache = call.k_cache, call.v_cache
    if call.layout.paged:  # gathered before the append
        k_cache, v_cache = gather_pages(k_cache, call.block_table), gather_pages(v_cache, call.block_table)
    out, lse = decode_reference(call.q, k_cache, v_cache, call.seqlens, call.k_new, call.v_new, causal=False,
                                window=call.band, scale=call.scale, alibi_slopes=call.alibi_slopes,
                                softcap=call.softcap, return_lse=True, upcast=True, sinks=call.sinks,
                                **call.rotary())  # the band already holds causal
    if call.k_new is not None:
        append = append_paged_reference if call.layout.paged else append_reference
        pages = (call.block_table,) if call.layout.paged else ()
        append(call.k_cache, call.v_cache, *pages, call.seqlens, call.k_new, call.v_new, **call.rotary())
    return out, lse

"""attention_with_kvcache's one entry below the public function: ``run(call)`` asks the router
where a validated call goes and runs it there, on the kernels, torch's fused SDPA, or the
reference. Nothing else chooses among them.

    route        plain or paged call                          ragged new tokens
    kernel       ops/decode/op.py (append + split-KV)         the same, packed
    reference    reference.decode_reference + the append      ``run`` per sequence (with its lse:
    torch_sdpa   fallback.decode_sdpa: one batched SDPA call  the reference) and concatenated

While torch.compile traces, every call off the kernels runs ``fallback.decode_masked``, which
reads nothing on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import backend
from fastattn.ops.decode import fallback
from fastattn.validation import CacheLayout, DecodeCall

OP = "attention_with_kvcache"


def run(call: DecodeCall):
    """out, or (out, lse) with ``call.return_lse``: shapes as attention_with_kvcache documents.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels cannot take the call."""
    route = backend.route(OP, "decode", *_router_shapes(call), needs_grad=call.needs_grad,
                          torch_sdpa=fallback.sdpa_expressible(call))
    if route.impl == "kernel":
        out, lse = _kernels(call)
    elif call.cu_seqlens_q is not None:
        out, lse = _ragged_by_sequence(call)
    elif torch.compiler.is_compiling():  # the other fallbacks read lengths on the host
        out, lse = fallback.decode_masked(call)
    elif route.impl == "torch_sdpa":
        out, lse = fallback.decode_sdpa(call), None
    else:
        out, lse = _reference(call)
    return (out, lse) if call.return_lse else out


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
        sinks=None if call.sinks is None else call.sinks.float().contiguous(), **call.rotary())


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


def _ragged_by_sequence(call: DecodeCall):
    """Ragged new tokens off the kernels: ``run`` on each sequence as a plain call (reads the
    offsets on the host). Packed q (total, Hq, D), k_new / v_new (total, Hkv, D) or None ->
    out (total, Hq, Dv), lse (Hq, total)."""
    q, outs, lses = call.q, [], []
    bounds = call.cu_seqlens_q.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e == s:  # a sequence with no tokens this step: nothing to compute or append
            continue

        def one(t):  # (total, H, D) -> (1, H, L_b, D)
            return None if t is None else t[s:e].transpose(0, 1)[None]

        if call.layout.paged:
            kc, vc, table = call.k_cache, call.v_cache, call.block_table[i:i + 1]
        else:
            kc, vc, table = call.k_cache[i:i + 1], call.v_cache[i:i + 1], None
        alibi = call.alibi_slopes
        out, lse = run(call._replace(
            q=one(q), k_cache=kc, v_cache=vc, seqlens=call.seqlens[i:i + 1], k_new=one(call.k_new),
            v_new=one(call.v_new), layout=CacheLayout.of(kc, vc, table), block_table=table,
            alibi_slopes=alibi if alibi is None or alibi.dim() == 1 else alibi[i:i + 1], cu_seqlens_q=None,
            max_seqlen_q=None, key_range=None, return_lse=True))
        outs.append(out[0].transpose(0, 1))  # (1, Hq, L_b, Dv) -> (L_b, Hq, Dv)
        lses.append(lse[0])  # (Hq, L_b)
    out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], call.layout.head_dim_v)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return out, lse

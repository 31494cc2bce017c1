"""The sparse family's one entry below the public function: ``run(op, call)`` asks the router
where a validated ``SparseCall`` goes and runs it there, on the kernels or the blocked
reference (torch's SDPA cannot skip blocks). Nothing else chooses.
"""
from __future__ import annotations

from fastattn import backend
from fastattn.validation import SparseCall


def run(op: str, call: SparseCall):
    """out (B, Hq, Lq, Dv), or (out, lse (B, Hq, Lq)) with ``call.return_lse``.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels cannot take the call."""
    q, k, v, layout = call.q, call.k, call.v, call.layout
    crow, col, ccol, row, dense = layout.device_tensors(q.device)
    route = backend.route(op, "sparse", q, k, v)
    if route.impl == "kernel":
        from fastattn.ops.sparse import op as sparse_op  # imports triton, so only when used

        out, lse = sparse_op.sparse_attn(q, k, v, crow, col, ccol, row, block_size=layout.block_size,
                                         scale=call.scale, causal=call.causal)
    else:
        from fastattn.ops.sparse.reference import sparse_attention_blocked

        out, lse = sparse_attention_blocked(q, k, v, dense, layout.block_size, causal=call.causal,
                                            scale=call.scale, return_lse=call.return_lse)
    return (out, lse) if call.return_lse else out

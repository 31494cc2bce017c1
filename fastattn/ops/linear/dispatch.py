"""The linear family's one entry below the public functions: ``run(op, call)`` asks the router
where a validated ``LinearCall`` goes and runs it there, on the kernels or the chunked reference
(torch's SDPA cannot express linear attention); ``run_performer`` computes the Performer
features in torch and runs them the same way. Nothing else chooses.
"""
from __future__ import annotations

from torch import Tensor

from fastattn import backend
from fastattn.validation import LinearCall, PerformerCall


def run(op: str, call: LinearCall) -> Tensor:
    """out (B, Hq, Lq, Dv), or packed (total, Hq, Dv) with ``call.cu_seqlens``.

    Raises:
        ValueError: under ``use_backend("triton")``, when the kernels cannot take the call."""
    if call.cu_seqlens is None:
        views, extra = (call.q, call.k, call.v), []
    else:
        views = [t.transpose(0, 1)[None] for t in (call.q, call.k, call.v)]  # (total, H, .) -> (1, H, total, .)
        n_seq = call.cu_seqlens.numel() - 1
        extra = [f"{n_seq} sequences exceed {backend.MAX_GRID_YZ}, CUDA's limit on a launch grid's third axis"] \
            if n_seq > backend.MAX_GRID_YZ else []
    route = backend.route(op, "linear", *views, extra_refusals=extra)
    options = dict(causal=call.causal, normalize=call.normalize, eps=call.eps)
    if route.impl == "kernel":
        from fastattn.ops.linear import op as linear_op  # imports triton, so only when used

        out = linear_op.linear_attn(*views, feature=call.feature, cu_seqlens=call.cu_seqlens, **options)
        return out if call.cu_seqlens is None else out[0].transpose(0, 1)  # (1, H, total, Dv) -> (total, H, Dv)
    from fastattn.ops.linear import reference as linear_ref

    fq, fk = linear_ref.feature_map(call.q, call.feature), linear_ref.feature_map(call.k, call.feature)
    if call.cu_seqlens is None:
        return linear_ref.linear_attention_chunked(fq, fk, call.v, **options)
    return linear_ref.linear_attention_varlen(fq, fk, call.v, call.cu_seqlens, chunk_size=64, **options)


def run_performer(op: str, call: PerformerCall) -> Tensor:
    """performer_attention's out (B, Hq, Lq, Dv): its features, then ``run`` on them."""
    from fastattn.ops.linear.performer import performer_features

    fq, fk, eps = performer_features(call.q, call.k, call.projection, kernel=call.kernel, scale=call.scale,
                                     eps=call.eps)
    return run(op, LinearCall(fq, fk, call.v, "identity", call.causal, True, eps))

"""Performer (FAVOR+) features of q and k for the linear-attention kernels or reference.

The features are computed in torch on every route: the key stabiliser is a max over the
whole sequence, which a chunked kernel cannot know in advance. No Triton here.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastattn.ops.linear.reference import favor_eps, favor_features, relu_features


def performer_features(q: Tensor, k: Tensor, projection: Tensor, *, kernel: str, scale: Optional[float],
                       eps: float):
    """(phi(q) (B, Hq, Lq, M), phi(k) (B, Hkv, Lk, M), eps) for ``performer_attention``.

    kernel "softmax": FAVOR+ positive features with their stabilisers; the returned eps is
    scaled like the features (``favor_eps``, (B, Hq, Lq, 1)), so the stabilisers cancel
    exactly and, causal, a large future key cannot reach past outputs through the key
    stabiliser. kernel "relu": ``relu(W x) / sqrt(M)`` and eps unchanged.
    """
    if kernel == "relu":
        return relu_features(q, projection), relu_features(k, projection), eps
    # stabilisers: (B, Hq, Lq, 1) per query row, (B, Hkv, 1, 1) for the keys
    fq, stab_q = favor_features(q, projection, is_query=True, scale=scale, return_stabiliser=True)
    fk, stab_k = favor_features(k, projection, is_query=False, scale=scale, return_stabiliser=True)
    return fq, fk, favor_eps(eps, stab_q, stab_k)

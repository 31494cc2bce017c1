"""Plain-PyTorch linear attention: feature maps, the quadratic oracle, the chunked CPU
fallback and the recurrent single-step form for decoding.

Linear attention replaces ``softmax(q k^T)`` by a kernel ``phi(q) . phi(k)`` with a feature
map ``phi: R^D -> R^M``. Written with features (all tensors (B, H, L, .)):

    A   = phi(Q) phi(K)^T                      (Lq, Lk), lower-triangular masked if causal
    out = (A V) / (A 1 + eps)                  normalised (``normalize=False``: out = A V)

``eps`` is a number or a tensor broadcastable to (B, Hq, Lq, 1): one value per query row, which
FAVOR+ needs to keep its stabilised features exact (see ``favor_eps``).

Because ``A V = phi(Q) (phi(K)^T V)``, the non-causal form costs O(L M Dv), and the causal one
is a running state ``S_i = sum_{j<=i} phi(k_j) v_j^T`` (M, Dv), ``z_i = sum_{j<=i} phi(k_j)`` (M).

Causal here means query i sees keys j <= i and needs Lq == Lk (a prefix of a longer context
is the recurrent state, see ``linear_attention_step``). Packed variable-length sequences
(``linear_attention_varlen``) run each sequence on its own: the state resets at each boundary.

Everything is ordinary differentiable torch code that runs in any dtype, float64 included.
GQA: kv head ``h // (Hq // Hkv)`` serves query head h.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.ops._sequences import per_sequence
from fastattn.validation import default_scale

FEATURE_MAPS = ("elu", "relu", "identity")
DEFAULT_EPS = 1e-6


# ---------------------------------------------------------------------------------------
# Feature maps

def elu_features(x: Tensor) -> Tensor:
    """elu(x) + 1 (Katharopoulos et al. 2020): positive, so the normaliser never vanishes."""
    return F.elu(x) + 1.0


def relu_features(x: Tensor, projection: Optional[Tensor] = None) -> Tensor:
    """The generalized ReLU kernel of Performer: ``relu(x W^T) / sqrt(M)`` with ``W`` (M, D)
    a projection (``performer_projection``); without one, ``relu(x)`` elementwise."""
    if projection is None:
        return F.relu(x)
    return F.relu(x @ projection.to(x.dtype).t()) / math.sqrt(projection.shape[0])


def feature_map(x: Tensor, name: Union[str, Callable[[Tensor], Tensor]]) -> Tensor:
    """Apply a named elementwise feature map ("elu" = elu+1, "relu", "identity") or a callable."""
    if callable(name):
        return name(x)
    if name == "elu":
        return elu_features(x)
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {name!r}")


def performer_projection(num_features: int, head_dim: int, *, orthogonal: bool = True,
                         generator: Optional[torch.Generator] = None, device=None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Random projection W (num_features, head_dim) for FAVOR+ (Choromanski et al. 2021).

    Rows are Gaussian directions. ``orthogonal=True`` draws them in blocks of ``head_dim``
    exactly orthogonal rows (QR of a Gaussian matrix), each rescaled to the norm of an
    independent Gaussian vector, so every row is still marginally N(0, I) (the estimator stays
    unbiased) while rows within a block are orthogonal, which lowers its variance.
    Redraw the features by calling again (with a different generator state).
    """
    if num_features < 1 or head_dim < 1:
        raise ValueError(f"performer_projection: num_features ({num_features}) and head_dim ({head_dim}) must be >= 1")
    gen_device = generator.device if generator is not None else "cpu"

    def gaussian(*shape):
        return torch.randn(*shape, generator=generator, device=gen_device, dtype=torch.float64)

    if not orthogonal:
        w = gaussian(num_features, head_dim)
    else:
        blocks = []
        for _ in range(math.ceil(num_features / head_dim)):
            qmat, r = torch.linalg.qr(gaussian(head_dim, head_dim))
            # Sign fix makes Q Haar-distributed (QR alone is not unique in sign).
            qmat = qmat * torch.sign(torch.diagonal(r))[None, :]
            blocks.append(qmat.t())
        w = torch.cat(blocks, 0)[:num_features]
        # Row norms of independent Gaussian vectors (chi distribution with head_dim dof).
        w = w * gaussian(num_features, head_dim).norm(dim=1, keepdim=True)
    return w.to(device=device, dtype=dtype)


def favor_stabiliser(x: Tensor, projection: Tensor, *, is_query: bool, scale: Optional[float] = None) -> Tensor:
    """The default FAVOR+ stabiliser of ``favor_features``, detached: for queries the max of
    ``W x'`` over the features of each row, (..., L, 1); for keys the max over the whole
    sequence and all features, (..., 1, 1), so that it is one constant per (batch, head)."""
    xs = _favor_scaled(x, scale)
    return _default_stabiliser(xs @ projection.to(xs.dtype).t(), is_query)


def _default_stabiliser(proj: Tensor, is_query: bool) -> Tensor:
    proj = proj.detach()  # (..., L, M)
    if is_query:
        return proj.amax(dim=-1, keepdim=True)
    if proj.shape[-2] == 0:  # no keys: nothing to stabilise (a max over nothing has no value)
        return proj.new_zeros(*proj.shape[:-2], 1, 1)
    return proj.amax(dim=(-1, -2), keepdim=True)


def _favor_scaled(x: Tensor, scale: Optional[float]) -> Tensor:
    """x * sqrt(scale) in at least float32 (default scale 1/sqrt(D))."""
    scale = default_scale(x.shape[-1], scale)
    return x.to(torch.promote_types(x.dtype, torch.float32)) * math.sqrt(scale)


def favor_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    scale: Optional[float] = None,
    stabiliser: Optional[Union[float, Tensor]] = None,
    return_stabiliser: bool = False,
):
    """FAVOR+ positive random features of the softmax kernel exp(scale * q.k).

    With ``x' = x * sqrt(scale)`` (default scale 1/sqrt(D)) and W = ``projection`` (M, D):

        phi(x) = exp(W x' - |x'|^2 / 2 - stabiliser) / sqrt(M)

    so that E[phi(q) . phi(k)] = exp(scale q.k) * exp(-stab_q - stab_k). The stabiliser keeps
    exp finite; it cancels in the normalised attention as long as it is constant along the
    keys and ``eps`` is scaled with it (``favor_eps``). The default is ``favor_stabiliser``:
    for keys the max of ``W x'`` over the whole sequence and all features (per batch and head),
    for queries the max over the features of each row. It is detached (it does not change
    the normalised result, so it carries no gradient). Pass a number or tensor to fix it, e.g.
    for decoding, where the future keys are unknown.

    x: (..., L, D). Returns (..., L, M) in x's dtype, computed in at least float32, and with
    ``return_stabiliser`` the stabiliser used, as a tensor (for ``favor_eps``).
    """
    xs = _favor_scaled(x, scale)
    proj = xs @ projection.to(xs.dtype).t()  # (..., L, M)
    sq = 0.5 * (xs * xs).sum(-1, keepdim=True)
    if stabiliser is None:
        stabiliser = _default_stabiliser(proj, is_query)
    phi = (torch.exp(proj - sq - stabiliser) / math.sqrt(projection.shape[0])).to(x.dtype)
    return (phi, torch.as_tensor(stabiliser, device=x.device)) if return_stabiliser else phi


def favor_eps(eps: float, stab_q: Tensor, stab_k: Tensor) -> Tensor:
    """The normaliser's eps in the units of the stabilised features: (B, Hq, Lq, 1) float32.

    Features scaled by exp(-stab_q) and exp(-stab_k) scale ``A 1`` by exp(-stab_q - stab_k);
    adding ``eps`` unscaled would make the result depend on the stabiliser, and the key
    stabiliser is a max over the whole sequence: under ``causal`` a large future key would then
    change past outputs. ``eps * exp(-stab_q - stab_k)`` keeps ``out`` equal to the
    unstabilised ``A V / (A 1 + eps)``, which only sees the past. The exponent is clamped to
    float32's range (beyond it the eps is negligible or the features have underflowed anyway)
    and the result kept above float32's smallest normal, so that a row whose features all
    underflowed still divides by a positive number.

    stab_q: (B, Hq, Lq, 1); stab_k: (B, Hkv, 1, 1), Hkv dividing Hq (GQA).
    """
    group = stab_q.shape[1] // max(stab_k.shape[1], 1)  # no heads at all: nothing to repeat
    exponent = -(stab_q.float() + stab_k.float().repeat_interleave(group, dim=1))
    tiny = torch.finfo(torch.float32).tiny
    return (eps * exponent.clamp(-80.0, 80.0).exp()).clamp_min(tiny if eps > 0 else 0.0)


# ---------------------------------------------------------------------------------------
# Linear attention on features

def _per_row(eps) -> bool:
    """eps given per query row, (B, Hq, Lq, 1) (see favor_eps), rather than one number."""
    return isinstance(eps, Tensor) and eps.dim() == 4 and eps.shape[2] > 1


def _expand_kv(phi_q: Tensor, *kv: Tensor) -> list[Tensor]:
    hq, hkv = phi_q.shape[1], kv[0].shape[1]
    if hq == hkv:
        return list(kv)
    # The oracle may copy K/V per query head; the kernels index instead.
    return [t.repeat_interleave(hq // hkv, dim=1) for t in kv]


def linear_attention_quadratic(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool = False,
    normalize: bool = True, eps: Union[float, Tensor] = DEFAULT_EPS,
) -> Tensor:
    """The oracle: ``A = phi(Q) phi(K)^T`` (causally masked), ``out = A V / (A 1 + eps)``.

    phi_q: (B, Hq, Lq, M), phi_k: (B, Hkv, Lk, M), v: (B, Hkv, Lk, Dv). O(Lq Lk) memory.
    """
    phi_k, v = _expand_kv(phi_q, phi_k, v)
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        lq, lk = a.shape[-2:]
        a = a.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=a.device).tril(), 0.0)
    out = a @ v
    if normalize:
        out = out / (a.sum(-1, keepdim=True) + eps)
    return out


def linear_attention_chunked(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool = False,
    normalize: bool = True, eps: Union[float, Tensor] = DEFAULT_EPS, chunk_size: int = 64,
) -> Tensor:
    """The CPU fallback: same result as ``linear_attention_quadratic`` in O(L) memory.

    Non-causal: ``S = phi(K)^T V`` (M, Dv) and ``z = phi(K)^T 1``, then ``phi(Q) S``.
    Causal: chunks of ``chunk_size`` rows; inside a chunk the masked quadratic form, across
    chunks a running state (S, z) in at least float32. The forward never holds more than one
    chunk's (C, C) scores and one (M, Dv) state per head, unlike a cumulative sum over the
    sequence, which materialises (L, M, Dv). (Autograd keeps each chunk's state for the
    backward: (L / C) x M x Dv.)
    """
    phi_k, v = _expand_kv(phi_q, phi_k, v)
    acc = torch.promote_types(v.dtype, torch.float32)
    if not causal:
        s = phi_k.transpose(-1, -2).to(acc) @ v.to(acc)
        out = phi_q.to(acc) @ s
        if normalize:
            den = phi_q.to(acc) @ phi_k.to(acc).sum(-2).unsqueeze(-1)
            out = out / (den + eps)
        return out.to(v.dtype)
    b, h, l, m = phi_q.shape
    s = phi_q.new_zeros(b, h, m, v.shape[-1], dtype=acc)
    z = phi_q.new_zeros(b, h, m, 1, dtype=acc)
    outs = []
    for start in range(0, l, chunk_size):
        qc = phi_q[:, :, start:start + chunk_size].to(acc)
        kc = phi_k[:, :, start:start + chunk_size].to(acc)
        vc = v[:, :, start:start + chunk_size].to(acc)
        a = (qc @ kc.transpose(-1, -2)).tril()  # within the chunk: key j <= query i
        num = qc @ s + a @ vc
        if normalize:
            eps_c = eps[:, :, start:start + chunk_size] if _per_row(eps) else eps
            num = num / (qc @ z + a.sum(-1, keepdim=True) + eps_c)
        outs.append(num.to(v.dtype))
        s = s + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(-2).unsqueeze(-1)
    if not outs:  # L = 0: no chunk; the (empty) quadratic form keeps the autograd graph
        return linear_attention_quadratic(phi_q, phi_k, v, causal=True, normalize=normalize, eps=eps)
    return torch.cat(outs, dim=2)


def linear_attention_varlen(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = False,
    normalize: bool = True, eps: float = DEFAULT_EPS, chunk_size: Optional[int] = None,
) -> Tensor:
    """Packed sequences, one at a time: sequence s is rows ``cu_seqlens[s]:cu_seqlens[s+1]`` of
    phi_q (total, Hq, M), phi_k (total, Hkv, M) and v (total, Hkv, Dv) (FlashAttention's
    layout), and attends only inside itself: causal, its running state starts empty at its
    first row. ``chunk_size`` None: the quadratic oracle per sequence; an int: the chunked CPU
    fallback. Returns (total, Hq, Dv). Reads the offsets on the host."""
    def attend(qs, ks, vs, _):  # (1, H, L, .) views of one sequence
        if chunk_size is None:
            return linear_attention_quadratic(qs, ks, vs, causal=causal, normalize=normalize, eps=eps), None
        return linear_attention_chunked(qs, ks, vs, causal=causal, normalize=normalize, eps=eps,
                                        chunk_size=chunk_size), None

    return per_sequence(attend, phi_q, phi_k, v, cu_seqlens, cu_seqlens)[0]


def linear_attention_cumsum(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = DEFAULT_EPS,
) -> Tensor:
    """Causal linear attention by a cumulative sum of outer products, the textbook way: it
    materialises (B, H, L, M, Dv). Kept only as the benchmark's memory foil."""
    phi_k, v = _expand_kv(phi_q, phi_k, v)
    s = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (B, H, L, M, Dv)
    out = torch.einsum("bhlm,bhlmd->bhld", phi_q, s)
    if normalize:
        out = out / ((phi_q * phi_k.cumsum(2)).sum(-1, keepdim=True) + eps)
    return out


def linear_attention_step(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Optional[tuple[Tensor, Tensor]] = None,
    *, normalize: bool = True, eps: float = DEFAULT_EPS,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One decoding step of causal linear attention with an explicit state.

    phi_q: (B, Hq, 1, M) features of the new query, phi_k: (B, Hkv, 1, M) of the new key,
    v: (B, Hkv, 1, Dv). ``state = (S, z)`` with S (B, Hkv, M, Dv) = sum phi(k) v^T and
    z (B, Hkv, M) = sum phi(k) over the tokens so far (None: empty), kept in at least float32.
    Returns ``(out (B, Hq, 1, Dv), (S', z'))``; the new token attends to itself, as in the
    causal form. Feature maps: ``feature_map(x, "elu")``; for FAVOR+ use ``favor_features``
    with a fixed ``stabiliser`` for the keys (the future keys are unknown).
    """
    b, hkv, _, m = phi_k.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    if state is None:
        state = (phi_k.new_zeros(b, hkv, m, v.shape[-1], dtype=acc), phi_k.new_zeros(b, hkv, m, dtype=acc))
    s, z = state
    s = s + phi_k[:, :, 0, :, None].to(acc) * v[:, :, 0, None, :].to(acc)
    z = z + phi_k[:, :, 0].to(acc)
    s_q, z_q = _expand_kv(phi_q, s, z)
    out = phi_q.to(acc) @ s_q  # (B, Hq, 1, Dv)
    if normalize:
        out = out / ((phi_q.to(acc) * z_q[:, :, None, :]).sum(-1, keepdim=True) + eps)
    return out.to(v.dtype), (s, z)


# ---------------------------------------------------------------------------------------
# Linformer

def linformer_project(x: Tensor, proj: Tensor) -> Tensor:
    """x (B, H, L, D) projected along the sequence by proj (k, L) or (H, k, L) -> (B, H, k, D)."""
    proj = proj.to(x.dtype)
    if proj.dim() == 2:
        return torch.matmul(proj, x)
    return torch.matmul(proj.unsqueeze(0), x)

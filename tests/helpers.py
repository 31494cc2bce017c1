"""Shared test helpers: random inputs in any layout, the docs/design.md error rule (from
fastattn.testing), pairwise parameter matrices and the oracle harness every op test uses."""
import itertools

import torch

import fastattn
from fastattn.testing import GRAD_FACTOR, assert_within_rule as assert_close_rule, max_error as max_err  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def pairwise(*axes):
    """Rows (tuples, one value per axis) that together hold every pair of values of any two
    axes, far fewer than the full product: every combination of the two longest axes, each
    completed greedily with the values of the other axes that add the most pairs not yet held,
    then one row per pair still missing (ties go to the value used least so far, which spreads
    each value over the others). Deterministic; fewer than three axes give the product."""
    axes = [list(a) for a in axes]
    if len(axes) < 3:
        return list(itertools.product(*axes))
    pairs = list(itertools.combinations(range(len(axes)), 2))
    missing = {(i, x, j, y) for i, j in pairs for x in range(len(axes[i])) for y in range(len(axes[j]))}
    longest = sorted(range(len(axes)), key=lambda i: -len(axes[i]))
    used = {(i, x): 0 for i, axis in enumerate(axes) for x in range(len(axis))}
    rows = []

    def complete(row):
        for i in range(len(axes)):
            if row[i] is None:  # the value held with the most missing pairs among those already chosen
                row[i] = max(range(len(axes[i])), key=lambda x: (sum(
                    (min(i, j), x if i < j else row[j], max(i, j), row[j] if i < j else x) in missing
                    for j in range(len(axes)) if row[j] is not None), -used[i, x]))
        missing.difference_update((i, row[i], j, row[j]) for i, j in pairs)
        used.update({(i, x): used[i, x] + 1 for i, x in enumerate(row)})
        rows.append(tuple(axes[i][x] for i, x in enumerate(row)))

    a, b = longest[:2]
    for x, y in itertools.product(range(len(axes[a])), range(len(axes[b]))):
        complete([x if i == a else y if i == b else None for i in range(len(axes))])
    while missing:
        i, x, j, y = min(missing)
        complete([x if n == i else y if n == j else None for n in range(len(axes))])
    return rows


def randn(shape, dtype, device, *, requires_grad=False, transposed=False, scale=1.0):
    """Fresh random (B, H, L, D) tensor. ``transposed`` makes it a non-contiguous view of a
    (B, L, H, D) buffer, the layout models produce with ``x.view(B, L, H, D).transpose(1, 2)``."""
    if transposed:
        b, h, l, d = shape
        t = (torch.randn(b, l, h, d, device=device) * scale).to(dtype).transpose(1, 2)
    else:
        t = (torch.randn(shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def qkv(dtype, device, *, b=1, hq=2, hkv=None, lq=17, lk=None, d=32, dv=None, transposed=False):
    """Fresh random q (b, hq, lq, d), k (b, hkv, lk, d), v (b, hkv, lk, dv), all requiring grad;
    ``hkv``, ``lk`` and ``dv`` default to ``hq``, ``lq`` and ``d``. ``transposed`` makes q and
    k non-contiguous (B, L, H, D) views while v stays contiguous: both layouts in one call."""
    hkv, lk, dv = hkv or hq, lk or lq, dv or d
    return (randn((b, hq, lq, d), dtype, device, requires_grad=True, transposed=transposed),
            randn((b, hkv, lk, d), dtype, device, requires_grad=True, transposed=transposed),
            randn((b, hkv, lk, dv), dtype, device, requires_grad=True))


def cu_seqlens(lengths, device):
    """int32 (len(lengths) + 1,) offsets of packed sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed(lengths_q, lengths_k, dtype, device, *, hq=4, hkv=2, d=32):
    """Fresh random packed q (total_q, hq, d), k and v (total_k, hkv, d) requiring grad, and
    their cu_seqlens_q, cu_seqlens_k."""
    q = torch.randn(sum(lengths_q), hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(sum(lengths_k), hkv, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(sum(lengths_k), hkv, d, device=device).to(dtype).requires_grad_()
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


def as64(t):
    """Detached float64 copy that keeps requires_grad (non-floats pass through)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def same_dtype_copy(t):
    """Detached copy in the same dtype that keeps requires_grad."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().clone().requires_grad_(t.requires_grad)


def check_op(kernel, reference, inputs, *, names=("out",), backend="triton", grad=True, same_dtype=same_dtype_copy,
             yardstick=None):
    """The oracle harness of the op tests (docs/design.md): ``kernel(**inputs)`` on ``backend``
    (explicit, so a silent fallback cannot pass) against ``reference`` run on float64 copies of
    the inputs (the oracle), with ``yardstick`` (default: ``reference``) on ``same_dtype``
    copies (plain PyTorch in the inputs' dtype) as the yardstick.

    ``kernel`` and ``reference`` return one tensor or a tuple, the output first, named by
    ``names`` (e.g. ("out", "lse")). Non-tensor inputs pass through unchanged. Asserts every
    result's shape equals the oracle's, the output's dtype equals the first input's, every
    result meets the rule (factor 2), and, with ``grad``, the gradient of the output under
    one random upstream gradient with respect to every input that requires grad has that
    input's shape and meets the rule with factor 3. Returns the kernel's results, as returned.
    """
    with fastattn.use_backend(backend):
        got = kernel(**inputs)
    oracle_args = {n: as64(t) for n, t in inputs.items()}
    base_args = {n: same_dtype(t) for n, t in inputs.items()}
    results, oracle, base = (r if isinstance(r, tuple) else (r,)
                             for r in (got, reference(**oracle_args), (yardstick or reference)(**base_args)))
    assert len(results) == len(oracle) == len(names)
    first = next(t for t in inputs.values() if isinstance(t, torch.Tensor))
    assert results[0].dtype == first.dtype, (results[0].dtype, first.dtype)
    for name, r, r64, rt in zip(names, results, oracle, base):
        assert r.shape == r64.shape, (name, r.shape, r64.shape)
        assert_close_rule(name, r, r64, rt)
    diff = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if grad and diff:
        do = torch.randn_like(results[0])
        grads = torch.autograd.grad(results[0], [inputs[n] for n in diff], do)
        grads64 = torch.autograd.grad(oracle[0], [oracle_args[n] for n in diff], do.double())
        grads_t = torch.autograd.grad(base[0], [base_args[n] for n in diff], do)
        for name, g, g64, gt in zip(diff, grads, grads64, grads_t):
            assert g.shape == inputs[name].shape, (name, g.shape)
            assert_close_rule(f"d{name}", g, g64, gt, factor=GRAD_FACTOR)
    return got


def arithmetic_mods():
    """(score_mod, mask_mod) for flex_attention using every construct its translator takes
    once, with torch's semantics: integer floor/trunc division and remainders of negative
    positions, casts, where, clamp, minimum/maximum, sigmoid, exp, sqrt, powers, ~ and |."""
    def score_mod(score, b, h, q_idx, kv_idx):
        rel = q_idx - kv_idx
        bucket = rel // 7 + rel % 5 + torch.div(rel, 3, rounding_mode="trunc") + torch.remainder(rel, -4)
        smooth = torch.sigmoid(score) * torch.exp(-score.abs()) + torch.sqrt(score * score + 1.0) ** 2
        capped = torch.clamp(score, min=-2.0, max=2.0) + torch.minimum(score, -score) - torch.maximum(score, 0.5 * score)
        return torch.where(bucket.float() > 0.0, smooth, capped) + (bucket % 3).to(torch.float32) / 4

    def mask_mod(b, h, q_idx, kv_idx):
        return ~((q_idx - kv_idx).abs() == 3) | (h == 1)

    return score_mod, mask_mod

"""fastattn.merge_attention_states: attention over disjoint key sets merged by their lse equals
attention over the union (values and gradients), the float64 oracle by the error rule."""
import pytest
import torch

import fastattn
from fastattn.ops.flash.reference import attention_reference
from helpers import assert_close_rule


def _split_and_merge(q, k, v, cut, stacked):
    """Attention over keys [:cut] and [cut:] separately (reference), then merged."""
    a, lse_a = attention_reference(q, k[:, :, :cut], v[:, :, :cut], return_lse=True)
    b, lse_b = attention_reference(q, k[:, :, cut:], v[:, :, cut:], return_lse=True)
    if stacked:
        return fastattn.merge_attention_states(torch.stack([a, b]), torch.stack([lse_a, lse_b]))
    return fastattn.merge_attention_states(a, lse_a, b, lse_b)


@pytest.mark.parametrize("stacked", [False, True], ids=["two", "stacked"])
def test_merging_two_halves_equals_the_whole(stacked):
    """(B, H, L, D) states of two key halves -> attention over all keys, out and lse, and the
    gradients through the merge to q, k and v."""
    q = torch.randn(2, 3, 5, 16, requires_grad=True)
    k, v = torch.randn(2, 3, 24, 16, requires_grad=True), torch.randn(2, 3, 24, 8, requires_grad=True)
    grad = torch.randn(2, 3, 5, 8)
    results = {}
    for name, dtype in (("oracle", torch.float64), ("base", torch.float32), ("merged", torch.float32)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        if name == "merged":
            out, lse = _split_and_merge(qq, kk, vv, 10, stacked)
        else:
            out, lse = attention_reference(qq, kk, vv, return_lse=True)
        grads = torch.autograd.grad((out * grad.to(dtype)).sum() + lse.sum(), (qq, kk, vv))
        results[name] = (out, lse, *grads)
    for i, what in enumerate(("out", "lse", "dq", "dk", "dv")):
        assert_close_rule(what, results["merged"][i], results["oracle"][i], results["base"][i])


def test_empty_states_give_zero_and_no_nan():
    """A state with no key (lse -inf) has weight 0; rows empty in both give out 0, lse -inf,
    and finite gradients."""
    out = torch.randn(2, 3, 4, requires_grad=True)
    lse = torch.tensor([[0.5, float("-inf"), float("-inf")], [1.0, 2.0, float("-inf")]], requires_grad=True)
    merged, merged_lse = fastattn.merge_attention_states(out, lse)
    assert torch.allclose(merged[1], out[1, 1]) and torch.allclose(merged_lse[1], lse[1, 1])
    assert torch.all(merged[2] == 0) and merged_lse[2] == float("-inf")
    g_out, g_lse = torch.autograd.grad(merged.sum() + merged_lse[:2].sum(), (out, lse))
    assert torch.isfinite(g_out).all() and torch.isfinite(g_lse).all()


def test_bad_shapes_raise():
    out, lse = torch.randn(3, 4), torch.randn(3)
    with pytest.raises(ValueError, match="out_b and lse_b"):
        fastattn.merge_attention_states(out, lse, out_b=out)
    with pytest.raises(ValueError, match="without its last dim"):
        fastattn.merge_attention_states(out, lse[:2], out, lse)
    with pytest.raises(ValueError, match="stacked"):
        fastattn.merge_attention_states(out, torch.randn(3, 4))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cascade_equals_attention_over_prefix_and_own_tokens(backend, device):
    """Three requests share a 40-token prefix stored once, each with its own cached tokens (one
    with none) and two new ones: the float64 reference over prefix + own tokens (bottom-right
    causal) by the error rule, the new tokens appended to the requests' own caches."""
    hq, hkv, d, prefix, lengths = 4, 2, 16, 40, [7, 0, 19]
    pk, pv = torch.randn(1, hkv, prefix, d, device=device), torch.randn(1, hkv, prefix, d, device=device)
    kc, vc = (torch.randn(3, hkv, 24, d, device=device) for _ in range(2))
    q = torch.randn(3, hq, 2, d, device=device)
    kn, vn = (torch.randn(3, hkv, 2, d, device=device) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    want = {}
    for dtype in (torch.float64, torch.float32):
        outs = []
        for i, n in enumerate(lengths):
            keys = torch.cat([pk, kc[i:i + 1, :, :n], kn[i:i + 1]], dim=2).to(dtype)
            values = torch.cat([pv, vc[i:i + 1, :, :n], vn[i:i + 1]], dim=2).to(dtype)
            outs.append(attention_reference(q[i:i + 1].to(dtype), keys, values, causal=True))
        want[dtype] = torch.cat(outs)
    with fastattn.use_backend(backend):
        out = fastattn.cascade_attention_with_kvcache(q, pk, pv, kc, vc, seqlens, k_new=kn, v_new=vn)
    assert_close_rule("out", out, want[torch.float64], want[torch.float32])
    for i, n in enumerate(lengths):
        assert torch.equal(kc[i, :, n:n + 2], kn[i]) and torch.equal(vc[i, :, n:n + 2], vn[i])

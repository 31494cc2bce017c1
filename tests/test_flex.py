"""fastattn.flex_attention: torch's FlexAttention mods inside fastattn's kernels, eagerly.

Forward results are checked against torch's own ``flex_attention`` (eager, run in float64 as
the oracle and in the test dtype as the baseline of the error rule); gradients against autograd
of the float64 reference, including those of tensors the score_mod captures.
"""
import math

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import fastattn
from fastattn.ops.flex import blocks as flex_blocks
from fastattn.ops.flex import compiled as flex_compiled
from fastattn.ops.flex import dispatch as flex_dispatch
from fastattn.ops.flex.reference import flex_reference
from tests.helpers import GRAD_FACTOR, arithmetic_mods, assert_close_rule

pytest.importorskip("triton")

# torch's eager flex_attention warns that it materialises the scores (it is the oracle here).
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


# ---------------------------------------------------------------------- attention-gym's catalogue
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(width):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= width)
    return mask


def prefix_lm(prefix):
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)
    return mask


def document(document_id):
    def mask(b, h, q_idx, kv_idx):
        return document_id[q_idx] == document_id[kv_idx]
    return mask


def alibi(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()
    return score_mod


def softcap(cap):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def relative_bias(bias, length):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + length]
    return score_mod


def t5_buckets(table, num_buckets=8, max_distance=64):
    """T5's bidirectional log-spaced relative position buckets, one learned logit per bucket."""
    half = num_buckets // 2
    exact = half // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = kv_idx - q_idx
        side = torch.where(rel > 0, half, 0)
        dist = rel.abs()
        far = exact + (torch.log(dist.float() / exact + 1e-6) / math.log(max_distance / exact)
                       * (half - exact)).to(torch.int64)
        bucket = side + torch.where(dist < exact, dist, far.clamp(max=half - 1))
        return score + table[h, bucket]
    return score_mod


def _block_mask(mask_mod, b, h, lq, lk, block):
    return torch_flex.create_block_mask(mask_mod, b, h, lq, lk, device="cpu", BLOCK_SIZE=block)


def _catalogue(name, h, lq, lk):
    """(score_mod, mask_mod) of a catalogue entry for h heads and lengths (lq, lk)."""
    if name == "causal":
        return None, causal
    if name == "sliding_window":
        return None, sliding_window(20)
    if name == "prefix_lm":
        return None, prefix_lm(24)
    if name == "document":
        return None, document(torch.tensor([0] * 30 + [1] * 41 + [2] * (max(lq, lk) - 71)))
    if name == "alibi":
        return alibi(torch.rand(h) * 0.5), causal
    if name == "softcap":
        return softcap(2.0), None
    if name == "relative_bias":
        return relative_bias(torch.randn(h, lq + lk), lk), None
    if name == "t5_buckets":
        return t5_buckets(torch.randn(h, 8)), None
    if name == "arithmetic":
        return arithmetic_mods()
    if name == "and_or_masks":
        return None, torch_flex.or_masks(torch_flex.and_masks(causal, sliding_window(16)), prefix_lm(8))
    raise AssertionError(name)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("name,dtype_id,lq,lk,block", [
    ("causal", "fp32", 97, 97, 32), ("sliding_window", "fp16", 113, 113, 64), ("prefix_lm", "bf16", 80, 80, 32),
    ("document", "fp32", 100, 100, 32), ("alibi", "fp16", 90, 90, 64), ("softcap", "bf16", 63, 97, 32),
    ("relative_bias", "fp32", 97, 63, 32), ("t5_buckets", "fp16", 96, 96, 32), ("and_or_masks", "fp32", 96, 96, 32),
    ("arithmetic", "fp32", 70, 90, 32),
])
def test_forward_equals_torch_flex(name, dtype_id, lq, lk, block, device):
    dtype = DTYPES[dtype_id]
    b, h, d = 2, 2, 32
    q, k, v = (torch.randn(b, h, n, d, device=device).to(dtype) for n in (lq, lk, lk))
    score_mod, mask_mod = _catalogue(name, h, lq, lk)
    block_mask = None if mask_mod is None else _block_mask(mask_mod, 1, 1, lq, lk, block)
    out, lse = fastattn.flex_attention(q, k, v, score_mod, block_mask, return_lse=True)
    oracle, oracle_lse = torch_flex.flex_attention(q.double(), k.double(), v.double(), score_mod, block_mask,
                                                   return_lse=True)
    base, base_lse = torch_flex.flex_attention(q, k, v, score_mod, block_mask, return_lse=True)
    assert_close_rule(f"{name} out", out, oracle, base)
    assert_close_rule(f"{name} lse", lse, oracle_lse, base_lse.float())


def test_gqa_fully_masked_rows_and_no_block_mask(device):
    """enable_gqa; rows whose keys are all masked give 0 and lse -inf, as torch's flex."""
    q = torch.randn(1, 4, 70, 16, device=device)
    k, v = (torch.randn(1, 2, 70, 16, device=device) for _ in range(2))
    empty_rows = _block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= 40) & (kv_idx <= q_idx), 1, 4, 70, 70, 32)
    for block_mask in (None, empty_rows):
        out, lse = fastattn.flex_attention(q, k, v, softcap(3.0), block_mask, enable_gqa=True, return_lse=True)
        ref, ref_lse = torch_flex.flex_attention(q.double(), k.double(), v.double(), softcap(3.0), block_mask,
                                                 enable_gqa=True, return_lse=True)
        base, base_lse = torch_flex.flex_attention(q, k, v, softcap(3.0), block_mask, enable_gqa=True,
                                                   return_lse=True)
        assert_close_rule("gqa out", out, ref, base)
        assert_close_rule("gqa lse", lse, ref_lse, base_lse)
    assert bool((out[:, :, :40] == 0).all()) and bool((lse[:, :, :40] == float("-inf")).all())


def _reference_grads(q, k, v, do, score_mod, block_mask, captures, dtype):
    """Gradients of the float64 reference (the oracle) and of the reference in ``dtype``."""
    b, h, lq, _ = q.shape
    blocks = (flex_blocks.all_blocks(b, h, lq, k.shape[2], q.device) if block_mask is None else
              flex_blocks.from_block_mask("test", block_mask, b, h, lq, k.shape[2], q.device))
    grads = []
    for t in (torch.float64, dtype):
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        out, _ = flex_reference(*leaves, score_mod, blocks, q.shape[-1] ** -0.5)
        grads.append(torch.autograd.grad(out, leaves + captures, do.to(t)))
    return grads


@pytest.mark.parametrize("name,dtype_id,gqa", [
    ("softcap", "fp32", False), ("alibi", "fp16", True), ("document", "bf16", False), ("t5_buckets", "fp32", True),
    ("arithmetic", "fp32", False),
])
def test_backward(name, dtype_id, gqa, device):
    """dq, dk, dv through the score_mod's derivative and the BlockMask, by the error rule."""
    dtype = DTYPES[dtype_id]
    lq = lk = 80
    hkv = 1 if gqa else 2
    q = torch.randn(1, 2, lq, 32, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(1, hkv, lk, 32, device=device).to(dtype).requires_grad_() for _ in range(2))
    score_mod, mask_mod = _catalogue(name, 2, lq, lk)
    block_mask = None if mask_mod is None else _block_mask(mask_mod, 1, 1, lq, lk, 32)
    out = fastattn.flex_attention(q, k, v, score_mod, block_mask, enable_gqa=gqa)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    oracle, base = _reference_grads(q, k, v, do, score_mod, block_mask, [], dtype)
    for n, g, o, bl in zip("qkv", got, oracle, base):
        assert_close_rule(f"{name} d{n}", g, o, bl, factor=GRAD_FACTOR)


@pytest.mark.parametrize("name", ["relative_bias", "alibi"])
def test_captured_tensor_gradients_are_exact_and_repeatable(name, device):
    """A learned relative-position bias and learnable ALiBi slopes get their gradients, equal to
    the float64 reference's by the error rule and bitwise the same on every run."""
    lq = lk = 72
    q, k, v = (torch.randn(1, 2, lq, 16, device=device).requires_grad_() for _ in range(3))
    param = (torch.randn(2, lq + lk, device=device) if name == "relative_bias" else
             torch.rand(2, device=device)).requires_grad_()
    score_mod = relative_bias(param, lk) if name == "relative_bias" else alibi(param)
    block_mask = _block_mask(causal, 1, 1, lq, lk, 32)
    out = fastattn.flex_attention(q, k, v, score_mod, block_mask)
    do = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v, param), do)
    again = torch.autograd.grad(fastattn.flex_attention(q, k, v, score_mod, block_mask), (q, k, v, param), do)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    oracle, base = _reference_grads(q, k, v, do, score_mod, block_mask, [param], torch.float32)
    for n, g, o, bl in zip(["dq", "dk", "dv", "dparam"], first, oracle, base):
        assert_close_rule(f"{name} {n}", g, o, bl, factor=GRAD_FACTOR)


def test_masked_blocks_are_never_visited(device):
    """The forward visits exactly the key tiles of the blocks the BlockMask lists: a causal mask
    of 32-token blocks over 160 tokens takes r + 1 tiles in query block r (15 of 25)."""
    from fastattn.ops.flex import op as flex_op

    q, k, v = (torch.randn(1, 1, 160, 16, device=device) for _ in range(3))
    block_mask = _block_mask(causal, 1, 1, 160, 160, 32)
    blocks = flex_blocks.from_block_mask("test", block_mask, 1, 1, 160, 160, q.device)
    tr = flex_op.prepare(q, v, None, blocks)
    visits = torch.zeros(5, dtype=torch.int32, device=device)
    flex_op.forward(q, k, v, tr, blocks, 0.25, visits=visits)
    assert visits.tolist() == [1, 2, 3, 4, 5]


def test_document_mask_at_16k_allocates_no_lxl_tensor(device, monkeypatch):
    """A document-masked call at 16k tokens creates no tensor of Lq * Lk / 64 elements or more on
    the kernel path. Running the kernels at 16k under the interpreter would take minutes, so the
    launches are replaced by stubs that record their grids; every tensor torch creates during
    the call is recorded by a dispatch mode. The BlockMask comes from ``document_block_mask``
    (O((L / 128)^2)), not from create_block_mask, which evaluates the mask_mod on (L, L)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastattn.ops.flex import kernels

    n = 16384
    document_id = torch.repeat_interleave(torch.arange(8, device=device), n // 8)
    block_mask = fastattn.flex.document_block_mask(document_id)
    q, k, v = (torch.randn(1, 2, n, 64, device=device) for _ in range(3))
    launched = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    monkeypatch.setattr(kernels, "flex_fwd_kernel", Stub())
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with fastattn.use_backend("triton"), Record():
        fastattn.flex_attention(q, k, v, None, block_mask)
    assert launched and sizes
    assert max(sizes) < n * n // 64, max(sizes)


def test_untranslatable_mod_names_the_construct(device):
    q = torch.randn(1, 1, 32, 16, device=device)

    def branchy(score, b, h, q_idx, kv_idx):
        return score if q_idx > kv_idx else -score

    def erf(score, b, h, q_idx, kv_idx):
        return torch.erf(score)

    with fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="control flow"):
            fastattn.flex_attention(q, q, q, branchy)
        with pytest.raises(ValueError, match="erf"):
            fastattn.flex_attention(q, q, q, erf)
    # "auto" runs the reference for a mod the kernels cannot take.
    out = fastattn.flex_attention(q, q, q, erf)
    assert_close_rule("erf fallback", out, torch_flex.flex_attention(q.double(), q.double(), q.double(), erf),
                      torch_flex.flex_attention(q, q, q, erf))


def test_bad_inputs_raise_value_error(device):
    q = torch.randn(1, 4, 32, 16, device=device)
    k = torch.randn(1, 2, 32, 16, device=device)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.flex_attention(q, k, k)
    with pytest.raises(ValueError, match="Q_LEN, KV_LEN"):
        fastattn.flex_attention(q, q, q, block_mask=_block_mask(causal, 1, 1, 64, 64, 32))
    with fastattn.use_backend("triton"), pytest.raises(ValueError, match="on meta"):
        fastattn.flex_attention(q, q, q, alibi(torch.ones(4, device="meta")))


def test_translation_is_cached_and_new_captures_reuse_the_compiled_mods():
    """The same mods are traced once; mods of the same code over other tensors get their own
    captures but the same jit functions (one compile)."""
    from fastattn.ops.flex.translate import translate

    first = translate(relative_bias(torch.randn(2, 20), 10), causal)
    mod = relative_bias(torch.randn(2, 20), 10)
    again = translate(mod, causal)
    assert translate(mod, causal) is again and again is not first
    assert again.score_mod is first.score_mod and again.captures[0] is not first.captures[0]


@pytest.mark.parametrize("dtype_id", ["fp16", "fp32"])
def test_varlen_mods_see_sequence_local_positions(dtype_id, device):
    """flex_attention_varlen: b is the sequence, positions are local to it (a causal mask_mod
    is causal inside each document), GQA, a sequence with no queries and one with no keys;
    forward, dq/dk/dv and a captured per-sequence bias's gradient (bitwise repeatable) by the
    error rule against the float64 reference."""
    from fastattn.ops.flex.reference import varlen_flex_reference

    dtype = DTYPES[dtype_id]
    lengths_q, lengths_k = [37, 0, 64, 9, 50], [40, 7, 64, 0, 50]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 2, 16, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(sum(lengths_k), 1, 16, device=device).to(dtype).requires_grad_() for _ in range(2))
    seq_bias = torch.randn(5, device=device).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + seq_bias[b] - 0.1 * (h + 1) * (q_idx - kv_idx).abs()

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    out, lse = fastattn.flex_attention_varlen(q, k, v, cu_q, cu_k, score_mod=score_mod, mask_mod=mask_mod,
                                              return_lse=True)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, seq_bias), do)
    again = torch.autograd.grad(fastattn.flex_attention_varlen(q, k, v, cu_q, cu_k, score_mod=score_mod,
                                                               mask_mod=mask_mod), (q, k, v, seq_bias), do)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    results = []
    for t in (torch.float64, dtype):
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        ref, ref_lse = varlen_flex_reference(*leaves, cu_q, cu_k, score_mod, mask_mod, 16 ** -0.5)
        results.append((ref, ref_lse, torch.autograd.grad(ref, leaves + [seq_bias], do.to(t))))
    (oracle, oracle_lse, oracle_grads), (base, base_lse, base_grads) = results
    assert_close_rule("varlen out", out, oracle, base)
    assert_close_rule("varlen lse", lse, oracle_lse, base_lse)
    for name, g, o, b in zip(["dq", "dk", "dv", "dseq_bias"], got, oracle_grads, base_grads):
        assert_close_rule(f"varlen {name}", g, o, b, factor=GRAD_FACTOR)
    assert bool((out[37 + 64:37 + 64 + 9] == 0).all())  # the sequence with no keys


def test_cpu_fallback_has_a_backward(device, monkeypatch):
    """use_backend("torch") runs the chunked reference, each chunk checkpointed (the backward's
    memory is O(chunk * Lk) too): forward equal to torch's
    flex_attention, and gradients (q, k, v and a captured bias) equal to the float64 oracle's
    by the error rule (torch's flex_attention has no backward on CPU without compile)."""
    q, k, v = (torch.randn(1, 2, 300, 16, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 600, device=device).requires_grad_()
    score_mod = relative_bias(bias, 300)
    block_mask = _block_mask(causal, 1, 1, 300, 300, 128)
    # One query block of 128 rows a chunk: three chunks. Each is checkpointed, so autograd
    # saves no chunk's (Hq, 128, Lk) scores or probabilities.
    monkeypatch.setattr(flex_dispatch, "FALLBACK_CHUNK_ELEMENTS", 2 * 300 * 128)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with fastattn.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastattn.flex_attention(q, k, v, score_mod, block_mask)
    assert max(saved) < 2 * 128 * 300, max(saved)
    q0, k0, v0 = (t.detach() for t in (q, k, v))  # torch's flex refuses inputs requiring grad on CPU
    assert_close_rule("fallback out", out, torch_flex.flex_attention(q0.double(), k0.double(), v0.double(),
                                                                     score_mod, block_mask),
                      torch_flex.flex_attention(q0, k0, v0, score_mod, block_mask))
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    oracle, base = _reference_grads(q, k, v, do, score_mod, block_mask, [bias], torch.bfloat16)
    for n, g, o, b in zip(["dq", "dk", "dv", "dbias"], got, oracle, base):
        assert_close_rule(f"fallback {n}", g, o, b, factor=GRAD_FACTOR)


def test_per_batch_block_mask_and_batch_index(device):
    """A BlockMask with a batch dim (each batch row its own documents) and a mask_mod that
    indexes a captured (B, L) tensor by b; BLOCK_SIZE (64, 32) and Lq != Lk."""
    document_id = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([20, 50, 26])),
                               torch.repeat_interleave(torch.arange(2), torch.tensor([70, 26]))])

    def per_batch_document(b, h, q_idx, kv_idx):
        return document_id[b, q_idx] == document_id[b, kv_idx + 16]

    q = torch.randn(2, 2, 96, 32, device=device, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 80, 32, device=device, dtype=torch.float16) for _ in range(2))
    block_mask = torch_flex.create_block_mask(per_batch_document, 2, 1, 96, 80, device="cpu", BLOCK_SIZE=(64, 32))
    out = fastattn.flex_attention(q, k, v, block_mask=block_mask)
    oracle = torch_flex.flex_attention(q.double(), k.double(), v.double(), block_mask=block_mask)
    assert_close_rule("per-batch documents", out, oracle, torch_flex.flex_attention(q, k, v, block_mask=block_mask))


def test_runs_inside_torch_compile(device):
    """Under torch.compile the call is a graph break that runs eagerly (dynamo does not trace
    the translator or the interpreter): the same output and gradient as without it."""
    torch._dynamo.reset()
    bias = torch.randn(2, 128, device=device)

    def model(q):
        return fastattn.flex_attention(q * 2, q, q, relative_bias(bias, 64))

    q = torch.randn(1, 2, 64, 16, device=device, requires_grad=True)
    compiled = torch.compile(model, backend="eager")(q)  # dynamo alone: no inductor compile time
    eager = model(q)
    do = torch.randn_like(eager)
    assert torch.equal(compiled, eager)
    assert torch.equal(torch.autograd.grad(compiled, q, do)[0], torch.autograd.grad(eager, q, do)[0])


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the poisoned rows
def test_unlisted_blocks_are_never_read_forward_or_backward(device):
    """NaN in blocks the causal BlockMask does not list reaches nothing: keys and values of the
    last key block poison no earlier query row's output or dq (the forward and dQ kernels skip
    it), and queries of the first query block poison no later key block's dk or dv (the
    dK/dV kernel walks the transposed lists). A visited block would: 0 * NaN is NaN."""
    n, blk = 128, 32
    block_mask = _block_mask(causal, 1, 1, n, n, blk)
    for poisoned in ("last keys", "first queries"):
        q, k, v = (torch.randn(1, 2, n, 16, device=device) for _ in range(3))
        if poisoned == "last keys":
            k[:, :, n - blk:], v[:, :, n - blk:] = float("nan"), float("nan")
        else:
            q[:, :, :blk] = float("nan")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = fastattn.flex_attention(q, k, v, block_mask=block_mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        if poisoned == "last keys":
            assert bool(out[:, :, :n - blk].isfinite().all()) and bool(dq[:, :, :n - blk].isfinite().all())
        else:
            assert bool(dk[:, :, blk:].isfinite().all()) and bool(dv[:, :, blk:].isfinite().all())


def tanh_softcap_20(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def test_fullgraph_compile_with_mods_that_translate(device):
    """Plain-function mods that translate and capture no tensor stay in the graph as fastattn's
    custom ops: torch.compile(fullgraph=True) takes the call, with the same output and gradients."""
    torch._dynamo.reset()
    q = torch.randn(1, 1, 32, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 1, 32, 16, device=device, requires_grad=True) for _ in range(2))
    block_mask = torch_flex.create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)

    def model(q, k, v):
        return fastattn.flex_attention(q, k, v, tanh_softcap_20, block_mask=block_mask)

    compiled = torch.compile(model, backend="eager", fullgraph=True)(q, k, v)
    eager = model(q, k, v)
    do = torch.randn_like(eager)
    assert torch.equal(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (q, k, v), do), torch.autograd.grad(eager, (q, k, v), do)):
        assert torch.equal(got, want)
    lists = [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
             block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks, block_mask.full_q_indices]
    args = (lists, [16, 16], [32, 32], flex_compiled.mods_key(tanh_softcap_20, causal), 0.25, False)
    torch.library.opcheck(flex_compiled.flex_fwd, (q, k, v, *args))
    torch.library.opcheck(flex_compiled.flex_bwd, (do, q.detach(), k.detach(), v.detach(), *args))

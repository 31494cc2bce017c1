"""Context-parallel attention (fastattn.distributed) on real process groups.

Spawned jobs of 2 and 4 CPU processes with the gloo backend (loopback only, file://
rendezvous in tmp_path, joined with a deadline) check ring and Ulysses attention, outputs
and gradients of every rank's shard, against the float64 reference of the full sequence by
the docs/design.md rule, with single-process ``fastattn.flash_attention`` on the torch backend
(plain PyTorch in the inputs' dtype) as the yardstick: fp32 mostly, plus bf16 and fp16 cases.
Process start-up is slow, so each job runs many cases. The torch path runs in the 2- and
4-rank jobs; the Triton kernels (interpreter on CPU, under ``use_backend("triton")`` so a
fallback cannot pass, NaN-poisoned outputs) in one 2-rank job.
"""
import itertools
import os
import random
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
import fastattn.distributed as fd
from fastattn.ops.flash.reference import attention_backward, attention_reference
from helpers import as64, assert_close_rule

JOB_SECONDS = 240  # a hung collective fails the test instead of blocking CI


def _poison_outputs():
    """As tests/conftest.py does in-process: kernel outputs start as NaN in the workers too."""
    from fastattn.ops import _launch

    def poisoned(*shape, like, dtype=None):
        t = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(255)

    _launch.empty = poisoned


def _dropout_keep(case, seed, shape):
    """The (B, Hq, L, L) keep-mask one process's ``flash_attention`` on the kernels draws from
    ``seed`` over the whole sequence (``dropout_keep_reference`` equals the kernels' mask:
    tests/test_flash.py), which a context-parallel call must draw too."""
    from fastattn.ops.flash.reference import dropout_keep_reference

    b, hq, length = shape
    return dropout_keep_reference(int(seed), b, hq, length, length, case["dropout"])


def _check_case(rank, world, case):
    """One attention call on this rank's shard vs the full-sequence oracle."""
    method, causal, zigzag, b, hq, hkv, length, d = (case[n] for n in
                                                     ("method", "causal", "zigzag", "b", "hq", "hkv", "l", "d"))
    gen = torch.Generator().manual_seed(case["seed"])  # same full tensors on every rank
    dtype = getattr(torch, case["dtype"])
    q, k, v, do = (torch.randn(b, h, length, d, generator=gen).to(dtype) for h in (hq, hkv, hkv, hq))
    full = {n: t.requires_grad_() for n, t in (("q", q), ("k", k), ("v", v))}
    opts = dict(window=case["window"], softcap=case["softcap"], dropout_p=case["dropout"])
    if case["alibi"]:  # (Hq,) slopes, or (B, Hq) with a batch of two
        opts["alibi_slopes"] = torch.rand((b, hq) if b > 1 else (hq,), generator=gen) * 0.5
    if case["sinks"]:
        full["sinks"] = torch.randn(hq, generator=gen).requires_grad_()
    if case["bias"] == "float":
        full["attn_bias"] = torch.randn(1, hq, length, length, generator=gen).to(dtype).requires_grad_()
    elif case["bias"] == "bool":  # every row keeps its first key, so none is empty
        opts["attn_bias"] = torch.rand(b, 1, length, length, generator=gen) > 0.3
        opts["attn_bias"][..., 0] = True
    torch.manual_seed(case["seed"])  # the call's dropout seed, redrawn below for the oracle's mask
    seed = torch.randint(0, 2**62, (1,)) if case["dropout"] else None

    def shard(t):
        return fd.shard_sequence(t, rank, world, zigzag=zigzag)

    # Oracle: float64 reference; yardstick: the plain-PyTorch reference in q's dtype.
    ref_opts = dict(opts, causal=causal, sinks=full.get("sinks"),
                    attn_bias=full.get("attn_bias", opts.get("attn_bias")))
    if case["dropout"]:
        ref_opts["dropout_mask"] = _dropout_keep(case, seed, (b, hq, length))
    args64 = {n: as64(t) for n, t in full.items()}
    oracle, lse64 = attention_reference(args64["q"], args64["k"], args64["v"], **{
        **ref_opts, "sinks": args64.get("sinks"), "attn_bias": args64.get("attn_bias", opts.get("attn_bias"))},
        return_lse=True)
    grads64 = torch.autograd.grad(oracle, list(args64.values()), do.double())
    base, lse_base = attention_reference(full["q"], full["k"], full["v"], **ref_opts, return_lse=True)
    grads_base = torch.autograd.grad(base, list(full.values()), do)

    def local_copy(t):
        t = shard(t.detach())
        if case.get("transposed"):  # the (B, L, H, D) buffer a model produces, viewed as (B, H, L, D)
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.clone(memory_format=torch.preserve_format).requires_grad_()

    local = {n: local_copy(t) for n, t in full.items() if n not in ("sinks", "attn_bias")}
    if case["sinks"]:
        local["sinks"] = full["sinks"].detach().clone().requires_grad_()
        opts["sinks"] = local["sinks"]
    # The ring takes this rank's query rows over every key; Ulysses the whole bias (it slices heads).
    rows = (lambda t: t) if method == "ulysses" else shard
    if case["bias"] == "float":
        local["attn_bias"] = rows(full["attn_bias"].detach()).clone().requires_grad_()
        opts["attn_bias"] = local["attn_bias"]
    elif case["bias"] == "bool":
        opts["attn_bias"] = rows(opts["attn_bias"])
    torch.manual_seed(case["seed"])
    with fastattn.use_backend(case["backend"]):
        if method in ("ring", "ulysses"):
            attend = fd.ring_attention if method == "ring" else fd.ulysses_attention
            out, lse = attend(local["q"], local["k"], local["v"], causal=causal, zigzag=zigzag, return_lse=True,
                              **opts)
            assert lse.dtype == torch.float32
            assert_close_rule(f"lse rank {rank}/{world} {case}", lse, shard(lse64), shard(lse_base))
        else:  # the nn-level switch, used as a context manager
            with fd.context_parallel(method="ring", zigzag=zigzag) as cp:
                assert fd.current() is cp
                out = fd.current()(local["q"], local["k"], local["v"], causal=causal, **opts)
            assert fd.current() is None
        grads = list(torch.autograd.grad(out, list(local.values()), shard(do)))
    # each rank holds its rows' (Ulysses: heads') share of the replicated sinks' and bias's gradient
    for name in ("sinks", "attn_bias") if method == "ulysses" else ("sinks",):
        if name in local:
            dist.all_reduce(grads[list(local).index(name)])
    tag = f"rank {rank}/{world} {case}"
    assert out.shape == (b, hq, length // world, d) and out.dtype == q.dtype, tag
    assert_close_rule(f"out {tag}", out, shard(oracle), shard(base))
    for name, g, g64, gb in zip(full, grads, grads64, grads_base):
        if name != "sinks" and not (name == "attn_bias" and method == "ulysses"):  # the ring's bias rows too
            g64, gb = shard(g64), shard(gb)
        assert_close_rule(f"d{name} {tag}", g, g64, gb, factor=3.0)


def _check_packed(rank, world, case):
    """Packed documents over uneven contiguous shards of the token stream (fd.varlen_attention)
    vs the single-process varlen reference: outputs, lse and gradients of this rank's tokens.
    With dropout the reference takes the masks one process's kernels draw from the call's seed
    (``varlen_dropout_keep_reference``, equal to them: tests/test_varlen.py)."""
    from fastattn.ops.flash.reference import varlen_attention_reference, varlen_dropout_keep_reference

    gen = torch.Generator().manual_seed(case["seed"])
    docs, shards, hq, hkv, d = case["docs"], case["shards"], case["hq"], case["hkv"], case["d"]
    total = sum(docs)
    cu = torch.tensor([0] + list(itertools.accumulate(docs)), dtype=torch.int32)
    q, k, v, do = (torch.randn(total, h, d, generator=gen) for h in (hq, hkv, hkv, hq))
    full = {"q": q, "k": k, "v": v}
    opts = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    if case["alibi"]:
        opts["alibi_slopes"] = torch.rand(len(docs), hq, generator=gen) * 0.5
    if case["sinks"]:
        full["sinks"] = torch.randn(hq, generator=gen)
    full = {n: t.requires_grad_() for n, t in full.items()}
    args64 = {n: as64(t) for n, t in full.items()}
    if case["dropout"]:
        torch.manual_seed(case["seed"])  # the call's dropout seed, redrawn below for the oracle's masks
        seed = int(torch.randint(0, 2**62, (1,)))
        opts.update(dropout_p=case["dropout"], dropout_masks=varlen_dropout_keep_reference(seed, cu, cu, hq,
                                                                                           case["dropout"]))

    def reference(a):
        out, lse = varlen_attention_reference(a["q"], a["k"], a["v"], cu, cu, sinks=a.get("sinks"), return_lse=True,
                                              **{**opts, "alibi_slopes": None if not case["alibi"] else
                                                 opts["alibi_slopes"].to(a["q"].dtype)})
        return out, lse, torch.autograd.grad(out, list(a.values()), do.to(out.dtype))

    oracle, lse64, grads64 = reference(args64)
    base, lse_base, grads_base = reference(full)
    start = sum(shards[:rank])
    rows = slice(start, start + shards[rank])
    local = {n: (t[rows] if n != "sinks" else t).detach().clone().requires_grad_() for n, t in full.items()}
    torch.manual_seed(case["seed"])
    with fastattn.use_backend(case["backend"]):
        out, lse = fd.varlen_attention(local["q"], local["k"], local["v"], cu, causal=case["causal"],
                                       window=case["window"], softcap=case["softcap"], sinks=local.get("sinks"),
                                       alibi_slopes=opts.get("alibi_slopes"), dropout_p=case["dropout"],
                                       return_lse=True)
        grads = list(torch.autograd.grad(out, list(local.values()), do[rows]))
    if case["sinks"]:
        dist.all_reduce(grads[-1])
    tag = f"packed rank {rank}/{world} {case}"
    assert_close_rule(f"out {tag}", out, oracle[rows], base[rows])
    assert_close_rule(f"lse {tag}", lse, lse64[:, rows], lse_base[:, rows])
    for name, g, g64, gb in zip(full, grads, grads64, grads_base):
        if name != "sinks":
            g64, gb = g64[rows], gb[rows]
        assert_close_rule(f"d{name} {tag}", g, g64, gb, factor=3.0)


class _OneProcess:
    """A world of one for ContextParallelAttention: flash_attention (packed: _varlen) with the
    same keywords."""

    def __call__(self, q, k, v, **options):
        return fastattn.functional.flash_attention(q, k, v, **options)

    def varlen(self, q, k, v, cu_seqlens, **options):
        return fastattn.functional.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, **options)


def _check_nn_module(rank, world):
    """A fastattn.nn.MultiHeadAttention whose kind is ContextParallelAttention(cp), fed this
    rank's shard of the tokens, gives this rank's shard of the single-process output and, summed
    over the ranks, its weights' and sinks' gradients (causal, GQA, zig-zag; then ALiBi, a
    window, softcap and learned sinks)."""
    gen = torch.Generator().manual_seed(1234)  # same weights and tokens on every rank
    torch.manual_seed(1234)
    cp = fd.context_parallel(method="ring")
    settings = [(dict(), {}), (dict(alibi=True), dict(window=(5, 0), softcap=3.0, sinks=True))]
    for layer, kind in settings:
        mha = fastattn.nn.MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, **layer,
                                             attention=fastattn.nn.ContextParallelAttention(_OneProcess(), **kind))
        if kind.get("sinks"):
            torch.nn.init.normal_(mha.kind.sinks)
        x = torch.randn(2, 8 * world, 32, generator=gen)
        do = torch.randn(2, 8 * world, 32, generator=gen)
        sharded = fastattn.nn.MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, **layer,
                                                 attention=fastattn.nn.ContextParallelAttention(cp, **kind))
        sharded.load_state_dict(mha.state_dict())
        with fastattn.use_backend("torch"):
            want = mha(x)
            grads_base = torch.autograd.grad(want, list(mha.parameters()), do)
            got = sharded(cp.shard(x, dim=1))  # (B, L, E): the sequence is dim 1
            grads = torch.autograd.grad(got, list(sharded.parameters()), cp.shard(do, dim=1))
            with pytest.raises(ValueError, match="context-parallel"):
                sharded(cp.shard(x, dim=1), attn_bias=torch.ones(1, 1, 4 * world, 4 * world, dtype=torch.bool))
            with cp:  # the with-block only sets fd.current(); a layer attends across ranks only by its kind
                assert torch.equal(mha(x), want)
        mha.double()
        oracle = mha(x.double())
        grads64 = torch.autograd.grad(oracle, list(mha.parameters()), do.double())
        tag = f"nn rank {rank}/{world} {layer} {kind}"
        assert_close_rule(tag, got, cp.shard(oracle, dim=1), cp.shard(want, dim=1))
        for (name, _), g, g64, gb in zip(mha.named_parameters(), grads, grads64, grads_base):
            dist.all_reduce(g)  # each rank's share of the gradient, from its tokens
            assert_close_rule(f"d{name} {tag}", g, g64, gb, factor=3.0)
    _check_nn_packed(rank, world, cp)


def _check_nn_packed(rank, world, cp):
    """Packed documents through the kind: this rank's uneven contiguous share of the tokens, RoPE
    at its documents' positions, ALiBi, window, softcap and sinks; output and summed gradients
    against one process."""
    from fastattn.nn.positional import packed_positions

    gen = torch.Generator().manual_seed(4321)
    docs = [5, 9 * world - 2, 3, 4]  # the second document spans every rank
    total = sum(docs)
    cu = torch.tensor([0] + list(itertools.accumulate(docs)), dtype=torch.int32)
    layer = dict(causal=True, alibi=True, rotary=fastattn.nn.RotaryEmbedding(8))
    kind = dict(window=(6, 0), softcap=3.0, sinks=True)
    mha = fastattn.nn.MultiHeadAttention(32, 4, num_kv_heads=2, **layer,
                                         attention=fastattn.nn.ContextParallelAttention(_OneProcess(), **kind))
    torch.nn.init.normal_(mha.kind.sinks)
    sharded = fastattn.nn.MultiHeadAttention(32, 4, num_kv_heads=2, **layer,
                                             attention=fastattn.nn.ContextParallelAttention(cp, **kind))
    sharded.load_state_dict(mha.state_dict())
    x, do = (torch.randn(1, total, 32, generator=gen) for _ in range(2))
    positions = cp.shard_packed(packed_positions(cu, total), dim=1)
    with fastattn.use_backend("torch"):
        want = mha(x, cu_seqlens=cu)
        grads_base = torch.autograd.grad(want, list(mha.parameters()), do)
        got = sharded(cp.shard_packed(x, dim=1), cu_seqlens=cu, offset=positions)
        grads = torch.autograd.grad(got, list(sharded.parameters()), cp.shard_packed(do, dim=1))
    mha.double()
    oracle = mha(x.double(), cu_seqlens=cu)
    grads64 = torch.autograd.grad(oracle, list(mha.parameters()), do.double())
    tag = f"nn packed rank {rank}/{world}"
    assert_close_rule(tag, got, cp.shard_packed(oracle, dim=1), cp.shard_packed(want, dim=1))
    for (name, _), g, g64, gb in zip(mha.named_parameters(), grads, grads64, grads_base):
        dist.all_reduce(g)
        assert_close_rule(f"d{name} {tag}", g, g64, gb, factor=3.0)


def _check_rejections(rank, world):
    """Bad sharding and head counts raise ValueError on every rank (no hang)."""
    q = torch.randn(1, 2, 6 if rank == 0 else 4, 16)
    with pytest.raises(ValueError, match="same shape"):
        fd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="same shape"):
        fd.ulysses_attention(q, q, q)
    odd = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="even"):
        fd.ring_attention(odd, odd, odd, causal=True)  # zig-zag by default under causal
    with pytest.raises(ValueError, match="multiples of 4 long; got Lk_local = 12"):
        fd.ring_attention(*(torch.randn(1, 2, 12, 16) for _ in range(3)), causal=True, dropout_p=0.1)
    heads = torch.randn(1, world + 1, 4, 16)
    with pytest.raises(ValueError, match="divisible by the world size"):
        fd.ulysses_attention(heads, heads, heads)
    even = torch.randn(1, world, 4, 16)
    with pytest.raises(ValueError, match=rf"attn_bias must cover the whole sequence, \(1 or 1, {world} or 1, "
                                         rf"{4 * world}, {4 * world}\), got \(1, 1, 4, {4 * world}\)"):
        fd.ulysses_attention(even, even, even, attn_bias=torch.zeros(1, 1, 4, 4 * world))
    with pytest.raises(ValueError, match="context-parallel attention takes the keywords"):
        fd.context_parallel()(q, q, q, attn_bias=q)
    packed = torch.randn(3 + rank, 2, 16)  # uneven shards of a packed stream of 3 + 4 (+ 5 + 6) tokens
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the ranks' total"):
        fd.varlen_attention(packed, packed, packed, torch.tensor([0, 5], dtype=torch.int32), causal=True)
    # A DeviceMesh names the ranks as well as a process group; a 2-D one must be cut to its cp dim.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
    x = torch.randn(1, 2, 4, 16)
    assert torch.equal(fd.ring_attention(x, x, x, mesh["cp"], causal=True), fd.ring_attention(x, x, x, causal=True))
    assert fd.context_parallel(mesh["cp"]).world_size == world
    with pytest.raises(ValueError, match="DeviceMesh of 2 dims"):
        fd.ulysses_attention(x, x, x, mesh)
    # The helpers: this rank's positions, and a gather that undoes the layout.
    x = torch.arange(4 * world).view(1, 1, 4 * world, 1).float()
    for zigzag in (False, True):
        mine = fd.shard_sequence(x, rank, world, zigzag=zigzag)
        assert torch.equal(mine.view(-1).long(), fd.shard_positions(4 * world, rank, world, zigzag=zigzag))
        assert torch.equal(fd.gather_sequence(mine, zigzag=zigzag), x)


def _worker(rank, world, init_file, cases, kernels):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    if kernels:
        # CPU ranks (gloo) run the kernels in the interpreter, GPU box or not. Triton reads
        # this when @triton.jit decorates, i.e. when fastattn.ops.flash.op is first imported,
        # which nothing in the worker has done yet.
        assert fastattn._env.interpreting() or "fastattn.ops.flash.kernels" not in sys.modules
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if kernels:
            _poison_outputs()
        else:
            _check_rejections(rank, world)
            _check_nn_module(rank, world)
        for case in cases:
            (_check_packed if "docs" in case else _check_case)(rank, world, case)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_job(tmp_path, world, cases, kernels=False):
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), cases, kernels), nprocs=world,
                   join=False)
    deadline = time.monotonic() + JOB_SECONDS
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):  # raises on a worker error
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process job did not finish in {JOB_SECONDS} s")


def _case(method, causal, zigzag, hq, hkv, length, d=16, b=1, backend="torch", dtype="float32",
          transposed=False, window=None, alibi=False, softcap=None, sinks=False, dropout=0.0, bias=None):
    """bias: None, "float" (a learned (1, Hq, L, L) bias, differentiated) or "bool" (a (B, 1, L, L) mask)."""
    return dict(method=method, causal=causal, zigzag=zigzag, b=b, hq=hq, hkv=hkv, l=length, d=d,
                backend=backend, dtype=dtype, transposed=transposed, window=window, alibi=alibi,
                softcap=softcap, sinks=sinks, dropout=dropout, bias=bias,
                seed=random.randrange(2**31))  # fresh inputs every run


def _packed(docs, shards, causal=True, hq=4, hkv=2, d=16, window=None, alibi=False, softcap=None, sinks=False,
            dropout=0.0, backend="auto"):
    """A packed-documents case: document lengths, and each rank's share of the token stream."""
    assert sum(docs) == sum(shards)
    return dict(docs=docs, shards=shards, causal=causal, hq=hq, hkv=hkv, d=d, window=window, alibi=alibi,
                softcap=softcap, sinks=sinks, dropout=dropout, backend=backend, seed=random.randrange(2**31))


def test_two_ranks_torch(tmp_path):
    cases = [
        _case("ring", False, False, 2, 2, 34, d=40, b=2),      # not causal, contiguous
        _case("ring", True, True, 4, 2, 36, d=32),             # causal zig-zag, GQA 2:1
        _case("ring", True, False, 3, 1, 30, d=64),            # causal contiguous, MQA 3:1
        _case("ulysses", True, False, 4, 2, 34, d=32),         # head-parallel, causal, GQA
        _case("ulysses", False, True, 2, 2, 36, d=16),         # zig-zag input, not causal
        _case("switch", True, True, 2, 2, 28, d=16),           # the nn-level switch
        _case("ring", True, True, 4, 2, 36, d=32, dtype="bfloat16", transposed=True),
        _case("ring", True, False, 2, 2, 36, d=32, dtype="float16"),
        # every flash_attention feature through the ring and Ulysses
        _case("ring", True, True, 4, 2, 24, window=(5, 0), softcap=3.0),          # band across chunks
        _case("ring", False, False, 2, 1, 24, b=2, window=(3, 4), alibi=True),    # two-sided, (B, Hq) slopes
        _case("ring", True, False, 2, 2, 24, alibi=True, sinks=True, dropout=0.3),
        _case("ring", False, True, 2, 1, 32, b=2, dropout=0.2),                   # dropout alone, zig-zag
        _case("ring", False, False, 2, 1, 32, window=(5, 2), dropout=0.2),        # keys from unaligned band edges
        _case("ring", False, True, 2, 2, 24, d=32, alibi=True, dtype="bfloat16"),
        _case("ulysses", True, False, 4, 2, 24, window=(4, 0), alibi=True, sinks=True, softcap=3.0, dropout=0.2),
        _case("switch", True, True, 2, 2, 24, window=(3, 0), sinks=True),
        _case("ring", True, True, 4, 2, 24, bias="float", sinks=True),             # a learned bias, dbias
        _case("ulysses", True, True, 4, 2, 24, bias="float", sinks=True),          # its heads of the whole bias
        # packed documents over uneven shards (13 + 24 tokens; the second document crosses)
        _packed([5, 20, 1, 11], [13, 24], window=(6, 0), alibi=True, sinks=True, softcap=3.0),
        _packed([9, 16, 12], [20, 17], causal=False, hq=2, hkv=1, alibi=True),  # rank 0 pads 5 query rows
        # dropout: each rank draws its rows of one process's mask (the reference with the kernels' masks)
        _packed([9, 16, 12], [20, 17], causal=False, hq=2, hkv=1, dropout=0.3, backend="torch"),
    ]
    _run_job(tmp_path, 2, cases)


def test_four_ranks_torch(tmp_path):
    cases = [
        _case("ring", True, True, 4, 2, 48, d=32),             # zig-zag: 8 chunks of 6
        _case("ring", True, False, 2, 2, 44, d=16, b=2),       # contiguous causal
        _case("ring", False, False, 8, 1, 40, d=64),           # MQA 8:1, not causal
        _case("ulysses", True, True, 8, 4, 48, d=16),          # head-parallel on zig-zag shards
        _case("ring", True, False, 2, 1, 48, window=(7, 0), alibi=True, sinks=True),  # 2 of 4 steps
        _case("ring", True, True, 4, 2, 32, softcap=2.0, dropout=0.25),
        _case("ring", False, True, 2, 2, 32, window=(4, 3), alibi=True),
        _case("ring", False, False, 2, 1, 32, b=2, bias="bool", softcap=2.0),       # a boolean mask
        _case("ulysses", False, True, 4, 4, 32, b=2, bias="bool", window=(6, 2)),
        _case("ulysses", True, True, 4, 4, 32, window=(5, 0), sinks=True, dropout=0.3),
        # a document over three ranks, one ending on a shard boundary, an empty one
        _packed([3, 25, 0, 6, 4], [7, 9, 13, 9], window=(8, 0), alibi=True, sinks=True),
        _packed([14, 10, 14], [10, 12, 7, 9], causal=False, softcap=2.0),
        _packed([14, 10, 14], [10, 12, 7, 9], causal=False, window=(3, 5), alibi=True, sinks=True),
        _packed([3, 25, 0, 6, 4], [7, 9, 13, 9], window=(8, 0), sinks=True, dropout=0.25, backend="torch"),
    ]
    _run_job(tmp_path, 4, cases)


def test_two_ranks_kernels(tmp_path):
    pytest.importorskip("triton")
    cases = [
        _case("ring", True, True, 4, 2, 44, d=32, backend="triton", transposed=True),  # flash_fwd/flash_bwd per step
        _case("ulysses", True, False, 2, 2, 36, d=16, backend="triton", dropout=0.2),
        _case("ring", True, True, 4, 2, 36, d=32, backend="triton", dtype="bfloat16"),
        # every feature: the pieces' windows, ALiBi on and off the diagonal, sinks, dropout
        _case("ring", True, True, 4, 2, 16, backend="triton", window=(5, 0), alibi=True, sinks=True, softcap=3.0,
              dropout=0.25),
        _case("ring", True, False, 2, 2, 16, backend="triton", bias="float"),
        _packed([5, 20, 1, 11], [13, 24], window=(6, 0), alibi=True, softcap=3.0, dropout=0.25, backend="triton"),
    ]
    _run_job(tmp_path, 2, cases, kernels=True)


# --- in-process checks of the helpers (no process group needed) -------------------------

@pytest.mark.parametrize("zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_roundtrip(world, zigzag):
    x = torch.randn(2, 3, 8 * world, 5)
    shards = [fd.shard_sequence(x, r, world, zigzag=zigzag) for r in range(world)]
    assert all(s.shape == (2, 3, 8, 5) for s in shards)
    assert torch.equal(fd.unshard_sequence(shards, zigzag=zigzag), x)
    if zigzag:  # rank r holds chunks r and 2W-1-r
        c = 4
        assert torch.equal(shards[0][:, :, c:], x[:, :, -c:])
        positions = torch.cat([fd.shard_positions(8 * world, r, world, zigzag=True) for r in range(world)])
        assert sorted(positions.tolist()) == list(range(8 * world))


def test_packed_bounds_tile_the_stream():
    """Contiguous shares of a packed stream: in rank order, covering it, sizes within one."""
    for total, world in ((7, 3), (8, 4), (5, 5)):
        bounds = [fd.packed_bounds(total, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    with pytest.raises(ValueError, match="total must be an int >= world_size = 4, got 3"):
        fd.packed_bounds(3, 0, 4)


@pytest.mark.parametrize("length,world,zigzag", [(10, 4, False), (12, 4, True), (7, 2, False)])
def test_uneven_shards_rejected(length, world, zigzag):
    with pytest.raises(ValueError, match=f"sequence length {length} cannot be split evenly"):
        fd.shard_sequence(torch.randn(1, 1, length, 4), 0, world, zigzag=zigzag)
    with pytest.raises(ValueError, match="rank must be"):
        fd.shard_sequence(torch.randn(1, 1, 8, 4), world, world)


def test_merge_partials_exact():
    """Attention over keys split in two, merged by LSE, equals attention over all keys;
    a block a row cannot see (lse -inf) contributes nothing, and two empty blocks give 0."""
    q, k, v = torch.randn(1, 2, 9, 8).double(), torch.randn(1, 2, 12, 8).double(), torch.randn(1, 2, 12, 8).double()
    want, want_lse = attention_reference(q, k, v, causal=True, return_lse=True)
    o1, l1 = attention_reference(q, k[:, :, :5], v[:, :, :5], window=(None, 7), return_lse=True)
    o2, l2 = attention_reference(q, k[:, :, 5:], v[:, :, 5:], causal=True, return_lse=True)
    assert torch.isneginf(l2).any()  # the early queries see nothing of the second block
    out, lse = fd.merge_partials(o1, l1, o2, l2)
    assert (out - want).abs().max() < 1e-12 and (lse - want_lse).abs().max() < 1e-12
    empty = torch.full_like(l1, float("-inf"))
    out0, lse0 = fd.merge_partials(torch.zeros_like(o1), empty, torch.zeros_like(o1), empty)
    assert torch.equal(out0, torch.zeros_like(o1)) and torch.isneginf(lse0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv,lq,lk", [(2, 2, 7, 7), (6, 2, 9, 5), (4, 1, 5, 11)], ids=str)
def test_backward_torch_matches_autograd(hq, hkv, lq, lk, causal):
    """The block backward with the block's own out/lse equals autograd of the reference,
    GQA and bottom-right causal included (lq > lk leaves fully masked rows)."""
    q = torch.randn(2, hq, lq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, lk, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, lk, 16, dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, causal=causal, return_lse=True)
    do = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), do)
    got = attention_backward(do, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                             scale=16 ** -0.5, causal=causal)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() < 1e-10


def test_single_rank_group(tmp_path):
    """World size 1 (in this process): one diagonal step, no P2P, same as flash_attention."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        q = torch.randn(1, 4, 12, 16, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(1, 2, 12, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        out = fd.ring_attention(q, k, v, causal=True)
        want = attention_reference(q, k, v, causal=True)
        do = torch.randn_like(out)
        for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
            assert (g - w).abs().max() < 1e-10
        assert (out - want).abs().max() < 1e-12
    finally:
        dist.destroy_process_group()


def test_not_initialised_and_bad_method():
    q = torch.randn(1, 1, 4, 8)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="not initialised"):
            fd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="method must be"):
        fd.context_parallel(method="tree")


@pytest.mark.parametrize("zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("band", [(None, 0), (5, 0), (3, 2), (None, None)], ids=str)
def test_schedule_covers_the_band(band, zigzag):
    """Every (query, key) pair inside the global band is attended by exactly one piece of one
    ring step, and nothing outside it; a window on the contiguous layout stops the ring early."""
    from fastattn.distributed.ring import Schedule
    from fastattn.ops.flash.reference import band_mask

    world, local = 4, 6
    length = world * local
    sched = Schedule(world, local, local, zigzag=zigzag, band=band, positional=True)
    seen = torch.zeros(length, length, dtype=torch.int64)
    for rank in range(world):
        for step in range(sched.steps):
            src = (rank - step) % world
            for piece in sched.pieces(rank, src):
                rows = fd.shard_positions(length, rank, world, zigzag=zigzag)[piece.q]
                cols = fd.shard_positions(length, src, world, zigzag=zigzag)[piece.k]
                window = band_mask(len(rows), len(cols), piece.left, piece.right)
                hit = torch.ones(len(rows), len(cols), dtype=torch.int64) if window is None else window.long()
                seen[rows[:, None], cols[None, :]] += hit
    want = band_mask(length, length, *band)
    want = torch.ones(length, length, dtype=torch.int64) if want is None else want.long()
    assert torch.equal(seen, want)
    if band == (5, 0) and not zigzag:
        assert sched.steps == 2  # keys 5 back reach only the previous rank's shard of 6
    elif band[1] != 0 or zigzag:
        assert sched.steps == world


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_schedule_covers_causal_pairs(world):
    """The per-step blocks of causal ring attention attend exactly the causal pairs of the
    rank's queries (counted from the global mask), and zig-zag gives every rank the same work."""
    from fastattn.bench.distributed import causal_work

    length = 4 * world
    for zigzag in (False, True):
        work = causal_work(length, world, zigzag)
        for rank in range(world):
            pos = fd.shard_positions(length, rank, world, zigzag=zigzag)
            assert work[rank] == int((torch.arange(length)[None, :] <= pos[:, None]).sum())
        if zigzag:
            assert len(set(work)) == 1
        else:  # the last rank sees the most keys
            assert work == sorted(work) and work[-1] > work[0]

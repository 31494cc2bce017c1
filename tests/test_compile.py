"""torch.compile(fullgraph=True) with the default (inductor) backend: every public op forward
and backward on the Triton kernels (interpreter on CPU) and on the plain-PyTorch fallback;
every model preset's training step and a KV-cache decode step on one of the two.

fullgraph=True turns any graph break into an error, and a host sync (``.item()``, ``.tolist()``,
``bool(tensor)``) is a graph break, so passing here means none is left on the compiled path.
Numbers are judged by the docs/design.md rule: the compiled run vs the float64 eager run on the
torch backend (oracle), against the float32 eager torch-backend run (yardstick).

The other test files' compile checks (test_api, test_sparse, test_linear, test_decode) use
backend="aot_eager", which never runs inductor's lowering; this file is the inductor one.
Shapes are tiny: inductor's C++ compile on CPU dominates the time, so nothing is compiled twice:
an op or a model that another case already compiles on one backend is not compiled again (the
cases below say which covers what).
"""
import copy

import pytest
import torch

import fastattn
from fastattn.models import (GPT, Encoder, EncoderConfig, EncoderDecoder, EncoderDecoderConfig, GPTConfig, ViT,
                             ViTConfig)
from tests.helpers import as64, assert_close_rule


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


NO_TRITON = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
BACKENDS = [pytest.param("torch", id="fallback"), pytest.param("triton", id="kernels", marks=NO_TRITON)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only oversubscribe a shared machine
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)


def _grads(out, tensors):
    """d(sum(out * w))/d(tensors) for a fixed random weight w (the same for every run)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=g).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), tensors)


# --------------------------------------------------------------------------------- ops

def _op_inputs(name):
    """Fresh random inputs for one op: (tensors needing gradients, other arguments)."""
    b, hq, hkv, l, d = 1, 2, 1, 32, 16
    q, k, v = (torch.randn(b, h, l, d, requires_grad=True) for h in (hq, hkv, hkv))
    if name == "sdpa":
        k, v = (torch.randn(b, hq, l, d, requires_grad=True) for _ in range(2))  # sdpa: no GQA by default
        return (q, k, v), dict(mask=torch.rand(b, 1, l, l) > 0.3)
    if name == "flash":  # Lk > Lq: cross-attention's shape, which the models compile only on the kernels
        k, v = (torch.randn(b, hkv, l + 8, d, requires_grad=True) for _ in range(2))
        return (q, k, v), {}
    if name == "sparse":
        return (q, k, v), dict(layout=fastattn.sparse.local(l, 16, block_size=16))
    if name == "performer":
        return (q, k, v), dict(projection=fastattn.performer_projection(16, d))
    if name == "linformer":
        return (q, k, v), dict(e=torch.randn(8, l) / 8 ** 0.5, f=torch.randn(8, l) / 8 ** 0.5)
    if name in ("kvcache", "kvcache_grad"):
        lmax = 40
        # the decode kernels have no backward (generation needs none): forward only there
        q1 = torch.randn(b, hq, 2, d, requires_grad=name == "kvcache_grad")
        cache = dict(k_cache=torch.randn(b, hkv, lmax, d), v_cache=torch.randn(b, hkv, lmax, d),
                     seqlens=torch.tensor([17], dtype=torch.int32))
        return (q1,), dict(cache, k_new=torch.randn(b, hkv, 2, d), v_new=torch.randn(b, hkv, 2, d))
    return (q, k, v), {}


def _op(name):
    """The op under test as a function of (tensors, other arguments)."""
    def flash(t, a):
        return fastattn.flash_attention(*t, causal=True, window=(8, 0), softcap=20.0)

    def sdpa(t, a):
        return fastattn.scaled_dot_product_attention(*t, attn_mask=a["mask"])

    def sparse(t, a):
        return fastattn.sparse_attention(*t, a["layout"], causal=True)

    def linear(t, a):
        return fastattn.linear_attention(*t, causal=True)

    def performer(t, a):
        return fastattn.performer_attention(*t, a["projection"], causal=True)

    def linformer(t, a):
        return fastattn.linformer_attention(*t, a["e"], a["f"])

    def kvcache(t, a):
        # the op writes k_new/v_new into the cache in place: attend over copies, so every run
        # starts from the same cache
        return fastattn.attention_with_kvcache(t[0], a["k_cache"].clone(), a["v_cache"].clone(), a["seqlens"],
                                               k_new=a["k_new"], v_new=a["v_new"])
    return dict(flash=flash, sdpa=sdpa, sparse=sparse, linear=linear, performer=performer, linformer=linformer,
                kvcache=kvcache, kvcache_grad=kvcache)[name]


# Every op on both backends, except: linear attention's fallback is the chunked form that the
# performer case compiles too (with other features), and attention_with_kvcache's fallback
# forward is part of its forward + backward case. (That fallback reads the cache lengths on
# the host; under compile it takes ops/decode/fallback.py decode_masked instead, which does not.)
OPS = ["flash", "sdpa", "sparse", "linear", "performer", "linformer"]
OP_CASES = [pytest.param(name, *b.values, id=f"{name}-{b.id}", marks=b.marks) for name in OPS for b in BACKENDS
            if (name, b.id) != ("linear", "fallback")]
OP_CASES += [pytest.param("kvcache", "triton", id="kvcache-kernels", marks=NO_TRITON)]
OP_CASES += [pytest.param("kvcache_grad", "torch", id="kvcache-backward-fallback")]


@pytest.mark.parametrize("name,backend", OP_CASES)
def test_public_op_compiles_fullgraph_with_inductor(name, backend):
    """Forward and backward of the compiled op (inductor, fullgraph) within the error rule
    (attention_with_kvcache: forward, as its kernels have no backward)."""
    tensors, args = _op_inputs(name)
    fn = _op(name)
    backward = any(t.requires_grad for t in tensors)
    with fastattn.use_backend(backend):
        got = torch.compile(fn, fullgraph=True)(tensors, args)
        got_grads = _grads(got, tensors) if backward else ()
    with fastattn.use_backend("torch"):
        t64 = tuple(as64(t) for t in tensors)
        oracle = fn(t64, {key: as64(a) for key, a in args.items()})
        oracle_grads = _grads(oracle, t64) if backward else ()
        base = fn(tensors, args)
        base_grads = _grads(base, tensors) if backward else ()
    assert_close_rule(f"{name} out", got, oracle, base)
    for i, (g, g64, gb) in enumerate(zip(got_grads, oracle_grads, base_grads)):
        assert_close_rule(f"{name} grad {i}", g, g64, gb, factor=3.0)


# ------------------------------------------------------------------------------ models

TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)


def _preset(name):
    """A tiny model and one training batch; the Encoder and EncoderDecoder batches are padded."""
    if name == "gpt":
        ids = torch.randint(0, 24, (2, 13))
        return GPT(GPTConfig(vocab_size=24, **TINY)), (ids[:, :-1], ids[:, 1:])
    if name == "encoder":
        cfg = EncoderConfig(vocab_size=24, **TINY)
        ids = torch.randint(3, 24, (2, 12))
        ids[1, 9:] = cfg.pad_token_id
        labels = torch.where(torch.rand(2, 12) < 0.3, ids, torch.full_like(ids, -100))
        labels[0, 0] = ids[0, 0]  # at least one label
        return Encoder(cfg), (ids, None, labels)
    if name == "encoder_decoder":
        cfg = EncoderDecoderConfig(vocab_size=24, positional="rope", **TINY)
        src = torch.randint(3, 24, (2, 10))
        src[0, 7:] = cfg.pad_token_id
        tgt = torch.randint(3, 24, (2, 7))
        return EncoderDecoder(cfg), (src, tgt[:, :-1], tgt[:, 1:])
    cfg = ViTConfig(image_size=8, patch_size=4, num_classes=4, **TINY)
    model = ViT(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the head starts at zero: give the gradients a path
    return model, (torch.randn(2, 3, 8, 8), torch.tensor([0, 3]))


def _train_step(model, batch):
    """Loss and the gradient of every parameter, from one forward + backward."""
    _, loss = model(*batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss, torch.cat([g.flatten() for g in grads])


def _as64(batch):
    return tuple(b.double() if isinstance(b, torch.Tensor) and b.is_floating_point() else b for b in batch)


# Every preset once. On the kernels the two that between them take every attention path a
# preset has: causal self-attention (GPT), padded bidirectional self-attention and
# cross-attention (EncoderDecoder); the other two on the fallback, whose attention paths the
# op cases above compile (flash and sdpa with masks, Lq != Lk).
MODEL_CASES = [pytest.param(name, "torch", id=f"{name}-fallback") for name in ("encoder", "vit")]
MODEL_CASES += [pytest.param(name, "triton", id=f"{name}-kernels", marks=NO_TRITON) for name in ("gpt", "encoder_decoder")]


@pytest.mark.parametrize("name,backend", MODEL_CASES)
def test_model_training_step_compiles_fullgraph_with_inductor(name, backend):
    """torch.compile(model, fullgraph=True): the loss and every parameter gradient of one
    training step within the error rule (before: "Could not guard on data-dependent
    expression" from the learned positions, graph breaks on the padding-mask host read)."""
    torch.manual_seed(0)
    model, batch = _preset(name)
    model.train()
    oracle_model = copy.deepcopy(model).double()
    with fastattn.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True)
        got = _train_step(compiled, batch)
    with fastattn.use_backend("torch"):
        oracle = _train_step(oracle_model, _as64(batch))
        base = _train_step(model, batch)
    assert_close_rule(f"{name} loss", got[0], oracle[0], base[0])
    assert_close_rule(f"{name} grads", got[1], oracle[1], base[1], factor=3.0)


@pytest.mark.parametrize("backend", [pytest.param("triton", id="kernels", marks=NO_TRITON)])
def test_gpt_kv_cache_decode_step_compiles_fullgraph_with_inductor(backend):
    """One decode step (a token in, its logits out, the cache appended) compiled; the logits
    equal the eager step's within the error rule and the cache holds the same keys. On the
    kernels only: the fallback's decode step is the kvcache-backward-fallback op case."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=24, positional="rope", **TINY)).eval()
    prompt, nxt = torch.randint(0, 24, (2, 5)), torch.randint(0, 24, (2, 1))

    def decode(model, tokens, cache, offset):
        return model(tokens, cache=cache, offset=offset)[0][:, -1]  # (B, V)

    def prefilled(m, dtype):
        cache = m.new_cache(2, 16)
        with torch.no_grad():
            m(prompt, cache=cache)
        return cache

    oracle_model = copy.deepcopy(model).double()
    with torch.no_grad():
        with fastattn.use_backend(backend):
            cache = prefilled(model, torch.float32)
            got = torch.compile(decode, fullgraph=True)(model, nxt, cache, 5)
        with fastattn.use_backend("torch"):
            cache64 = prefilled(oracle_model, torch.float64)
            oracle = decode(oracle_model, nxt, cache64, 5)
            cache32 = prefilled(model, torch.float32)
            base = decode(model, nxt, cache32, 5)
    assert_close_rule("decode logits", got, oracle, base)
    assert torch.equal(cache.seqlens(0), torch.tensor([6, 6], dtype=torch.int32)) and cache.max_seqlen(0) == 6
    assert_close_rule("cached keys", cache.keys(0)[:, :, :6], cache64.keys(0)[:, :, :6], cache32.keys(0)[:, :, :6])

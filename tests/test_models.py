"""fastattn.models: GPT, Encoder (MLM), EncoderDecoder (greedy + beam search) and ViT.

Tiny models on the torch backend (autouse fixture) except where a test enters
``use_backend("triton")`` to run a whole model on the kernels (interpreter on CPU).
"""
import copy
import io
import itertools

import pytest
import torch

import fastattn
from fastattn.models import (GPT, Encoder, EncoderConfig, EncoderDecoder, EncoderDecoderConfig, GPTConfig, ViT,
                             ViTConfig, gemma4_like_config)
from fastattn.nn import Linear, Linformer, MoEConfig, Performer, RotaryEmbedding, Sparse
from tests.helpers import assert_close_rule

POSITIONALS = ["learned", "sinusoidal", "rope", "alibi", "t5", "none"]
TINY = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


@pytest.fixture(autouse=True)
def torch_backend():
    # One intra-op thread: these tensors are tiny, and with -n 2 on a shared 2-core machine two
    # threads per worker oversubscribe the cores and run ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fastattn.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def _train(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("positional", POSITIONALS)
def test_gpt_overfits_and_caches(positional):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=24, n_kv_heads=2, positional=positional, **TINY))
    x = torch.randint(0, 24, (4, 12))
    losses = _train(m, (x[:, :-1], x[:, 1:]), 50, lr=1e-2)
    assert losses[-1] < losses[0] / 5, losses[::10]
    prompt = x[:, :3]
    with_cache = m.generate(prompt, 8)
    assert with_cache.shape == (4, 11)
    torch.testing.assert_close(with_cache, m.generate(prompt, 8, use_cache=False), rtol=0, atol=0)
    assert m.can_cache() == (positional != "t5")


@pytest.mark.parametrize("rope_dim", [None, 4], ids=["rope-all-channels", "rope-4-of-8-channels"])
def test_gpt_cached_logits_equal_full_pass(rope_dim):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=24, positional="rope", rope_dim=rope_dim, **TINY)).double().eval()
    rotaries = [mod for mod in m.modules() if isinstance(mod, RotaryEmbedding)]
    assert rotaries and all(r.dim == (rope_dim or 8) for r in rotaries)
    x = torch.randint(0, 24, (2, 10))
    full, _ = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :4], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache, offset=t)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full)


@pytest.mark.parametrize("rope_dim", [0, 3, 10], ids=["zero", "odd", "above-head-dim"])
def test_rope_dim_must_be_even_and_within_the_head(rope_dim):
    with pytest.raises(ValueError, match="rope_dim"):
        GPTConfig(vocab_size=24, positional="rope", rope_dim=rope_dim, **TINY)


def _assert_step_on_kernels(m, x):
    """One training step of GPT ``m`` on tokens x (B, L + 1) on the kernels: its logits and
    embedding gradient against the float64 torch-backend oracle, by the error rule with the
    torch-backend baseline as the yardstick."""
    def run(model, backend):
        with fastattn.use_backend(backend):
            logits, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        return logits, model.tok.weight.grad

    oracle, base, got = run(copy.deepcopy(m).double(), "torch"), run(copy.deepcopy(m), "torch"), run(m, "triton")
    assert_close_rule("logits", got[0], oracle[0], base[0])
    assert_close_rule("d_embedding", got[1], oracle[1], base[1], factor=3.0)


def _assert_cached_generation_recomputes(m, prompt, new, backend):
    """Greedy generation of ``new`` tokens through the KV cache under ``backend`` equals
    recomputing the whole sequence every step on the torch backend."""
    with fastattn.use_backend(backend):
        cached = m.generate(prompt, new)
    with fastattn.use_backend("torch"):
        full = m.generate(prompt, new, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=0)


def test_gpt_on_kernels_matches_torch_backend():
    """A whole GPT forward + backward on the Triton kernels vs the torch backend (error rule),
    and token-by-token generation on the decode kernels equal to recomputation."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, positional="alibi",
                    max_seq_len=32)
    m = GPT(cfg)
    x = torch.randint(0, 16, (1, 17))

    _assert_step_on_kernels(m, x)
    _assert_cached_generation_recomputes(m, x[:, :4], 5, "triton")


def test_gpt_with_head_dim_512_on_kernels_matches_torch_backend():
    """Head dim 512 (Gemma's global layers): a GPT forward + backward on the flash kernels vs
    the torch backend by the error rule (before: "triton" refused head dims above 256)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, d_model=1024, n_layers=1, n_heads=2, n_kv_heads=1, positional="rope",
                    d_ff=64, max_seq_len=16)
    m = GPT(cfg)
    x = torch.randint(0, 16, (1, 10))

    assert m.blocks.layers[0].self_attn.head_dim == 512
    _assert_step_on_kernels(m, x)


def _tiny_gemma(**overrides):
    """A Gemma-4-like GPT at test size: layer 0 slides (head dim 256, window 4), layer 1 is
    global (head dim 512), one KV head."""
    settings = dict(vocab_size=16, d_model=32, n_layers=2, n_heads=2, d_ff=32, sliding_window=4, global_every=2,
                    max_seq_len=64)
    return GPT(gemma4_like_config(**{**settings, **overrides}))


def test_gemma4_like_on_kernels_matches_torch_backend():
    """Per-layer head dims 256 (sliding window 4) and 512 (global): forward + backward on the
    flash kernels vs the torch backend by the error rule, and greedy generation through the
    per-layer KV cache ("auto": the decode kernels where they take the head dim) equal to
    recomputing the whole sequence every step."""
    torch.manual_seed(0)
    m = _tiny_gemma()
    layers = [layer.self_attn for layer in m.blocks.layers]
    assert [(a.head_dim, a.kind.window) for a in layers] == [(256, (3, 0)), (512, None)]
    x = torch.randint(0, 16, (2, 13))

    _assert_step_on_kernels(m, x)
    _assert_cached_generation_recomputes(m, x[:, :5], 6, "auto")


def test_gemma4_like_cached_logits_equal_full_pass():
    """float64: a prompt then one token at a time through the KV cache (one head dim per
    layer) gives the logits of one full pass; the window is in force (a global-only model
    differs)."""
    torch.manual_seed(0)
    m = _tiny_gemma().double().eval()
    x = torch.randint(0, 16, (2, 12))
    full, _ = m(x)
    cache = m.new_cache(2)
    assert [cache.keys(i).shape[-1] for i in range(2)] == [256, 512]
    parts = [m(x[:, :4], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache, offset=t)[0] for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    unwindowed = copy.deepcopy(m)
    unwindowed.blocks.layers[0].self_attn.kind.window = None
    assert (unwindowed(x)[0][:, 4:] - full[:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("settings, match", [
    (dict(global_every=2, sliding_window=None), "global_every"),
    (dict(attention=Linear()), "Flash"),
    (dict(global_head_dim=0), "global_head_dim"),
    (dict(rope_dim=384), "rope_dim"),
], ids=["global-every-without-window", "window-on-linear", "head-dim-0", "rope-dim-above-sliding-head-dim"])
def test_gemma4_like_config_refuses(settings, match):
    with pytest.raises(ValueError, match=match):
        _tiny_gemma(**settings)


def test_gemma4_like_paged_cache_refuses_mixed_head_dims():
    with pytest.raises(ValueError, match="one head dim"):
        _tiny_gemma().new_cache(1, 8, paged=True)


@pytest.mark.parametrize("attention", ["sparse", "performer", "linear"])
def test_gpt_trains_with_each_causal_attention(attention):
    torch.manual_seed(0)
    kind = {"sparse": Sparse(lambda lq, lk: fastattn.sparse.local(lk, 16, block_size=16, causal=True)),
            "performer": Performer(32), "linear": Linear()}[attention]
    m = GPT(GPTConfig(vocab_size=24, attention=kind, **TINY))
    x = torch.randint(0, 24, (4, 17))
    losses = _train(m, (x[:, :-1], x[:, 1:]), 40)
    assert losses[-1] < losses[0] / 3, losses[::10]
    assert not m.can_cache()
    torch.testing.assert_close(m.generate(x[:, :4], 4), m.generate(x[:, :4], 4, use_cache=False),
                               rtol=0, atol=0)  # recomputes every step either way: no cache to use


def test_gpt_moe_trains_and_adds_balance_loss():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=24, moe=MoEConfig(num_experts=4, top_k=2, aux_weight=0.1), **TINY))
    x = torch.randint(0, 24, (4, 12))
    logits, loss = m(x[:, :-1], x[:, 1:])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 24), x[:, 1:].reshape(-1))
    assert loss.item() > ce.item() + 0.05  # 2 layers x 0.1 x (balance loss >= ~1)
    losses = _train(m, (x[:, :-1], x[:, 1:]), 50)
    assert losses[-1] < losses[0] / 3, losses[::10]


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_encoder_mlm_overfits(positional):
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=24, positional=positional, **TINY)
    m = Encoder(cfg)
    ids = torch.randint(3, 24, (4, 12))
    ids[1, 9:] = cfg.pad_token_id
    inputs = ids.clone()
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, 2::4] = True
    masked &= ids != cfg.pad_token_id
    inputs[masked] = cfg.mask_token_id
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    losses = _train(m, (inputs, None, labels), 80, lr=5e-3)
    assert losses[-1] < losses[0] / 5, losses[::10]
    logits, _ = m(inputs)
    assert logits.shape == (4, 12, 24)
    # padding is ignored: changing padded tokens changes nothing for the real ones
    other = inputs.clone()
    other[1, 9:] = 5
    mask = inputs == cfg.pad_token_id
    torch.testing.assert_close(m(other, key_padding_mask=mask)[0][1, :9], logits[1, :9])


def test_config_checks_the_attention_at_construction():
    with pytest.raises(ValueError, match="GPTConfig: attention must be a fastattn.nn attention kind"):
        GPTConfig(vocab_size=24, attention="flash", **TINY)
    # a kind object is a spec: every layer of every model built from the config binds its own
    cfg = GPTConfig(vocab_size=24, attention=Performer(16), **TINY)
    a, b = GPT(cfg), GPT(cfg)
    assert a.blocks.layers[0].self_attn.kind.projection.data_ptr() != b.blocks.layers[0].self_attn.kind.projection.data_ptr()
    assert not a.can_cache() and GPT(GPTConfig(vocab_size=24, **TINY)).can_cache()


def test_encoder_linformer_forward_backward():
    m = Encoder(EncoderConfig(vocab_size=24, attention=Linformer(max_len=16, proj_dim=8), **TINY))
    ids = torch.randint(3, 24, (2, 16))
    _, loss = m(ids, labels=ids)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def _copy_task(n=4, length=6, vocab=12):
    cfg = EncoderDecoderConfig(vocab_size=vocab, **TINY)
    src = torch.randint(3, vocab, (n, length))
    tgt = torch.cat([torch.full((n, 1), cfg.bos_token_id), src], 1)  # bos + copy
    labels = torch.cat([src, torch.full((n, 1), cfg.eos_token_id)], 1)  # copy + eos
    return cfg, src, tgt, labels


@pytest.mark.parametrize("positional", ["sinusoidal", "alibi"])
def test_encoder_decoder_learns_to_copy(positional):
    torch.manual_seed(0)
    cfg, src, tgt, labels = _copy_task()
    cfg.positional = positional
    m = EncoderDecoder(cfg)
    losses = _train(m, (src, tgt, labels), 120)
    assert losses[-1] < losses[0] / 10, losses[::20]
    greedy = m.generate(src, 8)
    torch.testing.assert_close(greedy, m.generate(src, 8, use_cache=False), rtol=0, atol=0)
    torch.testing.assert_close(greedy[:, 1:7], src, rtol=0, atol=0)  # it copies
    assert (greedy[:, 7] == cfg.eos_token_id).all()
    beams = m.generate(src, 8, num_beams=3)  # greedy stops when all are done, beams may run on (pads)
    torch.testing.assert_close(beams[:, :greedy.shape[1]], greedy, rtol=0, atol=0)  # a confident model
    assert (beams[:, greedy.shape[1]:] == cfg.pad_token_id).all()


def _sequence_logprob(m, src, seq):
    """Sum of log-probs of seq[1:] given src, stopping after eos (pads after it cost nothing)."""
    logp = torch.log_softmax(m(src, seq[:, :-1])[0].double(), -1)
    total = 0.0
    for t in range(1, seq.shape[1]):
        total += logp[0, t - 1, seq[0, t]].item()
        if seq[0, t] == m.config.eos_token_id:
            break
    return total


def test_beam_search_is_exact_with_enough_beams():
    """With V^(n-1) beams over n steps, beam search is exhaustive: it must find the most likely
    sequence, and its reported score must be that sequence's log-probability."""
    torch.manual_seed(3)
    vocab, steps = 5, 3
    cfg = EncoderDecoderConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, positional="rope")
    m = EncoderDecoder(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.7)  # a flat random model: greedy is usually not optimal
    src = torch.randint(3, vocab, (2, 5))
    out, scores = m.generate(src, steps, num_beams=vocab ** (steps - 1), length_penalty=0.0, return_scores=True)
    greedy, gscores = m.generate(src, steps, return_scores=True)
    for i in range(2):
        best = max(_sequence_logprob(m, src[i:i + 1], torch.tensor([[cfg.bos_token_id, *s]]))
                   for s in itertools.product(range(vocab), repeat=steps)
                   if cfg.eos_token_id not in s[:-1] or all(t == cfg.pad_token_id for t in s[s.index(2) + 1:]))
        assert abs(scores[i].item() - best) < 1e-9
        assert abs(_sequence_logprob(m, src[i:i + 1], out[i:i + 1]) - best) < 1e-9
        assert abs(_sequence_logprob(m, src[i:i + 1], greedy[i:i + 1]) - gscores[i].item()) < 1e-9
        assert best >= gscores[i].item() - 1e-12
    torch.testing.assert_close(out, m.generate(src, steps, num_beams=vocab ** (steps - 1), length_penalty=0.0,
                                               use_cache=False), rtol=0, atol=0)
    torch.testing.assert_close(greedy, m.generate(src, steps, num_beams=1), rtol=0, atol=0)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_vit_overfits(positional):
    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=8, patch_size=4, channels=3, num_classes=4, positional=positional, **TINY))
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    logits, loss = m(images, labels)
    assert logits.shape == (8, 4) and abs(loss.item() - torch.log(torch.tensor(4.0)).item()) < 1e-4  # zero head
    losses = _train(m, (images, labels), 40)
    assert losses[-1] < losses[0] / 10, losses[::10]
    with pytest.raises(ValueError, match="images must be"):
        m(torch.randn(1, 3, 9, 9))


@pytest.mark.parametrize("name", ["gpt", "encoder", "encoder_decoder", "vit"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    make = {
        "gpt": lambda: GPT(GPTConfig(vocab_size=24, positional="t5", **TINY)),
        "encoder": lambda: Encoder(EncoderConfig(vocab_size=24, attention=Performer(), **TINY)),
        "encoder_decoder": lambda: EncoderDecoder(EncoderDecoderConfig(vocab_size=24, norm="rms", **TINY)),
        "vit": lambda: ViT(ViTConfig(image_size=8, patch_size=4, **TINY)),
    }[name]
    args = {"gpt": (torch.randint(0, 24, (2, 7)),), "encoder": (torch.randint(3, 24, (2, 7)),),
            "encoder_decoder": (torch.randint(3, 24, (2, 7)), torch.randint(3, 24, (2, 5))),
            "vit": (torch.randn(2, 3, 8, 8),)}[name]
    a = make().eval()
    if name == "vit":
        torch.nn.init.normal_(a.head.weight)  # the head starts at zero: give the outputs something to show
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make().eval()  # a fresh draw: different weights (and performer features) until loaded
    assert not torch.equal(a(*args)[0], b(*args)[0])
    b.load_state_dict(torch.load(buf))
    torch.testing.assert_close(b(*args)[0], a(*args)[0], rtol=0, atol=0)
    if hasattr(b, "tok") and hasattr(b, "head"):
        assert b.head.weight is b.tok.weight  # tied weights stay tied


def test_init_is_sensible():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4))
    x = torch.randint(0, 64, (4, 16))
    _, loss = m(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.2  # near-uniform predictions
    w = m.blocks.layers[0].self_attn.out_proj.weight
    assert abs(w.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.002  # residual projections scaled down


@pytest.mark.parametrize("positional", ["rope", "learned", "alibi"])
def test_gpt_packed_documents_equal_separate_runs(positional):
    """GPT(idx (1, total), cu_seqlens=...): documents packed in one row, no padding, give each
    document's own logits and the same gradients as running them one by one."""
    from fastattn.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, positional=positional,
                          max_seq_len=64)).double()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 11, 1, 3)]
    cu = torch.tensor([0, 5, 16, 17, 20], dtype=torch.int32)
    logits, _ = model(torch.cat(docs)[None], cu_seqlens=cu)
    grads = torch.autograd.grad(logits.sum(), list(model.parameters()))
    separate = [model(d[None])[0][0] for d in docs]
    want_grads = torch.autograd.grad(sum(s.sum() for s in separate), list(model.parameters()))
    assert (logits[0] - torch.cat(separate)).abs().max() < 1e-12
    assert max((g - w).abs().max() for g, w in zip(grads, want_grads)) < 1e-10


def test_packed_documents_need_one_row_and_a_kind_that_packs():
    from fastattn.nn import Linear, MultiHeadAttention

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        MultiHeadAttention(16, 2)(torch.randn(2, 8, 16), cu_seqlens=cu)
    with pytest.raises(ValueError, match="linear does not"):
        MultiHeadAttention(16, 2, attention=Linear())(torch.randn(1, 8, 16), cu_seqlens=cu)

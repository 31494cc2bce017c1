"""Existing models get fastattn without being rewritten: patch_sdpa, convert(model) and the
Hugging Face attention registration, judged against the unpatched models by the docs/design.md
rule (the unpatched model in float64 is the oracle, in float32 the yardstick)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.integrations import FastMultiheadAttention  # noqa: E402
from helpers import assert_close_rule, randn  # noqa: E402


def compare_models(make_model, make_inputs, fast, *, select=lambda out: out):
    """``fast(model)`` gives the model with fastattn. Outputs and parameter gradients of the
    fastattn model (fp32) vs the untouched model in float64 (oracle) and fp32 (yardstick)."""
    torch.manual_seed(0)
    base = make_model().float()
    oracle = copy.deepcopy(base).double()
    ours = fast(copy.deepcopy(base))
    inputs = make_inputs()
    outs = {}
    for name, model in (("ours", ours), ("oracle", oracle), ("base", base)):
        args = [x.double() if name == "oracle" and x.is_floating_point() else x for x in inputs]
        with fastattn.use_backend("triton" if name == "ours" else "auto"):  # no silent fallback
            out = select(model(*args))
        grad_out = torch.ones_like(out)  # d(sum)/d(out): the same for every model
        grads = torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad], grad_out.to(out.dtype))
        outs[name] = (out, torch.cat([g.flatten() for g in grads]))
    assert_close_rule("out", outs["ours"][0], outs["oracle"][0], outs["base"][0])
    assert_close_rule("param grads", outs["ours"][1], outs["oracle"][1], outs["base"][1], factor=3.0)


# ------------------------------------------------------------------------- patch_sdpa

def test_patch_sdpa_routes_to_fastattn_and_restores(device):
    original = F.scaled_dot_product_attention
    q, k, v = (randn((1, 2, 20, 32), torch.float32, device) for _ in range(3))
    with fastattn.patch_sdpa():
        assert fastattn.integrations.is_patched()
        with fastattn.use_backend("triton"):
            patched = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.equal(patched, fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))
        # Inputs the kernels cannot take go to torch's own function.
        q64, k64, v64 = (t.double() for t in (q, k, v))
        assert torch.equal(F.scaled_dot_product_attention(q64, k64, v64), original(q64, k64, v64))
    assert F.scaled_dot_product_attention is original
    fastattn.patch_sdpa()
    assert fastattn.integrations.is_patched()
    fastattn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is original


# ------------------------------------------------------------------------- convert

@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("masks", ["none", "causal", "padding", "float-mask+padding"])
def test_convert_transformer_encoder(batch_first, masks):
    b, l, e = 2, 19, 32

    def make_model():
        layer = nn.TransformerEncoderLayer(e, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    x = torch.randn(b, l, e) if batch_first else torch.randn(l, b, e)
    padding = torch.zeros(b, l, dtype=torch.bool)
    padding[1, -5:] = True  # the second sequence is 5 shorter
    kw = {}
    if masks == "causal":
        kw = dict(mask=nn.Transformer.generate_square_subsequent_mask(l), is_causal=True)
    elif masks == "padding":
        kw = dict(src_key_padding_mask=padding)
    elif masks == "float-mask+padding":
        kw = dict(mask=torch.randn(l, l), src_key_padding_mask=padding)

    class WithMasks(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = make_model()

        def forward(self, x):
            mask = kw.get("mask")
            if mask is not None and x.dtype == torch.float64:
                mask = mask.double()
            return self.encoder(x, mask=mask, src_key_padding_mask=kw.get("src_key_padding_mask"),
                                is_causal=kw.get("is_causal", False))

    def converted(model):
        fastattn.convert(model)
        assert all(type(m) is FastMultiheadAttention for m in model.modules() if isinstance(m, nn.MultiheadAttention))
        return model

    valid = ~padding if batch_first else ~padding.T
    compare_models(WithMasks, lambda: [x], converted, select=lambda out: out[valid])


def test_convert_keeps_weights_and_need_weights():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    state = copy.deepcopy(mha.state_dict())
    fastattn.convert(mha)
    assert type(mha) is FastMultiheadAttention
    assert all(torch.equal(state[n], t) for n, t in mha.state_dict().items())
    x = torch.randn(2, 7, 32)
    out, weights = mha(x, x, x)  # need_weights=True by default: torch's path, weights returned
    assert weights.shape == (2, 7, 7)
    out2, none = mha(x, x, x, need_weights=False)
    assert none is None and out2.shape == out.shape


# ------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def _hf_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    return {
        "llama-gqa": (LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128), "causal"),
        "gpt2": (GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128), "causal"),
        "bert": (BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=128), "masked"),
    }


@pytest.fixture(scope="module")
def hf_name():
    return fastattn.register_huggingface()


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bert"])
def test_huggingface_models_match_unpatched(arch, hf_name):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config, kind = _hf_configs()[arch]
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    b, l = 2, 23
    ids = torch.randint(0, 97, (b, l))
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[1, -6:] = 0  # a padded batch

    def make(impl):
        torch.manual_seed(0)
        model = auto.from_config(copy.deepcopy(config), attn_implementation=impl)
        return model.eval()  # no dropout: outputs are deterministic

    reference = make("eager")
    fast = make(hf_name)
    fast.load_state_dict(reference.state_dict())

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, attention_mask=attention_mask).logits

    valid = attention_mask.bool()
    compare_models(lambda: Logits(reference), lambda: [ids], lambda _: Logits(fast),
                   select=lambda out: out[valid])


def test_huggingface_generation_gives_the_same_tokens(hf_name):
    from transformers import AutoModelForCausalLM

    config, _ = _hf_configs()["llama-gqa"]
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    fast = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=hf_name).eval()
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for batched generation
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad(), fastattn.use_backend("triton"):
        got = fast.generate(ids, **kw)
    with torch.no_grad():
        want = reference.generate(ids, **kw)
    assert torch.equal(got, want)


def _mistral_sliding(window=8):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                         sliding_window=window)


def _pair(config, impl, reference_impl="eager"):
    """(reference model, fastattn model) with the same random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference_impl).eval()
    fast = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


class _Logits(nn.Module):
    """A causal LM as ids -> logits, so compare_models can differentiate it."""

    def __init__(self, model, attention_mask=None):
        super().__init__()
        self.model, self.attention_mask = model, attention_mask

    def forward(self, ids):
        return self.model(input_ids=ids, attention_mask=self.attention_mask).logits


def _spy_flash(monkeypatch, record):
    """Replaces the Hugging Face integration's flash_attention with a call that appends
    ``record(kwargs)`` to the returned list, then runs the real one."""
    from fastattn.integrations import huggingface

    seen, real = [], huggingface.flash_attention

    def spy(q, k, v, **kw):
        seen.append(record(kw))
        return real(q, k, v, **kw)
    monkeypatch.setattr(huggingface, "flash_attention", spy)
    return seen


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded"])
def test_huggingface_sliding_window_runs_the_band(padded, hf_name, monkeypatch):
    """Mistral with sliding_window=8 over 23 tokens: logits within the error rule of eager (the
    float64 eager model is the oracle). Without padding the kernel gets causal + window
    (W - 1, 0) and no dense mask, so it skips the tiles outside the band (before: the window
    was ignored and a dense (B, 1, L, L) mask walked every tile); a padded batch still passes
    transformers' dense mask."""
    reference, fast = _pair(_mistral_sliding(8), hf_name)
    b, l = 2, 23
    ids = torch.randint(0, 97, (b, l))
    attention_mask = torch.ones(b, l, dtype=torch.long)
    if padded:
        attention_mask[1, :6] = 0  # left padding, as for batched generation
    seen = _spy_flash(monkeypatch, lambda kw: dict(causal=kw["causal"], window=kw["window"],
                                                   dense=kw["attn_bias"] is not None))
    valid = attention_mask.bool()
    compare_models(lambda: _Logits(reference, attention_mask), lambda: [ids], lambda _: _Logits(fast, attention_mask),
                   select=lambda out: out[valid])
    want = dict(causal=False, window=None, dense=True) if padded else dict(causal=True, window=(7, 0), dense=False)
    assert seen and all(call == want for call in seen), seen


def test_huggingface_gemma4_head_dims_256_and_512_match_eager(hf_name, monkeypatch):
    """A tiny random Gemma 4 (transformers' own): a sliding layer at head dim 256 (window 8) and
    a global layer at head dim 512, through ``attn_implementation="fastattn"`` on the kernels:
    logits and parameter gradients within the error rule of eager in float64; the kernels get
    both head dims, the sliding one as causal + window (7, 0) with no dense mask."""
    from transformers.models.gemma4 import Gemma4TextConfig

    from fastattn.integrations import huggingface

    config = Gemma4TextConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              vocab_size_per_layer_input=97, hidden_size_per_layer_input=16,
                              max_position_embeddings=128)
    reference, fast = _pair(config, hf_name)
    ids = torch.randint(0, 97, (2, 19))
    seen, real = set(), huggingface.flash_attention

    def spy(q, k, v, **kw):
        seen.add((q.shape[-1], v.shape[-1], kw["causal"], kw["window"], kw["attn_bias"] is None))
        return real(q, k, v, **kw)
    monkeypatch.setattr(huggingface, "flash_attention", spy)
    compare_models(lambda: _Logits(reference), lambda: [ids], lambda _: _Logits(fast))
    assert seen == {(256, 256, True, (7, 0), True), (512, 512, True, None, True)}, seen


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padded"])
def test_huggingface_sliding_window_generation(padded, hf_name):
    """Greedy generation past the window (9 + 10 tokens, window 4) through the dynamic cache
    gives eager's tokens, on the band path (no padding) and the dense-mask path (padding)."""
    reference, fast = _pair(_mistral_sliding(4), hf_name)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad(), fastattn.use_backend("triton"):
        got = fast.generate(ids, **kw)
    with torch.no_grad():
        want = reference.generate(ids, **kw)
    assert torch.equal(got, want)


MASK_CASES = {  # name: (mask_function, local_size, q_offset, kv_offset, q_length, kv_length, padded, band?)
    "causal-prefill": ("causal", None, 0, 0, 6, 6, False, True),
    "causal-decode": ("causal", None, 9, 0, 1, 10, False, True),
    "sliding-decode-window-cache": ("sliding", 4, 9, 6, 1, 4, False, True),
    "sliding-prefill": ("sliding", 4, 0, 0, 12, 12, False, True),
    "sliding-padded": ("sliding", 4, 0, 0, 12, 12, True, False),
    "chunked": ("chunked", 4, 0, 0, 12, 12, False, False),
    "static-cache-prefill": ("causal", None, 0, 0, 6, 16, False, False),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_huggingface_mask_is_none_only_where_the_band_is_exact(case):
    """fastattn_mask returns None (the attention then runs bottom-right causal + window)
    exactly where that equals transformers' mask; otherwise transformers' dense mask."""
    from transformers import masking_utils as mu

    from fastattn.integrations.huggingface import fastattn_mask

    kind, local, q_off, kv_off, lq, lk, padded, band = MASK_CASES[case]
    fn = {"causal": mu.causal_mask_function, "sliding": mu.sliding_window_causal_mask_function(local or 0),
          "chunked": mu.chunked_causal_mask_function(local or 1, torch.zeros(2, dtype=torch.long))}[kind]
    pad = torch.ones(2, kv_off + lk, dtype=torch.long)
    if padded:
        pad[1, :3] = 0
    args = dict(batch_size=2, q_length=lq, kv_length=lk, q_offset=q_off, kv_offset=kv_off, mask_function=fn,
                attention_mask=pad.bool(), local_size=local)
    got = fastattn_mask(**args)
    dense = mu.sdpa_mask(**args, allow_is_causal_skip=False)
    if band:
        assert got is None
        # what the attention then computes: bottom-right causal, window (local - 1, 0)
        i = torch.arange(lq)[:, None] + (lk - lq)
        j = torch.arange(lk)[None, :]
        keep = (j <= i) & ((j >= i - (local - 1)) if local else True)
        assert torch.equal(dense, keep.expand(2, 1, lq, lk))
    else:
        assert got is not None and torch.equal(got, dense)


def test_huggingface_gpt_oss_sinks_match_eager(hf_name, monkeypatch):
    """gpt-oss passes its learned sinks as s_aux; through attn_implementation="fastattn" they
    reach the kernels as ``sinks`` (a spy sees them), and logits and every parameter gradient
    (the sinks' included) meet the error rule against eager in float64 (before: s_aux was
    ignored and the logits were 0.2 away from eager). Sinks of size ~2, sliding and full layers."""
    from transformers import GptOssConfig

    config = GptOssConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          experts_implementation="eager")  # the float64 oracle: grouped_mm takes no float64
    reference, fast = _pair(config, hf_name)
    with torch.no_grad():
        for model in (reference, fast):
            torch.manual_seed(1)
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks) * 2)
    seen = _spy_flash(monkeypatch, lambda kw: kw["sinks"] is not None)
    ids = torch.randint(0, 97, (1, 12))
    compare_models(lambda: _Logits(reference), lambda: [ids], lambda _: _Logits(fast))
    assert seen and all(seen), seen


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_model_compiles_fullgraph(training):
    """torch.compile(fullgraph=True) of a model using fastattn: no graph breaks from our ops."""
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
    model = fastattn.convert(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
    model.train(training)
    x = torch.randn(2, 17, 32, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(17)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask=mask, is_causal=True)
    if not training:
        assert_close_rule("out", out, model.double()(x.double(), mask=mask.double(), is_causal=True),
                          model.float()(x, mask=mask, is_causal=True))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("source", ["collator-kwargs", "position-ids"])
def test_huggingface_padding_free_batch_equals_the_padded_one(source, use_cache, hf_name, monkeypatch):
    """Packed documents in one row (DataCollatorWithFlattening's cu_seq_lens_q/k, or only
    position_ids restarting at 0) give the padded batch's loss and gradients, through
    flash_attention_varlen, and no dense block-diagonal mask is built or used. Without a cache
    (use_cache=False, as under gradient checkpointing) transformers detects the packing itself
    and asks the mask function for the block-diagonal pattern."""
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    config, _ = _hf_configs()["llama-gqa"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=hf_name).double()
    docs = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11, 3)]

    def loss_and_grads(**batch):
        model.zero_grad()
        loss = model(**batch, use_cache=use_cache).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    padded = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, d in enumerate(docs):
        padded[i, :len(d)], mask[i, :len(d)] = torch.tensor(d), 1
    labels = padded.masked_fill(mask == 0, -100)
    want_loss, want_grads = loss_and_grads(input_ids=padded, attention_mask=mask, labels=labels)

    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=source == "collator-kwargs", return_tensors="pt")(
        [{"input_ids": d} for d in docs])
    if source == "position-ids":
        assert "cu_seq_lens_q" not in flat
    varlen_calls, dense_masks, dense_calls = [], [], []
    from transformers import masking_utils

    from fastattn.integrations import huggingface

    real = huggingface.flash_attention_varlen
    monkeypatch.setattr(huggingface, "flash_attention_varlen", lambda *a, **kw: varlen_calls.append(1) or real(*a, **kw))
    # Spies on every way a dense mask could be built or used: transformers' sdpa_mask (what
    # fastattn_mask falls back to) and the dense attention function.
    real_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **kw: dense_masks.append(1) or real_mask(*a, **kw))
    real_dense = huggingface.flash_attention
    monkeypatch.setattr(huggingface, "flash_attention", lambda *a, **kw: dense_calls.append(1) or real_dense(*a, **kw))
    got_loss, got_grads = loss_and_grads(**flat)
    assert varlen_calls, "the packed batch did not go through flash_attention_varlen"
    assert not dense_masks, "a dense (L, L) mask was built for the packed batch"
    assert not dense_calls, "the packed batch reached the dense attention"
    # Same tokens, same loss terms (the padded loss averages the same 16 predicted tokens).
    assert (got_loss - want_loss).abs() < 1e-12 * max(1.0, want_loss.abs())
    assert (got_grads - want_grads).abs().max() < 1e-10


def _packed_pattern(lengths, window=None, bidirectional=False, rows=1):
    """transformers' mask function for documents of these lengths packed in each of ``rows``
    rows: causal (or not) on the positions restarting per document, within a document only."""
    from transformers.masking_utils import (and_masks, causal_mask_function, packed_sequence_mask_function,
                                            remap_positions_for_packed_sequence, sliding_window_overlay)

    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(rows, -1)  # (rows, L)
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].expand(rows, -1)
    pattern = causal_mask_function if window is None else and_masks(causal_mask_function,
                                                                    sliding_window_overlay(window))
    if bidirectional:
        pattern = lambda b, h, q, kv: torch.ones_like(torch.as_tensor(q), dtype=torch.bool)  # noqa: E731
    return and_masks(remap_positions_for_packed_sequence(pattern, positions), packed_sequence_mask_function(docs))


@pytest.mark.parametrize("case", ["causal", "sliding", "one-document", "bidirectional", "window-differs", "two-rows"])
def test_huggingface_mask_gives_offsets_only_for_packed_causal_documents(case):
    """fastattn_mask on a packed batch: the documents' offsets (O(L), no dense mask) where the
    pattern is causal (or sliding with the layer's window) per document, else the dense mask."""
    pytest.importorskip("transformers")
    from fastattn.integrations.huggingface import fastattn_mask

    lengths = {"one-document": [12]}.get(case, [5, 1, 9, 3])
    window = 4 if case in ("sliding", "window-differs") else None
    batch = 2 if case == "two-rows" else 1
    pattern = _packed_pattern(lengths, window=window, bidirectional=case == "bidirectional", rows=batch)
    l = sum(lengths)
    got = fastattn_mask(batch, l, l, mask_function=pattern, allow_is_causal_skip=False,
                        local_size=3 if case == "window-differs" else window, device="cpu")
    if case in ("causal", "sliding"):
        assert got.dtype == torch.int32 and got.tolist() == [0, 5, 6, 15, 18]
    else:
        want = torch.stack([torch.stack([torch.as_tensor(pattern(0, 0, torch.tensor(i), torch.tensor(j)))
                                         for j in range(l)]) for i in range(l)])
        assert got.shape == (batch, 1, l, l) and torch.equal(got[0, 0], want)

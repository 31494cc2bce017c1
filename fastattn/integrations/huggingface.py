"""Hugging Face transformers: ``attn_implementation="fastattn"``.

    import fastattn
    fastattn.register_huggingface()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")

Two pieces are registered under the name: the attention function (``fastattn_attention_forward``,
on ``fastattn.flash_attention``) and the mask function (``fastattn_mask``). The mask function
returns None whenever the layer's pattern is plain causal or sliding-window causal with no
padding and the queries are the last positions of the keys; the attention function then runs
``causal=True`` with ``window=(sliding_window - 1, 0)`` and no dense mask, so the kernel skips
every tile outside the band. For a padding-free batch (documents packed in one row, which
transformers detects from position_ids) it returns the documents' int32 offsets instead of a
dense block-diagonal mask, and the attention function runs ``flash_attention_varlen``: nothing
O(L^2) is built. Anything else gets transformers' own dense mask (``sdpa_mask``).

transformers is optional: nothing here is imported until ``register_huggingface()`` is called.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastattn.functional import flash_attention, flash_attention_varlen


def fastattn_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               sliding_window: Optional[int] = None, s_aux: Optional[Tensor] = None,
                               **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract.

    Args:
        module: the calling attention module (its ``is_causal`` is the default of ``is_causal``).
        query: (B, Hq, Lq, D). key, value: (B, Hkv, Lk, D), KV heads unrepeated (GQA runs by
            index in the kernel).
        attention_mask: from the registered mask function: bool (B or 1, 1, Lq, Lk), True =
            attend, with causality, window and padding in it; or None: plain causal (sliding
            when ``sliding_window`` is set), bottom-right aligned, is exact; or int32 (S+1,):
            the offsets of the documents packed in a batch of one row (see ``fastattn_mask``).
        dropout, scaling: attention dropout probability and the softmax scale.
        sliding_window: the layer's window W (transformers: key j is visible to query i iff
            ``i - W < j <= i``); with no mask it becomes ``window=(W - 1, 0)``.
        s_aux: (Hq,) attention-sink logits (gpt-oss), or None: passed on as ``sinks``
            (differentiable: the model's sinks train).
        kwargs: ``softcap`` (Gemma 2's logit soft-capping), ``position_bias`` (T5-style additive
            bias, combined with the mask); ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
            ``max_length_q`` / ``max_length_k`` (padding-free batches from
            ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or ``position_ids``
            that restart at 0 in a batch of one row: the packed documents go through
            ``fastattn.flash_attention_varlen`` and the dense block-diagonal mask is not used.
            The rest is ignored.

    Returns:
        ((B, Lq, Hq, D), None): no attention weights, as with "sdpa".

    Raises:
        ValueError: as ``fastattn.flash_attention`` (e.g. sinks not of shape (Hq,)).
    """
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = _packed_offsets(query, key, attention_mask, kwargs)
    if packed is not None:
        (cu_q, cu_k), (max_q, max_k) = packed
        window = (int(sliding_window) - 1, 0) if sliding_window is not None and is_causal else None
        # (1, H, total, D) -> (total, H, D): views
        out = flash_attention_varlen(*(t[0].transpose(0, 1) for t in (query, key, value)), cu_q, cu_k, max_q, max_k,
                                     causal=bool(is_causal), window=window, scale=scaling,
                                     softcap=kwargs.get("softcap"), dropout_p=dropout, sinks=sinks)
        return out[None], None  # (total, H, D) -> (1, total, H, D)
    causal, window = False, None
    if attention_mask is None and is_causal:
        causal = True  # the mask function returns None only where bottom-right causal is exact
        if sliding_window is not None:
            window = (int(sliding_window) - 1, 0)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style: an additive bias combined with the mask
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype.is_floating_point:
            attention_mask = position_bias + attention_mask
        else:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
    out = flash_attention(query, key, value, causal=causal, window=window, scale=scaling, attn_bias=attention_mask,
                          softcap=kwargs.get("softcap"), dropout_p=dropout, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None  # (B, H, L, D) -> (B, L, H, D)


def _packed_offsets(query: Tensor, key: Tensor, attention_mask: Optional[Tensor], kwargs: dict):
    """((cu_q, cu_k), (max_q, max_k)) int32 offsets of a padding-free batch, or None.

    From ``cu_seq_lens_q/k`` (and ``max_length_q/k``) when the data collator gave them, else
    from ``attention_mask`` when the mask function returned offsets (``_packed_documents``),
    else from ``position_ids`` restarting at 0 inside one row (read on the host, not under
    torch.compile). Only a batch of one row whose queries are its keys (training, prefill
    without a cache) is packed."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.dim() == 1:
            raise ValueError(f"fastattn (attn_implementation='fastattn'): packed-document offsets "
                             f"{tuple(attention_mask.shape)} came with query {tuple(query.shape)} and key "
                             f"{tuple(key.shape)}; they describe one row whose queries are its keys")
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        as_int = [None if m is None else int(m) for m in (max_q, max_k)] if not torch.compiler.is_compiling() \
            else [None, None]
        return (cu_q.to(torch.int32), cu_k.to(torch.int32)), tuple(as_int)
    if attention_mask is not None and attention_mask.dim() == 1:  # the mask function's offsets
        return (attention_mask, attention_mask), (None, None)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != query.shape[2] or torch.compiler.is_compiling():
        return None
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() <= 1 or int(starts[0]) != 0:  # one document (or not restarting at 0): not packed
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return (cu, cu), (None, None)


def _band_pattern(mask_function, local_size: Optional[int]) -> bool:
    """Whether ``mask_function`` is plain causal (``local_size`` None) or sliding-window causal
    with window ``local_size`` (transformers: ``i - W < j <= i``), read off two rows past the
    window so that any other pattern (chunked attention, which also comes with a local_size)
    is told apart. Index-based mask functions only (transformers' plain patterns are)."""
    w = 1 if local_size is None else int(local_size)
    q_idx = torch.arange(w + 1, w + 3)[:, None]  # (2, 1): rows w+1, w+2
    kv_idx = torch.arange(w + 4)[None, :]  # (1, w+4)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = torch.as_tensor(mask_function(zero, zero, q_idx, kv_idx)).expand(2, w + 4)
    except Exception:  # not index-based: not one of the plain patterns
        return False
    want = kv_idx <= q_idx
    if local_size is not None:
        want = want & (kv_idx > q_idx - w)
    return bool(torch.equal(got.to(torch.bool), want))


def _packed_documents(batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset, mask_function,
                      attention_mask: Optional[Tensor], local_size: Optional[int], device) -> Optional[Tensor]:
    """int32 (S+1,) offsets of the documents of a padding-free batch, or None (then the caller
    builds transformers' dense mask).

    transformers packs by position_ids (documents in one row, positions restarting) and hands
    the mask function a pattern that is causal (sliding with ``local_size``) inside each
    document and False across documents. Instead of evaluating it on all L x L pairs, this reads
    it on O(L) pairs: the boundaries are where a token does not see the one before it; then
    every token must see itself and the farthest key its document and window allow, and
    must see neither the next token, nor the key just past its window, nor the last token of
    the previous document. Only for one row with no padding mask, queries equal to keys at
    offset 0, not under torch.compile (the boundaries are read on the host), and more than one
    document; any pattern that fails a probe, or whose function does not take index tensors,
    gets None."""
    if (batch_size != 1 or attention_mask is not None or q_length != kv_length or q_length < 2
            or not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0)
            or (local_size is not None and int(local_size) < 2) or torch.compiler.is_compiling()):
        return None
    i = torch.arange(q_length, device=device)
    zero = torch.zeros_like(i)

    def sees(q_idx, kv_idx):  # the pattern at the pairs (q_idx[n], kv_idx[n])
        return torch.as_tensor(mask_function(zero[:q_idx.numel()], zero[:q_idx.numel()], q_idx, kv_idx)).to(torch.bool)

    try:
        starts = torch.cat([i[:1], (~sees(i[1:], i[:-1])).nonzero().flatten() + 1])
        if starts.numel() < 2:
            return None
        start_of = starts[torch.searchsorted(starts, i, right=True) - 1]  # (L,): first token of each token's document
        farthest, beyond = start_of, i - q_length  # no window: the document's first token, nothing beyond
        if local_size is not None:
            farthest = torch.maximum(start_of, i - int(local_size) + 1)
            beyond = i - int(local_size)
        later = i[beyond >= start_of]
        previous = i[start_of > 0]
        ok = (bool(sees(i, i).all()) and not bool(sees(i[:-1], i[1:]).any()) and bool(sees(i, farthest).all())
              and not bool(sees(later, later - int(local_size or 0)).any())
              and not bool(sees(previous, start_of[previous] - 1).any()))
    except Exception:  # a pattern that cannot be read at index tensors: not transformers' packing
        return None
    return torch.cat([starts, starts.new_tensor([q_length])]).to(torch.int32) if ok else None


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: Optional[Tensor] = None, local_size: Optional[int] = None,
                  allow_is_causal_skip: bool = True, **kwargs):
    """transformers' mask-interface contract (the arguments of ``masking_utils.sdpa_mask``).

    Returns None, meaning "bottom-right causal, with ``window=(local_size - 1, 0)`` for a
    sliding layer, is exact", when all of: transformers allows skipping the mask
    (``allow_is_causal_skip``: no custom overlays or packing), the pattern is plain causal or
    sliding-window causal, no key in range is padding (``attention_mask`` (B, >= kv_offset +
    kv_length) all ones; not read under torch.compile), and the queries are the last positions
    of the keys (integer offsets with ``q_offset - kv_offset == kv_length - q_length``, as with a
    dynamic cache; a static cache's preallocated keys are not). Returns int32 (S+1,) document
    offsets for a padding-free batch (``_packed_documents``), which the attention function runs
    through ``flash_attention_varlen``. Otherwise transformers' ``sdpa_mask`` (a bool
    (B, 1, Lq, Lk) mask, True = attend, or None where it finds none needed).
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    # Every fallback is transformers' dense mask: its own "None = use is_causal" cases assume
    # torch SDPA's top-left alignment (e.g. a static cache's prefill), not this function's.
    dense = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                 local_size=local_size, allow_is_causal_skip=False, **kwargs)
    aligned = (isinstance(q_offset, int) and isinstance(kv_offset, int)
               and q_offset - kv_offset == kv_length - q_length)
    if not (allow_is_causal_skip and aligned):
        documents = _packed_documents(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                      attention_mask, local_size, kwargs.get("device"))
        return documents if documents is not None else sdpa_mask(**dense)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        if torch.compiler.is_compiling():
            return sdpa_mask(**dense)  # reading it would break the graph
        if not bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            return sdpa_mask(**dense)
    if mask_function is causal_mask_function and local_size is None:
        return None
    if torch.compiler.is_compiling():
        return sdpa_mask(**dense)  # the pattern probe reads values
    return None if _band_pattern(mask_function, local_size) else sdpa_mask(**dense)


def register_huggingface(name: str = "fastattn") -> str:
    """Register fastattn with transformers' attention and mask interfaces (``fastattn_attention_forward``
    and ``fastattn_mask``); returns the name to pass as ``attn_implementation``. Raises
    ImportError if transformers is not installed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
    return name

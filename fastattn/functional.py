"""Public attention functions: signatures and docstrings; each body is ``check -> run``.

``fastattn.validation`` checks the arguments and builds one validated call record; the op's
``fastattn/ops/<op>/dispatch.py: run`` asks ``fastattn.backend.route`` which implementation runs
(the kernels in ``ops/<op>/op.py``, torch's fused SDPA, or the pure-PyTorch reference in
``ops/<op>/reference.py``) and runs it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import validation
from fastattn.validation import default_scale  # noqa: F401  (fastattn.nn reads the scale rule here)
from fastattn.validation import KV_CACHE_DTYPES  # noqa: F401  (fastattn.nn reads the 8-bit cache dtypes here)
from fastattn.ops.flash import dispatch as flash_dispatch


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[tuple] = None,
    attn_bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    dropout_p: float = 0.0,
    sinks: Optional[Tensor] = None,
    return_lse: bool = False,
    q_descale: Optional[Tensor] = None,
    k_descale: Optional[Tensor] = None,
    v_descale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    qk_quant: Optional[str] = None,
):
    """Exact attention with every FlashAttention feature, computed blockwise.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides. Hq must be a
            multiple of Hkv (GQA/MQA): query head h uses kv head ``h // (Hq // Hkv)``.
        causal: bottom-right aligned, as FlashAttention: query i sees key j iff
            ``j <= i + Lk - Lq`` (what a KV cache and chunked prefill need).
        scale: multiplies q @ k^T; default ``1 / sqrt(D)``.
        window: ``(left, right)``, ints >= 0 or None for unbounded: query i sees keys
            ``i + Lk - Lq - left .. i + Lk - Lq + right``. Combines with ``causal``.
        attn_bias: broadcastable to (B, Hq, Lq, Lk): bool (True = attend) or additive float
            (differentiable). Broadcast dims are read with stride 0, never copied.
        alibi_slopes: (Hq,) or (B, Hq): adds ``-slope * |i + Lk - Lq - j|``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (before bias and masks).
        dropout_p: dropout on the attention probabilities, drawn inside the kernel from
            torch's generator (``torch.manual_seed`` makes it repeatable).
        sinks: (Hq,) learnable attention-sink logits (gpt-oss's ``s_aux``): head h's softmax
            denominator gains ``exp(sinks[h])``, a key with no value. Differentiable.
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log (with
            sinks, the sink's term included).
        q_descale, k_descale, v_descale: FP8 forward (FlashAttention 3's arguments): with q, k,
            v all ``float8_e4m3fn`` (or all ``float8_e5m2``), float32 (B, Hkv) or None (1): the
            real values are ``q.float() * q_descale[b, h // (Hq // Hkv)]`` (k and v likewise
            per kv head). The scores are fp8 products, and P is cast to e4m3 (times 256, so
            small probabilities survive) for the PV product, as FlashAttention 3 does.
        out_dtype: the output dtype of a low-precision call: bfloat16 (the fp8 default),
            float16 or float32; None otherwise.
        qk_quant: "int8" (fp16/bf16 inputs): the scores come from INT8 products of q and k
            quantized per token, after subtracting K's mean over the sequence
            (``fastattn.ops.flash.reference.smooth_quantize_int8``: SageAttention's
            smoothing); P @ V stays in q's dtype.
            Both low-precision modes are forward-only (inference): no dropout, no input that
            requires grad. Off the kernels they compute the reference in float32 on the
            dequantized inputs.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype (or ``out_dtype``), or ``(out, lse)``. A row whose
        keys are all masked gives out 0 and lse -inf (with sinks: lse = sinks[h]).

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices or options (the message names the
            argument; among them a descale of the wrong shape, dtype or device, NaN, inf or
            <= 0 (values checked off CUDA only: reading them would sync), a descale without fp8
            inputs, fp8 q with 16-bit k, qk_quant with fp32 inputs, dropout or inputs that
            require grad with either mode), or, under ``use_backend("triton")``, an input the
            kernels cannot take (fp8 below compute capability 8.9).

    Equivalent code::

        s = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
        s = softcap * tanh(s / softcap) + attn_bias + alibi, masked by causal/window
        out = dropout(softmax(s, -1)) @ v.repeat_interleave(Hq // Hkv, 1)
        # with sinks: softmax(cat([s, sinks[None, :, None, None].expand(B, Hq, Lq, 1)], -1), -1)[..., :Lk]
    """
    call = validation.check_flash("flash_attention", q, k, v, causal=causal, scale=scale, window=window,
                                  attn_bias=attn_bias, alibi_slopes=alibi_slopes, softcap=softcap,
                                  dropout_p=dropout_p, sinks=sinks, return_lse=return_lse,
                                  descales=dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale),
                                  out_dtype=out_dtype, qk_quant=qk_quant)
    return flash_dispatch.run("flash_attention", call)


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                           causal: bool = False, scale: Optional[float] = None, window: Optional[tuple] = None,
                           alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                           dropout_p: float = 0.0, sinks: Optional[Tensor] = None, return_lse: bool = False,
                           q_descale: Optional[Tensor] = None, k_descale: Optional[Tensor] = None,
                           v_descale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                           qk_quant: Optional[str] = None):
    """Exact attention over packed variable-length sequences (FlashAttention's varlen layout).

    Several sequences share one packed tensor with no padding; each attends only inside
    itself. Every ``flash_attention`` feature applies per sequence.

    Args:
        q: (total_q, Hq, D). k: (total_k, Hkv, D). v: (total_k, Hkv, Dv). Any strides; Hq a
            multiple of Hkv (GQA by index).
        cu_seqlens_q, cu_seqlens_k: int32 (B+1,) offsets: sequence b holds rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
            of k/v (a sequence may have no keys: its rows give 0).
        max_seqlen_q, max_seqlen_k: the longest sequence, or None; FlashAttention's arguments,
            checked (on CPU) but not needed: the grid comes from shapes.
        causal, scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap, dropout_p, sinks: as
            ``flash_attention``, bottom-right aligned per sequence (query i of sequence b sees
            key j iff ``j <= i + Lk_b - Lq_b``).
        return_lse: also return the row logsumexp, float32 (Hq, total_q), natural log.
        q_descale, k_descale, v_descale, out_dtype, qk_quant: as ``flash_attention``, the
            descales (B, Hkv) per sequence; qk_quant's mean key is each sequence's own.

    Returns:
        out (total_q, Hq, Dv) in q's dtype (or ``out_dtype``), or ``(out, lse)``.

    Raises:
        ValueError: as ``flash_attention``, plus offsets that are not int32 (B+1,), do not start
            at 0, decrease, or do not end at the packed totals, or a max_seqlen below the longest
            sequence (these values are checked on CPU tensors, outside torch.compile's tracing;
            on a GPU nothing is read on the host, and the kernels clamp the offsets instead).

    Equivalent code, per sequence b (q_b = q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], likewise k_b, v_b)::

        out[cu_seqlens_q[b]:cu_seqlens_q[b+1]] = flash_attention(
            q_b.transpose(0, 1)[None], k_b.transpose(0, 1)[None], v_b.transpose(0, 1)[None],
            causal=causal, ...)[0].transpose(0, 1)
    """
    call = validation.check_flash_varlen(
        "flash_attention_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, sinks=sinks,
        return_lse=return_lse, descales=dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale),
        out_dtype=out_dtype, qk_quant=qk_quant)
    return flash_dispatch.run("flash_attention_varlen", call)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    The rule: it behaves exactly like torch's function, including what it accepts and what it
    refuses. Calls the kernels can take run the kernels; every other call (a backend or input
    the kernels do not take, an empty input, dropout_p=1.0, a NaN scale, a float mask of
    another dtype, nested tensors, ...) runs torch's own function, captured at import, so the
    result or the error is torch's. ``flash_attention`` is the stricter fastattn contract.

    Args:
        query: (N..., Hq, Lq, E), any number of leading batch dims (or none: (Lq, E)).
        key: (N..., Hkv, Lk, E). value: (N..., Hkv, Lk, Ev). Leading dims broadcast as in
            torch; a single kv (or query) head broadcasts over the other's heads. Leading
            dims are folded into one batch dim as a view (a copy only where their strides
            cannot merge).
        attn_mask: broadcastable to (N..., Hq, Lq, Lk): bool (True = attend) or additive
            float in query's dtype; or torch's ``causal_lower_right(...)`` /
            ``causal_upper_left(...)`` bias objects.
        is_causal: top-left aligned, as torch: query i sees key j iff ``j <= i``. With an
            ``attn_mask`` both apply, as in torch's default path (torch's math backend
            refuses the pair; its default CPU and CUDA dispatch combine them).
        enable_gqa: allow Hq to be a multiple of Hkv (otherwise they must be equal, or 1).

    Returns:
        (N..., Hq, Lq, Ev). Fully masked rows give 0, as torch >= 2.5 does.

    Raises:
        ValueError: Hq != Hkv without ``enable_gqa``; an ``attn_mask`` that is neither a
            Tensor, a CausalBias nor None; under
            ``use_backend("triton")``, any input the kernels cannot take (with the reasons).
            Otherwise what torch's function raises.

    Equivalent code: ``torch.nn.functional.scaled_dot_product_attention`` itself.
    """
    return flash_dispatch.run_sdpa("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p,
                                   is_causal, scale, enable_gqa)


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens=None, *,
                           k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, causal: bool = True,
                           scale: Optional[float] = None, window: Optional[tuple] = None,
                           alibi_slopes: Optional[Tensor] = None, softcap: Optional[float] = None,
                           num_splits: Optional[int] = None, rotary_cos: Optional[Tensor] = None,
                           rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False,
                           block_table: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                           max_seqlen_q: Optional[int] = None, sinks: Optional[Tensor] = None,
                           return_lse: bool = False, seqused_k: Optional[Tensor] = None,
                           k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None):
    """Attention of a few new tokens over a preallocated KV cache (incremental decoding).

    Sequence ``b`` holds ``n = cache_seqlens[b]`` tokens in slots ``0 .. n - 1`` of the caches
    (a ragged batch: lengths may differ). If ``k_new``/``v_new`` are given they are first
    written IN PLACE into slots ``n .. n + Lnew - 1`` of ``k_cache``/``v_cache``; then ``q``
    attends to the ``n + Lnew`` valid keys of its own sequence. Slots beyond are never read or
    written. ``cache_seqlens`` is NOT updated (as in FlashAttention's
    ``flash_attn_with_kvcache``): the caller adds ``Lnew`` for the next step
    (``fastattn.nn.KVCache`` / ``fastattn.nn.PagedKVCache`` do this bookkeeping).

    Args:
        q: (B, Hq, Lq, D), the new tokens' queries (1 for plain decoding, more for speculative
            decoding or chunked prefill). Any strides.
        k_cache: (B, Hkv, Lmax, D). v_cache: (B, Hkv, Lmax, Dv). Hq a multiple of Hkv (GQA:
            query head h reads kv head ``h // (Hq // Hkv)``). Any strides, e.g. a
            (B, Lmax, Hkv, D) buffer viewed with ``.transpose(1, 2)``. With ``block_table``
            they are pages instead: (num_pages, page_size, Hkv, D) / (num_pages, page_size,
            Hkv, Dv) (FlashAttention's and vLLM's layout), any page_size >= 1.
        cache_seqlens: int32 (or int64) (B,) tensor, or an int for every sequence: tokens
            already in the cache, before this call's ``k_new``. None when ``seqused_k`` is given.
        k_new / v_new: (B, Hkv, Lnew, D) / (B, Hkv, Lnew, Dv), or None.
        Head dims: D up to 576 and Dv up to 512 on the kernels (MLA's absorbed decode: 512
            latent + 64 rotary channels, values the 512 latent ones).
        Values as channels of the keys (MLA's single latent cache): ``v_cache`` may be a view
            ``k_cache[..., o:o + Dv]`` (same storage and strides, contiguous or paged), read
            in place, never copied. The append then writes each new key once and its channels
            o .. o + Dv - 1 are the new value: v_new must be None, and a rotary embedding
            must leave those channels alone (R <= o; MLA's rotary part comes after the latent,
            so rotate k_new before the call). Any other v_cache sharing k_cache's first
            element, a v_new, or a rotary table over the value channels raises ValueError.
        causal: bottom-right aligned, per sequence: new query i sees key j iff
            ``j <= i + (n + Lnew) - Lq``. With Lq == 1 it changes nothing.
        scale, window, alibi_slopes ((Hq,) or (B, Hq)), softcap: as ``flash_attention``,
            with positions measured per sequence (key j is cache slot j).
        num_splits: how many chunks each sequence's keys are cut into (split-KV "flash
            decoding"); None picks it from the shapes (batch, heads, Lmax; never from the
            values) to fill the GPU. Results do not depend on it beyond rounding.
        rotary_cos / rotary_sin: (P, R/2) float tables or None: rotary embedding (RoPE) of the
            first R dims of q and k_new, applied inside the kernels (the cache then holds
            rotated keys, as it must). New key t of sequence b is at position ``n + t``; query
            row i at ``n + Lnew - Lq + i`` (its bottom-right diagonal; ``n + i`` when
            Lq == Lnew). P must exceed the last position. ``rotary_interleaved``: rotate the
            pairs (2j, 2j+1) (GPT-J) instead of (j, j + R/2) (GPT-NeoX).
        block_table: int32 (B, P) or None. Row b lists sequence b's pages in order: its slot j
            is row ``j % page_size`` of page ``block_table[b, j // page_size]``, so Lmax is
            ``P * page_size``. Entries past a sequence's last used page are never read; page
            rows other than the new tokens' are never written.
        cu_seqlens_q: int32 (B+1,) or None: ragged new tokens (chunked prefill and decoding
            mixed in one batch). Sequence b brings ``cu[b+1] - cu[b]`` tokens, packed as
            FlashAttention's varlen functions and FlashInfer do: q is (total, Hq, D) and
            k_new / v_new (total, Hkv, D / Dv) with the same offsets (each sequence appends
            its own tokens' keys; with k_new None they are already in the cache); the output
            is (total, Hq, Dv) and lse (Hq, total). Causal stays bottom-right per sequence
            (its own Lq and Lnew). Equals one call per sequence.
        max_seqlen_q: with cu_seqlens_q, an upper bound on any sequence's token count (sizes
            the kernel grid without reading the offsets); None uses total.
        sinks: (Hq,) float logits or None: learnable attention sinks (gpt-oss's ``s_aux``).
            Sink h joins every softmax denominator of query head h as ``exp(sinks[h])`` and
            contributes no value; the lse includes it (a sequence with no key gives out 0 and
            lse ``sinks[h]``). Not scaled by ``scale``. Forward in the kernels; a call that
            needs its gradient runs the (differentiable) reference.
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.
        seqused_k: int32 (B,) instead of ``cache_seqlens`` when K/V are already written (FA3's
            name): sequence b attends to the first ``seqused_k[b]`` keys of its cache rows, as
            ``cache_seqlens=seqused_k`` without k_new / v_new.
        k_scale / v_scale: float32 scales of 8-bit caches (k_cache / v_cache both
            ``torch.float8_e4m3fn`` or both ``torch.int8``; q float16, bfloat16 or float32),
            else None. Cache entry x stands for ``x.float() * scale``. Either one element each
            (per tensor, fixed: the append stores new tokens as ``x / scale`` rounded to
            nearest even and saturated to +-448 / [-128, 127]) or the cache's shape without its
            last dim (per token and kv head: (B, Hkv, Lmax), paged (num_pages, page_size,
            Hkv); the append quantizes each new token by its own absmax, ``scale = absmax /
            448`` (e4m3) or ``/ 127`` (int8), and writes that scale in place). The attention
            reads the dequantized values rounded to q's dtype; its products run in q's dtype.
            See ``fastattn.ops.decode.reference.quantize_kv`` / ``dequantize_kv``.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, or ``(out, lse)``. A sequence with no key at all
        (n = 0 and no k_new) gives out 0 and lse -inf.

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices, options (the message names the
            argument), neither or both of ``cache_seqlens`` and ``seqused_k`` (or ``seqused_k``
            with k_new), ``cache_seqlens`` negative or above Lmax, ``n + Lnew > Lmax`` (the write
            would overflow the cache), a used block-table entry that is not a page, two new
            tokens mapped to one page row, or, under ``use_backend("triton")``, an input the
            kernels cannot take (e.g. one that requires grad: the kernels are forward-only).
            With 8-bit caches: a missing scale, a scale not float32 or of another shape, per
            tensor for one cache and per token for the other, a per-tensor scale not finite
            and > 0 (checked where cache_seqlens is), a q not float16/bfloat16/float32; a
            scale given with a 16/32-bit cache.
        The values of ``cache_seqlens`` (given as a tensor) / ``block_table`` are checked only
        where reading them costs no device sync: not on CUDA (a decode step never waits for
        the host there, so it can be captured in a CUDA graph) and not while ``torch.compile``
        traces. Unchecked, the kernels clamp every read and write to the buffers: a length to
        [0, Lmax], a page index to the pool, a rotary position to the table's rows.

    Equivalent code, per sequence b (n = cache_seqlens[b]; q, k_new rotated first if asked,
    see ``fastattn.ops.decode.reference.apply_rotary``; for pages read
    ``fastattn.ops.decode.reference.gather_pages(k_cache, block_table)`` for ``k_cache``)::

        k_cache[b, :, n:n + Lnew] = k_new[b]; v_cache[b, :, n:n + Lnew] = v_new[b]
        out[b] = flash_attention(q[b:b+1], k_cache[b:b+1, :, :n + Lnew],
                                 v_cache[b:b+1, :, :n + Lnew], causal=causal, ...)[0]
    """
    from fastattn.ops.decode import dispatch

    cache_seqlens = validation.decode_lengths("attention_with_kvcache", cache_seqlens, seqused_k, k_new)
    call = validation.check_decode("attention_with_kvcache", q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new,
                        causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                        num_splits=num_splits, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                        rotary_interleaved=rotary_interleaved, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
                        max_seqlen_q=max_seqlen_q, sinks=sinks, return_lse=return_lse, k_scale=k_scale,
                        v_scale=v_scale)
    return dispatch.run(call)


# ---------------------------------------------------------------------------------------
# Linear-complexity attention (fastattn/ops/linear)

def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    feature_map="elu",
    normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Linear attention (Katharopoulos et al. 2020): softmax(q k^T) replaced by phi(q).phi(k).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides; GQA/MQA as
            flash_attention (query head h uses kv head ``h // (Hq // Hkv)``).
        causal: query i sees keys j <= i; needs Lq == Lk.
        feature_map: "elu" (elu(x) + 1, the default), "relu", "identity", applied inside the
            kernels; or a callable x (..., L, D) -> (..., L, M), applied in torch first.
        normalize: divide by ``phi(q_i) . sum_j phi(k_j) + eps`` (the normaliser of the kernel
            attention). With "identity" or "relu" the normaliser can vanish; pass False for
            unnormalised (retention-style) linear attention.
        eps: added to the normaliser.

    Returns:
        (B, Hq, Lq, Dv) in q's dtype. The kernels accumulate in fp32 and cost O(L M Dv):
        non-causal via S = phi(K)^T V, causal in chunks with a running state.

    Raises:
        ValueError: bad ranks, shapes, dtypes, devices, feature_map or eps (naming the argument),
            causal with Lq != Lk, or, under ``use_backend("triton")``, an input the kernels
            cannot take (e.g. more than 256 features).

    Equivalent code::

        fq, fk = phi(q), phi(k).repeat_interleave(Hq // Hkv, 1)
        a = fq @ fk.transpose(-1, -2)            # tril() if causal
        out = (a @ v.repeat_interleave(Hq // Hkv, 1)) / (a.sum(-1, keepdim=True) + eps)
    """
    from fastattn.ops.linear import dispatch

    call = validation.check_linear_call("linear_attention", q, k, v, causal=causal, feature_map=feature_map,
                                        normalize=normalize, eps=eps)
    return dispatch.run("linear_attention", call)


def linear_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = False,
                            feature_map="elu", normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """``linear_attention`` over packed variable-length sequences (FlashAttention's varlen layout).

    Several sequences share one packed tensor with no padding; each attends only inside
    itself. Causal, the running state (S, z) starts empty at every sequence's first row, in
    the forward and the backward; non-causal, each sequence's queries see all of its own keys.

    Args:
        q: (total, Hq, D). k: (total, Hkv, D). v: (total, Hkv, Dv). Any strides; Hq a multiple
            of Hkv (GQA by index).
        cu_seqlens: int32 (S+1,) offsets, for queries and keys alike: sequence s holds rows
            ``cu_seqlens[s]:cu_seqlens[s+1]`` of q, k and v (Lq == Lk per sequence; a
            sequence may be empty). The kernels read them on the device (no host sync).
        causal, feature_map, normalize, eps: as ``linear_attention``, per sequence. A callable
            feature_map takes (total, H, D) and must return (total, H, M), row by row.

    Returns:
        (total, Hq, Dv) in q's dtype, contiguous.

    Raises:
        ValueError: as ``linear_attention``, plus offsets that are not int32 (S+1,), do not start
            at 0, decrease, or do not end at the packed total (checked on CPU tensors, outside
            torch.compile's tracing; on a GPU nothing is read on the host, and the kernels clamp
            the offsets instead), and under ``use_backend("triton")`` more than 65535
            sequences (CUDA's grid limit).

    Equivalent code, per sequence s (x_s = x[cu_seqlens[s]:cu_seqlens[s+1]].transpose(0, 1)[None])::

        out[cu_seqlens[s]:cu_seqlens[s+1]] = linear_attention(q_s, k_s, v_s, causal=causal, ...)[0].transpose(0, 1)
    """
    from fastattn.ops.linear import dispatch

    call = validation.check_linear_call("linear_attention_varlen", q, k, v, causal=causal, feature_map=feature_map,
                                        normalize=normalize, eps=eps, cu_seqlens=cu_seqlens)
    return dispatch.run("linear_attention_varlen", call)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool = False,
                        scale: Optional[float] = None, kernel: str = "softmax", eps: float = 1e-6) -> Tensor:
    """Performer attention (Choromanski et al. 2021): FAVOR+ random features of softmax.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). GQA as flash_attention.
        projection: (M, D) random directions from ``fastattn.performer_projection(M, D)``;
            redraw by calling that again. M <= 256 for the kernels.
        causal: query i sees keys j <= i; needs Lq == Lk.
        scale: softmax temperature approximated, ``softmax(scale * q k^T)``; default 1/sqrt(D).
        kernel: "softmax" (FAVOR+ positive features ``exp(W x - |x|^2/2 - stab)/sqrt(M)`` with
            x scaled by sqrt(scale); the key stabiliser is one constant per (batch, head) over
            the sequence and the query one per row, so both cancel) or "relu" (the generalized
            ReLU kernel ``relu(W x)/sqrt(M)``).
        eps: added to the normaliser of the unstabilised kernel; for "softmax" it is scaled by
            the stabilisers (``favor_eps``), so the result does not depend on them and, causal,
            no output depends on a later key.

    Returns:
        (B, Hq, Lq, Dv): an unbiased-kernel estimate of softmax attention whose error falls as
        M grows. The features are computed in torch (the key stabiliser needs a max over the
        whole sequence), then the linear-attention kernels run on them.

    Raises:
        ValueError: as linear_attention, plus a projection that is not (M, D) on q's device.

    Equivalent code::

        fq, sq = favor_features(q, W, is_query=True, return_stabiliser=True)
        fk, sk = favor_features(k, W, is_query=False, return_stabiliser=True)
        a = fq @ fk.transpose(-1, -2)            # tril() if causal
        out = (a @ v) / (a.sum(-1, keepdim=True) + favor_eps(eps, sq, sk))
    """
    from fastattn.ops.linear import dispatch

    call = validation.check_performer("performer_attention", q, k, v, projection, causal=causal, scale=scale,
                                      kernel=kernel, eps=eps)
    return dispatch.run_performer("performer_attention", call)


def performer_projection(
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random features W (num_features, head_dim) for ``performer_attention``.

    Rows are N(0, I) directions; ``orthogonal=True`` makes them exactly orthogonal in blocks of
    head_dim (each rescaled to a chi-distributed norm), which keeps FAVOR+ unbiased and lowers
    its variance. Call again to redraw; pass ``generator`` for repeatable draws (drawn on the
    generator's device in float64, then moved to ``device``/``dtype``).

    Equivalent code (i.i.d.): ``torch.randn(num_features, head_dim, generator=generator)``.
    """
    validation.check_projection_size("performer_projection", num_features, head_dim, dtype)
    from fastattn.ops.linear import reference as linear_ref

    return linear_ref.performer_projection(num_features, head_dim, orthogonal=orthogonal,
                                           generator=generator, device=device, dtype=dtype)


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e_proj: Tensor,
    f_proj: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tensor:
    """Linformer attention (Wang et al. 2020): keys and values projected along the sequence.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). GQA as flash_attention.
        e_proj, f_proj: (P, Lk) shared by all heads, or (Hkv, P, Lk) per kv head, in q's dtype
            and device; ``K' = E K`` and ``V' = F V`` have P rows. Sharing across layers or
            between E and F is the caller's (the module's) choice: pass the same tensor.
        scale: multiplies q K'^T; default 1/sqrt(D).
        causal: must be False. Linformer is non-causal by design: every projected row mixes
            all Lk positions, so no query could be kept from seeing future tokens.

    Returns:
        (B, Hq, Lq, Dv): exact attention of q over the P projected keys, through
        ``fastattn.flash_attention`` (kernels where they apply). Cost O(Lq P + Lk P).

    Raises:
        ValueError: causal=True; projections of the wrong shape, dtype or device; as
            flash_attention for q, k, v.

    Equivalent code::

        kp, vp = e_proj @ k, f_proj @ v          # (B, Hkv, P, D), (B, Hkv, P, Dv)
        out = torch.nn.functional.scaled_dot_product_attention(q, kp, vp, scale=scale, enable_gqa=True)
    """
    validation.check_linformer("linformer_attention", q, k, v, e_proj, f_proj, causal)
    from fastattn.ops.linear.reference import linformer_project

    return flash_attention(q, linformer_project(k, e_proj), linformer_project(v, f_proj), scale=scale)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, causal: bool = False,
                     scale: Optional[float] = None, return_lse: bool = False):
    """Block-sparse attention: only the (query block, key block) pairs kept by ``layout`` are
    computed; time and memory scale with the kept blocks, on the kernels and on the torch
    fallback alike.

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Any strides; Hq a multiple
            of Hkv (GQA/MQA: query head h uses kv head ``h // (Hq // Hkv)``).
        layout: a ``fastattn.sparse.BlockSparseLayout`` for ``seq_len == (Lq, Lk)`` with 1
            (shared) or Hq heads; build it with ``fastattn.sparse.local`` / ``strided`` /
            ``fixed`` / ``longformer`` / ``bigbird`` / ``dilated`` / ``from_dense``.
        causal: bottom-right aligned, as ``flash_attention``: query i sees key j iff
            ``j <= i + Lk - Lq``, applied token by token inside the kept blocks.
        scale: multiplies q @ k^T; default ``1 / sqrt(D)``.
        return_lse: also return the row logsumexp, float32 (B, Hq, Lq), natural log.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, or ``(out, lse)``. A query row that sees no key (an
        empty layout row, or causal) gives out 0 and lse -inf.

    Raises:
        ValueError: bad ranks, shapes, dtypes or devices (naming the argument), a layout that
            is not a BlockSparseLayout or does not fit (heads, seq_len), or, under
            ``use_backend("triton")``, an input the kernels cannot take.

    Equivalent code::

        mask = layout.to_element_mask()                      # (1 or Hq, Lq, Lk) bool
        s = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
        s = s.masked_fill(~mask | (causal & (j > i + Lk - Lq)), -inf)
        out = softmax(s, -1).nan_to_num(0) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    from fastattn.ops.sparse import dispatch

    call = validation.check_sparse("sparse_attention", q, k, v, layout, causal=causal, scale=scale,
                                   return_lse=return_lse)
    return dispatch.run("sparse_attention", call)

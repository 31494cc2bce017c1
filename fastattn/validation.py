"""Input validation shared by the public functions and fastattn.distributed.

Every check raises ``ValueError`` naming the argument and the shapes, never lets a bad input
reach a kernel (a Triton compile error) or a silent wrong answer.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


def shape_str(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def default_scale(head_dim: int, scale: Optional[float] = None) -> float:
    """The score scale: ``scale`` as a float when given, else ``1 / sqrt(head_dim)`` (with
    head_dim 0 every score is 0 whatever the scale, so 1)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def band_from(causal: bool, window: Optional[tuple]) -> tuple[Optional[int], Optional[int]]:
    """Combine ``causal`` and ``window=(left, right)`` into one band ``(left, right)``."""
    left, right = (None, None) if window is None else window
    if causal:  # causal is the band's right edge at the diagonal
        right = 0 if right is None else min(right, 0)
    return left, right


# Quantized KV caches: the dtypes attention_with_kvcache stores 8-bit keys and values in,
# and the largest magnitude each holds (the append maps a token's absmax onto it).
KV_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8)
KV_QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def check_tensors(op: str, q: Tensor, **others: Tensor) -> None:
    """q and ``others`` are 4-D tensors (batch, heads, seq, dim) of q's dtype and device, and
    q is floating point."""
    for name, t in (("q", q), *others.items()):
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {shape_str(t)}")
    for name, t in others.items():
        # 8-bit KV caches hold another dtype than q: ``check_kv_scales`` checks them.
        if t.dtype != q.dtype and not (name.endswith("_cache") and t.dtype in KV_CACHE_DTYPES):
            raise ValueError(f"{op}: {name}.dtype {t.dtype} differs from q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q must be floating point, got {q.dtype}")


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, *, names: tuple = ("k", "v"),
              seq: str = "seq") -> None:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with Hq a multiple of Hkv.
    ``names``/``seq`` name k, v and their sequence dim in messages (e.g. the caches' Lmax)."""
    kn, vn = names
    check_tensors(op, q, **{kn: k, vn: v})
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{op}: batch sizes differ: q {shape_str(q)}, {kn} {shape_str(k)}, {vn} {shape_str(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: {kn} {shape_str(k)} and {vn} {shape_str(v)} must agree in heads and {seq}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: head_dim of q {shape_str(q)} and {kn} {shape_str(k)} differ")
    hq, hkv = q.shape[1], k.shape[1]
    if (hkv == 0 and hq != 0) or (hkv and hq % hkv):
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}); "
            f"q {shape_str(q)}, {kn} {shape_str(k)}")


def check_bias(op: str, name: str, bias: Optional[Tensor], q: Tensor, k: Tensor) -> None:
    """bias: None, or bool / floating, broadcastable to (B, Hq, Lq, Lk), on q's device."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise ValueError(f"{op}: {name} must be a Tensor or None, got {type(bias).__name__}")
    if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be bool (True = attend) or floating point, got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"{op}: {name} is on {bias.device} but q is on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        if bias.dim() > 4 or torch.broadcast_shapes(bias.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{op}: {name} of shape {shape_str(bias)} does not broadcast to "
            f"(batch, heads, Lq, Lk) = {target}") from None


def check_options(op: str, q: Tensor, *, scale=None, window=None, alibi_slopes=None, softcap=None,
                  dropout_p=0.0) -> None:
    """The non-tensor options of the flash family (and ALiBi slopes (Hq,) or (B, Hq))."""
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(f"{op}: softcap must be a positive finite float or None, got {softcap!r}")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"{op}: window must be (left, right), got {window!r}")
        for side, w in zip(("left", "right"), window):
            if w is not None and not (isinstance(w, int) and w >= 0):
                raise ValueError(f"{op}: window {side} must be an int >= 0 or None, got {w!r}")
    check_alibi(op, alibi_slopes, q.shape[0], q.shape[1], q.device)


def check_alibi(op: str, alibi_slopes, batch: int, heads: int, device) -> None:
    """ALiBi slopes: None, or floating point (heads,) or (batch, heads) on ``device``."""
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, Tensor) or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        shape = shape_str(alibi_slopes) if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
        raise ValueError(f"{op}: alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {shape}")
    if alibi_slopes.device != device or not alibi_slopes.dtype.is_floating_point:
        raise ValueError(f"{op}: alibi_slopes must be floating point on {device}")


def check_sinks(op: str, sinks, heads: int, device) -> None:
    """Attention sinks: None, or floating point (heads,) logits on ``device``."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or tuple(sinks.shape) != (heads,):
        shape = shape_str(sinks) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ValueError(f"{op}: sinks must have shape ({heads},) (one logit per query head), got {shape}")
    if sinks.device != device or not sinks.dtype.is_floating_point:
        raise ValueError(f"{op}: sinks must be floating point on {device}, got {sinks.dtype} on {sinks.device}")


def check_eps(op: str, eps) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")


def check_linear(op: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    """Linear-attention inputs: as check_qkv, and causal needs Lq == Lk."""
    check_qkv(op, q, k, v)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{op}: causal linear attention needs Lq == Lk (query i sees keys j <= i), got "
            f"q {shape_str(q)}, k {shape_str(k)}; decode token by token with "
            "fastattn.ops.linear.reference.linear_attention_step")


class CacheLayout(NamedTuple):
    """The geometry of attention_with_kvcache's caches, from their shapes only.

    Contiguous caches are (batch, kv_heads, lmax, head_dim) / (.., head_dim_v); paged ones are
    pages (num_pages, page_size, kv_heads, head_dim) read through a block table (batch, P),
    so lmax = P * page_size. page_size is None for contiguous caches (num_pages 0)."""

    batch: int
    kv_heads: int
    lmax: int
    head_dim: int
    head_dim_v: int
    page_size: Optional[int] = None
    num_pages: int = 0

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @classmethod
    def of(cls, k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor] = None) -> "CacheLayout":
        """The layout of (already validated) caches and block table."""
        if block_table is None:
            b, hkv, lmax, d = k_cache.shape
            return cls(b, hkv, lmax, d, v_cache.shape[-1])
        n_pages, page, hkv, d = k_cache.shape
        return cls(block_table.shape[0], hkv, block_table.shape[1] * page, d, v_cache.shape[-1], page, n_pages)


def check_kvcache(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens,
                  k_new: Optional[Tensor], v_new: Optional[Tensor], num_splits,
                  block_table: Optional[Tensor] = None) -> Tensor:
    """attention_with_kvcache's tensors; returns cache_seqlens as a (B,) int32 or int64 tensor
    (an int, which must lie in [0, Lmax], becomes int32). A tensor's values are checked by the
    caller (``check_cache_lengths``), before any int32 cast.
    With ``block_table`` the caches are pages (see ``check_pages``)."""
    if block_table is None:
        check_qkv(op, q, k_cache, v_cache, names=("k_cache", "v_cache"), seq="Lmax")
        hkv = k_cache.shape[1]
    else:
        check_pages(op, q, k_cache, v_cache, block_table)
        hkv = k_cache.shape[2]
    b = q.shape[0]
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: give both k_new and v_new, or neither")
    if k_new is not None:
        # The new tokens are written in place: a broadcast (stride-0) dim would put one
        # sequence's token in another's slot, and one buffer as both caches would lose the keys.
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if 0 in cache.stride() and any(st == 0 and n > 1 for st, n in zip(cache.stride(), cache.shape)):
                raise ValueError(f"{op}: {name} {shape_str(cache)} has a broadcast (stride-0) dim, strides "
                                 f"{tuple(cache.stride())}; k_new/v_new are written into it in place, so it "
                                 "must own its memory (e.g. .contiguous())")
        if not torch.compiler.is_compiling() and k_cache.data_ptr() == v_cache.data_ptr() and k_cache.numel() \
                and value_channels(k_cache, v_cache) is None:
            raise ValueError(f"{op}: k_cache and v_cache are the same memory; k_new and v_new would "
                             "overwrite each other")
        for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{op}: {name} must be a 4-D Tensor (batch, kv_heads, Lnew, head_dim)")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{op}: {name} ({t.dtype}, {t.device}) must match q ({q.dtype}, {q.device})")
            if (t.shape[0], t.shape[1], t.shape[3]) != (b, hkv, cache.shape[3]):
                raise ValueError(f"{op}: {name} {shape_str(t)} must be ({b}, {hkv}, Lnew, {cache.shape[3]}) "
                                 f"to go into {'k' if cache is k_cache else 'v'}_cache {shape_str(cache)}")
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"{op}: k_new {shape_str(k_new)} and v_new {shape_str(v_new)} differ in Lnew")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lmax = CacheLayout.of(k_cache, v_cache, block_table).lmax
        if not 0 <= cache_seqlens <= lmax:  # a host int: checked on every device (and before any cast)
            raise ValueError(f"{op}: cache_seqlens must lie in [0, {lmax}] (Lmax of k_cache {shape_str(k_cache)}), "
                             f"got {cache_seqlens}")
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32 if cache_seqlens < 2**31 else torch.int64,
                                   device=q.device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cache_seqlens must be an int32/int64 Tensor of shape ({b},) or an int")
    if tuple(cache_seqlens.shape) != (b,) or cache_seqlens.device != q.device:
        raise ValueError(f"{op}: cache_seqlens must have shape ({b},) on {q.device}, got "
                         f"{shape_str(cache_seqlens)} on {cache_seqlens.device}")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"{op}: num_splits must be an int >= 1 or None, got {num_splits!r}")
    return cache_seqlens


def value_channels(k_cache, v_cache) -> Optional[int]:
    """The channel offset o where ``v_cache`` is ``k_cache[..., o:o + Dv]``, a view of some of
    K's channels (MLA's latent: V is the first 512 of the 576 cached channels), else None.
    Such a view shares K's storage, its shape but the last dim and its strides (those of dims
    longer than 1). Not read while torch.compile traces (storage identity is a runtime fact)."""
    if not (isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor)) or k_cache.dim() != v_cache.dim() \
            or k_cache.shape[:-1] != v_cache.shape[:-1] or torch.compiler.is_compiling() or not k_cache.numel():
        return None
    if k_cache.untyped_storage().data_ptr() != v_cache.untyped_storage().data_ptr():
        return None
    if any(n > 1 and sk != sv for n, sk, sv in zip(v_cache.shape, k_cache.stride(), v_cache.stride())):
        return None
    step, delta = k_cache.stride(-1), v_cache.storage_offset() - k_cache.storage_offset()
    if step <= 0 or delta % step:
        return None
    o = delta // step
    return o if 0 <= o and o + v_cache.shape[-1] <= k_cache.shape[-1] else None


def value_new_in_keys(op: str, k_new: Tensor, v_new, offset: int, dv: int, rotary_cos) -> Tensor:
    """v_new where the value cache is the key cache's channels offset .. offset + dv - 1
    (``value_channels``): k_new's own channels there, written once, with the keys. v_new must
    be None, and a rotary embedding must leave those channels alone (R <= offset), or the keys
    and values written would disagree."""
    if v_new is not None:
        got = shape_str(v_new) if isinstance(v_new, Tensor) else type(v_new).__name__
        raise ValueError(f"{op}: v_cache is k_cache[..., {offset}:{offset + dv}], the same memory (the values are "
                         f"channels of the keys), so v_new must be None: k_new's channels {offset}..{offset + dv - 1} "
                         f"are the new values; got v_new {got}")
    if isinstance(rotary_cos, Tensor) and rotary_cos.dim() == 2 and 2 * rotary_cos.shape[1] > offset:
        raise ValueError(f"{op}: v_cache is k_cache[..., {offset}:{offset + dv}] and rotary_cos "
                         f"{shape_str(rotary_cos)} rotates k_new's first {2 * rotary_cos.shape[1]} channels, "
                         "which would rotate the values too; rotate k_new before the call instead")
    return k_new[..., offset:offset + dv]


def check_pages(op: str, q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table) -> None:
    """Paged caches: q (B, Hq, Lq, D), k_pages (num_pages, page_size, Hkv, D), v_pages
    (num_pages, page_size, Hkv, Dv) of q's dtype and device, any page_size >= 1,
    Hq a multiple of Hkv; block_table an int32 (B, P) tensor on q's device, P >= 1. The table's
    values are checked by the caller (``check_paged_values``)."""
    check_tensors(op, q, k_cache=k_pages, v_cache=v_pages)
    if k_pages.shape[:3] != v_pages.shape[:3]:
        raise ValueError(f"{op}: paged k_cache {shape_str(k_pages)} and v_cache {shape_str(v_pages)} must agree in "
                         "(num_pages, page_size, kv_heads)")
    n_pages, page, hkv, d = k_pages.shape
    if page < 1:
        raise ValueError(f"{op}: page_size (dim 1 of k_cache {shape_str(k_pages)}) must be >= 1, got {page}")
    if n_pages < 1:
        raise ValueError(f"{op}: paged k_cache {shape_str(k_pages)} holds no page")
    if q.shape[-1] != d:
        raise ValueError(f"{op}: head_dim of q {shape_str(q)} and k_cache {shape_str(k_pages)} differ")
    hq = q.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}); "
                         f"q {shape_str(q)}, paged k_cache {shape_str(k_pages)}")
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        got = f"{block_table.dtype} {shape_str(block_table)}" if isinstance(block_table, Tensor) else \
            type(block_table).__name__
        raise ValueError(f"{op}: block_table must be an int32 Tensor (batch, max_pages_per_seq), got {got}")
    if block_table.shape[0] != q.shape[0] or block_table.shape[1] < 1 or block_table.device != q.device:
        raise ValueError(f"{op}: block_table {shape_str(block_table)} on {block_table.device} must be "
                         f"({q.shape[0]}, P >= 1) on {q.device}")


def check_paged_values(op: str, block_table: Tensor, num_pages: int, page_size: int, seqlens: Tensor,
                       lnew) -> None:
    """ValueError unless every page a sequence uses (its ``seqlens[b] + lnew`` slots; ``lnew``
    an int or a (B,) tensor) is in [0, num_pages), and no two new tokens are written to the same
    page row. Reads the table on the host: the caller calls it only where that costs no sync."""
    n = seqlens.long()
    used = (n + (lnew if isinstance(lnew, int) else lnew.long()) + page_size - 1) // page_size  # (B,) pages in use
    in_use = torch.arange(block_table.shape[1], device=block_table.device) < used[:, None]  # (B, P)
    lo, hi = (int(x) for x in torch.stack(block_table.where(in_use, 0).aminmax()).tolist())  # one host read
    if lo < 0 or hi >= num_pages:
        b, j = (int(x) for x in (in_use & ((block_table < 0) | (block_table >= num_pages))).nonzero()[0])
        raise ValueError(f"{op}: block_table[{b}, {j}] = {int(block_table[b, j])} is not a page index in "
                         f"[0, {num_pages}) (sequence {b} uses {int(used[b])} pages)")
    most = lnew if isinstance(lnew, int) else (int(lnew.max()) if lnew.numel() else 0)
    if most:
        t = torch.arange(most, device=seqlens.device)
        slots = n[:, None] + t  # (B, most)
        if not isinstance(lnew, int):  # ragged: only the slots really written
            writes = t < lnew[:, None]
            slots = slots[writes]
            seq = torch.arange(n.shape[0], device=n.device)[:, None].expand(writes.shape)[writes]
        else:
            slots, seq = slots.flatten(), torch.arange(n.shape[0], device=n.device).repeat_interleave(most)
        rows = block_table.long()[seq, slots // page_size] * page_size + slots % page_size  # one per new token
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"{op}: block_table {shape_str(block_table)} maps new tokens of two sequences to the "
                             "same page row; a page that is written must belong to one sequence")


def check_ragged_q(op: str, q: Tensor, k_new: Optional[Tensor], v_new: Optional[Tensor], cu_seqlens_q,
                   max_seqlen_q, values: bool) -> tuple:
    """Ragged new tokens for attention_with_kvcache: q (total, Hq, D), k_new / v_new (total, Hkv,
    D / Dv) or None, packed by the int32 (B+1,) offsets ``cu_seqlens_q`` (sequence b's tokens
    are rows cu[b] .. cu[b+1] - 1 of all three). ``values``: also read the offsets on the host
    (0 first, non-decreasing, total last, none longer than max_seqlen_q). Returns (B, Hq, total,
    D)-shaped views (q4, k_new4, v_new4) (stride 0 over the batch) for the 4-D checks."""
    if not isinstance(cu_seqlens_q, Tensor) or cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1 \
            or cu_seqlens_q.numel() < 1:
        got = f"{cu_seqlens_q.dtype} {shape_str(cu_seqlens_q)}" if isinstance(cu_seqlens_q, Tensor) else \
            type(cu_seqlens_q).__name__
        raise ValueError(f"{op}: cu_seqlens_q must be an int32 Tensor of shape (batch + 1,), got {got}")
    if max_seqlen_q is not None and not (isinstance(max_seqlen_q, int) and not isinstance(max_seqlen_q, bool)
                                         and max_seqlen_q >= 0):
        raise ValueError(f"{op}: max_seqlen_q must be an int >= 0 or None, got {max_seqlen_q!r}")
    views = []
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if t is None:
            views.append(None)
            continue
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = shape_str(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: with cu_seqlens_q, {name} must be packed, a 3-D Tensor (total, heads, "
                             f"head_dim), got {got}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: {name} {shape_str(t)} and q {shape_str(q)} must hold the same packed tokens "
                             "(cu_seqlens_q describes both)")
        # (total, H, D) -> (B, H, total, D), stride 0 over the batch: shapes for the 4-D checks.
        views.append(t.transpose(0, 1)[None].expand(cu_seqlens_q.numel() - 1, -1, -1, -1))
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"{op}: cu_seqlens_q is on {cu_seqlens_q.device} but q is on {q.device}")
    if values:
        lengths = cu_seqlens_q.diff()
        if int(cu_seqlens_q[0]) != 0 or int(cu_seqlens_q[-1]) != q.shape[0] or bool((lengths < 0).any()):
            got = cu_seqlens_q.tolist() if cu_seqlens_q.numel() <= 16 else shape_str(cu_seqlens_q)
            raise ValueError(f"{op}: cu_seqlens_q must start at 0, never decrease, and end at the packed total "
                             f"{q.shape[0]} (q {shape_str(q)}); got {got}")
        if max_seqlen_q is not None and lengths.numel() and int(lengths.max()) > max_seqlen_q:
            raise ValueError(f"{op}: max_seqlen_q={max_seqlen_q} is below the longest sequence, "
                             f"{int(lengths.max())}")
    return tuple(views)


def check_rotary(op: str, q: Tensor, rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor]) -> None:
    """rotary_cos / rotary_sin: both None, or the same (P, R/2) float shape, 2 <= R <= D."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{op}: give both rotary_cos and rotary_sin, or neither")
    if rotary_cos is None:
        return
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be a 2-D float Tensor (positions, rotary_dim / 2)")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if rotary_cos.shape != rotary_sin.shape or not 1 <= rotary_cos.shape[1] <= q.shape[-1] // 2:
        raise ValueError(f"{op}: rotary_cos {shape_str(rotary_cos)} and rotary_sin {shape_str(rotary_sin)} "
                         f"must have the same shape (P, R/2) with 2 <= R <= head_dim {q.shape[-1]}")


def check_varlen(op: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k) -> None:
    """Packed inputs q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) and int32
    (B+1,) offsets. The offsets' values (0 first, non-decreasing, the totals last) are checked
    only where reading them is free: on CPU tensors, outside torch.compile's tracing. On a GPU
    a packed call never syncs with the host (it can be captured in a CUDA graph); there the
    kernels clamp what they read to the packed tensors instead."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = shape_str(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 3-D Tensor (total, heads, head_dim), got {got}")
    # The packed tensors as (1, H, total, D) views: the 4-D checks name the same arguments.
    check_qkv(op, *(t.transpose(0, 1)[None] for t in (q, k, v)))
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{cu.dtype} {shape_str(cu)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"{op}: {name} must be an int32 Tensor of shape (batch + 1,), got {got}")
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q {shape_str(cu_seqlens_q)} and cu_seqlens_k "
                         f"{shape_str(cu_seqlens_k)} must describe the same number of sequences")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and not (isinstance(m, int) and not isinstance(m, bool) and m >= 0):
            raise ValueError(f"{op}: {name} must be an int >= 0 or None, got {m!r}")
    if torch.compiler.is_compiling() or q.device.type != "cpu":
        return
    for name, cu, total, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        lengths = cu.diff()
        first, last = int(cu[0]), int(cu[-1])
        if first != 0 or last != total or bool((lengths < 0).any()):
            raise ValueError(f"{op}: {name} must start at 0, never decrease, and end at the packed total "
                             f"{total}; got {cu.tolist() if cu.numel() <= 16 else shape_str(cu)}")
        if m is not None and lengths.numel() and int(lengths.max()) > m:
            raise ValueError(f"{op}: {name.replace('cu_seqlens', 'max_seqlen')}={m} is below the longest "
                             f"sequence, {int(lengths.max())}")


class DecodeCall(NamedTuple):
    """attention_with_kvcache's arguments, validated (see its docstring for their meaning).

    q, k_new, v_new stay as given: (B, Hq, Lq, D) / (B, Hkv, Lnew, D), or packed (total, H, D)
    with ``cu_seqlens_q``. seqlens: int32 contiguous (B,). ``band``: causal and window as one
    (left, right) band; ``scale`` resolved. rotary tables, block_table and cu_seqlens_q are
    contiguous, sinks as given. ``key_range``: (fewest, most) keys of any sequence after the append
    where the lengths were read on the host, else None. ``needs_grad``: some input requires grad."""

    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    seqlens: Tensor
    k_new: Optional[Tensor]
    v_new: Optional[Tensor]
    layout: CacheLayout
    scale: float
    band: tuple
    alibi_slopes: Optional[Tensor]
    softcap: Optional[float]
    num_splits: Optional[int]
    rotary_cos: Optional[Tensor]
    rotary_sin: Optional[Tensor]
    rotary_interleaved: bool
    block_table: Optional[Tensor]
    cu_seqlens_q: Optional[Tensor]
    max_seqlen_q: Optional[int]
    key_range: Optional[tuple]
    sinks: Optional[Tensor]
    return_lse: bool
    needs_grad: bool
    k_scale: Optional[Tensor] = None
    v_scale: Optional[Tensor] = None

    def rotary(self) -> dict:
        """The rotary options as keyword arguments (rotary_cos, rotary_sin, rotary_interleaved)."""
        return dict(rotary_cos=self.rotary_cos, rotary_sin=self.rotary_sin, rotary_interleaved=self.rotary_interleaved)


def values_readable(q: Tensor) -> bool:
    """Whether cache lengths, offsets and block tables may be read on the host: not while
    tracing, not on CUDA (it would stall every decode step and break CUDA-graph capture)."""
    return not torch.compiler.is_compiling() and q.device.type != "cuda"


def check_decode(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, *, k_new, v_new, causal,
                 scale, window, alibi_slopes, softcap, num_splits, rotary_cos, rotary_sin, rotary_interleaved,
                 block_table, cu_seqlens_q, max_seqlen_q, sinks, return_lse, k_scale=None,
                 v_scale=None) -> DecodeCall:
    """Every check of attention_with_kvcache (its docstring lists what raises); returns the
    validated call. The values of cache_seqlens, cu_seqlens_q and block_table are read only
    where ``values_readable``."""
    readable = values_readable(q)
    offset = value_channels(k_cache, v_cache)
    if offset is not None and isinstance(k_new, Tensor) and k_new.dim() and k_new.shape[-1] == k_cache.shape[-1]:
        v_new = value_new_in_keys(op, k_new, v_new, offset, v_cache.shape[-1], rotary_cos)
    q4, k_new4, v_new4 = q, k_new, v_new
    if cu_seqlens_q is not None:  # the 4-D checks see (B, H, total, D) views of the packed tensors
        q4, k_new4, v_new4 = check_ragged_q(op, q, k_new, v_new, cu_seqlens_q, max_seqlen_q, readable)
    seqlens = check_kvcache(op, q4, k_cache, v_cache, cache_seqlens, k_new4, v_new4, num_splits, block_table)
    check_options(op, q4, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap)
    check_sinks(op, sinks, q4.shape[1], q.device)
    check_rotary(op, q4, rotary_cos, rotary_sin)
    check_kv_scales(op, q, k_cache, v_cache, k_scale, v_scale, k_new is not None, readable)
    layout = CacheLayout.of(k_cache, v_cache, block_table)
    lq, lnew = q4.shape[2], (0 if k_new is None else k_new4.shape[2])
    if cu_seqlens_q is not None:  # per sequence: its own count of queries and of new keys
        lq = cu_seqlens_q.diff()
        lnew = lq if k_new is not None else 0
    key_range = None
    if readable and seqlens.numel():  # on the given dtype: int64 must not wrap
        key_range = check_cache_lengths(op, k_cache, layout.lmax, seqlens, lnew, lq, rotary_cos)
        if layout.paged:
            check_paged_values(op, block_table, layout.num_pages, layout.page_size, seqlens, lnew)
    grads = (q, k_cache, v_cache, k_new, v_new, alibi_slopes, rotary_cos, rotary_sin, sinks)
    contiguous = (lambda t: None if t is None else t.contiguous())  # noqa: E731
    return DecodeCall(
        q, k_cache, v_cache, seqlens.to(torch.int32).contiguous(), k_new, v_new, layout,
        default_scale(q.shape[-1], scale), band_from(causal, window), alibi_slopes, softcap,
        num_splits, contiguous(rotary_cos), contiguous(rotary_sin), rotary_interleaved, contiguous(block_table),
        contiguous(cu_seqlens_q), max_seqlen_q, key_range, sinks,
        return_lse, torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads), k_scale,
        v_scale)


def check_kv_scales(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale, v_scale, appends: bool,
                    readable: bool) -> None:
    """The scales of an 8-bit KV cache (k_cache / v_cache already checked but for dtype).

    An 8-bit cache (``KV_CACHE_DTYPES``, both caches of one dtype) needs a float16, bfloat16 or
    float32 q and both scales, float32 on q's device, both per tensor (one element each) or both
    per token and kv head (the cache's shape without its last dim: (B, Hkv, Lmax) contiguous,
    (num_pages, page_size, Hkv) paged; with ``appends`` no broadcast dim, they are written in
    place), and a v_cache of its own (not a view of k_cache's channels, as MLA's latent is).
    Any other cache takes no scale. Per-tensor values must be finite and > 0, checked
    where ``readable`` (per-token ones are written by the append and, like the cache, not read)."""
    quantized = k_cache.dtype in KV_CACHE_DTYPES or v_cache.dtype in KV_CACHE_DTYPES
    if not quantized:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{op}: {name} is given but k_cache is {k_cache.dtype}; scales go with an "
                                 f"8-bit cache ({', '.join(map(str, KV_CACHE_DTYPES))})")
        return
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{op}: k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share one 8-bit dtype")
    if value_channels(k_cache, v_cache) is not None:
        raise ValueError(f"{op}: v_cache is a view of the {k_cache.dtype} k_cache's channels (MLA's latent); "
                         "8-bit caches take separate key and value storage")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{op}: q must be float16, bfloat16 or float32 with an 8-bit cache "
                         f"({k_cache.dtype}), got {q.dtype}")
    kinds = []
    for name, s, cache in (("k_scale", k_scale, k_cache), ("v_scale", v_scale, v_cache)):
        per_token = tuple(cache.shape[:-1])
        if not isinstance(s, Tensor):
            raise ValueError(f"{op}: {name} must be a float32 Tensor of 1 element or of shape {per_token} with the "
                             f"{cache.dtype} cache {shape_str(cache)}, got {type(s).__name__}")
        if s.dtype != torch.float32 or s.device != q.device:
            raise ValueError(f"{op}: {name} must be float32 on {q.device}, got {s.dtype} on {s.device}")
        if s.numel() == 1 and s.dim() <= 1:
            kinds.append("per tensor")
            if readable and not (math.isfinite(v := float(s.reshape(()))) and v > 0):
                raise ValueError(f"{op}: {name} must be finite and > 0, got {v}")
        elif tuple(s.shape) == per_token:
            kinds.append("per token")
            if appends and any(st == 0 and n > 1 for st, n in zip(s.stride(), s.shape)):
                raise ValueError(f"{op}: {name} {shape_str(s)} has a broadcast (stride-0) dim, strides "
                                 f"{tuple(s.stride())}; the append writes the new tokens' scales into it")
        else:
            raise ValueError(f"{op}: {name} {shape_str(s)} must have 1 element (per tensor) or shape {per_token} "
                             f"(per token and kv head of {'k' if cache is k_cache else 'v'}_cache {shape_str(cache)})")
    if kinds[0] != kinds[1]:
        raise ValueError(f"{op}: k_scale is {kinds[0]} but v_scale {kinds[1]}; give both of one kind")


def check_cache_lengths(op: str, k_cache: Tensor, lmax: int, seqlens: Tensor, lnew, lq, rotary_cos) -> tuple:
    """ValueError unless every write fits the cache (and the rotary table); returns the
    (fewest, most) keys of any sequence after the append. ``lnew`` / ``lq``: ints, or (B,)
    tensors for ragged new tokens. Reads cache_seqlens on the host (one sync)."""
    if isinstance(lnew, int):  # one reduction (a few lengths: read as they are); the rest is host arithmetic
        vals = seqlens.tolist() if seqlens.numel() <= 64 else torch.stack(seqlens.aminmax()).tolist()
        lo, hi = min(vals), max(vals)
        least, end, first = lo + lnew, hi + lnew, lo + lnew - lq
    else:
        s = seqlens.long()
        ends = s + lnew  # (B,) keys per sequence after the append
        starts = ends - lq  # (B,) position of each sequence's first query
        lo, hi, least, end, first = torch.stack([s.min(), s.max(), ends.min(), ends.max(), starts.min()]).tolist()
    if lo < 0 or hi > lmax:
        raise ValueError(f"{op}: cache_seqlens must lie in [0, {lmax}] (Lmax of k_cache "
                         f"{shape_str(k_cache)}), got values in [{lo}, {hi}]")
    if end > lmax:
        raise ValueError(f"{op}: appending new tokens would overflow the cache: cache_seqlens + Lnew "
                         f"reaches {end} > Lmax = {lmax} (k_cache {shape_str(k_cache)})")
    if rotary_cos is not None:
        if first < 0:
            raise ValueError(f"{op}: with rotary, Lq may not exceed cache_seqlens + Lnew (a query "
                             f"would sit at position {first}): query positions would be negative")
        if end > rotary_cos.shape[0]:
            raise ValueError(f"{op}: rotary_cos {shape_str(rotary_cos)} covers {rotary_cos.shape[0]} "
                             f"positions; the longest sequence reaches position {end - 1}")
    return least, end


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FlashCall(NamedTuple):
    """flash_attention's (or flash_attention_varlen's) arguments, validated (see their docstrings).

    q, k, v as given: (B, Hq, Lq, D) / (B, Hkv, Lk, D / Dv), or packed (total, H, D) with
    ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 (B+1,), contiguous). ``band``: causal and window
    as one (left, right) band; ``scale`` resolved. ``attn_bias``: broadcastable to
    (B, Hq, Lq, Lk) or None (never packed). ``alibi_grad``: the slopes require grad."""

    q: Tensor
    k: Tensor
    v: Tensor
    band: tuple
    scale: float
    attn_bias: Optional[Tensor]
    alibi_slopes: Optional[Tensor]
    softcap: Optional[float]
    dropout_p: float
    sinks: Optional[Tensor]
    return_lse: bool
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    descale: Optional[Tensor] = None  # fp8 q, k, v: float32 (B, Hkv, 3), q's, k's and v's descales
    out_dtype: Optional[torch.dtype] = None  # a low-precision call's output dtype
    qk_quant: Optional[str] = None  # "int8": smoothed INT8 q.k

    @property
    def alibi_grad(self) -> bool:
        return _needs_grad(self.alibi_slopes)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_low_precision(op: str, q: Tensor, k: Tensor, v: Tensor, batch: int, *, descales: dict, out_dtype,
                        qk_quant, dropout_p) -> tuple[Optional[Tensor], Optional[torch.dtype], Optional[str]]:
    """The low-precision options of the flash family, on validated (B, H, L, D) views of q, k, v
    (``batch``: B, or the number of packed sequences). ``descales``: {"q_descale": ..,
    "k_descale": .., "v_descale": ..}, each None (1) or float32 (B, Hkv) on q's device, for fp8
    q, k, v only; their values (finite, > 0) are checked where reading them is free
    (``values_readable``). ``qk_quant``: None or "int8", for fp16/bf16 q, k, v. Both modes are
    forward-only (no dropout, no input that requires grad). Returns (descales stacked as float32
    (B, Hkv, 3) or None, the output dtype (default bf16 for fp8, q's for int8), qk_quant);
    (None, None, None) for a 16-bit call."""
    fp8 = q.dtype in FP8_DTYPES
    descales = {name: descales.get(name) for name in ("q_descale", "k_descale", "v_descale")}
    if qk_quant not in (None, "int8"):
        raise ValueError(f"{op}: qk_quant must be None or 'int8', got {qk_quant!r}")
    if qk_quant is not None and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: qk_quant='int8' needs float16 or bfloat16 q, k, v; got {q.dtype}")
    for name, d in descales.items():
        if d is not None and not fp8:
            raise ValueError(f"{op}: {name} is for float8 q, k, v ({FP8_DTYPES}); got q.dtype {q.dtype}")
    if not (fp8 or qk_quant):
        if out_dtype is not None:
            raise ValueError(f"{op}: out_dtype is for float8 q, k, v or qk_quant; the output is in q's dtype "
                             f"{q.dtype}")
        return None, None, None
    what = f"{q.dtype} q, k, v" if fp8 else "qk_quant='int8'"
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {OUT_DTYPES} or None, got {out_dtype!r}")
    if dropout_p:
        raise ValueError(f"{op}: dropout_p must be 0 with {what}: the low-precision forward is for inference")
    if _needs_grad(q, k, v):
        raise ValueError(f"{op}: {what} is forward-only (no backward): q, k, v must not require grad")
    if not fp8:
        return None, out_dtype or q.dtype, qk_quant
    shape = (batch, k.shape[1])
    ones = torch.ones(shape, device=q.device, dtype=torch.float32)
    for name, d in descales.items():
        if d is None:
            continue
        if not isinstance(d, Tensor) or d.dtype != torch.float32 or tuple(d.shape) != shape or d.device != q.device:
            got = f"{d.dtype} {shape_str(d)} on {d.device}" if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"{op}: {name} must be float32 of shape (batch, kv heads) = {shape} on {q.device}, "
                             f"got {got}")
        if values_readable(q) and not bool((torch.isfinite(d) & (d > 0)).all()):
            raise ValueError(f"{op}: {name} must be finite and > 0, got {d.tolist() if d.numel() <= 16 else d}")
    stacked = torch.stack([ones if d is None else d for d in descales.values()], dim=-1)
    return stacked, out_dtype or torch.bfloat16, None


def check_flash(op: str, q: Tensor, k: Tensor, v: Tensor, *, causal, scale, window, attn_bias, alibi_slopes,
                softcap, dropout_p, sinks, return_lse, descales=None, out_dtype=None, qk_quant=None) -> FlashCall:
    """Every check of flash_attention (its docstring lists what raises); returns the validated call."""
    check_qkv(op, q, k, v)
    check_bias(op, "attn_bias", attn_bias, q, k)
    check_options(op, q, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                  dropout_p=dropout_p)
    check_sinks(op, sinks, q.shape[1], q.device)
    lowp = check_low_precision(op, q, k, v, q.shape[0], descales=descales or {}, out_dtype=out_dtype,
                               qk_quant=qk_quant, dropout_p=dropout_p)
    return FlashCall(q, k, v, band_from(causal, window), default_scale(q.shape[-1], scale),
                     attn_bias, alibi_slopes, softcap, float(dropout_p), sinks, bool(return_lse), None, None, *lowp)


def check_flash_varlen(op: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, *, causal, scale, window, alibi_slopes, softcap, dropout_p, sinks,
                       return_lse, descales=None, out_dtype=None, qk_quant=None) -> FlashCall:
    """Every check of flash_attention_varlen (its docstring lists what raises); returns the
    validated call."""
    check_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_options(op, q.transpose(0, 1)[None], scale=scale, window=window, softcap=softcap, dropout_p=dropout_p)
    check_alibi(op, alibi_slopes, cu_seqlens_q.numel() - 1, q.shape[1], q.device)
    check_sinks(op, sinks, q.shape[1], q.device)
    lowp = check_low_precision(op, *(t.transpose(0, 1)[None] for t in (q, k, v)), cu_seqlens_q.numel() - 1,
                               descales=descales or {}, out_dtype=out_dtype, qk_quant=qk_quant, dropout_p=dropout_p)
    return FlashCall(q, k, v, band_from(causal, window), default_scale(q.shape[-1], scale),
                     None, alibi_slopes, softcap, float(dropout_p), sinks, bool(return_lse),
                     cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), *lowp)


class LinearCall(NamedTuple):
    """linear_attention's (or its varlen form's) arguments, validated. q, k are the inputs of the
    elementwise map ``feature`` ("identity" when the features were computed in torch); with
    ``cu_seqlens`` (int32 (S+1,)) q, k, v are packed, (total, H, .)."""

    q: Tensor
    k: Tensor
    v: Tensor
    feature: str
    causal: bool
    normalize: bool
    eps: float
    cu_seqlens: Optional[Tensor] = None


def check_features(op: str, q: Tensor, k: Tensor, feature_map) -> tuple:
    """(q, k, feature) for the kernels: a callable feature map runs here, in torch, and must keep
    every dim but the last, and the dtype; a named one ("elu", "relu", "identity") is applied by
    the op. Raises ValueError for any other feature_map or a callable's wrong output."""
    if callable(feature_map):
        fq, fk = feature_map(q), feature_map(k)
        for name, t, x in (("feature_map(q)", fq, q), ("feature_map(k)", fk, k)):
            if not isinstance(t, Tensor) or t.dim() != x.dim():
                raise ValueError(f"{op}: {name} must return a {x.dim()}-D Tensor")
            if t.dtype != x.dtype or t.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"{op}: {name} must keep its input's dtype {x.dtype} and all dims but the last "
                                 f"{tuple(x.shape[:-1])}, got {t.dtype} {shape_str(t)}")
        return fq, fk, "identity"
    if feature_map not in ("elu", "relu", "identity"):
        raise ValueError(f"{op}: feature_map must be 'elu', 'relu', 'identity' or a callable, got {feature_map!r}")
    return q, k, feature_map


def check_linear_call(op: str, q: Tensor, k: Tensor, v: Tensor, *, causal, feature_map, normalize, eps,
                      cu_seqlens=None) -> LinearCall:
    """Every check of linear_attention (with ``cu_seqlens``: linear_attention_varlen); returns the
    validated call, with a callable feature map already applied."""
    if cu_seqlens is None:
        check_qkv(op, q, k, v)
    else:
        check_varlen(op, q, k, v, cu_seqlens, cu_seqlens, None, None)
    check_eps(op, eps)
    q, k, feature = check_features(op, q, k, feature_map)
    if cu_seqlens is None:
        check_linear(op, q, k, v, causal)
    else:  # the features, as (1, H, total, .) views
        check_qkv(op, *(t.transpose(0, 1)[None] for t in (q, k, v)))
    return LinearCall(q, k, v, feature, bool(causal), bool(normalize), eps, cu_seqlens)


class PerformerCall(NamedTuple):
    """performer_attention's arguments, validated: ``scale`` resolved."""

    q: Tensor
    k: Tensor
    v: Tensor
    projection: Tensor
    causal: bool
    scale: float
    kernel: str
    eps: float


def check_performer(op: str, q: Tensor, k: Tensor, v: Tensor, projection, *, causal, scale, kernel,
                    eps) -> PerformerCall:
    """Every check of performer_attention (its docstring lists what raises); returns the validated call."""
    check_qkv(op, q, k, v)
    check_eps(op, eps)
    if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[1] != q.shape[-1] \
            or projection.shape[0] < 1:
        shape = shape_str(projection) if isinstance(projection, Tensor) else type(projection).__name__
        raise ValueError(f"{op}: projection must be (num_features >= 1, head_dim={q.shape[-1]}), got {shape}")
    if not projection.dtype.is_floating_point:
        raise ValueError(f"{op}: projection must be floating point, got {projection.dtype}")
    if projection.device != q.device:
        raise ValueError(f"{op}: projection is on {projection.device} but q is on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be a positive float or None, got {scale!r}")
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"{op}: kernel must be 'softmax' or 'relu', got {kernel!r}")
    check_linear(op, q, k, v, causal)
    return PerformerCall(q, k, v, projection, bool(causal),
                         default_scale(q.shape[-1], scale), kernel, eps)


def check_projection_size(op: str, num_features, head_dim, dtype) -> None:
    """performer_projection's sizes (ints >= 1) and dtype (floating point)."""
    for name, n in (("num_features", num_features), ("head_dim", head_dim)):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{op}: {name} must be an int >= 1, got {n!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{op}: dtype must be a floating-point torch.dtype, got {dtype!r}")


def check_linformer(op: str, q: Tensor, k: Tensor, v: Tensor, e_proj, f_proj, causal) -> None:
    """linformer_attention's inputs: non-causal, q/k/v as check_qkv, and projections (P, Lk) or
    (Hkv, P, Lk) in q's dtype and device, both with the same P."""
    if causal:
        raise ValueError(
            f"{op}: causal=True is not supported: Linformer is non-causal by design (each projected "
            "key/value row is a mix of all sequence positions, future ones included). Use "
            "flash_attention(causal=True) or linear_attention(causal=True) instead.")
    check_qkv(op, q, k, v)
    hkv, lk = k.shape[1], k.shape[2]
    for name, p in (("e_proj", e_proj), ("f_proj", f_proj)):
        if not isinstance(p, Tensor):
            raise ValueError(f"{op}: {name} must be a Tensor, got {type(p).__name__}")
        if not (p.dim() == 2 or (p.dim() == 3 and p.shape[0] == hkv)) or p.shape[-1] != lk or p.shape[-2] < 1:
            raise ValueError(f"{op}: {name} must be (P, Lk={lk}) or (Hkv={hkv}, P, Lk={lk}), got {shape_str(p)}")
        if p.dtype != q.dtype or p.device != q.device:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype} and device {q.device}, got "
                             f"{p.dtype} on {p.device}")
    if e_proj.shape[-2] != f_proj.shape[-2]:
        raise ValueError(f"{op}: e_proj {shape_str(e_proj)} and f_proj {shape_str(f_proj)} must project to the "
                         "same number of rows")


class SparseCall(NamedTuple):
    """sparse_attention's arguments, validated: ``scale`` resolved; layout fits q and k."""

    q: Tensor
    k: Tensor
    v: Tensor
    layout: object
    causal: bool
    scale: float
    return_lse: bool


def check_sparse(op: str, q: Tensor, k: Tensor, v: Tensor, layout, *, causal, scale, return_lse) -> SparseCall:
    """Every check of sparse_attention (its docstring lists what raises); returns the validated call."""
    from fastattn.sparse import BlockSparseLayout

    check_qkv(op, q, k, v)
    check_options(op, q, scale=scale)
    if not isinstance(layout, BlockSparseLayout):
        raise ValueError(f"{op}: layout must be a fastattn.sparse.BlockSparseLayout, got {type(layout).__name__}")
    layout.check_for(op, q, k)
    return SparseCall(q, k, v, layout, bool(causal), default_scale(q.shape[-1], scale),
                      bool(return_lse))


def decode_lengths(op: str, cache_seqlens, seqused_k, k_new) -> object:
    """attention_with_kvcache's lengths: ``cache_seqlens``, or ``seqused_k`` (keys already in
    the cache, so no k_new). ValueError for neither, both, or seqused_k with k_new."""
    if seqused_k is None:
        if cache_seqlens is None:
            raise ValueError(f"{op}: give cache_seqlens (tokens cached before k_new) or seqused_k (keys already "
                             "written)")
        return cache_seqlens
    if cache_seqlens is not None:
        raise ValueError(f"{op}: give cache_seqlens or seqused_k, not both")
    if k_new is not None:
        raise ValueError(f"{op}: seqused_k means the keys are already in the cache: k_new / v_new must be None "
                         "(append with cache_seqlens instead)")
    return seqused_k
